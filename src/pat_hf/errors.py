"""The errors pat_hf raises that users catch.

Bad input is refused before any training with a subclass of ``ValueError`` (so ``except ValueError`` keeps
working) that names the file, column, argument or folder at fault; see docs/reliability.md for the full list.
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.errors import HfHubHTTPError

__all__ = [
    "CheckpointError",
    "CheckpointSaveError",
    "ConfigValueError",
    "DatasetError",
    "DivergedLossError",
    "HubPushError",
    "ImageLoadError",
    "LabelError",
    "NonFiniteLossError",
    "OutputDirError",
    "RunLockedError",
    "StudentLoadError",
    "StudentUnchangedError",
    "TeacherLoadError",
]


class NonFiniteLossError(FloatingPointError):
    """A loss component became NaN or infinite; training stops before the weights or checkpoints are hit."""


class DivergedLossError(FloatingPointError):
    """The training loss grew far beyond its early level (``divergence_factor``) or past ``divergence_max_loss``
    while still finite; training stops before that step's update."""


class StudentUnchangedError(RuntimeError):
    """The run cannot change the student: it has no trainable parameter, or its gradients stay exactly 0 (the loss
    does not depend on it); raised before the run goes on training nothing."""


class HubPushError(HfHubHTTPError):
    """A push the Hub refused (rejected or missing token, no write access, no such repo) or that could not reach
    it (connection refused, no answer within ``hub_timeout``), saying what to change.

    It keeps the Hub's response (None when there was no answer), so ``except HfHubHTTPError`` still catches it.
    """

    def __init__(
        self, message: str, *, response: Any = None, server_message: str | None = None, request: Any = None
    ) -> None:
        if response is not None:
            super().__init__(message, response=response, server_message=server_message)
            return
        # No answer to read (the connection failed): the HTTP error's own fields, without a response.
        super(HfHubHTTPError, self).__init__(message)
        self.request_id = None
        self.server_message = server_message
        self.response = None
        if request is not None:
            self.request = request


class OutputDirError(ValueError):
    """An ``output_dir`` pat_hf will not write to: a model's source folder, the Hub cache, or a folder holding
    files that no pat_hf run wrote (see :mod:`pat_hf.training.output_dir`)."""


class RunLockedError(OutputDirError):
    """Another run is training in the same ``output_dir`` (its ``pat_hf_run.lock`` names the process)."""


class TeacherLoadError(ValueError):
    """The teacher could not be loaded as a transformers image classifier; the message names the path and file."""


class StudentLoadError(ValueError):
    """The student cannot be built as asked: pretrained weights that cannot be downloaded (offline), a model that
    cannot be a student (a ``features_only`` timm model, the teacher itself); the message names the model and the
    setting."""


class DatasetError(ValueError):
    """The data cannot be trained on: empty, a missing column, an unreadable image."""


class LabelError(DatasetError):
    """Labels of the wrong type or out of range for the classes."""


class ImageLoadError(DatasetError):
    """An image of the dataset cannot be read (truncated or corrupt file); the message names the file or row."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: incomplete, corrupted (the message names the file) or another run's."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint or the export failed (e.g. no space left); the earlier checkpoints are intact."""


class ConfigValueError(ValueError):
    """A value of a YAML/JSON config file of the wrong type (``temperature: "hot"``) or an unknown key."""
