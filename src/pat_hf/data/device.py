"""The device side of the input pipeline: each model's view of a uint8 batch (resize, normalisation, random
erasing with the boxes drawn on the CPU), one batched op per model."""

from __future__ import annotations

import numpy as np
import torch

from .augment import RE_MODES
from .views import ImageView, convert_view, make_view

__all__ = ["device_views", "erase_batch"]


def erase_batch(x: torch.Tensor, erase: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Applies drawn erasing boxes to a normalised batch, in place, on its device.

    Args:
        x: (B, C, H, W) float batch, normalised (the fill is normal noise in that normalisation, as timm's).
        erase: (B, re_count, 6) int64 boxes of :func:`draw_erasing` for this batch's size (a NumPy array, as
            collated, or a tensor).

    Returns:
        ``x``, erased. Each box's fill comes from a generator on ``x``'s device seeded with the box's seed, so it
        is the same in every run, whatever process or resume point made the batch.
    """
    # The boxes are read on the host: a NumPy array (what collate_images makes, so Trainer leaves it there) costs
    # no device sync; a tensor on the device would wait for the queued work.
    rows = erase.tolist() if isinstance(erase, np.ndarray) else erase.detach().to("cpu").tolist()
    channels = x.shape[1]
    for i, boxes in enumerate(rows):
        for top, left, h, w, mode, seed in boxes:
            if h <= 0 or w <= 0:
                continue
            region = x[i, :, top : top + h, left : left + w]
            if RE_MODES[mode] == "const":
                region.zero_()
                continue
            generator = torch.Generator(device=x.device).manual_seed(int(seed))
            shape = (channels, h, w) if RE_MODES[mode] == "pixel" else (channels, 1, 1)
            noise = torch.randn(shape, generator=generator, device=x.device, dtype=torch.float32)
            region.copy_(noise.to(x.dtype).expand_as(region))
    return x


def device_views(
    images: torch.Tensor,
    student_view: ImageView,
    teacher_view: ImageView | None = None,
    erase: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's and the teacher's views of one uint8 batch, made on its device (one batched op per model).

    Without erasing boxes each view is :func:`pat_hf.data.views.make_view` of the batch (resize where the
    sizes differ, antialiased when shrinking; the model's normalisation). With them, the batch is normalised for
    the student at its own size, erased there (:func:`erase_batch`), then converted to each view
    (:func:`pat_hf.data.views.convert_view`), so the box and its fill are the same in both views: what timm's
    transform followed by the former per-image conversion computed on the CPU.

    Args:
        images: (B, 3, H, W) uint8 images, at the larger of the two views' sizes (or any size: each view is a
            resize of the whole image).
        student_view: The student's view.
        teacher_view: The teacher's view; None: no teacher view is made.
        erase: (B, re_count, 6) boxes drawn by :func:`draw_erasing` (NumPy, as collated, or a tensor), or None.

    Returns:
        ``(student_pixels, teacher_pixels)``, float32; ``teacher_pixels`` None without ``teacher_view``.
    """
    if erase is not None and bool((erase[..., 2] > 0).any()):  # NumPy (collated): no device sync
        base = ImageView(size=tuple(images.shape[-2:]), mean=student_view.mean, std=student_view.std)
        x = erase_batch(make_view(images, base), erase)
        teacher = convert_view(x, base, teacher_view) if teacher_view is not None else None
        return convert_view(x, base, student_view), teacher
    teacher = make_view(images, teacher_view) if teacher_view is not None else None
    return make_view(images, student_view), teacher
