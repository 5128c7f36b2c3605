"""Mixup / CutMix with timm's ``Mixup``, the SAME mix for the student's and the teacher's batch.

timm draws the mixing parameters (λ per batch, pair or element; mixup or CutMix; the CutMix box) from numpy's
global RNG, as in its own training script; Trainer saves and restores that RNG in checkpoints, so a resumed run
draws the same mixes. :class:`PairedMixup` reuses timm's draws (``Mixup._params_per_batch`` /
``_params_per_elem``, ``cutmix_bbox_and_lam``) and its targets (``mixup_target``: one-hot, label smoothing, then
mixed), and applies one mix to every view of the batch:

- the partner of sample ``i`` is sample ``B - 1 - i`` (timm's flip), in every view;
- mixup blends every view with the same λ (blending commutes with each view's affine normalisation);
- CutMix draws its box on the student's view (timm's λ correction uses the student's box area, the area the
  student's targets describe) and pastes the same relative box, scaled to each view's size, in the others.

An odd batch (the last of an epoch without ``dataloader_drop_last``) mixes its first ``B - 1`` samples and leaves
the last one unmixed (λ = 1), instead of timm's assertion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["MIXUP_MODES", "MixInfo", "PairedMixup", "build_mixup"]

MIXUP_MODES = ("batch", "pair", "elem")

try:
    from timm.data.mixup import Mixup as _TimmMixup
    from timm.data.mixup import cutmix_bbox_and_lam, mixup_target
except ImportError:  # pragma: no cover - timm is a dependency
    _TimmMixup = object


@dataclass
class MixInfo:
    """What the last call mixed, in the student's pixels.

    Args:
        lam: Per-sample λ (B,): the share of the sample's own image and target.
        boxes: Per-sample CutMix box ``(y_low, y_high, x_low, x_high)`` on the student's view, or None (mixup
            or no mix).
        size: The student's (height, width).
    """

    lam: np.ndarray
    boxes: list[tuple[int, int, int, int] | None] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)


def _scaled_box(box: tuple[int, int, int, int], source: tuple[int, int], target: tuple[int, int]):
    if tuple(source) == tuple(target):
        return box
    sy, sx = target[0] / source[0], target[1] / source[1]
    yl, yh, xl, xh = box
    return round(yl * sy), round(yh * sy), round(xl * sx), round(xh * sx)


class PairedMixup(_TimmMixup):
    """timm's ``Mixup`` applied identically to the student's and the teacher's batch.

    Takes timm's ``Mixup`` arguments (``mixup_alpha``, ``cutmix_alpha``, ``cutmix_minmax``, ``prob``,
    ``switch_prob``, ``mode``, ``correct_lam``, ``label_smoothing``, ``num_classes``). Call it with the batch
    tensors; it returns new tensors (the inputs are not modified).

    Example:
        >>> mixup = PairedMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=100)
        >>> pixels, teacher_pixels, targets = mixup(pixels, teacher_pixels, labels)  # targets: (B, 100)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("_params_per_batch", "_params_per_elem"):
            if not hasattr(self, name):  # pragma: no cover - present in every timm since 0.4
                raise TypeError(f"timm's Mixup lacks {name}; upgrade timm.")
        self.last_mix: MixInfo | None = None

    def __call__(
        self,
        pixel_values: torch.Tensor,
        teacher_pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Mixes a batch.

        Args:
            pixel_values: Student inputs (B, C, H_s, W_s).
            teacher_pixel_values: Teacher inputs (B, C, H_t, W_t) of the same images, or None.
            labels: Class indices (B,), or None (unlabelled data: images only).

        Returns:
            ``(pixel_values, teacher_pixel_values, targets)``: the mixed views and the soft targets (B, K) (float32,
            label smoothing applied), None where the input was None.
        """
        views = [pixel_values] + ([teacher_pixel_values] if teacher_pixel_values is not None else [])
        size = tuple(pixel_values.shape[-2:])
        batch = pixel_values.shape[0]
        n = batch - batch % 2
        lam = np.ones(batch, dtype=np.float64)
        boxes: list[tuple[int, int, int, int] | None] = [None] * batch
        if n:
            if self.mode == "elem" or self.mode == "pair":
                mixed, lam[:n], boxes[:n] = self._mix_per_elem([v[:n] for v in views], size, pair=self.mode == "pair")
            else:
                mixed, lam[:n], boxes[:n] = self._mix_per_batch([v[:n] for v in views], size)
            views = [torch.cat([m, v[n:]]) if n < batch else m for m, v in zip(mixed, views)]
        self.last_mix = MixInfo(lam=lam, boxes=boxes, size=size)
        targets = None
        if labels is not None:
            lam_t = torch.as_tensor(lam, dtype=torch.float32, device=labels.device).unsqueeze(1)
            # timm's targets, built on the even part (its flip pairs i with n - 1 - i); the odd sample keeps its own.
            targets = mixup_target(labels[:n], self.num_classes, lam_t[:n], self.label_smoothing)
            if n < batch:
                own = mixup_target(labels[n:], self.num_classes, 1.0, self.label_smoothing)
                targets = torch.cat([targets, own])
        return views[0], (views[1] if len(views) > 1 else None), targets

    def _mix_per_batch(self, views: list[torch.Tensor], size: tuple[int, int]):
        n = views[0].shape[0]
        lam, use_cutmix = self._params_per_batch()
        if lam == 1.0:
            return views, np.ones(n), [None] * n
        if use_cutmix:
            box, lam = cutmix_bbox_and_lam(
                (n, 3, *size), lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam
            )
            box = tuple(int(b) for b in box)
            out = []
            for v in views:
                yl, yh, xl, xh = _scaled_box(box, size, tuple(v.shape[-2:]))
                v = v.clone()
                v[:, :, yl:yh, xl:xh] = v.flip(0)[:, :, yl:yh, xl:xh]
                out.append(v)
            return out, np.full(n, float(lam)), [box] * n
        lam = float(lam)
        return [v * lam + v.flip(0) * (1.0 - lam) for v in views], np.full(n, lam), [None] * n

    def _mix_per_elem(self, views: list[torch.Tensor], size: tuple[int, int], pair: bool):
        n = views[0].shape[0]
        count = n // 2 if pair else n
        lam_draw, use_cutmix = self._params_per_elem(count)
        lam = np.ones(n, dtype=np.float64)
        boxes: list[tuple[int, int, int, int] | None] = [None] * n
        originals = views
        views = [v.clone() for v in views]
        for i in range(count):
            j = n - i - 1
            if lam_draw[i] == 1.0:
                continue
            if use_cutmix[i]:
                box, lam_i = cutmix_bbox_and_lam(
                    (3, *size), lam_draw[i], ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam
                )
                box = tuple(int(b) for b in box)
                for v, orig in zip(views, originals):
                    yl, yh, xl, xh = _scaled_box(box, size, tuple(v.shape[-2:]))
                    v[i][:, yl:yh, xl:xh] = orig[j][:, yl:yh, xl:xh]
                    if pair:
                        v[j][:, yl:yh, xl:xh] = orig[i][:, yl:yh, xl:xh]
                boxes[i] = box
                if pair:
                    boxes[j] = box
            else:
                lam_i = float(lam_draw[i])
                for v, orig in zip(views, originals):
                    v[i] = orig[i] * lam_i + orig[j] * (1 - lam_i)
                    if pair:
                        v[j] = orig[j] * lam_i + orig[i] * (1 - lam_i)
            lam[i] = lam_i
            if pair:
                lam[j] = lam_i
        return views, lam, boxes


def build_mixup(args: Any, num_classes: int, label_smoothing: float) -> PairedMixup | None:
    """The run's :class:`PairedMixup` from :class:`~pat_hf.PATTrainingArguments`, or None when mixup and CutMix
    are off.

    Args:
        args: Training arguments (``mixup_alpha``, ``cutmix_alpha``, ``cutmix_minmax``, ``mixup_prob``,
            ``mixup_switch_prob``, ``mixup_mode``).
        num_classes: Number of classes of the soft targets.
        label_smoothing: The method's label smoothing, applied once, by timm, to the mixed targets.
    """
    if not (args.mixup_alpha > 0 or args.cutmix_alpha > 0 or args.cutmix_minmax):
        return None
    return PairedMixup(
        mixup_alpha=args.mixup_alpha,
        cutmix_alpha=args.cutmix_alpha,
        cutmix_minmax=list(args.cutmix_minmax) if args.cutmix_minmax else None,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
