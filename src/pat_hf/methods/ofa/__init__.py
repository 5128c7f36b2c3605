"""OFA-KD: the method (:mod:`.method`) and its branch heads (:mod:`.heads`)."""

from .heads import (
    ConvBranchHead,
    PatchMerging,
    SepConv,
    TokenBranchHead,
    build_branch_head,
    is_convolutional_family,
    teacher_feature_dim,
)
from .method import OFADistillation

__all__ = [
    "ConvBranchHead",
    "OFADistillation",
    "PatchMerging",
    "SepConv",
    "TokenBranchHead",
    "build_branch_head",
    "is_convolutional_family",
    "teacher_feature_dim",
]
