"""Is a checkpoint (or a model folder) complete? File checks that read no tensors.

Every ``checkpoint-N/`` written by pat_hf ≥ 0.2 ends with ``checkpoint_files.json``: the size and sha256 of every
other file in it, written last inside the staging folder, before the folder is renamed. A checkpoint is complete
when every listed file is there with its size and hash. A checkpoint without the list is incomplete, unless its
manifest says pat_hf 0.1 wrote it: checkpoints of pat_hf 0.1 have no list, and their files get
the structural checks below (JSON parses, a safetensors file is as long as its header says, a ``torch.save``
archive has its zip directory), which catch truncation and most corruption without loading anything.

This module imports nothing of pat_hf but its errors (the teacher loader uses the same structural checks).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import zipfile
from typing import Any

__all__ = [
    "FILE_LIST_NAME",
    "checkpoint_step",
    "file_problem",
    "list_checkpoints",
    "manifest_differences",
    "save_failure",
    "verify_checkpoint",
    "write_file_list",
]

FILE_LIST_NAME = "checkpoint_files.json"
# The run manifest of a checkpoint (written by pat_hf.training.checkpointing; its name is fixed since 0.1).
MANIFEST_NAME = "distill_manifest.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What Trainer needs to resume, on top of the student's weights.
REQUIRED = ("model.safetensors", "trainer_state.json")


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_problem(path: str) -> str | None:
    """What is structurally wrong with one file (by its extension), or None.

    ``.json``: must parse. ``.safetensors``: the header must parse and the file be as long as the header says.
    ``.pt`` / ``.pth`` / ``.bin``: a ``torch.save`` zip archive must have its central directory (a truncated one
    has not). Other files: only readable.
    """
    try:
        size = os.path.getsize(path)
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
        elif path.endswith(".safetensors"):
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return f"truncated ({size} bytes, not even a safetensors header)"
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    return f"truncated ({size} bytes; its header alone needs {n + 8})"
                header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if size < 8 + n + end:
                return f"truncated ({size} bytes; its header says {8 + n + end})"
        elif path.endswith((".pt", ".pth", ".bin")):
            if size == 0:
                return "empty (0 bytes)"
            with open(path, "rb") as f:
                magic = f.read(4)
            # A torch.save zip archive keeps its directory at the end: a cut-short one has none.
            if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
                return f"truncated ({size} bytes; the torch.save archive has no zip directory)"
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, struct errors
        return f"not valid {'JSON' if path.endswith('.json') else 'data'} ({err})"
    except (KeyError, TypeError, IndexError) as err:
        return f"not a valid safetensors header ({err})"
    except OSError as err:
        return f"cannot be read ({err})"
    return None


def _walk(folder: str) -> list[str]:
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def write_file_list(folder: str) -> None:
    """Writes ``checkpoint_files.json`` (size and sha256 of every file under ``folder``), last, via a rename."""
    files = {
        rel: {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": sha256_of(os.path.join(folder, rel))}
        for rel in _walk(folder)
        if rel != FILE_LIST_NAME
    }
    tmp = os.path.join(folder, FILE_LIST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, FILE_LIST_NAME))


def verify_checkpoint(folder: str, deep: bool = True) -> list[str]:
    """The problems of a checkpoint folder, each naming its file; empty when it is complete.

    Args:
        folder: A ``checkpoint-N`` folder.
        deep: Also compare sha256 hashes (reads every file once); sizes are always compared.
    """
    if not os.path.isdir(folder):
        return [f"{folder}: not a folder"]
    listing = os.path.join(folder, FILE_LIST_NAME)
    problems = []
    if os.path.isfile(listing):
        try:
            with open(listing, encoding="utf-8") as f:
                files: dict[str, Any] = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return [f"{listing}: not a valid file list ({type(err).__name__}: {err})"]
        for rel, meta in sorted(files.items()):
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                problems.append(f"{path}: missing")
                continue
            size = os.path.getsize(path)
            if size != meta.get("size"):
                problems.append(f"{path}: {size} bytes, but {meta.get('size')} were written (truncated or replaced)")
            elif deep and sha256_of(path) != meta.get("sha256"):
                problems.append(f"{path}: its content changed after it was written (sha256 differs)")
        return problems
    # Only pat_hf 0.1 wrote checkpoints without the list; any later checkpoint lacking it is a copy cut short (the
    # list is its last file), whose weights may be truncated or zero-filled in ways no structural check sees.
    legacy = legacy_version(folder)
    if legacy is None:
        return [
            f"{listing}: missing. pat_hf >= 0.2 writes this file list last, so its checkpoints without it are "
            "incomplete copies (only pat_hf 0.1 checkpoints, recognised by their manifest's pat_hf_version, have none)"
        ]
    for name in REQUIRED:
        if not os.path.isfile(os.path.join(folder, name)):
            problems.append(f"{os.path.join(folder, name)}: missing")
    for rel in _walk(folder):
        problem = file_problem(os.path.join(folder, rel))
        if problem:
            problems.append(f"{os.path.join(folder, rel)}: {problem}")
    return problems


def legacy_version(folder: str) -> str | None:
    """The ``pat_hf_version`` of a checkpoint written by pat_hf 0.1 (which wrote no file list), read from its
    manifest; None for any other folder (another version, no manifest, or one that cannot be read)."""
    try:
        with open(os.path.join(folder, MANIFEST_NAME), encoding="utf-8") as f:
            version = json.load(f).get("pat_hf_version")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) and re.match(r"0\.1(?!\d)", version) else None


def checkpoint_step(name: str) -> int | None:
    match = _CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``run_dir``, newest (highest N) first."""
    if not os.path.isdir(run_dir):
        return []
    found = [
        (checkpoint_step(n), n)
        for n in os.listdir(run_dir)
        if checkpoint_step(n) is not None and os.path.isdir(os.path.join(run_dir, n))
    ]
    return [os.path.join(run_dir, n) for _, n in sorted(found, reverse=True)]


LOW_SPACE = 64 * 2**20  # bytes: a write that failed with less than this free ran out of space


def _is_no_space(err: BaseException) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def save_failure(err: BaseException, folder: str, what: str, intact: str) -> Exception:
    """The error to raise when writing ``what`` under ``folder`` failed; call before removing the partial files
    (their space is what tells a full disk).

    torch.save and safetensors report a full disk as ``unexpected pos ...`` or a bare I/O error: the free space
    of the folder's file system (``shutil.disk_usage``) tells it apart.

    Args:
        err: What torch.save / safetensors / the OS raised.
        folder: Where the files were being written.
        what: ``checkpoint-12``, ``the export``.
        intact: What is still there, e.g. ``the previous checkpoints (newest: checkpoint-9) are intact``.
    """
    from .errors import CheckpointSaveError

    try:
        free = shutil.disk_usage(folder if os.path.isdir(folder) else os.path.dirname(folder) or ".").free
    except OSError:
        free = None
    if _is_no_space(err) or (free is not None and free < LOW_SPACE):
        shown = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return CheckpointSaveError(
            errno.ENOSPC,
            f"No space left on the device while writing {what} to {folder} ({shown}; the error was: "
            f"{type(err).__name__}: {err}). The incomplete files were removed and {intact}. Free some space "
            "(or lower save_total_limit), then resume with resume_from_checkpoint=True.",
        )
    return CheckpointSaveError(
        getattr(err, "errno", None) or errno.EIO,
        f"Writing {what} to {folder} failed ({type(err).__name__}: {err}). The incomplete files were removed and "
        f"{intact}.",
    )


def manifest_differences(saved: dict[str, Any], current: dict[str, Any], saved_name: str = "checkpoint") -> list[str]:
    """The differences between a saved run description and the current one, one line each.

    Keys an older pat_hf did not record (a 0.1 manifest has no student model_args or pretrained_cfg, an older
    method no new setting; 0.1 left integer labels unnamed) are not compared; the teacher is compared by
    architecture, weights and revision.
    """
    diffs = []
    for key in ("method", "teacher", "student", "class_names"):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys = ("architecture", "fingerprint", "revision") if key == "teacher" else sorted(a.keys() & b.keys())
            for sub in keys:
                x, y = a.get(sub), b.get(sub)
                if isinstance(x, dict) and isinstance(y, dict):
                    for leaf in sorted(x.keys() | y.keys()):
                        if x.get(leaf) != y.get(leaf):
                            diffs.append(f"{key}.{sub}.{leaf}: {saved_name} {x.get(leaf)} vs now {y.get(leaf)}")
                elif x != y:
                    diffs.append(f"{key}.{sub}: {saved_name} {x} vs now {y}")
        elif key == "class_names" and a is None and str(saved.get("pat_hf_version", "")).startswith("0.1"):
            continue  # 0.1 left integer labels unnamed; pat_hf now names them after the teacher's classes
        elif a != b:
            diffs.append(f"{key}: {saved_name} {a} vs now {b}")
    return diffs
