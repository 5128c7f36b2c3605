"""Which teacher x student x method cases pat_hf trains: a coverage probe over tiny random models.

Builds tiny random teachers from the configs of transformers' image-classification types
(``MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES``) and tiny random timm students (the ``test_*`` models plus small
variants of other families), then for each teacher x student x method tries construction and 2 training steps
through :class:`pat_hf.PATDistillationTrainer` on a tiny in-memory dataset. Each case ends as one of:

- ``trained``: 2 steps ran, every loss part finite, the feature part (pat: hcl, fitnet: hint, ofa: ofa_s*) present
  and non-zero, the stage features read are distinct tensors, and (pat) the prompts change the teacher's logits
  once their scale is set to 1;
- ``silent``: it ran but one of those checks failed (the reason is printed);
- ``refused``: a ``ValueError`` / ``TypeError`` before training whose message names the model (clear refusal);
- ``crashed``: any other error, or an error during training.

Everything is offline (no Hub). Runs on CPU in a few minutes for a subset::

    python benchmarks/model_coverage.py --pairs cross --methods kd fitnet ofa pat
    python benchmarks/model_coverage.py --teachers 6 --students 6 --methods pat

``--pairs cross`` (default) pairs every teacher with the reference students and every student with the reference
teachers (what one distils from and into); ``--pairs full`` takes the whole product of the first N teachers and M
students. Models that cannot be built tiny here are listed with the reason and not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

TEACHER_SIZE = 32
STUDENT_SIZE = 64
MAX_PARAMS = 30_000_000
FEATURE_PARTS = {"pat": ("loss_hcl",), "fitnet": ("loss_hint",), "ofa": ("loss_ofa_s",)}

# transformers types that are not a plain image classifier on pixel_values (or cannot be built tiny offline).
HF_SKIP = {
    "imagegpt": "takes colour-cluster token ids, not pixels",
    "perceiver": "three classifier heads with their own preprocessors; not an image-classification backbone",
    "shieldgemma2": "a vision-language model (Gemma 3), not buildable tiny from its config here",
}

# A few per-type overrides the generic shrinking cannot guess (sizes, ratios that must divide).
HF_OVERRIDES: dict[str, dict[str, Any]] = {
    "bit": {"image_size": 64},
    "cvt": {"image_size": 64},
    "donut-swin": {"image_size": [64, 64]},
    "efficientnet": {"width_coefficient": 0.25, "depth_coefficient": 0.25, "hidden_dim": 320, "image_size": 32},
    "mobilenet_v1": {"depth_multiplier": 0.25, "min_depth": 4},
    "mobilenet_v2": {"depth_multiplier": 0.25, "min_depth": 4},
    "mobilevit": {"hidden_sizes": [16, 24, 32], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64], "patch_size": 2},
    "mobilevitv2": {"width_multiplier": 0.25, "patch_size": 2, "image_size": 64},
    "swin": {"image_size": 64},
    "regnet": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "groups_width": 8, "embedding_size": 8},
    "levit": {
        "hidden_sizes": [32, 48, 64],
        "num_attention_heads": [2, 2, 2],
        "depths": [1, 1, 1],
        "key_dim": [8, 8, 8],
    },
    "hiera": {"embed_dim": 16, "num_heads": [1, 1, 1, 1], "depths": [1, 1, 1, 1], "image_size": [224, 224]},
    "swiftformer": {"embed_dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]},
    "dinat": {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "kernel_size": 3},
    "segformer": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2]},
    "pvt": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2]},
    "pvt_v2": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2]},
    "poolformer": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]},
    "focalnet": {"embed_dim": 16, "depths": [1, 1, 1, 1]},
}
# Types whose sizes are tied together in ways the generic shrinking breaks: built at their default config.
HF_NO_SHRINK = {"bit", "cvt", "hgnet_v2", "textnet", "levit"}

# timm students: name -> kwargs of a small variant (timm.create_model / pat_hf.create_student).
TIMM_STUDENTS: dict[str, dict[str, Any]] = {
    "test_resnet": {},
    "test_convnext": {},
    "test_efficientnet": {},
    "test_vit": {"img_size": STUDENT_SIZE},
    "test_byobnet": {},
    "test_coatnet": {"img_size": STUDENT_SIZE},
    "test_maxvit": {"img_size": STUDENT_SIZE},
    "test_nfnet": {},
    "test_mambaout": {},
    "test_vit_relpos": {"img_size": STUDENT_SIZE},
    "resnet18": {"layers": [1, 1, 1, 1]},
    "mobilenetv2_050": {},
    "mobilenetv3_small_050": {},
    "deit_tiny_distilled_patch16_224": {
        "img_size": STUDENT_SIZE,
        "patch_size": 8,
        "depth": 4,
        "embed_dim": 32,
        "num_heads": 2,
    },
    "swin_tiny_patch4_window7_224": {
        "img_size": STUDENT_SIZE,
        "embed_dim": 16,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 1, 1),
        "window_size": 2,
    },
    "resmlp_12_224": {"img_size": STUDENT_SIZE},
    "fastvit_t8": {"layers": (1, 1, 1, 1)},
    "efficientvit_b0": {},
    "efficientvit_m0": {"img_size": STUDENT_SIZE},
    "repvit_m0_9": {},
    "mobilevitv2_050": {},
    "edgenext_xx_small": {},
    "levit_128s": {"img_size": STUDENT_SIZE},
    "tiny_vit_5m_224": {"img_size": STUDENT_SIZE},
    "ghostnet_050": {},
    "regnetx_002": {},
    "poolformer_s12": {},
    "cait_xxs24_224": {"img_size": STUDENT_SIZE, "depth": 4},
    "beit_base_patch16_224": {"img_size": STUDENT_SIZE, "depth": 4, "embed_dim": 32, "num_heads": 2},
    "eva02_tiny_patch14_224": {"img_size": STUDENT_SIZE, "patch_size": 8, "depth": 4},
    "twins_pcpvt_small": {"img_size": STUDENT_SIZE, "depths": (1, 1, 1, 1)},
    "hiera_tiny_224": {"img_size": STUDENT_SIZE, "embed_dim": 16, "stages": (1, 1, 1, 1)},
    "gcvit_xxtiny": {"img_size": STUDENT_SIZE},
    "swinv2_cr_tiny_224": {
        "img_size": STUDENT_SIZE,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 1, 1),
        "embed_dim": 16,
        "window_size": 2,
    },
    "pvt_v2_b0": {"img_size": STUDENT_SIZE},
    "pit_ti_224": {"img_size": STUDENT_SIZE},
    "mobilenetv4_conv_small": {},
    "hgnetv2_b0": {},
    "xcit_nano_12_p16_224": {"img_size": STUDENT_SIZE, "depth": 4},
    "davit_tiny": {"depths": (1, 1, 1, 1), "embed_dims": (16, 32, 64, 128), "num_heads": (1, 1, 2, 4)},
    "densenet121": {"block_config": (1, 1, 1, 1), "growth_rate": 8},
    "ese_vovnet19b_dw": {},
    "starnet_s1": {},
}

REFERENCE_TEACHERS = ("vit", "convnext")
REFERENCE_STUDENTS = ("test_resnet", "test_vit")


# ---- building -------------------------------------------------------------------------------------------------


def _shrink(config: Any, size: int) -> None:
    """Small sizes on a transformers config, in place (generic attribute names)."""
    ints = {
        "num_hidden_layers": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "embedding_size": 8,
        "embed_dim": 16,
        "projection_dim": 16,
        "num_register_tokens": 4,
        "window_size": 2,
    }
    for name, value in ints.items():
        current = getattr(config, name, None)
        if isinstance(current, int) and not isinstance(current, bool):
            setattr(config, name, value)
    if isinstance(getattr(config, "num_attention_heads", None), int):
        config.num_attention_heads = 2
    if hasattr(config, "image_size"):
        config.image_size = [size, size] if isinstance(config.image_size, (list, tuple)) else size
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int) and patch > 4:
        config.patch_size = 4
    for name in ("hidden_sizes", "embed_dims"):
        sizes = getattr(config, name, None)
        if isinstance(sizes, (list, tuple)) and sizes and all(isinstance(s, int) for s in sizes):
            setattr(config, name, [8 * 2**i for i in range(len(sizes))])
    for name in ("depths",):
        depths = getattr(config, name, None)
        if isinstance(depths, (list, tuple)) and depths:
            setattr(config, name, [1] * len(depths))
    heads = getattr(config, "num_heads", None)
    if isinstance(heads, (list, tuple)):
        config.num_heads = [1] * len(heads)
    if isinstance(getattr(config, "num_attention_heads", None), (list, tuple)):
        config.num_attention_heads = [1] * len(config.num_attention_heads)


def build_teacher(model_type: str, size: int = TEACHER_SIZE) -> torch.nn.Module:
    """A tiny random transformers classifier of ``model_type`` with 3 labels."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as names

    if model_type in HF_SKIP:
        raise NotImplementedError(HF_SKIP[model_type])
    class_name = names[model_type]
    class_name = class_name[0] if isinstance(class_name, tuple) else class_name
    if model_type == "timm_wrapper":
        config = transformers.TimmWrapperConfig(architecture="test_resnet", num_labels=3)
        return transformers.TimmWrapperForImageClassification(config)
    config = CONFIG_MAPPING[model_type]()
    if model_type not in HF_NO_SHRINK:
        for sub in ("vision_config", "backbone_config"):
            if getattr(config, sub, None) is not None:
                _shrink(getattr(config, sub), size)
        _shrink(config, size)
    for name, value in HF_OVERRIDES.get(model_type, {}).items():
        setattr(config, name, value)
    if getattr(config, "vision_config", None) is not None:
        config.vision_config.image_size = size
    elif model_type in HF_NO_SHRINK and "image_size" not in HF_OVERRIDES.get(model_type, {}):
        current = getattr(config, "image_size", None)
        config.image_size = [size, size] if isinstance(current, (list, tuple)) else size
    config.num_labels = 3
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config)
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMS:
        raise NotImplementedError(f"{count / 1e6:.1f}M parameters even shrunk")
    _calibrate_batch_norms(model, config)
    model.eval()
    if not _input_sensitive(model, config):
        raise NotImplementedError("its tiny random build gives the same logits for every input")
    return model


def _calibrate_batch_norms(model: torch.nn.Module, config: Any) -> None:
    """PyTorch's BatchNorm init and running statistics measured on random images, as a trained model has them. With
    the initial ones (mean 0,
    variance 1) the activations of a deep tiny random CNN vanish layer after layer in eval mode (EfficientNet,
    MobileViT), so its logits are the same for every input and nothing upstream can change them."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        # Some types draw BatchNorm weights like linear ones (std 0.02): PyTorch's init (1, 0) instead.
        norm.reset_parameters()
        norm.momentum = None  # a cumulative average over the calibration batches
    size = getattr(config, "image_size", None) or getattr(getattr(config, "vision_config", None), "image_size", 32)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    generator = torch.Generator().manual_seed(2)
    model.train()
    try:
        with torch.no_grad():
            for _ in range(2):
                model(pixel_values=torch.rand(4, 3, size, size, generator=generator))
    except Exception:  # a model that cannot run is reported by the cases themselves
        pass
    finally:
        for norm in norms:
            norm.momentum = 0.1
        model.eval()


def _logits(output: Any) -> torch.Tensor:
    """A classifier's logits: ``.logits``, else its first output (PP-LCNet names them ``last_hidden_state``)."""
    return output.logits if hasattr(output, "logits") else output[0]


def _input_sensitive(model: torch.nn.Module, config: Any) -> bool:
    size = getattr(config, "image_size", None) or getattr(getattr(config, "vision_config", None), "image_size", 32)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, size, size, generator=generator)
    try:
        with torch.no_grad():
            logits = _logits(model(pixel_values=pixels))
    except Exception:  # a model that cannot run is reported by the cases themselves
        return True
    return bool((logits[0] - logits[1]).abs().max() > 1e-6)


def build_student(name: str) -> torch.nn.Module:
    """A tiny random timm student with 3 classes."""
    from pat_hf import create_student

    kwargs = dict(TIMM_STUDENTS[name])
    img_size = kwargs.pop("img_size", None)
    torch.manual_seed(0)
    model = create_student(name, num_classes=3, img_size=img_size or STUDENT_SIZE, **kwargs)
    if img_size is None and hasattr(model, "set_input_size"):
        with contextlib.suppress(Exception):
            model.set_input_size(img_size=(STUDENT_SIZE, STUDENT_SIZE))
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMS:
        raise NotImplementedError(f"{count / 1e6:.1f}M parameters even shrunk")
    return model


# ---- one case -------------------------------------------------------------------------------------------------


def _distinct(features: list[torch.Tensor]) -> bool:
    for i in range(len(features)):
        for j in range(i + 1, len(features)):
            a, b = features[i], features[j]
            if a is b or (a.shape == b.shape and torch.equal(a, b)):
                return False
    return True


def _taps_distinct(taps: Any, model: torch.nn.Module, pixels: torch.Tensor) -> bool:
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), taps.capture() as features:
            model(pixels)
    finally:
        model.train(was)
    return len(features) > 0 and all(f is not None for f in features) and _distinct(list(features))


def run_case(teacher_proto: torch.nn.Module, student_proto: torch.nn.Module, method: str, tmp: str) -> tuple[str, str]:
    """(outcome, detail) of one teacher x student x method case."""
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import ViTImageProcessor

    from pat_hf import ImageView, PATDistillationTrainer, PATTrainingArguments, with_image_transforms

    teacher = copy.deepcopy(teacher_proto)
    student = copy.deepcopy(student_proto)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    dataset = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 0, 1, 2]}, features=features)
    view = ImageView.from_timm(student)
    teacher_size = getattr(getattr(teacher, "config", None), "image_size", None) or TEACHER_SIZE
    teacher_size = teacher_size[0] if isinstance(teacher_size, (list, tuple)) else teacher_size
    processor = ViTImageProcessor(size={"height": int(teacher_size), "width": int(teacher_size)})
    overrides: dict[str, Any] = {}
    if method == "pat":
        overrides = {"pat_dim": 32, "pat_num_heads": 4}
    try:
        args = PATTrainingArguments(
            output_dir=os.path.join(tmp, "out"),
            per_device_train_batch_size=3,
            max_steps=2,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
            distill_method=method,
            **overrides,
        )
        trainer = PATDistillationTrainer(
            model=student,
            teacher=teacher,
            args=args,
            train_dataset=with_image_transforms(dataset, view, None, train=True),
            teacher_image_processor=processor,
        )
    except (ValueError, TypeError, NotImplementedError) as error:
        message = str(error).splitlines()[0][:200]
        return "refused", f"{type(error).__name__}: {message}"
    except Exception as error:
        return "crashed", f"at construction: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    try:
        trainer.train()
    except Exception as error:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
        return "crashed", f"in training ({where}): {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    if len(logs) < 2:
        return "silent", f"{len(logs)} logged steps"
    for entry in logs:
        parts = {k: v for k, v in entry.items() if k.startswith("loss")}
        bad = [k for k, v in parts.items() if not math.isfinite(v)]
        if bad:
            return "silent", f"non-finite {bad}"
        wanted = FEATURE_PARTS.get(method, ())
        for prefix in wanted:
            values = [v for k, v in parts.items() if k.startswith(prefix)]
            if not values:
                return "silent", f"feature loss {prefix}* missing (parts: {sorted(parts)})"
            if any(v == 0 for v in values):
                return "silent", f"feature loss {prefix}* is zero"
    method_module = trainer.method
    pixels = torch.rand(2, 3, *view.size)
    teacher_pixels = torch.rand(2, 3, int(teacher_size), int(teacher_size))
    for side, attr, model, x in (
        ("student", "student_taps", trainer.student, pixels),
        ("student", "_taps", trainer.student, pixels),
        ("teacher", "teacher_taps", trainer.teacher.model, teacher_pixels),
    ):
        taps = getattr(method_module, attr, None)
        if taps is not None and not _taps_distinct(taps, model, x):
            return "silent", f"{side} stages not distinct"
    if method == "pat":
        with torch.no_grad():
            for prompt in method_module.prompts.values():
                prompt.beta.fill_(1.0)
            teacher_model = trainer.teacher.model
            plain = _logits(teacher_model(teacher_pixels))
            method_module.teacher_taps.set_input_transforms(method_module._prompt_transforms)
            try:
                prompted = _logits(teacher_model(teacher_pixels))
            finally:
                method_module.teacher_taps.set_input_transforms(None)
        if torch.equal(plain, prompted):
            return "silent", "prompts have no effect on the teacher's logits"
    return "trained", ""


# ---- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", type=int, default=None, help="first N transformers types (default: all)")
    parser.add_argument("--students", type=int, default=None, help="first M timm students (default: all)")
    parser.add_argument("--teacher-types", nargs="*", default=None, help="explicit transformers model types")
    parser.add_argument("--student-names", nargs="*", default=None, help="explicit timm student names")
    parser.add_argument("--methods", nargs="+", default=["kd", "fitnet", "ofa", "pat"])
    parser.add_argument("--pairs", choices=["cross", "full"], default="cross")
    parser.add_argument("--json", default=None, help="write every case's outcome to this file")
    parser.add_argument("--verbose", action="store_true", help="print every case")
    options = parser.parse_args(argv)

    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    import pat_hf

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(f"pat_hf from {os.path.dirname(pat_hf.__file__)}")

    teacher_types = options.teacher_types or sorted(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    teacher_types = teacher_types[: options.teachers]
    student_names = options.student_names or list(TIMM_STUDENTS)
    student_names = student_names[: options.students]

    teachers: dict[str, torch.nn.Module] = {}
    students: dict[str, torch.nn.Module] = {}
    skipped: dict[str, str] = {}
    wanted_teachers = set(teacher_types) | (set(REFERENCE_TEACHERS) if options.pairs == "cross" else set())
    wanted_students = set(student_names) | (set(REFERENCE_STUDENTS) if options.pairs == "cross" else set())
    for model_type in sorted(wanted_teachers):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                teachers[model_type] = build_teacher(model_type)
        except Exception as error:
            skipped[f"teacher {model_type}"] = f"{type(error).__name__}: {str(error).splitlines()[0][:150]}"
    for name in sorted(wanted_students, key=lambda n: list(TIMM_STUDENTS).index(n)):
        try:
            students[name] = build_student(name)
        except Exception as error:
            skipped[f"student {name}"] = f"{type(error).__name__}: {str(error).splitlines()[0][:150]}"

    pairs: list[tuple[str, str]] = []
    if options.pairs == "full":
        pairs = [(t, s) for t in teacher_types for s in student_names if t in teachers and s in students]
    else:
        for t in teacher_types:
            pairs += [(t, s) for s in REFERENCE_STUDENTS if t in teachers and s in students]
        for s in student_names:
            pairs += [(t, s) for t in REFERENCE_TEACHERS if t in teachers and s in students]
        pairs = list(dict.fromkeys(pairs))

    print(f"{len(teachers)} teachers, {len(students)} students built; {len(pairs)} pairs x {options.methods}")
    for what, why in skipped.items():
        print(f"  not built: {what}: {why}")

    import tempfile

    counts: dict[str, Counter] = defaultdict(Counter)
    records = []
    failures = defaultdict(list)
    start = time.time()
    for teacher_type, student_name in pairs:
        for method in options.methods:
            with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
                try:
                    outcome, detail = run_case(teachers[teacher_type], students[student_name], method, tmp)
                except Exception as error:
                    outcome, detail = "crashed", f"probe: {type(error).__name__}: {error}"
            counts[method][outcome] += 1
            records.append(
                {
                    "teacher": teacher_type,
                    "student": student_name,
                    "method": method,
                    "outcome": outcome,
                    "detail": detail,
                }
            )
            if outcome != "trained":
                failures[method].append(f"{teacher_type} -> {student_name}: {outcome}: {detail}")
            if options.verbose:
                print(f"{method:7s} {teacher_type:24s} {student_name:34s} {outcome:8s} {detail}", flush=True)

    print(f"\n{len(records)} cases in {time.time() - start:.0f} s")
    print(f"{'method':8s} {'trained':>8s} {'refused':>8s} {'crashed':>8s} {'silent':>8s} {'total':>6s}")
    for method in options.methods:
        c = counts[method]
        print(
            f"{method:8s} {c['trained']:8d} {c['refused']:8d} {c['crashed']:8d} {c['silent']:8d} {sum(c.values()):6d}"
        )
    for method in options.methods:
        if failures[method]:
            print(f"\n{method}: not trained")
            for line in failures[method]:
                print(f"  {line}")
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({"skipped": skipped, "cases": records}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
