"""Pushing the student to the Hub: :class:`HubPushMixin` (Trainer's push methods, the student alone) and the
explanation of refused pushes (:func:`explain_push_error`).

Trainer uploads all of output_dir but checkpoints (training_args.bin, logs, results, a processor saved there); a
pat_hf repo's root holds the student export alone, so each upload reads a snapshot of hard links to
:func:`pat_hf.models.export.hub_files` only. Checkpoints (``hub_strategy="checkpoint"`` / ``"all_checkpoints"``) go to a
subfolder, as in Trainer, so that they can be downloaded and resumed. Snapshots also keep background uploads
consistent while checkpoints are renamed from their staging folder, rotated away, or written next to them.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
from typing import Any

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import get_token

from ..errors import HubPushError
from ..models.export import hub_files
from ..models.model_card import ModelCardInfo, render_model_card
from ..models.student import is_timm_model
from ..version import __version__
from .recipe import recipe_summary

__all__ = ["HubPushError", "HubPushMixin", "bound_hub_timeouts", "explain_network_error", "explain_push_error"]

logger = logging.getLogger(__name__)

HUB_SNAPSHOT_PREFIX = "_hub-push-"


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
        A :class:`HubPushError` (also for server errors, HTTP 5xx and 429), or ``err`` itself for other failures.
    """
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
    elif status is not None and (status >= 500 or status == 429):
        # The Hub (or a proxy in front of it) failed or throttled: nothing to fix on this side but the timing.
        message = (
            f"Cannot push to the Hub repo {repo_id!r} at {endpoint}: the server answered HTTP {status}.{server} "
            "Try again later; the local export in output_dir is kept."
        )
    else:
        return err
    return HubPushError(message, response=err.response, server_message=getattr(err, "server_message", None))


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a failed connection: the HTTP client's transport errors (whichever client this
    huggingface_hub uses) and the OS's."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            client = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(client, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(dict.fromkeys(errors))


def bound_hub_timeouts(seconds: float) -> None:
    """Gives huggingface_hub's shared HTTP client a timeout when it has none (its default: wait forever, so a push
    to an endpoint that accepts the connection and never answers hangs). A timeout the user configured is kept.

    Args:
        seconds: Longest wait for a connection, or for any data sent or received.
    """
    from huggingface_hub.utils import get_session

    session = get_session()
    current = getattr(session, "timeout", None)
    if current is None or not hasattr(current, "read"):
        return
    if current.read is None or current.connect is None or current.write is None:
        session.timeout = type(current)(seconds)


def explain_network_error(
    err: BaseException, repo_id: str | None, seconds: float, endpoint: str | None = None, exported: bool = True
) -> Any:
    """A failed connection to the Hub as a :class:`HubPushError` naming the endpoint, the repo and the cause; other
    errors are returned unchanged."""
    if not isinstance(err, _network_errors()):
        return err
    endpoint = endpoint or constants.ENDPOINT
    name = type(err).__name__
    if "timeout" in name.lower() or isinstance(err, TimeoutError):
        cause = f"no answer within {seconds:g} s ({name}; raise hub_timeout for a slow connection)"
    else:
        cause = f"the connection failed ({name}: {str(err).strip() or 'no details'})"
    later = (
        "the local export in output_dir is kept, and trainer.push_to_hub() (or `hf upload`) can push it later"
        if exported
        else "nothing was trained or written yet; set push_to_hub=False to train without pushing"
    )
    message = (
        f"Cannot push to the Hub repo {repo_id!r} at {endpoint}: {cause}. Check the network and HF_ENDPOINT; {later}."
    )
    return HubPushError(message, request=getattr(err, "_request", None))


class HubPushMixin:
    """Model card and Hub push for :class:`pat_hf.PATDistillationTrainer` (mixed in before ``Trainer``)."""

    def model_card_info(self, model_name: str | None = None, dataset: str | None = None) -> ModelCardInfo:
        """Collects what the model card says: teacher, method settings, data, last evaluation metrics."""
        student = self.student
        metrics: dict[str, float] = {}
        for entry in self.state.log_history if self.state is not None else []:
            metrics.update({k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))})
        metrics = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second", "_steps_per_second"))}
        args = self.args
        hyper = {
            "learning_rate": args.learning_rate,
            "train_batch_size (total)": args.per_device_train_batch_size
            * max(1, args.world_size)
            * args.gradient_accumulation_steps,
            # What was trained (a max_steps run may stop before num_train_epochs), not what was asked for.
            "epochs": round(float(self.state.epoch), 2)
            if self.state is not None and self.state.epoch
            else args.num_train_epochs,
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "seed": args.seed,
            "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        }
        augmentation = getattr(self, "augmentation", None)
        if augmentation is not None:
            hyper["augmentation"] = augmentation.describe()
        ema = self.model_ema
        hyper.update(recipe_summary(args, ema.settings() if ema else None, self.exported_weights() if ema else None))
        arch = student.pretrained_cfg.get("architecture") if is_timm_model(student) else type(student).__name__
        return ModelCardInfo(
            model_name=model_name
            or (args.hub_model_id.split("/")[-1] if args.hub_model_id else None)
            or os.path.basename(os.path.normpath(args.output_dir)),
            student_architecture=str(arch),
            method_settings=self.method.settings(),
            teacher=self.teacher.describe() if self.teacher is not None else None,
            dataset=dataset or self.dataset_name,
            metrics=metrics,
            class_names=self.class_names,
            hyperparameters=hyper,
            repo_id=args.hub_model_id,
            library_name="timm" if is_timm_model(student) else "transformers",
            model_class=self.accelerator.unwrap_model(self.model).student_model_class,
            trained=bool(self.state is not None and self.state.global_step > 0)
            and not getattr(self, "_student_unchanged", False),
        )

    def create_model_card(self, model_name: str | None = None, dataset: str | None = None, **kwargs: Any) -> None:
        """Writes README.md for the exported student (Trainer's version reads ``model.config``, which the
        wrapper lacks)."""
        if not self.is_world_process_zero():
            return
        if self.state is None or not self.state.global_step or getattr(self, "_student_unchanged", False):
            logger.warning(
                "The model card of %s says that the student is not trained: no training step changed its weights.",
                self.args.output_dir,
            )
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(render_model_card(self.model_card_info(model_name=model_name, dataset=dataset)))

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Creates the repo ``args.hub_model_id``; a refused token or namespace raises
        :class:`pat_hf.HubPushError` saying what to change."""
        bound_hub_timeouts(self.args.hub_timeout)
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        try:
            super().init_hf_repo(token=token, private=private)
        except HfHubHTTPError as err:
            raise explain_push_error(err, repo_id, token if token is not None else self.args.hub_token) from err
        except _network_errors() as err:
            exported = os.path.isfile(os.path.join(self.args.output_dir, "config.json"))
            raise explain_network_error(err, repo_id, self.args.hub_timeout, exported=exported) from err

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Saves the student to ``output_dir`` and uploads it alone: ``config.json``, ``model.safetensors`` and
        ``README.md`` for a timm student (never the teacher, the method's heads or state, logs or checkpoints).

        Args:
            commit_message: Message of the commit.
            blocking: Wait for the upload; otherwise return a ``Future``.
            token: Token with write access; default ``args.hub_token``, then ``HF_TOKEN`` / ``hf auth login``.
            revision: Branch to commit to; default ``args.hub_revision`` (the default branch).
            private: Whether a repo created now is private; default ``args.hub_private_repo``.
            **kwargs: ``model_name`` and ``dataset`` for the model card.

        Returns:
            The ``CommitInfo`` (a ``Future`` of it when ``blocking=False``); None on processes other than the
            main one.

        Raises:
            pat_hf.HubPushError: The Hub refused the token or the repo (HTTP 401/403/404); nothing was
                uploaded and the local export stays as saved.
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        bound_hub_timeouts(self.args.hub_timeout)
        # The local export first (on every process: FSDP/DeepSpeed gather the weights collectively; only the main
        # process writes), so that it is there whatever happens to the push.
        self.save_model(_internal_call=True)
        if self.is_world_process_zero():
            self.create_model_card(model_name=kwargs.pop("model_name", None), dataset=kwargs.pop("dataset", None))
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        try:
            return self._upload_snapshot(
                self.args.output_dir,
                hub_files(self.student),
                repo_id=self.hub_model_id,
                commit_message=commit_message,
                token=token,
                run_as_future=not blocking,
                revision=revision if revision is not None else self.args.hub_revision,
            )
        except HfHubHTTPError as err:
            raise explain_push_error(err, self.hub_model_id, token) from err
        except _network_errors() as err:
            raise explain_network_error(err, self.hub_model_id, self.args.hub_timeout) from err

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """As Trainer's: the repo root gets the checkpoint's student (plus a model card with the metrics so
        far); the whole checkpoint, method state and manifest included, goes to ``last-checkpoint/`` or
        ``checkpoint-N/`` only with ``hub_strategy="checkpoint"`` / ``"all_checkpoints"``."""
        from transformers.trainer_utils import HubStrategy, SaveStrategy
        from transformers.utils.hub import PushInProgress

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if getattr(self, "_staging_dir", None) is not None:
            # Trainer pushes from inside its save, while the checkpoint is still staged without its file list
            # (a pushed checkpoint without it would not resume): CheckpointMixin pushes it once it is complete.
            self._deferred_checkpoint_push = True
            return
        # As Trainer: skip this push while the previous one is still uploading, unless hub_always_push.
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        bound_hub_timeouts(self.args.hub_timeout)
        output_dir = self.args.output_dir
        patterns = hub_files(self.student)
        # As Trainer, output_dir gets the checkpoint's student: copying it avoids gathering the weights again.
        for name in os.listdir(checkpoint_folder):
            if name != "README.md" and any(fnmatch.fnmatch(name, p) for p in patterns):
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        self.create_model_card()
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        common = {
            "repo_id": self.hub_model_id,
            "token": self.args.hub_token,
            "revision": self.args.hub_revision,
            "run_as_future": True,
        }
        jobs = [self._upload_snapshot(output_dir, patterns, commit_message=commit_message, **common)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            name = os.path.basename(os.path.normpath(checkpoint_folder))
            path_in_repo = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else name
            message = commit_message + ", checkpoint"
            jobs.append(
                self._upload_snapshot(
                    checkpoint_folder, None, path_in_repo=path_in_repo, commit_message=message, **common
                )
            )
        for job in jobs:
            job.add_done_callback(self._warn_failed_push)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def _upload_snapshot(self, folder: str, patterns: list[str] | None, *, run_as_future: bool, **kwargs: Any) -> Any:
        """``upload_folder`` of a hard-link snapshot of ``folder`` (its top-level files matching ``patterns``, or
        everything), removed once uploaded."""
        snapshot = _link_snapshot(folder, os.path.join(self.args.output_dir, HUB_SNAPSHOT_PREFIX), patterns)
        try:
            result = self._hf_api().upload_folder(folder_path=snapshot, run_as_future=run_as_future, **kwargs)
        except BaseException:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        if run_as_future:
            result.add_done_callback(lambda _: shutil.rmtree(snapshot, ignore_errors=True))
        else:
            shutil.rmtree(snapshot, ignore_errors=True)
        return result

    def _warn_failed_push(self, job: Any) -> None:
        # Trainer waits for background pushes without looking at their outcome; a failed one would go unnoticed.
        err = None if job.cancelled() else job.exception()
        if isinstance(err, HfHubHTTPError):
            err = explain_push_error(err, self.hub_model_id, self.args.hub_token)
        elif err is not None:
            err = explain_network_error(err, self.hub_model_id, self.args.hub_timeout)
        if err is not None:
            logger.warning("A push to the Hub failed (training goes on): %s", err)

    def _hf_api(self) -> Any:
        # One client per trainer: its single worker thread keeps background commits in submission order.
        api = getattr(self, "_hub_api", None)
        if api is None:
            api = self._hub_api = HfApi(library_name="pat_hf", library_version=__version__)
        return api


def _link_snapshot(folder: str, prefix: str, patterns: list[str] | None = None) -> str:
    """A new folder named ``prefix...`` holding hard links (copies across devices) to ``folder``'s files: all of
    them, or only its top-level files matching ``patterns``."""
    snapshot = tempfile.mkdtemp(prefix=os.path.basename(prefix), dir=os.path.dirname(prefix))
    for root, _, files in os.walk(folder):
        relative = os.path.relpath(root, folder)
        if patterns is not None and relative != ".":
            continue
        os.makedirs(os.path.join(snapshot, relative), exist_ok=True)
        for name in files:
            if patterns is not None and not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            source, target = os.path.join(root, name), os.path.join(snapshot, relative, name)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    return snapshot
