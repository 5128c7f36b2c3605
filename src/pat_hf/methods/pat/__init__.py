"""Perspective-Aware Teaching: the method (:mod:`.method`), the adaptive feedback prompts in the teacher
(:mod:`.prompts`), and the student-side region-aware attention and aligners (:mod:`.heads`)."""

from .heads import FeedbackAligner, RegionAwareAttention, StageAligner, region_grid, sinusoidal_positions
from .method import PerspectiveAwareTeaching
from .prompts import AdaptiveFeedbackPrompt

__all__ = [
    "AdaptiveFeedbackPrompt",
    "FeedbackAligner",
    "PerspectiveAwareTeaching",
    "RegionAwareAttention",
    "StageAligner",
    "region_grid",
    "sinusoidal_positions",
]
