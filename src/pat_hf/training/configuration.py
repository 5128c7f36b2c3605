"""``PATTrainingArguments``: transformers' TrainingArguments plus the distillation settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from ..methods import available_methods, get_method
from .recipe import RecipeArguments

__all__ = ["PATTrainingArguments"]


@dataclass
class PATTrainingArguments(RecipeArguments, TrainingArguments):
    """Training arguments for :class:`~pat_hf.PATDistillationTrainer`.

    Every field of ``transformers.TrainingArguments`` is available, plus the recipe fields of
    :class:`~pat_hf.training.recipe.RecipeArguments` (Mixup / CutMix, model EMA, timm schedules); the fields below configure
    distillation. ``None`` for ``temperature`` and ``label_smoothing`` means the method's default (``kd``, ``dkd``:
    T = 4, no smoothing; ``dist``, ``fitnet``: T = 1, no smoothing; ``ofa``, ``pat``: T = 1, smoothing 0.1).
    ``remove_unused_columns`` defaults to False because pat_hf
    datasets build ``pixel_values`` lazily with ``set_transform``.
    """

    distill_method: str = field(
        default="kd",
        metadata={"help": "Distillation method, one of the registered ones (none, kd, dkd, dist, fitnet, ofa, pat)."},
    )
    temperature: float | None = field(
        default=None,
        metadata={"help": "Softmax temperature T (> 0) of the KL terms, scaled by T². Default: the method's."},
    )
    ce_weight: float = field(default=1.0, metadata={"help": "Weight (>= 0) of the cross-entropy on the labels."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight (>= 0) of the logit distillation term."})
    label_smoothing: float | None = field(
        default=None,
        metadata={
            "help": "Label smoothing in [0, 1) of the cross-entropy term. Default: the method's. "
            "(transformers' label_smoothing_factor is used when this is not set.)"
        },
    )
    eval_teacher_losses: bool = field(
        default=True,
        metadata={
            "help": "Also compute the logit distillation loss against the teacher during evaluation (logged "
            "as eval_loss_kd). Metrics always come from the student alone."
        },
    )
    stop_on_nonfinite_loss: bool = field(
        default=True,
        metadata={
            "help": "Stop training with an error naming the loss component when a training loss is NaN or "
            "infinite, before that step's update (one device sync per step). Set False to let fp16's loss "
            "scaling skip such steps instead."
        },
    )
    divergence_factor: float = field(
        default=1000.0,
        metadata={
            "help": "Stop training (DivergedLossError) before a step's update when its loss exceeds this many times "
            "its early level (the mean loss of the first 20 steps, counted as at least 1). 0 turns it off. See "
            "docs/reliability.md."
        },
    )
    divergence_max_loss: float = field(
        default=1e6,
        metadata={"help": "Stop training before a step's update when its loss exceeds this value. 0 turns it off."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into an output_dir that holds files no pat_hf run wrote, or another run's export and "
            "checkpoints (they may be replaced). Never allows writing into the teacher's or student's own folder "
            "or the Hub cache. The example script then also starts over instead of resuming."
        },
    )
    hub_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Seconds a Hub push waits for a connection or for the Hub to answer before it fails with "
            "HubPushError (huggingface_hub's own client waits forever). The local export is kept."
        },
    )
    # ---- OFA-KD (distill_method="ofa") ----
    ofa_epsilon: list[float] = field(
        default_factory=lambda: [1.0],
        metadata={
            "help": "OFA exponent ε (>= 1): one value per distilled stage plus one for the final logits, or a "
            "single value for all (1.0 on CIFAR, 1.5 on ImageNet in the OFA paper)."
        },
    )
    ofa_weight: float = field(
        default=1.0,
        metadata={"help": "Weight (>= 0) of the branch-head OFA terms (0.1 for CNN students on CIFAR in the paper)."},
    )
    ofa_stages: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4],
        metadata={"help": "Student stages (1-4) that get an OFA branch head."},
    )
    # ---- PAT (distill_method="pat") ----
    pat_prompt_stages: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4],
        metadata={"help": "Teacher stages (1-4) whose inputs get an adaptive feedback prompt; empty for none."},
    )
    pat_num_queries: int = field(
        default=64, metadata={"help": "Region tokens of the region-aware attention (Nq; Nq/4 per stage, a square)."}
    )
    pat_dim: int = field(default=512, metadata={"help": "Width D of the region-aware attention."})
    pat_num_heads: int = field(default=8, metadata={"help": "Heads of the region-aware attention (divides D)."})
    pat_feature_weight: float = field(default=1.0, metadata={"help": "Weight (>= 0) of the HCL feature loss."})
    pat_reg_weight: float = field(
        default=1.0, metadata={"help": "Weight (>= 0) of the KL regulariser between prompted and plain teacher."}
    )
    pat_feedback: bool = field(
        default=True, metadata={"help": "Feed the previous step's student-teacher feature gap to the prompts."}
    )
    pat_spatial_prompt: bool = field(
        default=False,
        metadata={
            "help": "Use the spatial prompt variant (u * SE-gate) in the prompt branch. Default off: the published "
            "prompt is the SE gate alone, a per-channel offset. With feedback the fused input is still per-channel "
            "(see docs/methods.md)."
        },
    )
    pat_checkpoint_teacher: bool = field(
        default=False,
        metadata={
            "help": "In the prompted teacher pass, keep only the inputs of the teacher's blocks and recompute each "
            "block during the backward (forward hooks; same loss and gradients): PAT's peak memory drops to at most "
            "2x kd's on the benchmark pairs, for one more teacher forward per step. See docs/benchmarks.md."
        },
    )
    # ---- DKD (distill_method="dkd") ----
    dkd_alpha: float = field(
        default=1.0,
        metadata={"help": "DKD: weight α (>= 0) of the target-class term TCKD (1 in the DKD reference code)."},
    )
    dkd_beta: float = field(
        default=8.0,
        metadata={
            "help": "DKD: weight β (>= 0) of the non-target-class term NCKD (8 in the DKD reference code's CIFAR-100 "
            "settings; the OFA-KD benchmark code defaults to 2)."
        },
    )
    dkd_warmup_epochs: float = field(
        default=20.0,
        metadata={
            "help": "DKD: epochs (>= 0) over which the DKD term's weight rises linearly from 0 to 1, "
            "min(epoch / warmup, 1) (20 in the DKD reference code; 0: no warm-up, as the OFA-KD benchmark code)."
        },
    )
    # ---- DIST (distill_method="dist") ----
    dist_beta: float = field(
        default=1.0, metadata={"help": "DIST: weight β (>= 0) of the inter-class relation loss (1 in DIST's code)."}
    )
    dist_gamma: float = field(
        default=1.0, metadata={"help": "DIST: weight γ (>= 0) of the intra-class relation loss (1 in DIST's code)."}
    )
    # ---- FitNet (distill_method="fitnet") ----
    fitnet_stages: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4],
        metadata={
            "help": "FitNet: student stages (distinct, 1-4) whose features learn a teacher stage's feature through "
            "a connector (all 4 in the OFA-KD benchmark code)."
        },
    )
    fitnet_teacher_stages: list[int] = field(
        default_factory=list,
        metadata={
            "help": "FitNet: the teacher stage (1-4) each stage of fitnet_stages learns from, in the same order; "
            "empty (default): the same stage numbers."
        },
    )
    fitnet_weight: float = field(
        default=1.0,
        metadata={"help": "FitNet: weight (>= 0) of the hint (MSE) loss (1 in the OFA-KD benchmark code)."},
    )
    # ---- RSD (distill_method="rsd"; see docs/methods.md) ----
    rsd_weight: float = field(
        default=1.0,
        metadata={
            "help": "RSD: weight λ (>= 0) of the redundancy-suppression loss (normalised by D_t), times kd_weight."
        },
    )
    rsd_kappa: float | None = field(
        default=None,
        metadata={
            "help": "RSD: weight κ (>= 0) of the off-diagonal (decorrelation) terms; 0: correlation only. "
            "Default: 1 / D_t (Barlow Twins' scaling with the dimension)."
        },
    )
    rsd_expander_dim: int | None = field(
        default=None, metadata={"help": "RSD: width E (>= 1) of the AAD module's expander. Default: 4 * D_t."}
    )
    rsd_target: str = field(
        default="embedding",
        metadata={"help": "RSD: what it distils, 'embedding' (the penultimate embeddings) or 'logits'."},
    )
    rsd_kd_weight: float = field(
        default=0.0,
        metadata={"help": "RSD: weight (>= 0) of an added Hinton KD term at temperature T (0: off, as published)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Kept False: image datasets create pixel_values on the fly with set_transform."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.label_names is None:
            self.label_names = ["labels"]
        if self.distill_method not in available_methods():
            raise ValueError(
                f"distill_method={self.distill_method!r} is not a registered distillation method; "
                f"choose one of: {', '.join(available_methods())}."
            )
        if self.temperature is not None and not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be > 0 and finite (it divides the logits), got {self.temperature}.")
        for name in ("ce_weight", "kd_weight"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite (0 switches the term off), got {value}.")
        for name in ("divergence_factor", "divergence_max_loss"):
            value = getattr(self, name)
            if value is None or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite (0 turns the check off), got {value}.")
        if self.divergence_factor and self.divergence_factor <= 1:
            raise ValueError(
                f"divergence_factor must be > 1 (a loss above its early level times this stops the run) or 0 (off), "
                f"got {self.divergence_factor}."
            )
        if self.label_smoothing is None and self.label_smoothing_factor:
            self.label_smoothing = self.label_smoothing_factor
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        self.check_recipe()
        # The method checks its own settings (OFA's, PAT's, ...): this class knows no method's rules.
        get_method(self.distill_method).validate_args(self)
        self._check_loop_settings()
        self._check_something_trains()

    def _check_loop_settings(self) -> None:
        """Settings transformers accepts and fails on later with a raw error (a division by zero, an empty
        dataloader), or that train nothing: refused here, before anything is loaded."""
        if not str(self.output_dir or "").strip():
            raise ValueError("output_dir is empty: give the folder the run writes its checkpoints and export to.")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        for name in ("seed", "data_seed"):
            value = getattr(self, name, None)
            if value is not None and not 0 <= value < 2**32:
                raise ValueError(f"{name} must be in [0, 2**32 - 1] (numpy's seed range), got {value}.")
        if self.hub_timeout is None or not 0 < self.hub_timeout < math.inf:
            raise ValueError(f"hub_timeout must be > 0 seconds and finite, got {self.hub_timeout}.")
        if self.dataloader_num_workers < 0:
            raise ValueError(
                f"dataloader_num_workers must be >= 0 (0: load in the main process), got {self.dataloader_num_workers}."
            )
        for name in ("weight_decay", "max_grad_norm", "adam_epsilon"):
            value = getattr(self, name, None)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        for name in ("save", "eval"):
            strategy = str(getattr(getattr(self, f"{name}_strategy", None), "value", getattr(self, f"{name}_strategy")))
            steps = getattr(self, f"{name}_steps", None)
            if strategy == "steps" and steps is not None and not steps > 0:
                raise ValueError(f"{name}_strategy='steps' needs {name}_steps > 0, got {steps}.")
        epochs = self.num_train_epochs
        if epochs is None or not 0 <= epochs < math.inf:
            raise ValueError(f"num_train_epochs must be >= 0 and finite, got {epochs}.")
        if epochs == 0 and (self.max_steps is None or self.max_steps <= 0):
            raise ValueError(
                f"num_train_epochs=0 with max_steps={self.max_steps}: the run would train no step and export an "
                "untrained student. Set num_train_epochs > 0, or max_steps > 0 (which then decides the length)."
            )
        lr = self.learning_rate
        if lr is None or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"learning_rate must be > 0 and finite, got {lr}.")
        # transformers' schedules scale the base rate, so 0 stays 0; only a timm warm-up from warmup_lr > 0 trains.
        warms_up = bool(self.lr_schedule) and self.warmup_epochs > 0 and self.warmup_lr > 0
        if lr == 0 and not warms_up:
            raise ValueError(
                "learning_rate=0 with no schedule that raises it: the optimizer would leave every weight as it is and "
                "the run would export an untrained student. Set learning_rate > 0 (e.g. 1e-3 for AdamW)."
            )

    def _check_something_trains(self) -> None:
        """Every weight of the method's loss 0 (``ce_weight``, ``kd_weight`` and the method's own ``<method>_*weight``
        fields): the loss is the constant 0 and the student would not change."""
        method = get_method(self.distill_method)
        names = ["ce_weight"]
        if method.requires_teacher:
            names.append("kd_weight")
            prefix = f"{self.distill_method}_"
            names += [f.name for f in fields(self) if f.name.startswith(prefix) and f.name.endswith("weight")]
        values = {name: getattr(self, name) for name in names}
        if all(isinstance(v, (int, float)) and v == 0 for v in values.values()):
            shown = ", ".join(f"{k}={v}" for k, v in values.items())
            raise ValueError(
                f"Every loss weight of distill_method={self.distill_method!r} is 0 ({shown}): the loss would be 0 and "
                "the student would not train. Give at least one of them a positive weight."
            )
