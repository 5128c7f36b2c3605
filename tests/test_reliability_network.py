"""Network faults of a Hub push (issue 23, class 6): an endpoint that accepts connections and never answers, and
one that refuses them. Both end with pat_hf.HubPushError naming the endpoint and the repo, in bounded time, with the
local export kept.

huggingface_hub reads HF_ENDPOINT when it is imported, so the pushes run in a child process pointed at a real local
socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"

CHILD = """
import json, os, sys, time
from pathlib import Path
from support.tiny import tiny_args, tiny_teacher
from pat_hf import PATDistillationTrainer, create_student
from pat_hf.errors import HubPushError

params = json.loads(sys.argv[1])
report = {}

def attempt(name, call):
    start = time.monotonic()
    try:
        call()
        report[name] = {"error": None}
    except HubPushError as err:
        report[name] = {"error": str(err), "type": "HubPushError"}
    except BaseException as err:  # a raw error: what the test must not see
        report[name] = {"error": f"{type(err).__name__}: {err}", "type": type(err).__name__}
    report[name]["seconds"] = time.monotonic() - start

def make(folder, **overrides):
    args = tiny_args(Path(params["tmp"]) / folder, hub_model_id="user/student", hub_timeout=2, **overrides)
    return PATDistillationTrainer(
        model=create_student("test_resnet", num_classes=3), teacher=tiny_teacher("vit"), args=args,
        class_names=["cat", "dog", "bird"])

# push_to_hub=True: Trainer creates the repo when it is built.
attempt("init", lambda: make("init", push_to_hub=True))
# A push at the end: the export is written first and kept.
trainer = make("push")
attempt("push", trainer.push_to_hub)
report["files"] = sorted(os.listdir(trainer.args.output_dir))
json.dump(report, open(params["report"], "w"))
"""


class SilentServer:
    """Accepts every connection on 127.0.0.1 and never answers (a hung proxy or Hub)."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.connections:
            connection.close()


def refused_url() -> str:
    """A local port nothing listens on: connecting is refused at once."""
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return f"http://127.0.0.1:{port}"


def push_against(endpoint: str, tmp_path: Path) -> dict:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_TOKEN="hf_test_token",
        HF_HUB_DISABLE_TELEMETRY="1",
        TQDM_DISABLE="1",
        PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]),
        OMP_NUM_THREADS="1",
    )
    report = tmp_path / "report.json"
    params = json.dumps({"tmp": str(tmp_path / "runs"), "report": str(report)})
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(script), params], env=env, capture_output=True, text=True, timeout=240)
    if result.returncode != 0 or not report.exists():
        pytest.fail(f"the child failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return {**json.loads(report.read_text()), "wall": time.monotonic() - start}


def check_report(report: dict, endpoint: str, cause: str) -> None:
    for name in ("init", "push"):
        outcome = report[name]
        assert outcome["type"] == "HubPushError", outcome
        assert f"'user/student' at {endpoint}" in outcome["error"], outcome["error"]
        assert cause in outcome["error"], outcome["error"]
        # Bounded: hub_timeout=2 s per wait, huggingface_hub's retries included.
        assert outcome["seconds"] < 60, outcome
    assert "local export in output_dir is kept" in report["push"]["error"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(report["files"])


@pytest.mark.slow
def test_an_endpoint_that_never_answers_times_out(tmp_path):
    server = SilentServer()
    try:
        report = push_against(server.url, tmp_path)
    finally:
        server.close()
    check_report(report, server.url, "no answer within 2 s")
    assert server.connections, "the client never reached the silent endpoint"


@pytest.mark.slow
def test_a_refused_connection_names_the_endpoint_and_the_repo(tmp_path):
    endpoint = refused_url()
    report = push_against(endpoint, tmp_path)
    check_report(report, endpoint, "the connection failed (ConnectError")


@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_name_the_endpoint_and_the_repo(status):
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client
    from huggingface_hub.errors import HfHubHTTPError

    from pat_hf.errors import HubPushError
    from pat_hf.training.hub_push import explain_push_error

    request = httpx2.Request("POST", "https://hub.example/api/models/user/student/commit/main")
    response = httpx2.Response(status, request=request, headers={"X-Error-Message": "upstream unavailable"})
    err = explain_push_error(
        HfHubHTTPError("raw", response=response, server_message="upstream unavailable"),
        "user/student",
        "hf_x",
        endpoint="https://hub.example",
    )
    assert isinstance(err, HubPushError) and err.response is response
    assert f"'user/student' at https://hub.example: the server answered HTTP {status}" in str(err)
    assert "upstream unavailable" in str(err) and "local export in output_dir is kept" in str(err)
