"""The declarative method API of methods/base.py: reads, build(shapes), losses(), loss_weights(), gather().

The methods here are built directly and never registered (the registry, and the docs' table generated from it,
stay as they are); the example of docs/extending.md is trained through the script in test_example_script.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_hf import create_student
from pat_hf.methods import DistillationBatch, DistillationMethod, Features, Shapes
from pat_hf.models.teacher import load_teacher
from support.tiny import tiny_args, tiny_teacher


class ReadsEverything(DistillationMethod):
    name = "reads_everything"
    reads = ("logits", "embedding", "stages")

    def build(self, args, shapes: Shapes) -> None:
        self.shapes = shapes
        self.head = nn.Linear(shapes.student.embedding, shapes.teacher.embedding)
        self.seen: list[tuple[Features, Features]] = []

    def losses(self, student, teacher, labels):
        self.seen.append((student, teacher))
        return {
            "embed": (self.head(student.embedding) - teacher.embedding).square().mean(),
            "stage4": student.stages[3].float().mean() * 0 + 1.0,
        }

    def loss_weights(self):
        return {"embed": 0.5}  # stage4 weighs kd_weight


@pytest.fixture
def built(tmp_path):
    torch.manual_seed(0)
    student = create_student("test_resnet", num_classes=3, img_size=20)
    teacher = load_teacher(tiny_teacher("convnext"))
    method = ReadsEverything(tiny_args(tmp_path, distill_method="kd", kd_weight=3.0), student, teacher)
    return method, student, teacher


def test_build_gets_the_measured_shapes(built):
    method, student, teacher = built
    shapes = method.shapes
    assert shapes.student.num_classes == 3 and shapes.teacher.num_classes == 3
    assert shapes.student.embedding == student.num_features == 96
    assert shapes.teacher.embedding == teacher.model.config.hidden_sizes[-1]
    assert len(shapes.student.stages) == len(shapes.teacher.stages) == 4
    assert shapes.teacher.stages[3].channels == teacher.model.config.hidden_sizes[-1]
    assert isinstance(method.head, nn.Linear) and "head.weight" in method.state_dict()


def test_the_step_runs_the_passes_and_weights_the_parts(built):
    method, student, teacher = built
    labels = torch.tensor([0, 1, 2, 0])
    batch = DistillationBatch(torch.randn(4, 3, 20, 20), labels, torch.randn(4, 3, *teacher.view.size))
    out = method(student, teacher, batch)
    ((s, t),) = method.seen
    assert s.logits.shape == t.logits.shape == (4, 3)
    assert s.embedding.shape == (4, 96) and t.embedding.shape == (4, method.shapes.teacher.embedding)
    assert [f.shape[0] for f in s.stages] == [4] * 4 and [f.shape[0] for f in t.stages] == [4] * 4
    assert s.embedding.requires_grad and not t.embedding.requires_grad and not t.logits.requires_grad
    assert set(out.parts) == {"ce", "embed", "stage4"}
    expected = out.parts["ce"] + 0.5 * out.parts["embed"] + 3.0 * out.parts["stage4"]
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.parts["ce"], torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert method.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_unknown_reads_and_missing_losses_are_explained(tmp_path):
    student = create_student("test_resnet", num_classes=3, img_size=20)
    teacher = load_teacher(tiny_teacher("vit"))

    class Typo(DistillationMethod):
        name = "typo"
        reads = ("logits", "embeddings")

    with pytest.raises(ValueError, match=r"unknown \['embeddings'\]"):
        Typo(tiny_args(tmp_path, distill_method="kd"), student, teacher)

    class NoLosses(DistillationMethod):
        name = "no_losses"
        reads = ("logits",)

    method = NoLosses(tiny_args(tmp_path, distill_method="kd"), student, teacher)
    batch = DistillationBatch(torch.randn(2, 3, 20, 20), None, torch.randn(2, 3, 16, 16))
    with pytest.raises(NotImplementedError, match="implements no `losses`"):
        method(student, teacher, batch)
