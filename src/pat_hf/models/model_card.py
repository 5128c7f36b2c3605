"""The exported student's model card: huggingface_hub's ``ModelCard`` / ``ModelCardData`` and a Jinja template
(``templates/model_card.md``), filled from what the run knows (:class:`ModelCardInfo`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CITATIONS", "ModelCardInfo", "build_model_card", "render_model_card"]

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"

PAT_CITATION = """@inproceedings{lin2025pat,
  title     = {Perspective-Aware Teaching: Adapting Knowledge for Heterogeneous Distillation},
  author    = {Lin, Jhe-Hao and Yao, Yi and Hsu, Chan-Feng and Xie, Hongxia and Shuai, Hong-Han and Cheng, Wen-Huang},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2025}
}"""
OFA_CITATION = """@inproceedings{hao2023ofa,
  title     = {One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation},
  author    = {Hao, Zhiwei and Guo, Jianyuan and Han, Kai and Tang, Yehui and Hu, Han and Wang, Yunhe and Xu, Chang},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023}
}"""
KD_CITATION = """@article{hinton2015distilling,
  title   = {Distilling the Knowledge in a Neural Network},
  author  = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year    = {2015}
}"""
DKD_CITATION = """@inproceedings{zhao2022dkd,
  title     = {Decoupled Knowledge Distillation},
  author    = {Zhao, Borui and Cui, Quan and Song, Renjie and Qiu, Yiyu and Liang, Jiajun},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""
DIST_CITATION = """@inproceedings{huang2022dist,
  title     = {Knowledge Distillation from A Stronger Teacher},
  author    = {Huang, Tao and You, Shan and Wang, Fei and Qian, Chen and Xu, Chang},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2022}
}"""
FITNET_CITATION = """@inproceedings{romero2015fitnets,
  title     = {FitNets: Hints for Thin Deep Nets},
  author    = {Romero, Adriana and Ballas, Nicolas and Kahou, Samira Ebrahimi and Chassang, Antoine and Gatta, Carlo and Bengio, Yoshua},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2015}
}"""
RSD_CITATION = """@inproceedings{zhang2025rsd,
  title     = {Cross-Architecture Distillation Made Simple with Redundancy Suppression},
  author    = {Zhang, Weijia and Liu, Yuehao and Ran, Wu and Ma, Chao},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2025}
}"""
CITATIONS: dict[str, list[str]] = {
    "kd": [KD_CITATION],
    "dkd": [DKD_CITATION],
    "dist": [DIST_CITATION],
    # The heterogeneous connectors follow the OFA-KD benchmark's FitNet.
    "fitnet": [FITNET_CITATION, OFA_CITATION],
    "ofa": [OFA_CITATION],
    "pat": [PAT_CITATION, OFA_CITATION],
    "rsd": [RSD_CITATION],
}
"""The papers a method's card cites first (PAT builds on OFA-KD's aligners); PAT, the paper pat_hf implements,
is always cited. A registered method adds its entry here."""


@dataclass
class ModelCardInfo:
    """What the model card says about a run.

    Args:
        model_name: Name of the exported model.
        student_architecture: timm architecture (or transformers class) of the student.
        method_settings: The method's settings (``DistillationMethod.settings()``).
        teacher: Teacher description (``Teacher.describe()``), None without a teacher.
        dataset: Dataset name, if known.
        metrics: Final evaluation metrics (``eval_accuracy`` ...).
        class_names: The classes, in output order.
        hyperparameters: Training hyper-parameters worth recording.
        repo_id: Hub repository id, for the usage snippets.
        library_name: ``timm`` or ``transformers`` (the student's library).
        model_class: Dotted path of the class a timm student loads with when timm's registry cannot rebuild it.
        trained: Whether training changed the exported weights (False: no step ran, or none moved them; the card
            says so instead of calling the model distilled).
    """

    model_name: str
    student_architecture: str
    method_settings: dict[str, Any]
    teacher: dict[str, Any] | None = None
    dataset: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    class_names: list[str] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    repo_id: str | None = None
    library_name: str = "timm"
    model_class: str | None = None
    trained: bool = True


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None


def build_model_card(info: ModelCardInfo) -> Any:
    """The ``huggingface_hub.ModelCard`` of an exported student: metadata (library, pipeline tag, tags,
    ``base_model`` = the teacher's Hub id, ``datasets``, ``model-index`` from the accuracy metrics) and the text of
    ``templates/model_card.md``."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    method = info.method_settings.get("method", "none")
    teacher = info.teacher or {}
    teacher_name = teacher.get("name_or_path") or teacher.get("architecture")
    tags = ["image-classification", "pat_hf"]
    if info.library_name == "timm":
        tags.append("timm")
    if method != "none":
        tags += ["knowledge-distillation", method]
    dataset_id = info.dataset if info.dataset and _is_hub_id(info.dataset) else None
    accuracy = {k: float(v) for k, v in sorted(info.metrics.items()) if re.search(r"accuracy|top\d", k)}
    eval_results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=info.dataset or "custom",
            dataset_name=info.dataset or "evaluation set",
            metric_type="accuracy",
            metric_name=name,
            metric_value=value,
        )
        for name, value in accuracy.items()
    ]
    card_data = ModelCardData(
        library_name=info.library_name,
        pipeline_tag="image-classification",
        tags=tags,
        base_model=teacher_name if _is_hub_id(teacher_name) else None,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"] if accuracy else None,
        eval_results=eval_results or None,
        model_name=info.model_name,
    )
    # An in-memory teacher has no name: its class is named once, not as "`Class` (Class)".
    architecture = teacher.get("architecture")
    teacher_label = f"`{teacher_name}`" + (f" ({architecture})" if architecture and teacher.get("name_or_path") else "")
    citations = list(CITATIONS.get(method, []))
    if PAT_CITATION not in citations:
        citations.append(PAT_CITATION)
    metrics = [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in sorted(info.metrics.items())]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=info.model_name,
        method=method,
        student_architecture=info.student_architecture,
        teacher=info.teacher,
        teacher_name=teacher_name,
        teacher_label=teacher_label,
        library_name=info.library_name,
        dataset=info.dataset,
        method_settings=info.method_settings,
        hyperparameters=info.hyperparameters,
        metrics=metrics,
        class_names=info.class_names,
        repo=info.repo_id or "ORG/NAME",
        model_class=info.model_class,
        citations=citations,
        trained=info.trained,
    )


def render_model_card(info: ModelCardInfo) -> str:
    """README.md (YAML metadata + text) for an exported student."""
    return str(build_model_card(info))
