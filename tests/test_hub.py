"""Hub round trip through the real huggingface_hub client and a local Hub (tests/hub_server.py).

The client reads HF_ENDPOINT when huggingface_hub is imported, so everything that talks to the Hub runs in a
subprocess pointed at the local server, with an empty cache. One child pushes a teacher, distils from its id
and pushes the student (hub_strategy="end"), trains and pushes again (hub_strategy="checkpoint"), tries refused
pushes and resumes from the pushed checkpoint; a fresh child pulls the student with timm, AutoModel and
pipeline alone. The tests check what each step left on the server and locally.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors

from support.hub_server import HubServer, git_blob_sha1

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TOKEN = "hf_user_write_token"
BAD_TOKEN = "hf_not_a_real_token"

_PRELUDE = f"""
import hashlib, json, os, sys
from pathlib import Path
sys.path.insert(0, {TESTS_DIR!r})
import numpy as np
import torch
from PIL import Image

params = json.loads(sys.argv[1])
x = torch.randn(2, 3, 20, 20, generator=torch.Generator().manual_seed(0))
image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 20, 3), dtype=np.uint8))
"""

# Pushes a tiny teacher and distils it by id into a timm student, pushed at the end (hub_strategy="end"); trains
# again with hub_strategy="checkpoint" and pushes again. Saves the student's outputs after each push. Then the
# refused pushes: a bad token (at construction and in push_to_hub), and a namespace one may not write to (a
# new repo, and an existing repo of someone else), recording the messages and the output_dir's hashes.
_TRAIN = """
import timm
from transformers import ViTImageProcessor
from support.tiny import make_image_dataset, tiny_args, tiny_teacher
from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf import HubPushError

teacher = tiny_teacher("vit")
teacher.push_to_hub("user/teacher")
processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
teacher_commit = processor.push_to_hub("user/teacher").oid

dataset = make_image_dataset()
torch.manual_seed(0)
student = create_student("test_resnet", num_classes=3, img_size=20)
view = ImageView.from_timm(student)


def distil(strategy):
    args = tiny_args(
        Path(params["tmp"]), distill_method="kd", num_train_epochs=2, eval_strategy="epoch", save_strategy="epoch",
        push_to_hub=True, hub_model_id="user/student", hub_strategy=strategy, hub_token=params["token"],
    )
    trainer = PATDistillationTrainer(
        model=student, teacher="user/teacher", teacher_revision=teacher_commit, args=args,
        dataset_name="user/toy-images",
        train_dataset=with_image_transforms(dataset, view, None, train=True),
        eval_dataset=with_image_transforms(dataset, view, None, train=False),
    )
    assert trainer.teacher.model.config.image_size == 16  # the pushed teacher, at the pushed revision
    trainer.train()
    return trainer


def outputs():
    model = student.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        return {"logits": model(x), "probs": model(transform(image).unsqueeze(0)).softmax(-1)[0]}


first = distil("end").push_to_hub()
torch.save({"sha": first.oid, **outputs()}, params["out"] + "/first.pt")
second = distil("checkpoint").push_to_hub(commit_message="Second round")
torch.save({"sha": second.oid, **outputs()}, params["out"] + "/second.pt")


def digest(folder):
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


def make(name, **overrides):
    args = tiny_args(Path(params["tmp"]) / name, distill_method="kd", **overrides)
    return PATDistillationTrainer(model=student, teacher=tiny_teacher("vit"), args=args, class_names=dataset.features["label"].names)


def refused(call):
    try:
        call()
    except HubPushError as err:
        return str(err)
    raise AssertionError("the push was not refused")


report = {}
report["init_bad_token"] = refused(
    lambda: make("a", push_to_hub=True, hub_model_id="user/never", hub_token=params["bad_token"])
)
for repo in ("other-org/existing", "other-org/new"):
    trainer = make(repo.replace("/", "_"), hub_model_id=repo)
    trainer.save_model()
    out = trainer.args.output_dir
    before = digest(out)
    report[repo] = {
        "bad_token": refused(lambda: trainer.push_to_hub(token=params["bad_token"])),
        "forbidden": refused(lambda: trainer.push_to_hub()),
        "unchanged": digest(out) == before,
        "files": sorted(before),
    }

# The checkpoint pushed with hub_strategy="checkpoint" resumes from a download.
from huggingface_hub import snapshot_download

checkpoint = os.path.join(snapshot_download("user/student", allow_patterns="last-checkpoint/*"), "last-checkpoint")
resumed = PATDistillationTrainer(
    model=student, teacher="user/teacher", teacher_revision=teacher_commit,
    args=tiny_args(Path(params["tmp"]) / "resumed", distill_method="kd", num_train_epochs=3),
    train_dataset=with_image_transforms(dataset, view, None, train=True),
)
resumed.train(resume_from_checkpoint=checkpoint)
report["resumed_steps"] = resumed.state.global_step
json.dump(report, open(params["out"] + "/report.json", "w"))
"""

# Loads the student back from the Hub, without pat_hf, at the first push's commit and at main.
_PULL = """
import timm
from transformers import AutoModelForImageClassification, pipeline

assert "pat_hf" not in sys.modules
results = {}
for name, revision in params["revisions"].items():
    at = "" if revision == "main" else "@" + revision
    model = timm.create_model("hf-hub:user/student" + at, pretrained=True).eval()
    auto = AutoModelForImageClassification.from_pretrained("user/student", revision=revision).eval()
    classifier = pipeline("image-classification", model="user/student", revision=revision)
    with torch.no_grad():
        results[name] = {
            "timm": model(x),
            "auto": auto(pixel_values=x).logits,
            "pipeline": {p["label"]: p["score"] for p in classifier(image, top_k=3)},
            "labels": [auto.config.id2label[i] for i in range(3)],
        }
assert "pat_hf" not in sys.modules
torch.save(results, params["out"] + "/pulled.pt")
"""


def _run_child(code: str, hub: HubServer, tmp_path, name: str, timeout: int = 240, **params) -> None:
    """Runs ``code`` in a fresh interpreter talking to ``hub`` with an empty cache."""
    script = tmp_path / f"{name}.py"
    script.write_text(textwrap.dedent(_PRELUDE) + textwrap.dedent(code))
    home = tmp_path / f"hf_home_{name}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_OFFLINE="0",  # conftest.py makes the test process offline; the child talks to the local Hub
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TQDM_DISABLE="1",
    )
    params = {"tmp": str(tmp_path / name), "out": str(tmp_path), **params}
    result = subprocess.run(
        [sys.executable, str(script), json.dumps(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tokens = {TOKEN: "user", "hf_other_org_token": "other-org"}
    with HubServer(tmp_path_factory.mktemp("hub"), tokens=tokens, orgs={"user": ["user-org"]}) as server:
        yield server


@pytest.fixture(scope="module")
def round_trip(hub, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("round_trip")
    hub.create_repo("other-org/existing", owner="other-org")
    seeded = hub.head("other-org/existing")
    _run_child(_TRAIN, hub, tmp_path, "train", token=TOKEN, bad_token=BAD_TOKEN)
    first = torch.load(tmp_path / "first.pt")
    second = torch.load(tmp_path / "second.pt")
    _run_child(_PULL, hub, tmp_path, "pull", revisions={"first": first["sha"], "main": "main"})
    report = json.loads((tmp_path / "report.json").read_text())
    return {
        "first": first,
        "second": second,
        "pulled": torch.load(tmp_path / "pulled.pt"),
        "report": report,
        "seeded": seeded,
        "output_dir": tmp_path / "train" / "out",
    }


def _card(hub: HubServer, revision: str = "main") -> tuple[dict, str]:
    text = hub.files("user/student", revision)["README.md"].decode()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_repo_root_holds_the_student_alone_in_timm_layout(hub, round_trip):
    files = hub.files("user/student")
    root = {path for path in files if "/" not in path}
    assert root == {".gitattributes", "config.json", "model.safetensors", "README.md"}
    # Weights are the student's own keys: no wrapper prefix, no method heads, no teacher.
    weights = load_safetensors(files["model.safetensors"])
    assert weights and not any(k.startswith(("student.", "method.", "teacher")) for k in weights)
    config = json.loads(files["config.json"])
    assert config["architecture"] == "test_resnet" and config["label_names"] == ["cat", "dog", "bird"]
    # Nothing of the teacher's (its image processor) nor of the training run outside the checkpoint folder.
    assert not any(path.endswith(("preprocessor_config.json", "training_args.bin")) for path in root)
    assert {path.split("/")[0] for path in files if "/" in path} == {"last-checkpoint"}


def test_checkpoint_strategy_pushes_a_resumable_checkpoint_to_a_subfolder(hub, round_trip):
    files = hub.files("user/student")
    checkpoint = {path.split("/", 1)[1] for path in files if path.startswith("last-checkpoint/")}
    assert {"model.safetensors", "config.json", "distill_manifest.json", "trainer_state.json"} <= checkpoint
    assert {"optimizer.pt", "scheduler.pt"} <= checkpoint
    manifest = json.loads(files["last-checkpoint/distill_manifest.json"])
    assert manifest["teacher"]["name_or_path"] == "user/teacher" and manifest["method"]["method"] == "kd"
    messages = [message for _, message in hub.commits("user/student")]
    assert "Training in progress, epoch 1" in messages and "Training in progress, epoch 1, checkpoint" in messages
    # Intermediate root commits already load as a plain timm model: config, weights and a model card.
    first_progress = next(sha for sha, message in hub.commits("user/student") if message.endswith("epoch 1"))
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files("user/student", first_progress))
    # The background uploads read hard-linked snapshots of the checkpoints, removed once uploaded.
    assert not [name for name in os.listdir(round_trip["output_dir"]) if name.startswith("_hub-push-")]


def test_pulled_student_gives_the_local_students_outputs(round_trip):
    local, pulled = round_trip["second"], round_trip["pulled"]["main"]
    torch.testing.assert_close(pulled["timm"], local["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(pulled["auto"], local["logits"], rtol=0, atol=1e-5)
    assert pulled["labels"] == ["cat", "dog", "bird"]
    expected = dict(zip(pulled["labels"], local["probs"].tolist(), strict=True))
    assert pulled["pipeline"].keys() == expected.keys()
    for label, score in pulled["pipeline"].items():
        assert score == pytest.approx(expected[label], abs=1e-5)


def test_second_push_makes_a_new_commit_with_the_new_weights(hub, round_trip):
    first, second, pulled = round_trip["first"], round_trip["second"], round_trip["pulled"]
    assert first["sha"] != second["sha"] and hub.head("user/student") == second["sha"]
    history = hub.commits("user/student")
    shas = [sha for sha, _ in history]
    assert history[-1][1] == "initial commit" and dict(history)[first["sha"]] == "End of training"
    # hub_strategy="end" pushed once; the second run's checkpoint pushes and its final push come after it (the
    # final one makes no empty commit when the last checkpoint push already uploaded the same student).
    newer = [message for _, message in history[: shas.index(first["sha"])]]
    assert newer and all(m.startswith("Training in progress") or m == "Second round" for m in newer)
    assert not torch.allclose(first["logits"], second["logits"])
    # The first push stays reachable at its commit, with its own weights.
    torch.testing.assert_close(pulled["first"]["timm"], first["logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(pulled["first"]["auto"], first["logits"], rtol=0, atol=1e-5)


def test_model_card_metadata_and_text(hub, round_trip):
    meta, body = _card(hub)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"knowledge-distillation", "kd", "timm", "image-classification"} <= set(meta["tags"])
    assert meta["base_model"] == "user/teacher"
    assert meta["datasets"] == ["user/toy-images"]
    assert meta["model-index"][0]["name"] == "student"  # named after hub_model_id, not the output folder
    assert body.lstrip().startswith("# student")
    results = meta["model-index"][0]["results"][0]
    assert results["task"]["type"] == "image-classification"
    assert results["dataset"]["type"] == "user/toy-images"
    metrics = {m["name"]: m["value"] for m in results["metrics"]}
    assert "eval_accuracy" in metrics and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert "ViTForImageClassification" in body and "temperature: 4.0" in body and "kd_weight" in body
    assert 'timm.create_model("hf-hub:user/student", pretrained=True)' in body
    assert 'AutoModelForImageClassification.from_pretrained("user/student")' in body
    assert 'pipeline("image-classification", model="user/student")' in body
    assert "hinton2015distilling" in body and "lin2025pat" in body and "hao2023ofa" not in body


def test_refused_pushes_say_what_to_fix_and_keep_the_local_export(hub, round_trip):
    report = round_trip["report"]

    for message in [report["init_bad_token"]] + [
        report[r]["bad_token"] for r in ("other-org/existing", "other-org/new")
    ]:
        assert "HTTP 401" in message and "invalid or expired" in message
        assert "hub_token" in message and f"{hub.url}/settings/tokens" in message
        assert BAD_TOKEN not in message  # never echo a secret
    for repo in ("other-org/existing", "other-org/new"):
        message = report[repo]["forbidden"]
        assert f"'{repo}'" in message and "HTTP 403" in message and "may not write" in message
        assert f"hub_model_id='user/{repo.split('/')[1]}'" in message  # the user's own namespace, from whoami
        assert report[repo]["unchanged"], f"a refused push to {repo} changed the local export"
        assert {"config.json", "model.safetensors", "README.md"} <= set(report[repo]["files"])
    # Nothing reached the Hub.
    assert not hub.has_repo("other-org/new") and not hub.has_repo("user/never")
    assert hub.head("other-org/existing") == round_trip["seeded"]


def test_pushed_checkpoint_resumes_after_download(round_trip):
    # last-checkpoint is step 6 of 2 epochs x 3 steps; a 3-epoch run resumed from it trains steps 7 to 9.
    assert round_trip["report"]["resumed_steps"] == 9


def test_server_answers_like_the_hub(hub):
    """The few Hub behaviours the tests above rely on, checked without a client."""
    import urllib.error
    import urllib.request

    def request(path: str, token: str | None = None, method: str = "GET"):
        req = urllib.request.Request(hub.url + path, method=method)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    hub.create_repo("user/probe", owner="user")
    status, headers, _ = request("/user/probe/resolve/main/.gitattributes", method="HEAD")
    assert status == 200 and headers["X-Repo-Commit"] == hub.head("user/probe") and headers["ETag"]
    status, headers, _ = request("/user/probe/resolve/main/missing.json")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert request("/api/whoami-v2", BAD_TOKEN)[0] == 401
    assert json.load(io.BytesIO(request("/api/whoami-v2", TOKEN)[2]))["name"] == "user"
    # ETags of regular files are git blob ids, as on the Hub (git's id of the empty blob).
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
