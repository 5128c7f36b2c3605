"""Input checks that need no model: labels (type and range, read from the label column alone, not the images)
and the values of a YAML/JSON config file (type of every field, before any parser or torch sees them).

- :func:`resolve_labels` decides the class names of a run from its training labels and the teacher, and refuses
  labels that cannot be right (1-based integers, -1, values past the last class, floats, lists, missing);
- :func:`check_dataset_labels` is what the trainer runs on its datasets before training;
- :func:`check_config_values` checks (and converts: ``"1e-3"`` -> 0.001) a config file's values against the
  argument dataclasses' field types.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import logging
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data.dataset_shapes import is_iterable_dataset
from ..data.datasets import check_not_empty, dataset_class_names, prepared_info
from ..errors import ConfigValueError, LabelError
from ..models.classes import ambiguous_names, describe_ambiguous
from ..models.teacher import Teacher, normalise_class_name

__all__ = ["LabelSpace", "check_config_values", "check_dataset_labels", "resolve_labels"]

logger = logging.getLogger(__name__)

FIX_ONE_BASED = "shift them to start at 0: dataset = dataset.map(lambda e: {{{col!r}: e[{col!r}] - 1}})"


@dataclass
class LabelSpace:
    """The classes of a run as its labels define them.

    Args:
        class_names: Names in output order, or None when only the count is known.
        num_classes: The number of classes, or None when unknown.
        kind: ``class_label`` (a `datasets` ClassLabel), ``int``, or ``str`` (mapped by name).
        source: How the names / count were decided (for messages and the log).
    """

    class_names: list[str] | None
    num_classes: int | None
    kind: str
    source: str


def label_column_of(dataset: Any, label_column: str | None = None) -> str | None:
    """The label column: given, recorded by with_image_transforms, or "labels" / "label" when present."""
    if label_column:
        return label_column
    info = prepared_info(dataset)
    if info is not None:
        return info.get("label_column")
    columns = getattr(dataset, "column_names", None) or []
    return next((c for c in ("labels", "label") if c in columns), None)


def _column(dataset: Any, column: str) -> Any:
    """The label column as a pyarrow array (no image is decoded), or None for data that is not a `datasets`
    Dataset."""
    if not hasattr(dataset, "with_format") or column not in (getattr(dataset, "column_names", None) or []):
        return None
    if is_iterable_dataset(dataset):  # streaming: reading the labels would read the whole dataset
        return None
    return dataset.with_format("arrow")[column]


def resolve_labels(
    dataset: Any,
    label_column: str | None = None,
    *,
    class_names: Sequence[str] | None = None,
    teacher: Teacher | None = None,
    num_classes: int | None = None,
    what: str = "training data",
    fixed: bool = False,
) -> LabelSpace:
    """Checks the labels of ``dataset`` and decides the classes of the run.

    - A ClassLabel column: its names; values must lie in range (``-1``, "no label", is refused).
    - Integers: indices into ``class_names`` if given, else into the teacher's classes (named as the teacher
      names them), else into ``num_classes`` (the student's outputs), else ``0..max``. 1-based labels are
      recognised and refused with the fix.
    - Strings: mapped by name (case, spaces, ``_``, ``-`` ignored) to ``class_names`` if given, else to the
      teacher's names (all of them when the data uses them all, else those the data uses, in the teacher's
      order), else to the sorted unique names.

    Args:
        fixed: ``class_names`` / ``num_classes`` are the run's classes (the evaluation data is checked against
            the training data's), ahead of the dataset's own ClassLabel.

    Raises:
        LabelError: Missing labels, floats, lists, 1-based or out-of-range integers, names no class has.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    column = label_column_of(dataset, label_column)
    values = _column(dataset, column) if column else None
    if values is None:
        names = list(class_names) if class_names else None
        return LabelSpace(names, len(names) if names else num_classes, "unknown", "not a datasets.Dataset")
    feature = (getattr(dataset, "features", None) or {}).get(column)
    where = f"column {column!r} of the {what}"
    nulls = values.null_count
    if nulls:
        raise LabelError(f"{nulls} rows of {where} have no label (None). Remove them: dataset.filter(...).")
    kind = values.type
    teacher_names = teacher.label_names if teacher is not None else None
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        found = [str(v) for v in pc.unique(values).to_pylist()]
        return _string_space(found, class_names, teacher, teacher_names, where)
    if not pa.types.is_integer(kind):
        fix = (
            f"cast them: dataset.cast_column({column!r}, datasets.Value('int64'))"
            if pa.types.is_floating(kind)
            else "use one class index or name per image (pat_hf trains single-label classifiers)"
        )
        raise LabelError(f"The labels in {where} are {kind}, not class indices or names: {fix}.")
    if len(values) == 0:
        return LabelSpace(list(class_names) if class_names else None, num_classes, "int", "empty")
    bounds = pc.min_max(values).as_py()
    low, high = int(bounds["min"]), int(bounds["max"])
    feature_names = list(getattr(feature, "names", None) or []) or None
    if class_names:
        names, count, source = list(class_names), len(class_names), "the class names given"
    elif fixed and num_classes is not None:
        names, count, source = None, int(num_classes), f"the training data's {num_classes} classes"
    elif feature_names:
        names, count, source = feature_names, len(feature_names), "the dataset's ClassLabel"
    elif teacher is not None:
        count = teacher.num_labels
        names, source = teacher_names, f"the teacher's {teacher.num_labels} classes"
    elif num_classes is not None:
        names, count, source = None, int(num_classes), f"the student's {num_classes} outputs"
    else:
        names, count, source = None, None, "0 to the largest label"
    if low < 0:
        negative = pc.sum(pc.less(values, 0)).as_py()
        raise LabelError(
            f"{negative} rows of {where} have a negative label ({low}; -1 is `datasets`' 'no label'). Remove "
            f"them: dataset = dataset.filter(lambda e: e[{column!r}] >= 0)."
        )
    present = None
    if count is None:
        present = set(pc.unique(values).to_pylist())
        if low == 1 and 0 not in present and len(present) == high:
            raise LabelError(
                f"The labels in {where} run from 1 to {high}: they look 1-based, and class indices start at 0; "
                + FIX_ONE_BASED.format(col=column)
                + " (or pass class_names= to keep a class 0 without examples)."
            )
        count = high + 1
    if high >= count:
        one_based = low == 1 and high == count
        hint = (
            "they look 1-based; " + FIX_ONE_BASED.format(col=column)
            if one_based
            else f"use class indices 0 to {count - 1} or class names"
        )
        raise LabelError(
            f"The labels in {where} go up to {high}, but there are {count} classes ({source}), numbered 0 to "
            f"{count - 1}: {hint}."
        )
    if source.startswith("the teacher's") and high + 1 < count:
        # Integer labels are read as the teacher's class indices: right for data labelled like the teacher,
        # silently wrong for another dataset's numbering. Say which classes they are taken to be.
        shown = ", ".join(f"{i}={n!r}" for i, n in enumerate((names or [])[: min(high + 1, 5)]))
        logger.warning(
            "The integer labels of %s (0 to %d) are read as the teacher's class indices, among its %d classes (%s%s). "
            "If they number other classes, give class_names= (or cast the column to a datasets.ClassLabel).",
            where,
            high,
            count,
            shown,
            " ..." if high + 1 > 5 else "",
        )
    return LabelSpace(names, count, "class_label" if feature_names else "int", source)


def _string_space(
    found: list[str],
    class_names: Sequence[str] | None,
    teacher: Teacher | None,
    teacher_names: list[str] | None,
    where: str,
) -> LabelSpace:
    def unknown(names: Sequence[str]) -> list[str]:
        known = {normalise_class_name(n) for n in names}
        return [f for f in found if normalise_class_name(f) not in known]

    # String labels are mapped by name ignoring case, spaces, "_" and "-": labels or class names equal up to that
    # would silently become one class (and leave another without examples).
    clash = ambiguous_names(sorted(found))
    spellings = "; ".join(" and ".join(repr(n) for _, n in entries) for entries in list(clash.values())[:5])
    if clash and (class_names or teacher_names):
        # The classes are named elsewhere (one class for these spellings): they are one class, said aloud.
        logger.warning(
            "%s spells labels in several ways (%s); each group is mapped to the one class of that name.",
            where,
            spellings,
        )
    elif clash:
        raise LabelError(
            f"{where} holds labels that differ only in case, spaces, '_' or '-': {spellings}. pat_hf maps labels to "
            "classes ignoring those differences, so they would become one class and leave another without examples. "
            "Make them one spelling (dataset.map) if they are one class, rename them if they are not, or pass "
            "class_names=."
        )
    for given, source in ((class_names, "class_names"), (teacher_names, "the teacher's config.id2label")):
        used = {normalise_class_name(f) for f in found}
        clash = {k: v for k, v in ambiguous_names(list(given or [])).items() if k in used}
        if clash:
            raise LabelError(
                f"{source} holds a class name more than once (up to case, spaces, '_' and '-'): "
                f"{describe_ambiguous(clash)}, and {where} uses it, so which class a label means cannot be told. "
                "Rename the classes so that each name is unique."
            )

    if class_names:
        missing = unknown(class_names)
        if missing:
            raise LabelError(f"{where} has labels that are not in class_names: {missing[:10]}.")
        return LabelSpace(list(class_names), len(class_names), "str", "the class names given")
    if teacher_names:
        missing = unknown(teacher_names)
        if missing:
            raise LabelError(
                f"{where} holds the class names {missing[:10]}, which the teacher does not know (its classes "
                f"start with {teacher_names[:5]}). Rename those labels to the teacher's names (config.id2label), "
                "or use a teacher trained on these classes."
            )
        used = {normalise_class_name(f) for f in found}
        names = [n for n in teacher_names if normalise_class_name(n) in used]
        if len(names) == len(teacher_names):
            source = "the teacher's class names (all of them, in its order)"
        else:
            source = f"the {len(names)} of the teacher's {len(teacher_names)} classes the data uses, in its order"
        logger.info("String labels of %s mapped to %s.", where, source)
        return LabelSpace(names, len(names), "str", source)
    names = sorted(found)
    if teacher is not None and len(names) != teacher.num_labels:
        raise LabelError(
            f"{where} has {len(names)} distinct labels but the teacher predicts {teacher.num_labels} classes and "
            "does not name them (config.id2label), so they cannot be matched. Use a teacher with named classes, "
            "or labels as class indices."
        )
    logger.warning(
        "String labels of %s mapped to their sorted unique names %s (class i = the i-th name)%s. Pass "
        "class_names= for another order.",
        where,
        names[:10],
        " in the teacher's output order" if teacher is not None else "",
    )
    return LabelSpace(names, len(names), "str", "the sorted unique label names")


def check_dataset_labels(
    train_dataset: Any,
    eval_dataset: Any,
    *,
    class_names: Sequence[str] | None,
    teacher: Teacher | None,
    num_classes: int | None,
) -> list[str] | None:
    """What the trainer runs before training: no empty dataset, labels of the right type and range in both
    datasets, string labels mapped by name (the mapping is set on datasets prepared by with_image_transforms).

    Returns:
        The class names of the run (given, from a ClassLabel, from string labels, or the teacher's), or None.

    Raises:
        DatasetError: An empty dataset. LabelError: bad labels (see :func:`resolve_labels`).
    """
    check_not_empty(train_dataset, "training dataset")
    check_not_empty(eval_dataset, "evaluation dataset")
    if train_dataset is None and eval_dataset is None:
        return list(class_names) if class_names else None
    first = train_dataset if train_dataset is not None else eval_dataset
    space = resolve_labels(first, class_names=class_names, teacher=teacher, num_classes=num_classes)
    if eval_dataset is not None and first is not eval_dataset:
        eval_names = dataset_class_names(eval_dataset, label_column_of(eval_dataset))
        if eval_names and space.class_names and eval_names != space.class_names:
            raise LabelError(
                f"The evaluation data's classes {eval_names[:10]} differ from the training data's "
                f"{space.class_names[:10]} (names or order): the same index would mean two classes. Cast both "
                "label columns to the same datasets.ClassLabel."
            )
        resolve_labels(
            eval_dataset,
            class_names=space.class_names,
            num_classes=space.num_classes,
            teacher=None if space.num_classes else teacher,
            what="evaluation data",
            fixed=True,
        )
    if space.kind == "str":
        for dataset in (train_dataset, eval_dataset):
            info = prepared_info(dataset)
            if info is None and dataset is not None:
                raise LabelError(
                    "The labels are strings; prepare the dataset with pat_hf.with_image_transforms (which maps them "
                    "to class indices) or cast the label column to a datasets.ClassLabel."
                )
            if info is not None and not info.get("class_names"):
                info["class_names"] = space.class_names
    return space.class_names


# ---- config files -------------------------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    return names.get(tp, "None" if tp is type(None) else getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as ``tp`` (YAML's strings for numbers such as "1e-3" converted), or :class:`_Mismatch`."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin in (list, Sequence, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, item) for v in items]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            return value  # a JSON string: the parser reads it
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, dict):
            return json.dumps(value)  # e.g. student_kwargs written as a mapping
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value == member:
                return member.value
        raise _Mismatch
    return value  # a type this check does not know: left to the parser


def check_config_values(values: dict[str, Any], dataclass_types: Sequence[type], source: str) -> dict[str, Any]:
    """Checks every value of a config file against the field types of the argument dataclasses.

    Args:
        values: The file's mapping of argument names to values.
        dataclass_types: The dataclasses the parser fills (ModelArguments, ..., PATTrainingArguments).
        source: The file's name, for messages.

    Returns:
        The values, converted where YAML left a number as a string (``1e-3``) or an integer as ``8.0``.

    Raises:
        ConfigValueError: An unknown key (with close names) or a value of the wrong type, naming the key, the
            value and the type expected.
    """
    fields: dict[str, Any] = {}
    for cls in dataclass_types:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                fields[f.name] = hints.get(f.name, Any)
    out = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigValueError(f"{source}: unknown argument {key!r}.{hint}")
        try:
            out[key] = _coerce(value, fields[key])
        except _Mismatch:
            raise ConfigValueError(
                f"{source}: {key!r} must be {_describe(fields[key])}, got {value!r} ({type(value).__name__})."
            ) from None
    return out
