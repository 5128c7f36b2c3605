"""A distillation method written outside pat_hf, in one file: cosine distillation of the penultimate embedding.

The student's penultimate embedding (its classifier's input) is projected to the teacher's width by a linear
head, and the student learns to point it the same way as the teacher's embedding of the same image:
``w_ce·CE(z_s, y) + w_kd·[(1 − cos(W·e_s, e_t)) + KL(p_t ‖ p_s; T)·T²]``. The projection trains with the student,
is saved in checkpoints and is never exported. docs/extending.md walks through this file.

Train with it through the example script, which imports the file before it checks the arguments:

    python examples/run_image_classification_pat.py --method_module examples/custom_method.py \\
        --distill_method cosine_embedding --output_dir outputs/cosine --do_train --do_eval
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pat_hf import register_method
from pat_hf.losses import kl_div_loss
from pat_hf.methods import DistillationMethod, Features, Shapes


@register_method
class CosineEmbeddingDistillation(DistillationMethod):
    """Cosine similarity between the projected student embedding and the teacher's, plus Hinton KD."""

    # 1. Who it is: the name --distill_method takes, and what it logs (loss_<part>).
    name = "cosine_embedding"
    description = "cosine distillation of the penultimate embedding, plus KD on the logits"
    default_temperature = 4.0
    loss_parts: ClassVar[dict[str, str]] = {
        "ce": "cross-entropy on the labels (labelled batches only)",
        "cosine": "1 - cosine similarity of the projected student embedding and the teacher's",
        "kd": "KL(p_t ‖ p_s) at temperature T, times T²",
    }
    # 2. What it reads from both models; the base class runs the passes and the taps.
    reads = ("logits", "embedding")

    # 3. Its heads, built from the shapes the probes measured (D_s, D_t).
    def build(self, args, shapes: Shapes) -> None:
        self.projection = nn.Linear(shapes.student.embedding, shapes.teacher.embedding)

    # 4. Its loss parts, unweighted; the base class adds the cross-entropy and the weights.
    def losses(self, student: Features, teacher: Features, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        projected = self.projection(student.embedding).float()
        cosine = 1 - F.cosine_similarity(projected, teacher.embedding.float(), dim=-1).mean()
        return {"cosine": cosine, "kd": kl_div_loss(student.logits, teacher.logits, self.temperature)}

    # 5. (Optional) their weights; a part left out weighs kd_weight.
    def loss_weights(self) -> dict[str, float]:
        return {"cosine": 2.0 * self.kd_weight, "kd": self.kd_weight}
