"""Two real processes (torchrun, gloo, CPU) against one: DDP equivalence, rank sync, rank-0 export, gathered eval.

All scenarios run in ONE launch of tests/distributed_worker.py on 2 processes (start-up dominates the cost); the
one-process references run in this process through the same worker code. Tiny models, 4 optimizer steps.

Tolerance of the 1-vs-2-process comparisons: ``rtol=1e-5, atol=1e-6`` on weights. Both runs do the same float32
maths on the same samples; only the order of the batch reductions differs (one sum over 8 samples vs two sums
over 4, averaged by the all-reduce), which changes results by a few float32 ulps per step. Measured after 4 SGD
steps (lr 0.1): at most 6e-8 absolute (kd, pat without feedback), 7e-9 (ofa); the tolerance leaves more than an
order of magnitude of margin, while a mis-ordered sample or per-process BatchNorm statistics moved weights by
~3e-4 in the same setting. PAT with feedback and BatchNorm running statistics are compared as far as they are
defined to match (see docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import ViTImageProcessor

from support import distributed_worker as worker
from support.tiny import make_image_dataset, tiny_teacher

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL, ATOL = 1e-5, 1e-6
# Logged values are rounded to 4 decimals by the trainer.
LOG_ATOL = 2e-4

SCENARIOS = [
    {
        "name": "kd",
        "method": "kd",
        "args": {"ddp_find_unused_parameters": False},
        "evaluate": True,
        "export": True,
    },
    {"name": "ofa", "method": "ofa", "args": {"ddp_find_unused_parameters": False}},
    # RSD's correlation and AAD BatchNorm over the GLOBAL batch (embeddings gathered with gradients).
    {"name": "rsd", "method": "rsd", "args": {"ddp_find_unused_parameters": False}},
    {"name": "pat_no_feedback", "method": "pat", "args": {"pat_feedback": False, "ddp_find_unused_parameters": False}},
    # Model EMA (decay 0.5, so 4 steps move it well away from the initial weights), evaluated beside the student.
    {
        "name": "ema",
        "method": "kd",
        "args": {"model_ema": True, "model_ema_decay": 0.5, "ddp_find_unused_parameters": False},
        "evaluate": True,
    },
    # The default: the Trainer turns find_unused_parameters on for the (non-PreTrainedModel) wrapper.
    {"name": "pat", "method": "pat"},
    # torch_compile: regions compiled in each process, inside DDP's forward.
    {"name": "pat_compiled", "method": "pat", "args": {"torch_compile": True, "torch_compile_backend": "aot_eager"}},
    {"name": "example", "example_argv": None},  # filled in by the fixture (paths)
    # Last: a DDP error leaves the reducer of this trainer unusable.
    {"name": "pat_strict", "method": "pat", "args": {"ddp_find_unused_parameters": False}, "expect_error": True},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_argv(data_dir: str, teacher_dir: str, output_dir: str) -> list[str]:
    return [
        "--dataset_name", data_dir,
        "--teacher_name_or_path", teacher_dir,
        "--student_name", "test_vit",
        "--student_kwargs", json.dumps({"img_size": 16}),
        "--distill_method", "pat",
        "--pat_dim", "32",
        "--pat_num_heads", "4",
        "--output_dir", output_dir,
        "--do_train", "--do_eval",
        "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--save_strategy", "steps",
        "--save_steps", "2",
        "--logging_steps", "1",
        "--report_to", "none",
        "--use_cpu",
        "--dataloader_num_workers", "0",
        "--seed", "0",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Results of the 2-process launch: scenario name -> [rank 0 result, rank 1 result]."""
    root = tmp_path_factory.mktemp("distributed")
    data_dir, teacher_dir = str(root / "data"), str(root / "teacher")
    import datasets

    datasets.DatasetDict(
        {"train": make_image_dataset(n=16), "validation": make_image_dataset(n=worker.EVAL_SIZE, seed=1)}
    ).save_to_disk(data_dir)
    tiny_teacher("vit", id2label={0: "cat", 1: "dog", 2: "bird"}).save_pretrained(teacher_dir)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(teacher_dir)

    scenarios = [dict(s) for s in SCENARIOS]
    for s in scenarios:
        if s["name"] == "example":
            s["example_argv"] = example_argv(data_dir, teacher_dir, str(root / "work" / "example"))
    spec = {"workdir": str(root / "work"), "results_dir": str(root / "results"), "scenarios": scenarios}
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps(spec))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("WORLD_SIZE", None)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()),
        os.path.join(HERE, "support", "distributed_worker.py"), str(spec_path),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=str(root))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    results = {}
    for s in scenarios:
        results[s["name"]] = [
            torch.load(root / "results" / f"{s['name']}-rank{r}.pt", weights_only=False) for r in range(2)
        ]
    results["_stdout"] = proc.stdout
    results["_root"] = str(root)
    return results


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, dict]:
    """The same scenarios on one process: global batch 8 in one batch (or 2 x 4 accumulated for PAT)."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name, extra in (
        ("kd", {}),
        ("ofa", {}),
        ("rsd", {}),
        # Local batch statistics, for contrast: two micro-batches of 4, each with its own correlation and BatchNorm.
        ("rsd", {"gradient_accumulation_steps": 2, "reference_name": "rsd_local"}),
        ("pat_no_feedback", {"gradient_accumulation_steps": 2}),
        ("ema", {}),
    ):
        extra = dict(extra)
        key = extra.pop("reference_name", name)
        scenario = {**next(s for s in SCENARIOS if s["name"] == name), **extra, "export": False, "name": key}
        out[key] = worker.run_scenario(scenario, str(root))
    return out


def without_bn_statistics(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # BatchNorm running statistics (PAT's aligners) follow DDP's buffer broadcast: on N processes they are rank
    # 0's chunk's running averages, on one process with accumulation every micro-batch's. They never reach a
    # forward in training mode nor the exported student, so the 1-vs-2-process comparison leaves them out.
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tolerance) -> float:
    a, b = without_bn_statistics(a), without_bn_statistics(b)
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **tolerance)
        if a[key].is_floating_point():
            worst = max(worst, (a[key] - b[key]).abs().max().item())
    return worst


def test_runs_used_two_processes_and_the_teacher_outside_ddp(runs):
    for name in ("kd", "ofa", "pat_no_feedback", "pat"):
        ranks = runs[name]
        assert [r["process_index"] for r in ranks] == [0, 1]
        assert all(r["world_size"] == 2 for r in ranks)
        # The frozen teacher lives on each process's device and is no part of the DDP module's state.
        assert all(r["teacher_device"] == "cpu" for r in ranks)
        assert not any(k.startswith("teacher") for k in ranks[0]["state"])
    assert runs["kd"][0]["ddp_find_unused_parameters"] is False
    assert runs["pat"][0]["ddp_find_unused_parameters"] is True


def test_each_rank_gets_its_chunk_of_the_global_batch(runs, references):
    """Rank r's step-k batch is rows [4r, 4r + 4) of the one-process step-k batch, across an epoch boundary."""
    single = references["kd"]["seen"]["train"][: worker.MAX_STEPS]
    for rank in range(2):
        ranked = runs["kd"][rank]["seen"]["train"][: worker.MAX_STEPS]
        for step, (mine, whole) in enumerate(zip(ranked, single)):
            assert mine == pytest.approx(whole[4 * rank : 4 * rank + 4]), (rank, step)
    # With accumulation the micro-batches are the same chunks, in rank order.
    micro = references["pat_no_feedback"]["seen"]["train"][: 2 * worker.MAX_STEPS]
    for step in range(worker.MAX_STEPS):
        for rank in range(2):
            assert runs["pat_no_feedback"][rank]["seen"]["train"][step] == pytest.approx(micro[2 * step + rank])


@pytest.mark.parametrize("name", ["kd", "ofa", "rsd", "pat_no_feedback"])
def test_two_processes_match_one_process(runs, references, name):
    """Same global batch, same steps: the student, the heads and the logged loss parts match.

    For rsd this pins the global batch (see test_rsd_uses_the_global_batch). Its AAD weights get the largest
    gradients of these runs (grad norm ~70 at lr 0.1): float32 rounding in the gathered batch's reductions then
    moves a few of them by up to ~2e-6 (atol 1e-5 for them), against ~1e-2 with local statistics."""
    atol = 1e-5 if name == "rsd" else ATOL
    worst = assert_states_close(runs[name][0]["state"], references[name]["state"], rtol=RTOL, atol=atol)
    assert worst < 1e-5
    # Something did train: a wrong sync would not hide behind unchanged weights.
    logs = [h for h in runs[name][0]["log_history"] if "loss" in h]
    single = [h for h in references[name]["log_history"] if "loss" in h]
    assert len(logs) == len(single) == worker.MAX_STEPS
    for mine, whole in zip(logs, single):
        parts = [k for k in whole if k.startswith("loss_")]
        assert parts and set(parts) == {k for k in mine if k.startswith("loss_")}
        for key in ["loss", *parts]:
            # Reduced across ranks: the 2-process value of each part is the global-batch mean.
            assert mine[key] == pytest.approx(whole[key], abs=LOG_ATOL), key


def test_rsd_uses_the_global_batch(runs, references):
    """RSD's correlation and AAD BatchNorm statistics come from the global batch of 8 (all-gathered with gradients):
    the 2-process run follows the one-process batch of 8, not two local batches of 4 (accumulated), which log
    another loss_rsd and end elsewhere."""
    two = [h["loss_rsd"] for h in runs["rsd"][0]["log_history"] if "loss_rsd" in h]
    whole = [h["loss_rsd"] for h in references["rsd"]["log_history"] if "loss_rsd" in h]
    local = [h["loss_rsd"] for h in references["rsd_local"]["log_history"] if "loss_rsd" in h]
    assert two == pytest.approx(whole, abs=LOG_ATOL)
    assert abs(two[0] - local[0]) > 0.05
    state, local_state = (
        without_bn_statistics(runs["rsd"][0]["state"]),
        without_bn_statistics(references["rsd_local"]["state"]),
    )
    assert max((state[k] - local_state[k]).abs().max().item() for k in state if state[k].is_floating_point()) > 1e-3


@pytest.mark.parametrize("name", ["kd", "ofa", "rsd", "pat_no_feedback", "pat", "pat_compiled"])
def test_all_ranks_hold_identical_weights(runs, name):
    rank0, rank1 = runs[name][0]["state"], runs[name][1]["state"]
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    # Every process logged the same (reduced) history; only timings differ.
    def timeless(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if not k.endswith(("runtime", "per_second"))} for h in history]

    assert timeless(runs[name][0]["log_history"]) == timeless(runs[name][1]["log_history"])


def test_compiled_regions_under_ddp_train_as_eager(runs):
    """torch_compile on 2 processes: DDP wraps the plain wrapper, each process compiles its regions, and the run
    ends where the eager one does (aot_eager: float32 rounding apart)."""
    for rank in range(2):
        compiled, eager = runs["pat_compiled"][rank], runs["pat"][rank]
        for key, value in compiled["state"].items():
            torch.testing.assert_close(value, eager["state"][key], rtol=RTOL, atol=ATOL, msg=key)
        for key, value in compiled["feedback"].items():
            torch.testing.assert_close(value, eager["feedback"][key], rtol=1e-4, atol=1e-5, msg=key)


def test_pat_feedback_is_per_process(runs):
    """PAT's feedback is each process's own: its local batch of 4, from its own samples, never broadcast."""
    fb0, fb1 = runs["pat"][0]["feedback"], runs["pat"][1]["feedback"]
    assert fb0.keys() == fb1.keys() and len(fb0) == 4
    for key in fb0:
        assert fb0[key].shape[0] == fb1[key].shape[0] == 4
        assert not torch.equal(fb0[key], fb1[key]), key


def test_pat_feedback_needs_find_unused_parameters(runs):
    """The first step (and any odd-sized batch) has no feedback, so the prompts' fusion branch gets no gradient."""
    for rank in runs["pat_strict"]:
        assert "error" in rank, "expected DDP to refuse unused parameters"
        assert "find_unused_parameters" in rank["error"] or "unused" in rank["error"].lower(), rank["error"]


def test_eval_metrics_cover_the_whole_eval_set(runs, references):
    """13 images on 2 processes x batch 4: the padding is dropped, accuracy equals the one-process value."""
    single = references["kd"]["eval"]
    accuracies = [k for k in single if "accuracy" in k]
    assert "eval_accuracy" in accuracies
    for rank in runs["kd"]:
        assert {k: rank["eval"][k] for k in accuracies} == {k: single[k] for k in accuracies}
    # Every rank evaluated its share: 4 + 4 + 4 + 1 real images, the last global batch padded by 3.
    seen = [len(b) for rank in runs["kd"] for b in rank["seen"]["eval"]]
    assert seen == [4, 4, 4, 4]
    # Loss: Trainer's eval_loss is the per-batch mean repeated per image, so the one real image of rank 1's padded
    # last batch [12, 0, 1, 2] carries that batch's mean; close, not equal (see docs/distributed.md).
    for rank in runs["kd"]:
        assert rank["eval"]["eval_loss"] == pytest.approx(single["eval_loss"], rel=0.05)


def opened_files(result: dict, under: str) -> set[str]:
    """Files opened for writing under ``under``; the export's files by their final names (they are written to a
    ``_tmp-export-*`` staging folder, then moved in place)."""
    paths = {
        os.path.relpath(path, under) for event, path in result["writes"] if event == "open" and path.startswith(under)
    }
    return {p.split(os.sep, 1)[1] if p.startswith("_tmp-export-") and os.sep in p else p for p in paths}


def test_only_rank_zero_writes_the_export(runs):
    out = os.path.join(runs["_root"], "work", "kd", "out")
    assert sorted(os.listdir(out)) == [
        "README.md", "config.json", "model.safetensors", "pat_hf_run.json", "training_args.bin"
    ]  # fmt: skip
    assert {"config.json", "README.md"} <= opened_files(runs["kd"][0], out)
    # Rank 1 wrote nothing at all (no file, no folder) through save_model, create_model_card and push_to_hub;
    # push_to_hub returned before reaching the Hub (offline, it would have raised).
    assert runs["kd"][1]["writes"] == []
    assert runs["kd"][1]["push_returned"] is True


def test_example_script_on_two_processes(runs):
    """examples/run_image_classification_pat.py (PAT, a checkpoint, train + eval) under the same 2-process launch."""
    out = os.path.join(runs["_root"], "work", "example")
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "all_results.json", "eval_results.json"} <= files
    assert {"train_results.json", "trainer_state.json", "checkpoint-2"} <= files
    assert not [name for name in files if name.startswith("_tmp-") or "rank" in name]
    checkpoint = set(os.listdir(os.path.join(out, "checkpoint-2")))
    # Per-rank files exist only where Trainer means them to: the RNG states.
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors", "distill_state.safetensors"} <= checkpoint
    assert not [name for name in checkpoint if "rank" in name]
    assert opened_files(runs["example"][1], out) == set()
    assert {"config.json", "README.md", "all_results.json"} <= opened_files(runs["example"][0], out)
    # Both processes return the same gathered metrics; the logs were printed by rank 0 only.
    metrics = [rank["example_metrics"] for rank in runs["example"]]
    assert metrics[0]["eval_accuracy"] == metrics[1]["eval_accuracy"]
    assert runs["_stdout"].count("***** train metrics *****") == 1
    assert runs["_stdout"].count("***** eval metrics *****") == 1
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
        history = json.load(f)["log_history"]
    assert all({"loss_ce", "loss_kd", "loss_hcl", "loss_reg"} <= set(h) for h in history if "loss" in h)


def test_model_ema_is_identical_on_both_ranks_and_matches_one_process(runs, references):
    """Every rank updates its EMA from the same all-reduced weights: bit-identical on both ranks, equal to the
    one-process EMA within the weights' tolerance, and both ranks report the one-process EMA accuracy."""
    rank0, rank1 = runs["ema"][0]["ema"], runs["ema"][1]["ema"]
    assert rank0.keys() == rank1.keys() == references["ema"]["ema"].keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert_states_close(rank0, references["ema"]["ema"], rtol=RTOL, atol=ATOL)
    # Not the raw student: the average lags behind it.
    raw = {k[len("student.") :]: v for k, v in runs["ema"][0]["state"].items() if k.startswith("student.")}
    assert any(not torch.equal(raw[k], rank0[k]) for k in rank0)
    for rank in runs["ema"]:
        assert rank["eval"]["eval_ema_accuracy"] == references["ema"]["eval"]["eval_ema_accuracy"]
        assert rank["eval"]["eval_ema_loss"] == pytest.approx(references["ema"]["eval"]["eval_ema_loss"], rel=0.05)
