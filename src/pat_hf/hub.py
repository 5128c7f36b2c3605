"""Export of the distilled student: timm's Hub layout plus a model card generated from the run.

The export is a plain timm model (``config.json`` + ``model.safetensors`` + ``README.md``) that loads without
pat_hf through ``timm.create_model("hf-hub:..." or "local-dir:...", pretrained=True)``,
``AutoModelForImageClassification.from_pretrained`` (TimmWrapper) and ``pipeline("image-classification")``.
Heads, prompts, feedback buffers and the teacher never enter it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import HfHubHTTPError
from torch import nn

from .student import is_timm_model, is_transformers_model

__all__ = ["HubPushError", "ModelCardInfo", "explain_push_error", "export_student", "hub_files", "render_model_card"]

SAFE_WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

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


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None


def render_model_card(info: ModelCardInfo) -> str:
    """Renders README.md (YAML metadata + text) for an exported student."""
    method = info.method_settings.get("method", "none")
    teacher_name = (info.teacher or {}).get("name_or_path") or (info.teacher or {}).get("architecture")
    tags = ["image-classification", "pat_hf"]
    if info.library_name == "timm":
        tags.append("timm")
    if method != "none":
        tags += ["knowledge-distillation", method]
    meta: dict[str, Any] = {
        "library_name": info.library_name,
        "pipeline_tag": "image-classification",
        "tags": tags,
    }
    if _is_hub_id(teacher_name):
        meta["base_model"] = teacher_name
    if info.dataset and _is_hub_id(info.dataset):
        meta["datasets"] = [info.dataset]
    accuracy = {k: v for k, v in info.metrics.items() if re.search(r"accuracy|top\d", k)}
    if accuracy:
        meta["metrics"] = ["accuracy"]
        meta["model-index"] = [
            {
                "name": info.model_name,
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": info.dataset or "evaluation set", "type": info.dataset or "custom"},
                        "metrics": [
                            {"type": "accuracy", "name": k, "value": float(v)} for k, v in sorted(accuracy.items())
                        ],
                    }
                ],
            }
        ]
    import yaml

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {info.model_name}", ""]
    if method == "none":
        lines.append(
            f"A `{info.student_architecture}` image classifier trained with [pat_hf](https://pypi.org/project/pat-hf/) (cross-entropy, no teacher)."
        )
    else:
        lines.append(
            f"A `{info.student_architecture}` student distilled from the teacher `{teacher_name}` "
            f"({(info.teacher or {}).get('architecture', '')}) with **{method}**, using "
            "[pat_hf](https://pypi.org/project/pat-hf/). The export is a plain "
            f"{'timm' if info.library_name == 'timm' else 'transformers'} model: loading it does not need pat_hf."
        )
    lines += ["", "## Training", ""]
    if info.dataset:
        lines.append(f"- Data: `{info.dataset}`")
    if info.teacher:
        revision = f" at revision `{info.teacher['revision']}`" if info.teacher.get("revision") else ""
        lines.append(f"- Teacher: `{teacher_name}`{revision} (weights fingerprint `{info.teacher.get('fingerprint')}`)")
    lines.append(f"- Method: `{method}`")
    for key, value in info.method_settings.items():
        if key != "method":
            lines.append(f"  - {key}: {value}")
    for key, value in info.hyperparameters.items():
        lines.append(f"- {key}: {value}")
    if info.metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        for key, value in sorted(info.metrics.items()):
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if info.class_names:
        shown = ", ".join(info.class_names[:20]) + (" ..." if len(info.class_names) > 20 else "")
        lines += ["", f"Classes ({len(info.class_names)}): {shown}"]
    repo = info.repo_id or "ORG/NAME"
    lines += ["", "## How to use", ""]
    if info.library_name == "timm":
        lines += [
            "```python",
            "import timm, torch",
            "from PIL import Image",
            "",
            f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
            "config = timm.data.resolve_data_config({}, model=model)",
            "transform = timm.data.create_transform(**config)",
            'image = Image.open("image.png").convert("RGB")',
            "with torch.no_grad():",
            "    probabilities = model(transform(image).unsqueeze(0)).softmax(-1)",
            "```",
            "",
        ]
    lines += [
        "```python",
        "from transformers import AutoModelForImageClassification, pipeline",
        "",
        f'model = AutoModelForImageClassification.from_pretrained("{repo}")',
        f'classifier = pipeline("image-classification", model="{repo}")',
        'classifier("image.png")',
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
    ]
    # The method's own papers first (PAT builds on OFA-KD's aligners), then PAT, the paper pat_hf implements.
    citations = {"kd": [KD_CITATION], "ofa": [OFA_CITATION], "pat": [PAT_CITATION, OFA_CITATION]}.get(method, [])
    if PAT_CITATION not in citations:
        citations.append(PAT_CITATION)
    lines.append("\n\n".join(citations))
    lines += ["```", ""]
    return "\n".join(lines)


# What a Hub repo's root holds: the export and nothing else (no training_args.bin, logs, results or checkpoints).
TIMM_HUB_FILES = (CONFIG_NAME, SAFE_WEIGHTS_NAME, "README.md")
TRANSFORMERS_HUB_FILES = (
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "preprocessor_config.json",
    "README.md",
)


def hub_files(student: nn.Module) -> list[str]:
    """The files of an export (``upload_folder`` ``allow_patterns``): the student in its library's layout.

    Args:
        student: The exported student (unwrapped).

    Returns:
        File names and shard patterns, relative to the export folder.
    """
    return list(TIMM_HUB_FILES if is_timm_model(student) else TRANSFORMERS_HUB_FILES)


class HubPushError(HfHubHTTPError):
    """A push the Hub refused (rejected or missing token, no write access, no such repo), saying what to change.

    It keeps the Hub's response, so ``except HfHubHTTPError`` still catches it.
    """


def _token_source(token: str | bool | None) -> str:
    if isinstance(token, str):
        return "the token passed as hub_token (--hub_token)"
    if os.environ.get("HF_TOKEN"):
        return "the token in the HF_TOKEN environment variable"
    return "the token saved by `hf auth login`"


def explain_push_error(
    err: HfHubHTTPError, repo_id: str, token: str | bool | None, endpoint: str | None = None
) -> HfHubHTTPError:
    """Turns the Hub's 401/403/404 on a push into a :class:`HubPushError` that says what is wrong and how to fix it.

    Args:
        err: The error ``create_repo`` / ``upload_folder`` raised.
        repo_id: The repo being pushed to.
        token: The token given to the push (None: HF_TOKEN or the saved login).
        endpoint: The Hub's URL (default ``HF_ENDPOINT``).

    Returns:
        A :class:`HubPushError`, or ``err`` itself for other failures (server errors, network).
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.utils import get_token

    endpoint = endpoint or constants.ENDPOINT
    status = getattr(getattr(err, "response", None), "status_code", None)
    fix_token = (
        f"Create a token with write access at {endpoint}/settings/tokens and pass it as hub_token= "
        "(--hub_token), set HF_TOKEN, or run `hf auth login`."
    )
    has_token = isinstance(token, str) or (token is not False and get_token() is not None)
    server_message = (getattr(err, "server_message", None) or "").strip().rstrip(".")
    server = f" The Hub said: {server_message}." if server_message else ""
    if status == 401 and not has_token:
        message = f"Cannot push to the Hub repo {repo_id!r}: no Hugging Face token was found (HTTP 401). {fix_token}"
    elif status == 401 and not isinstance(err, RepositoryNotFoundError):
        message = (
            f"Cannot push to the Hub repo {repo_id!r}: the Hub rejected {_token_source(token)} as invalid or "
            f"expired (HTTP 401).{server} {fix_token}"
        )
    elif status == 403:
        namespace, _, name = repo_id.rpartition("/")
        try:
            user = HfApi(endpoint=endpoint).whoami(token=token if isinstance(token, str) else None)["name"]
        except Exception:  # only improves the hint; the push already failed for the reason given above
            user = None
        mine = f" (e.g. hub_model_id='{user}/{name}')" if user else ""
        message = (
            f"Cannot push to the Hub repo {repo_id!r}: {_token_source(token)} may not write there (HTTP 403)."
            f"{server} Push to your own namespace{mine} or to an organization where you have write access, or "
            f"use a token with write permission on {namespace or repo_id!r} (a fine-grained token needs "
            "'write' on that repo or organization)."
        )
    elif isinstance(err, RepositoryNotFoundError):
        message = (
            f"Cannot push to the Hub repo {repo_id!r}: it does not exist or {_token_source(token)} cannot see it "
            f"(HTTP {status}).{server} Check hub_model_id, and that the token belongs to an account with access."
        )
    else:
        return err
    return HubPushError(message, response=err.response, server_message=getattr(err, "server_message", None))


def export_student(
    student: nn.Module,
    output_dir: str | os.PathLike,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    class_names: list[str] | None = None,
    model_args: dict[str, Any] | None = None,
    card: ModelCardInfo | None = None,
    image_processor: Any = None,
) -> None:
    """Writes the student alone in its library's Hub layout.

    timm students: ``config.json`` (architecture, num_classes, num_features, label_names, model_args,
    pretrained_cfg with input_size / mean / std / interpolation / crop_pct), ``model.safetensors``. transformers
    students: ``save_pretrained`` plus their image processor. Both get ``README.md`` when ``card`` is given.

    Args:
        student: The trained student (unwrapped).
        output_dir: Destination folder (created).
        state_dict: The student's weights when they come from elsewhere (gathered under FSDP/DeepSpeed);
            default ``student.state_dict()``.
        class_names: Class names in output order (``label_names`` / ``id2label``).
        model_args: Extra ``timm.create_model`` arguments to record (older timm does not record them itself).
        card: Model-card content; no README.md when None.
        image_processor: The image processor of a transformers student.
    """
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    if state_dict is None:
        state_dict = student.state_dict()
    # safetensors refuses shared or non-contiguous storage; a fresh contiguous copy of each tensor is cheap.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if is_timm_model(student):
        from timm.models._hub import save_config_for_hf

        model_config: dict[str, Any] = {}
        if class_names:
            model_config["label_names"] = list(class_names)
        config_path = os.path.join(output_dir, CONFIG_NAME)
        # timm <= 1.0.29 calls config_path.open(): a Path works with every release.
        save_config_for_hf(student, Path(config_path), model_config=model_config, model_args=model_args)
        # transformers' TimmWrapper passes num_classes itself (from num_labels) and would get it twice; timm
        # reads it from the root of config.json anyway.
        config = read_json(config_path)
        if isinstance(config.get("model_args"), dict) and config["model_args"].pop("num_classes", None) is not None:
            if not config["model_args"]:
                del config["model_args"]
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    elif is_transformers_model(student):
        if class_names:
            student.config.id2label = dict(enumerate(class_names))
            student.config.label2id = {n: i for i, n in enumerate(class_names)}
        student.save_pretrained(output_dir, state_dict=tensors)
        if image_processor is not None and hasattr(image_processor, "save_pretrained"):
            image_processor.save_pretrained(output_dir)
    else:
        raise TypeError(
            f"Cannot export a {type(student).__name__}: the student must be a timm model or a transformers model."
        )
    if card is not None:
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(render_model_card(card))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
