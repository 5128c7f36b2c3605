"""Checks of a run's parts against each other, before anything is built: what transformers or torch would only
refuse at the first step with a raw error (or not at all).

- the student is a classifier: a timm ``features_only`` model (``FeatureListNet`` ...) returns feature maps;
- the student and the teacher are two models: the same object, one inside the other, or sharing parameters
  would train the "frozen" teacher along with the student;
- the teacher takes RGB images (``config.num_channels == 3``): pat_hf feeds every model 3-channel images;
- a batch fits in the data when ``dataloader_drop_last`` drops incomplete batches (else no step at all).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import DatasetError, StudentLoadError, TeacherLoadError

__all__ = ["check_batch_fits", "check_student_is_classifier", "check_teacher_input", "check_two_models"]

_FEATURE_WRAPPERS = ("FeatureListNet", "FeatureDictNet", "FeatureHookNet", "FeatureGetterNet", "FeatureInfoNet")


def _unwrap(model: Any) -> Any:
    return getattr(model, "_orig_mod", model)  # torch.compile


def check_student_is_classifier(student: Any) -> None:
    """Refuses a timm ``features_only`` model as the student.

    Raises:
        StudentLoadError: Naming the model's class.
    """
    model = _unwrap(student)
    if not isinstance(model, nn.Module):
        return
    name = type(model).__name__
    features_only = name in _FEATURE_WRAPPERS or (
        hasattr(model, "feature_info") and not hasattr(model, "get_classifier") and not hasattr(model, "config")
    )
    if features_only:
        raise StudentLoadError(
            f"The student is a timm features_only model ({name}): it returns a list of feature maps, not class logits, "
            "so it cannot be trained as a classifier. Create it without features_only=True (e.g. "
            "pat_hf.create_student(name, num_classes=...)); pat_hf reads the features it distils through hooks."
        )


def check_two_models(student: Any, teacher: Any) -> None:
    """Refuses a student that is the teacher, contains it, is contained in it, or shares parameters with it.

    Args:
        student: The student module.
        teacher: The teacher's module (``Teacher.model``) or None.

    Raises:
        StudentLoadError: Saying which.
    """
    student, teacher = _unwrap(student), _unwrap(teacher)
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        return
    if student is teacher:
        raise StudentLoadError(
            f"The student and the teacher are the same object ({type(student).__name__}): the teacher is frozen, so "
            "nothing would train, and a model cannot learn from itself. Create a separate student (e.g. "
            "pat_hf.create_student(...), or copy.deepcopy(teacher) to distil into a copy)."
        )
    if any(m is teacher for m in student.modules()) or any(m is student for m in teacher.modules()):
        raise StudentLoadError(
            f"The student ({type(student).__name__}) and the teacher ({type(teacher).__name__}) are one inside the "
            "other: training the student would change the frozen teacher. Give the student its own copy "
            "(copy.deepcopy)."
        )
    # Same storage (tied or copied-by-reference weights); empty and meta tensors have no storage address.
    teacher_storage = {p.data_ptr() for p in teacher.parameters() if p.numel() and p.data_ptr()}
    shared = [n for n, p in student.named_parameters() if p.numel() and p.data_ptr() in teacher_storage]
    if shared:
        raise StudentLoadError(
            f"The student shares {len(shared)} parameters with the teacher (e.g. {shared[0]!r}): training the student "
            "would change the frozen teacher. Give the student its own copy (copy.deepcopy)."
        )


def check_teacher_input(teacher: Any) -> None:
    """Refuses a teacher built for other than 3-channel input (``config.num_channels``).

    Raises:
        TeacherLoadError: Naming the channel count.
    """
    model = _unwrap(teacher)
    config = getattr(model, "config", None)
    channels = getattr(config, "num_channels", None)
    if channels is None:
        timm_model = getattr(model, "timm_model", None)
        input_size = (getattr(timm_model, "pretrained_cfg", None) or {}).get("input_size")
        channels = input_size[0] if input_size else None
    if isinstance(channels, int) and channels != 3:
        raise TeacherLoadError(
            f"The teacher ({type(model).__name__}) is built for {channels}-channel input (config.num_channels="
            f"{channels}), but pat_hf feeds every model RGB images (3 channels; grey images are replicated). Use a "
            "teacher built for 3 channels (e.g. fine-tune one with num_channels=3 on the same data)."
        )


def check_batch_fits(
    dataset: Any, batch_size: int, drop_last: bool, world_size: int = 1, what: str = "training"
) -> None:
    """With ``dataloader_drop_last``, a dataset smaller than one batch (over all processes) gives no batch at all.

    Raises:
        DatasetError: Naming the sizes and the fixes.
    """
    if not drop_last or dataset is None:
        return
    try:
        size = len(dataset)
    except TypeError:  # streaming: no length
        return
    needed = batch_size * max(1, world_size)
    if 0 < size < needed:
        raise DatasetError(
            f"The {what} dataset has {size} rows, fewer than one batch ({batch_size} per device x {max(1, world_size)} "
            f"processes = {needed}), and dataloader_drop_last=True drops incomplete batches: no step would run. "
            f"Lower the batch size to at most {size // max(1, world_size) or 1}, or set dataloader_drop_last=False."
        )
