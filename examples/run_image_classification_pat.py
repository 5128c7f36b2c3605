#!/usr/bin/env python
"""Distil a transformers image classifier into a timm student with PAT, OFA-KD or KD.

Shaped like transformers' examples/pytorch/image-classification/run_image_classification.py: model, data and
training arguments through HfArgumentParser (a single .json / .yaml argument is read as a config file),
`datasets` for the data, Trainer for the loop. The paper's recipes (examples/configs/*.yaml) set timm's augmentation
(data arguments: auto_augment, color_jitter, re_prob, ...), Mixup / CutMix, model EMA and timm schedules (training
arguments: mixup_alpha, model_ema, lr_schedule, ...).

    # the built-in default: Fashion-MNIST, the demo's transformers ResNet teacher, a small timm ResNet student
    accelerate launch examples/run_image_classification_pat.py

    # your own pair and data
    accelerate launch --multi_gpu --num_processes 8 examples/run_image_classification_pat.py \
        --teacher_name_or_path facebook/convnext-tiny-224 --student_name deit_tiny_patch16_224 \
        --dataset_name uoft-cs/cifar100 --label_column_name fine_label --distill_method kd \
        --output_dir outputs/convnext-deit --do_train --do_eval --push_to_hub
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import transformers
import yaml
from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

import pat_hf
from pat_hf import ImageView, PATDistillationTrainer, PATTrainingArguments, create_student, with_image_transforms
from pat_hf.data.augment import AugmentationConfig
from pat_hf.data.datasets import check_columns, load_fashion_mnist
from pat_hf.errors import ConfigValueError
from pat_hf.methods import get_method
from pat_hf.training.output_dir import RunLock, check_output_dir, source_dirs
from pat_hf.training.validation import check_config_values, resolve_labels

logger = logging.getLogger(__name__)

BUILTIN_DATASET = "fashion_mnist"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")


@dataclass
class ModelArguments:
    """Which teacher and student to use."""

    teacher_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Teacher: Hub id or local path of a transformers image classifier (TimmWrapper included). "
            "Default with the built-in dataset: the demo's Fashion-MNIST ResNet, trained and cached if needed."
        },
    )
    teacher_revision: str | None = field(default=None, metadata={"help": "Hub revision of the teacher."})
    student_name: str = field(
        default="resnet18",
        metadata={"help": "timm student: architecture name, hf-hub:ORG/NAME or local-dir:PATH."},
    )
    student_pretrained: bool | None = field(
        default=None,
        metadata={"help": "Load the student's pretrained weights (default: yes for hf-hub:/local-dir: ids)."},
    )
    student_kwargs: str | None = field(
        default=None,
        metadata={"help": 'Extra timm.create_model arguments as JSON, e.g. \'{"img_size": 32, "depth": 4}\'.'},
    )
    student_pretrained_cfg: str | None = field(
        default=None,
        metadata={"help": "Overrides of the student's pretrained_cfg as JSON, e.g. '{\"crop_pct\": 1.0}'."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code for the teacher."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})
    token: str | None = field(default=None, metadata={"help": "Hub token (defaults to the stored login)."})
    method_module: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Python files (or importable module names) defining distillation methods registered with "
            "pat_hf.register_method, imported before the arguments are checked, so --distill_method can name "
            "them (e.g. examples/custom_method.py; docs/extending.md)."
        },
    )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A dataset on the Hub or a local `datasets` folder. With no dataset_name and no train_dir, "
            "the built-in Fashion-MNIST (Debian's dataset-fashion-mnist package) is used."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "An imagefolder with the training images."})
    validation_dir: str | None = field(default=None, metadata={"help": "An imagefolder with the evaluation images."})
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Fraction of train held out for evaluation when there is no validation split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set (debugging, low-data runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    # ---- training augmentation: timm's create_transform, drawn once per image for both models ----
    min_crop_scale: float = field(default=0.08, metadata={"help": "Lower bound of RandomResizedCrop's area fraction."})
    crop_ratio: list[float] = field(
        default_factory=lambda: [3 / 4, 4 / 3], metadata={"help": "Aspect-ratio range of RandomResizedCrop."}
    )
    hflip: float = field(default=0.5, metadata={"help": "Probability of a horizontal flip."})
    train_interpolation: str = field(
        default="bilinear",
        metadata={"help": "Interpolation of the random crop: bilinear, bicubic, nearest or random (timm's per-image)."},
    )
    auto_augment: str | None = field(
        default=None,
        metadata={"help": "timm augmentation policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment); none by default."},
    )
    color_jitter: float | None = field(
        default=None,
        metadata={"help": "Colour-jitter factor (brightness, contrast, saturation); timm skips it under auto_augment."},
    )
    re_prob: float = field(default=0.0, metadata={"help": "Probability of timm's random erasing."})
    re_mode: str = field(default="pixel", metadata={"help": "Random-erasing fill: const, rand or pixel."})
    re_count: int = field(default=1, metadata={"help": "Maximum number of random-erasing boxes per image."})
    per_sample_seed: bool = field(
        default=True,
        metadata={
            "help": "Seed each sample's augmentation from (seed, epoch, index): the same pixels for any number of "
            "data-loader workers and any resume point."
        },
    )

    def __post_init__(self) -> None:
        if self.train_val_split is not None and not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1 (or left unset for all samples), got {value}.")
        # Built (and checked) once, then passed down whole to with_image_transforms.
        self.augmentation = augmentation_config(self)


def augmentation_config(data_args: DataTrainingArguments) -> AugmentationConfig:
    """The run's :class:`pat_hf.data.augment.AugmentationConfig` from the data arguments."""
    fields = AugmentationConfig.__dataclass_fields__
    return AugmentationConfig(**{name: getattr(data_args, name) for name in fields})


def gpu_loader_defaults(
    training_args: PATTrainingArguments, given: set[str], gpus: int | None = None, cpus: int | None = None
) -> None:
    """What a GPU user expects from the data loader unless set explicitly (``given``): worker processes (the CPU
    cores of this process's share of the machine, at most 8, as timm's scripts), persistent workers, pinned memory
    and non-blocking host-to-device copies (the batch is one uint8 image per sample; the views are made on the
    device). ``gpus`` / ``cpus``: this machine's (None: detected); nothing changes without a GPU or with
    ``--use_cpu``."""
    import torch

    gpus = (torch.cuda.device_count() if torch.cuda.is_available() else 0) if gpus is None else gpus
    if training_args.use_cpu or not gpus:
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or gpus
    if "dataloader_num_workers" not in given:
        cpus = (os.cpu_count() or 1) if cpus is None else cpus
        training_args.dataloader_num_workers = max(1, min(8, cpus // local_processes))
    if "dataloader_persistent_workers" not in given and training_args.dataloader_num_workers > 0:
        training_args.dataloader_persistent_workers = True
    if "dataloader_pin_memory" not in given:
        training_args.dataloader_pin_memory = True
    config = getattr(training_args, "accelerator_config", None)
    if training_args.dataloader_pin_memory and hasattr(config, "non_blocking") and "accelerator_config" not in given:
        config.non_blocking = True


def given_arguments(argv: list[str]) -> set[str]:
    """The argument names set on the command line or in the config file."""
    names = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    if argv and argv[0].endswith((".json", ".yaml", ".yml")) and os.path.isfile(argv[0]):
        with open(argv[0], encoding="utf-8") as f:
            values = json.load(f) if argv[0].endswith(".json") else yaml.safe_load(f)
        names |= set(values) if isinstance(values, dict) else set()
    return names


def import_method_modules(paths: list[str]) -> None:
    """Imports the files (or module names) given to ``--method_module``: their ``@register_method`` classes join the
    registry before ``PATTrainingArguments`` checks ``distill_method``."""
    for path in paths:
        if not path.endswith(".py"):
            importlib.import_module(path)
            continue
        if not os.path.isfile(path):
            raise ValueError(f"--method_module {path}: no such file.")
        name = "pat_hf_user_method_" + os.path.splitext(os.path.basename(path))[0]
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # registered before it runs, as an import does (dataclasses, pickling look it up)
        spec.loader.exec_module(module)


def _method_modules_in(flags: list[str]) -> list[str]:
    """The values of ``--method_module`` among command-line flags (``--method_module A B`` or ``=A``)."""
    found: list[str] = []
    for i, flag in enumerate(flags):
        if flag.startswith("--method_module="):
            found.append(flag.split("=", 1)[1])
        elif flag == "--method_module":
            found += list(itertools.takewhile(lambda v: not v.startswith("--"), flags[i + 1 :]))
    return found


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataTrainingArguments, PATTrainingArguments]:
    """Command-line flags, a YAML/JSON config file, or a config file followed by flags that override it."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, PATTrainingArguments))
    if not argv:
        argv = [DEFAULT_CONFIG]
    config, overrides = (argv[0], argv[1:]) if argv[0].endswith((".json", ".yaml", ".yml")) else (None, argv)
    if config is None:
        import_method_modules(_method_modules_in(overrides))
        return parser.parse_args_into_dataclasses(args=overrides)
    try:
        with open(config, encoding="utf-8") as f:
            values = json.load(f) if config.endswith(".json") else yaml.safe_load(f)
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigValueError(
            f"{config} is not valid {'JSON' if config.endswith('.json') else 'YAML'}: {err}"
        ) from None
    if not isinstance(values, dict):
        raise ConfigValueError(
            f"{config} must hold a mapping of argument names to values, got {type(values).__name__}."
        )
    from_file = values.get("method_module") or []
    import_method_modules((from_file if isinstance(from_file, list) else [from_file]) + _method_modules_in(overrides))
    # Every value checked against its field's type here: the parser would pass "hot" or a list on to torch.
    values = check_config_values(values, parser.dataclass_types, config)
    if not overrides:
        return parser.parse_dict(values)
    flags: list[str] = []
    for key, value in values.items():
        if isinstance(value, list):
            flags += [f"--{key}", *(str(v) for v in value)]
        elif value is not None:
            flags += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
    # argparse keeps the last occurrence of a flag: the command line wins over the file.
    return parser.parse_args_into_dataclasses(args=flags + overrides)


def json_argument(value: str | None, flag: str) -> dict[str, Any]:
    """A ``--student_kwargs`` style JSON object, or a clear error naming the flag."""
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except ValueError as err:
        raise ValueError(
            f"{flag} must be a JSON object such as '{{\"img_size\": 32}}', got {value!r} ({err})."
        ) from None
    if not isinstance(parsed, dict):
        raise ValueError(f"{flag} must be a JSON object (a mapping), got {value!r}.")
    return parsed


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    if data_args.dataset_name is None and data_args.train_dir is None:
        return datasets.DatasetDict({"train": load_fashion_mnist("train"), "validation": load_fashion_mnist("test")})
    if data_args.dataset_name is not None:
        if os.path.isdir(data_args.dataset_name) and os.path.isfile(
            os.path.join(data_args.dataset_name, "dataset_dict.json")
        ):
            dataset = datasets.load_from_disk(data_args.dataset_name)
        else:
            dataset = datasets.load_dataset(
                data_args.dataset_name,
                data_args.dataset_config_name,
                cache_dir=model_args.cache_dir,
                token=model_args.token,
            )
    else:
        data_files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    if isinstance(dataset, datasets.Dataset):
        dataset = datasets.DatasetDict({"train": dataset})
    if "validation" not in dataset:
        for name in ("val", "valid", "test"):
            if name in dataset:
                dataset["validation"] = dataset[name]
                break
    if "validation" not in dataset and data_args.train_val_split:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=0)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    return dataset


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    model_args, data_args, training_args = parse_args(argv)
    gpu_loader_defaults(training_args, given_arguments(argv or [DEFAULT_CONFIG]))

    # Setup logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("pat_hf %s, method %s", pat_hf.__version__, training_args.distill_method)

    # What to do, and the student's build arguments, before anything is loaded.
    if not (training_args.do_train or training_args.do_eval):
        extra = " (--do_predict is not supported by this script)" if training_args.do_predict else ""
        raise ValueError(
            f"Nothing to do: neither --do_train nor --do_eval is set{extra}. Pass --do_train to distil the student "
            "(and --do_eval to evaluate it)."
        )
    if training_args.do_predict:
        raise ValueError("--do_predict is not supported by this script: run trainer.predict() on the exported model.")
    if training_args.push_to_hub and not training_args.do_train:
        raise ValueError(
            "--push_to_hub without --do_train would push a student this run did not train, as distilled. Add "
            "--do_train, or push an earlier run's export (trainer.push_to_hub() after training, or `hf upload`)."
        )
    student_kwargs = json_argument(model_args.student_kwargs, "--student_kwargs")
    student_cfg = json_argument(model_args.student_pretrained_cfg, "--student_pretrained_cfg")
    for key, flag in (
        ("num_classes", "the dataset's labels"),
        ("pretrained", "--student_pretrained"),
        ("pretrained_cfg_overlay", "--student_pretrained_cfg"),
    ):
        if key in student_kwargs:
            raise ValueError(
                f"--student_kwargs sets {key!r}, which the script already sets from {flag}: remove it from "
                "--student_kwargs."
            )

    # The output folder first, before anything is loaded: never a model's own folder or the Hub cache, no files
    # another program wrote (unless --overwrite_output_dir), no other run training there.
    teacher_id = model_args.teacher_name_or_path
    needs_teacher = get_method(training_args.distill_method).requires_teacher
    if training_args.do_train or training_args.do_eval or training_args.push_to_hub:
        protected = source_dirs(teacher_id if needs_teacher else None, model_args.student_name)
        check_output_dir(training_args.output_dir, protected=protected, overwrite=training_args.overwrite_output_dir)
        RunLock(training_args.output_dir, owner=False).check()

    # Detecting last checkpoint (transformers' convention: continue a run found in output_dir). The trainer
    # resumes from the newest complete one (a broken newer one is skipped with a warning).
    resume: str | bool | None = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = True if resume.lower() == "true" else None
    if (
        resume is None
        and training_args.do_train
        and not training_args.overwrite_output_dir
        and os.path.isdir(training_args.output_dir)
        and get_last_checkpoint(training_args.output_dir) is not None
    ):
        logger.info("Checkpoints detected in %s: resuming training.", training_args.output_dir)
        resume = True

    set_seed(training_args.seed)

    # Teacher: through pat_hf's loader (one clear message naming the path and the problem), before the data.
    builtin = data_args.dataset_name is None and data_args.train_dir is None
    teacher = None
    if needs_teacher:
        if teacher_id is None:
            if not builtin:
                raise ValueError("--teacher_name_or_path is required with your own dataset.")
            from pat_hf.demo import ensure_teacher

            teacher_id = ensure_teacher(os.path.join(".cache", "pat_hf"))
        teacher = pat_hf.load_teacher(
            teacher_id,
            revision=model_args.teacher_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
        )

    # Data
    dataset = load_data(data_args, model_args)
    for split in dataset:
        check_columns(dataset[split], data_args.image_column_name, data_args.label_column_name, what=f"'{split}' split")
    train_ds = dataset["train"] if training_args.do_train else None
    eval_ds = dataset.get("validation") if training_args.do_eval else None
    if training_args.do_train and train_ds is None:
        raise ValueError("--do_train needs a train split.")
    if training_args.do_eval and eval_ds is None:
        raise ValueError("--do_eval needs a validation split (or --train_val_split).")
    if train_ds is not None and data_args.max_train_samples is not None:
        train_ds = train_ds.shuffle(seed=training_args.seed).select(
            range(min(data_args.max_train_samples, len(train_ds)))
        )
    if eval_ds is not None and data_args.max_eval_samples is not None:
        eval_ds = eval_ds.select(range(min(data_args.max_eval_samples, len(eval_ds))))
    # Labels: type and range from the label column alone; string labels are mapped by name.
    labels = resolve_labels(dataset["train"], data_args.label_column_name, teacher=teacher)
    class_names = labels.class_names

    # Student
    student = create_student(
        model_args.student_name,
        num_classes=labels.num_classes,
        pretrained=model_args.student_pretrained,
        pretrained_cfg_overlay=student_cfg or None,
        **student_kwargs,
    )
    student_view = ImageView.from_timm(student)
    teacher_view = teacher.view if teacher is not None else None

    # Transforms: timm's augmentation drawn once per image, one uint8 image per sample; the trainer resizes and
    # normalises it for each model on the device.
    common = {
        "image_column": data_args.image_column_name,
        "label_column": data_args.label_column_name,
        "class_names": class_names if labels.kind == "str" else None,
    }
    if train_ds is not None:
        train_ds = with_image_transforms(
            train_ds, student_view, teacher_view, train=True, augmentation=data_args.augmentation, **common
        )
    if eval_ds is not None:
        # The teacher's own view for eval_loss_kd: its resize and centre crop of each image.
        eval_teacher_view = teacher_view if training_args.eval_teacher_losses else None
        eval_ds = with_image_transforms(eval_ds, student_view, eval_teacher_view, train=False, **common)

    # Initialize the trainer
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        class_names=class_names,
        dataset_name=BUILTIN_DATASET if builtin else (data_args.dataset_name or "imagefolder"),
    )
    results: dict[str, Any] = {}

    # Training
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)

    # Evaluation
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    # Write model card (with the final metrics) and (optionally) push to Hub
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset=trainer.dataset_name)
    elif training_args.do_train:
        trainer.create_model_card(dataset=trainer.dataset_name)
    return results


if __name__ == "__main__":
    main()
