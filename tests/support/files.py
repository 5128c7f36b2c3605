"""File-system helpers of the reliability tests: every byte of a folder, before and after."""

from __future__ import annotations

import hashlib
import os


def folder_hashes(folder) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (empty for a missing folder)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def truncate(path, keep: float = 0.5) -> None:
    """Cuts ``path`` to ``keep`` of its size, as a job killed while writing it (or a full disk) would."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
