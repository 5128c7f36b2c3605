"""What pat_hf writes into, and what it refuses to: the run marker, the run lock and the source-folder guard.

- **Never** a model's source folder: the teacher's or the student's local folder (``local-dir:``, a path) or
  anything under the Hub cache (``HF_HUB_CACHE``), whatever the flags.
- A folder is **pat_hf's** when it holds ``pat_hf_run.json``, the run marker: written by the main process when
  a run starts training (after the checks below) and with every export. It records the run (teacher, student,
  method settings, classes: the checkpoint manifest), so a later run with other settings is refused as
  checkpoints of another run are. Folders written by pat_hf 0.1 have no marker: they are pat_hf's when every
  entry is a name pat_hf writes (:data:`PAT_HF_NAMES`) and a checkpoint manifest or a model card tagged
  ``pat_hf`` shows where they came from.
- A folder that exists, is not empty and is not pat_hf's (a model folder, your files) is refused unless
  ``overwrite_output_dir=True``: then pat_hf may replace any file in it (the source-folder guard still holds).
- ``pat_hf_run.lock`` (pid and host) is held while a run trains: a second run in the same folder is refused
  while the first one's process lives; a lock left by a killed process is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import socket
import time
from collections.abc import Iterable
from typing import Any

from ..errors import OutputDirError, RunLockedError
from ..version import __version__

__all__ = [
    "LOCK_NAME",
    "MARKER_NAME",
    "PAT_HF_NAMES",
    "RunLock",
    "check_output_dir",
    "check_output_path",
    "read_marker",
    "source_dirs",
    "write_marker",
]

logger = logging.getLogger(__name__)

MARKER_NAME = "pat_hf_run.json"
LOCK_NAME = "pat_hf_run.lock"
# Everything a pat_hf run (and Trainer inside it) writes at the top of its output_dir.
PAT_HF_NAMES = (
    MARKER_NAME,
    f".{MARKER_NAME}.*",
    LOCK_NAME,
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "preprocessor_config.json",
    "README.md",
    "training_args.bin",
    "trainer_state.json",
    "*_results.json",
    "runs",
    "checkpoint-*",
    "_tmp-*",
    "_hub-push-*",
)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return os.path.realpath(constants.HF_HUB_CACHE)


def source_dirs(*sources: Any) -> list[str]:
    """Folders pat_hf must never write to: each source's local folder and the Hub cache.

    Args:
        *sources: Paths, ``local-dir:`` / ``hf-hub:`` ids, Hub ids, or None (skipped).
    """
    out = [_hub_cache()]
    for source in sources:
        if not source or not isinstance(source, str):
            continue
        path = source[len("local-dir:") :] if source.startswith("local-dir:") else source
        path = os.path.expanduser(path)
        if os.path.exists(path):
            out.append(os.path.realpath(path))
    return list(dict.fromkeys(out))


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def _matches(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in PAT_HF_NAMES)


def _written_by_pat_hf_0_1(path: str, names: list[str]) -> bool:
    """A folder without marker (pat_hf 0.1): only pat_hf's names, and a manifest or model card of pat_hf."""
    if not all(_matches(n) for n in names):
        return False
    for name in names:
        if name.startswith("checkpoint-") and os.path.isfile(os.path.join(path, name, "distill_manifest.json")):
            return True
    card = os.path.join(path, "README.md")
    if os.path.isfile(card):
        with open(card, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
        return head.startswith("---") and "- pat_hf" in head.split("\n---", 1)[0]
    return False


def check_output_path(output_dir: str) -> None:
    """Refuses an output path that cannot become a writable folder, before any work: empty, a dangling symbolic
    link, a path through a file, a folder (or the nearest existing parent) that is read-only.

    Raises:
        OutputDirError: Naming the path, and the part of it at fault.
    """
    if output_dir is None or not str(output_dir).strip():
        raise OutputDirError("output_dir is empty: give the folder the run writes its checkpoints and export to.")
    path = os.path.abspath(os.path.expanduser(str(output_dir)))
    # The path itself or any parent may be a link to nowhere, or a file in the way of the folders to create.
    probe = path
    while True:
        if os.path.islink(probe) and not os.path.exists(probe):
            raise OutputDirError(
                f"output_dir {output_dir!r}: {probe} is a symbolic link to {os.readlink(probe)!r}, which does not "
                "exist. Create its target, remove the link, or choose another output_dir."
            )
        if os.path.exists(probe):
            break
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        if probe == path:
            raise OutputDirError(f"output_dir {output_dir!r} is a file, not a folder.")
        raise OutputDirError(
            f"output_dir {output_dir!r} cannot be created: {probe} is a file, not a folder. Choose another output_dir."
        )
    read_only_fs = hasattr(os, "statvfs") and bool(os.statvfs(probe).f_flag & getattr(os, "ST_RDONLY", 1))
    if read_only_fs or not os.access(probe, os.W_OK | os.X_OK):
        what = "is on a read-only file system" if read_only_fs else "is not writable by this user"
        where = "output_dir" if probe == path else f"its nearest existing parent {probe!r}"
        raise OutputDirError(
            f"output_dir {output_dir!r}: {where} {what}, so no checkpoint or export could be written. Choose a "
            "writable output_dir (or fix the folder's permissions)."
        )


def check_output_dir(output_dir: str, *, protected: Iterable[str] = (), overwrite: bool = False) -> None:
    """Refuses an output folder pat_hf must not write to (see the module's docstring).

    Args:
        output_dir: The folder a run or an export is about to write to.
        protected: Source folders (:func:`source_dirs`); refused whatever ``overwrite`` says.
        overwrite: Accept a folder holding files no pat_hf run wrote (they may be replaced).

    Raises:
        OutputDirError: ``output_dir`` is, or is inside, a protected folder; or it holds files not written by
            pat_hf and ``overwrite`` is False. The message lists what it holds.
    """
    check_output_path(output_dir)
    path = os.path.realpath(os.path.expanduser(output_dir))
    for folder in protected:
        if _inside(path, folder):
            what = "the Hub cache" if folder == _hub_cache() else "the folder a model is loaded from"
            raise OutputDirError(
                f"output_dir {output_dir!r} is {'inside ' if path != folder else ''}{what} ({folder}): pat_hf never "
                "writes there, whatever overwrite_output_dir says, so that it cannot replace the teacher's or the "
                "student's files. Choose another output_dir."
            )
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise OutputDirError(f"output_dir {output_dir!r} is a file, not a folder.")
        return
    # pat_hf's own bookkeeping (the lock of the run checking, a marker being written) does not count.
    names = sorted(n for n in os.listdir(path) if n != LOCK_NAME and not n.startswith(f".{MARKER_NAME}."))
    if not names or MARKER_NAME in names or overwrite or _written_by_pat_hf_0_1(path, names):
        if overwrite and names and MARKER_NAME not in names and not _written_by_pat_hf_0_1(path, names):
            logger.warning("overwrite_output_dir: %s holds %s, which this run may replace.", output_dir, names[:10])
        return
    model_files = [n for n in names if n in ("config.json", "model.safetensors", "pytorch_model.bin")]
    what = "a model (" + ", ".join(model_files) + ")" if model_files else "files"
    raise OutputDirError(
        f"output_dir {output_dir!r} holds {what} not written by a pat_hf run: {names[:10]}"
        f"{' ...' if len(names) > 10 else ''}. pat_hf would overwrite them (config.json, model.safetensors, "
        f"README.md, ...). Choose an empty or new output_dir, or pass overwrite_output_dir=True "
        f"(--overwrite_output_dir) to replace them. (A pat_hf run marks its folder with {MARKER_NAME}.)"
    )


def read_marker(output_dir: str) -> dict[str, Any] | None:
    """The run marker of ``output_dir``, or None. An unreadable marker reads as ``{}`` (another run)."""
    path = os.path.join(output_dir, MARKER_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def write_marker(output_dir: str, run: dict[str, Any]) -> None:
    """Writes ``pat_hf_run.json`` (atomically): pat_hf version, time, and the run (its manifest)."""
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, f".{MARKER_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"pat_hf_version": __version__, "written_at": time.time(), "run": run}, f, indent=2, default=str)
    os.replace(tmp, os.path.join(output_dir, MARKER_NAME))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """``pat_hf_run.lock`` in ``output_dir`` while a run trains (created with O_EXCL, removed at the end).

    Args:
        output_dir: The run's folder.
        owner: Whether this process takes the lock (the main process); the others only check it.
    """

    def __init__(self, output_dir: str, owner: bool = True) -> None:
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.owner = owner
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock, when a live process other than this one does."""
        try:
            with open(self.path, encoding="utf-8") as f:
                info = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # Being written this instant, or left half-written by a killed process: stale after a minute.
            try:
                young = time.time() - os.path.getmtime(self.path) < 60
            except OSError:
                return None
            return {"pid": "?", "host": "?"} if young else None
        pid, host = info.get("pid"), info.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and (pid == os.getpid() or not _alive(pid)):
            return None
        return info

    def check(self) -> None:
        """Raises :class:`RunLockedError` when another live run holds the lock."""
        info = self.holder()
        if info is not None:
            raise RunLockedError(
                f"Another run is training in {os.path.dirname(self.path)!r} (process {info.get('pid')} on "
                f"{info.get('host')}, since {time.ctime(info.get('started', 0))}; {LOCK_NAME}). Two runs in one "
                "output_dir would overwrite each other's checkpoints: wait for it, use another output_dir, or "
                f"delete {self.path} if that run is gone."
            )

    def acquire(self) -> None:
        if not self.owner:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check()
                logger.warning("Taking over %s, left by a run that is no longer running.", self.path)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
            self.held = True
            return
        self.check()

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
