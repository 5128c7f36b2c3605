#!/usr/bin/env python
"""Training-step cost of student-only, kd, dkd, dist, fitnet, ofa, pat and rsd for one teacher/student pair.

Each configuration runs in its own process (so peak memory is its own): a few warm-up steps, then the median
time of full training steps (forward, backward, AdamW step) on random data and random weights. Prints a
table with images/s, peak memory, the ratios to `kd`, the parameters each method adds to the student (its heads,
trained and never exported), and PAT's time split.

    python benchmarks/step_cost.py --pair convnext_t-deit_t --image-size 224 --batch 8 --threads 2
    python benchmarks/step_cost.py --pair swin_t-resnet18 --cuda --bf16          # on a GPU
    python benchmarks/step_cost.py --pair swin_t-resnet18 --configs kd dkd dist fitnet   # the baselines only
    python benchmarks/step_cost.py --pair convnext_t-deit_t --configs kd rsd rsd_logits  # RSD against KD
    python benchmarks/step_cost.py --pair swin_t-resnet18 --compile               # torch.compile by regions

PAT's split: student = the student-only step; plain teacher pass = kd − student; the prompt blocks, RAA +
aligners and the losses = their own forward + backward timed on the step's real tensors; the prompted teacher
pass with its backward = the rest. `pat_checkpoint` recomputes the teacher's blocks in the backward
(`--pat_checkpoint_teacher`: the prompted pass keeps only the blocks' inputs, for one more teacher forward).

`--compile` compiles what `torch_compile=True` compiles (the methods' regions, pat_hf.models.compile; inductor unless
`--compile-backend` says otherwise); the warm-up steps include the compilation, so give at least 2 (PAT's first
step has no feedback, the second compiles the pass with feedback). In that mode PAT's component timings run the
compiled regions too (RAA + aligners and HCL as the step compiles them; the four prompt blocks as one compiled
function, whereas the step fuses them into the prompted teacher pass).

On a shared machine (other jobs' load comes and goes), `--rounds N` times the configurations N times in turn and
keeps each one's fastest median: a burst of load then slows one round of every configuration rather than all the
steps of one, and the ratios to `kd` compare runs that saw the least interference.

`--timeout` bounds each configuration's process and `--budget` the whole invocation: a configuration that times
out, fails (`--keep-going`) or is not started for lack of budget is reported as such and the others still run.
`--one-process` (GPU) runs the configurations one after the other in a single process, which saves the imports
and, compiled, lets each configuration find the graphs of the previous ones in inductor's disk cache; peak GPU
memory is still per configuration (`torch.cuda.reset_peak_memory_stats` after the previous one is freed).

CPU memory is the peak resident set size of a second process per configuration, which runs the warm-up steps
and two more. glibc keeps freed memory of mid-sized allocations in its heap, so a plain peak RSS says more
about the allocator's history than about what the step needs; that process starts with
``MALLOC_MMAP_THRESHOLD_=131072``, so that every tensor above 128 KiB goes back to the system when it is freed
and the peak RSS follows live memory, as ``torch.cuda.max_memory_allocated`` does on a GPU. The timed process
runs with the allocator's defaults. Compiled (`--compile`), the compiler's own memory is left out: the peak is
taken over the steps after the warm-up (VmHWM reset through /proc/self/clear_refs), less what the warm-up left
resident beyond the models and the optimizer's state (graphs, kernels, caches), reported as `compiler_mib`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PAIRS = ("convnext_t-deit_t", "swin_t-resnet18", "vit_s-mobilenetv2", "convnext_t-resmlp_s12")
CONFIGS = ("none", "kd", "dkd", "dist", "fitnet", "ofa", "pat", "pat_checkpoint", "rsd", "rsd_logits")


def build_pair(pair: str, num_classes: int = 100):
    import timm
    import transformers as tf

    teacher_name, student_name = pair.split("-")
    if teacher_name == "convnext_t":
        teacher = tf.ConvNextForImageClassification(
            tf.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], num_labels=num_classes)
        )
    elif teacher_name == "swin_t":
        teacher = tf.SwinForImageClassification(
            tf.SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], num_labels=num_classes)
        )
    elif teacher_name == "vit_s":
        teacher = tf.ViTForImageClassification(
            tf.ViTConfig(
                hidden_size=384,
                num_hidden_layers=12,
                num_attention_heads=6,
                intermediate_size=1536,
                num_labels=num_classes,
            )
        )
    else:
        raise ValueError(pair)
    timm_name = {
        "deit_t": "deit_tiny_patch16_224",
        "resnet18": "resnet18",
        "mobilenetv2": "mobilenetv2_100",
        "resmlp_s12": "resmlp_12_224",
    }[student_name]
    return teacher, timm.create_model(timm_name, num_classes=num_classes)


def run_one(
    config: str,
    pair: str,
    image_size: int,
    batch: int,
    steps: int,
    warmup: int,
    device: str,
    bf16: bool,
    memory_only: bool = False,
    compile_backend: str | None = None,
) -> dict:
    """One configuration in this process; returns its timings (and peak memory on a GPU), or with
    ``memory_only`` (CPU) only its peak memory."""
    import torch

    from pat_hf import PATTrainingArguments, build_distillation_model

    torch.manual_seed(0)
    libraries_rss = _rss_kib()  # the interpreter and the imported libraries, before any model exists
    if device == "cuda":
        libraries_cuda = torch.cuda.memory_allocated()
    teacher_model, student = build_pair(pair)
    method_name = config.split("_")[0] if config.startswith(("pat", "rsd")) else config
    args = PATTrainingArguments(
        output_dir="/tmp/pat_hf_bench", distill_method=method_name, report_to=[], use_cpu=device == "cpu",
        pat_checkpoint_teacher=config == "pat_checkpoint", rsd_target="logits" if config == "rsd_logits" else "embedding",
    )  # fmt: skip
    # What the trainer builds: teacher loaded and frozen, classes matched, the method's heads.
    model = build_distillation_model(args, student, teacher_model if method_name != "none" else None)
    model = model.to(device).train()
    if compile_backend:
        model.compile_regions({"backend": compile_backend})
    teacher, method = model.teacher, model.method
    if teacher is not None:
        teacher.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            out = model(pixel_values=x, labels=y, teacher_pixel_values=x if teacher is not None else None)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    base_rss = _rss_kib()
    if memory_only:
        # CPU peak memory, in a process of its own started with a fixed mmap threshold (see the module doc).
        if not compile_backend:
            for _ in range(warmup + 2):
                step()
            return {
                "peak_mib": (_peak_rss_kib() - base_rss) / 1024,
                "peak_total_mib": (_peak_rss_kib() - libraries_rss) / 1024,
            }
        # Compiled: the compiler's own peak (tracing, code generation) and what it keeps (graphs, kernels) are not
        # training memory. The peak is taken over the steps after the warm-up (the kernel's high-water mark reset),
        # less what the warm-up left that is neither the models nor the optimizer's state.
        for _ in range(warmup):
            step()
        optimizer_kib = sum(
            t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
            if torch.is_tensor(t)
        ) / 1024  # fmt: skip
        compiler_kib = max(_rss_kib() - base_rss - optimizer_kib, 0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        for _ in range(2):
            step()
        return {
            "peak_mib": (_peak_rss_kib() - base_rss - compiler_kib) / 1024,
            "peak_total_mib": (_peak_rss_kib() - libraries_rss - compiler_kib) / 1024,
            "compiler_mib": compiler_kib / 1024,
        }
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    for _ in range(warmup):
        step()
    sync()
    times = _times(step, steps, sync)
    extra = sum(p.numel() for p in method.parameters() if p.requires_grad)
    result = {"config": config, "step_s": statistics.median(times), "times": times, "extra_params": extra}
    if device == "cuda":
        result["peak_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        result["peak_total_mib"] = (torch.cuda.max_memory_allocated() - libraries_cuda) / 2**20
    if config == "pat":
        result.update(_pat_components(method, student, teacher, x, steps, sync, compile_backend))
    return result


def _pat_components(method, student, teacher, x, steps: int, sync, compile_backend: str | None = None) -> dict:
    """PAT's component timings on one step's real tensors (a function, so its tensors are freed on return)."""
    import torch

    from pat_hf.losses import hcl_loss
    from pat_hf.methods.pat.method import _align_student
    from pat_hf.models.taps import as_map

    def compiled(fn):
        return torch.compile(fn, backend=compile_backend) if compile_backend else fn

    def hcl_sum(aligned, targets):
        return sum(hcl_loss(a, t) for a, t in zip(aligned, targets))

    align, hcl = method.region(_align_student), compiled(hcl_sum)

    timings = {}
    # Component timings on this step's real tensors: RAA + aligners (forward + backward) and the losses.
    with method.student_taps.capture() as feats:
        student(x)
    feats = [f.detach().requires_grad_(True) for f in feats]
    with torch.no_grad(), method.teacher_taps.capture() as tfeats:
        teacher(x)
    targets = [as_map(f, s) for f, s in zip(tfeats, method.teacher_output_specs)]

    def raa_step():
        aligned = align(method, feats)
        sum(t.float().mean() for t in aligned).backward()
        return aligned

    def loss_step(aligned):
        aligned = [a.detach().requires_grad_(True) for a in aligned]
        hcl(aligned, targets).backward()

    aligned = raa_step()
    timings["raa_s"] = _median_time(raa_step, steps, sync)
    timings["loss_s"] = _median_time(lambda: loss_step(aligned), steps, sync)

    # The four prompt blocks (with feedback) on the real stage inputs, forward + backward.
    stage_inputs = {}

    def keep(stage):
        def transform(t):
            stage_inputs[stage] = t.detach()
            return t

        return transform

    method.teacher_taps.set_input_transforms({i: keep(i) for i in range(4)})
    with torch.no_grad():
        teacher(x)
    method.teacher_taps.set_input_transforms(None)

    def prompts_sum(inputs):
        return sum(method._apply_prompt(stage, inputs[stage - 1]).sum() for stage in method.prompt_stages)

    prompts = compiled(prompts_sum)

    def prompt_step():
        method._pass_feedback = list(method.feedback)  # as the prompted pass sets it
        try:
            prompts([stage_inputs[i].requires_grad_(True) for i in range(4)]).backward()
        finally:
            method._pass_feedback = [None] * 4

    prompt_step()
    timings["prompts_s"] = _median_time(prompt_step, steps, sync)
    return timings


def _times(fn, repeats: int, sync) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _median_time(fn, repeats: int, sync) -> float:
    return statistics.median(_times(fn, repeats, sync))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rss_kib() -> int:
    return _status_kib("VmRSS")


def _peak_rss_kib() -> int:
    return _status_kib("VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=PAIRS, default="convnext_t-deit_t")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile by regions, as torch_compile=True")
    parser.add_argument("--compile-backend", default="inductor", help="the backend of --compile")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed to each configuration's process")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all configurations together")
    parser.add_argument("--keep-going", action="store_true", help="report a failed configuration and go on")
    parser.add_argument("--one-process", action="store_true", help="every configuration in one process (see above)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time the configurations this many times, in turn, keeping each one's fastest median (shared machines)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    parser.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if args.cuda else "cpu"

    if args._child:
        import gc

        import torch

        torch.set_num_threads(args.threads)
        for config in args._child.split(","):
            result = run_one(
                config,
                args.pair,
                args.image_size,
                args.batch,
                args.steps,
                args.warmup,
                device,
                args.bf16,
                args._memory,
                args.compile_backend if args.compile else None,
            )
            print(json.dumps({"config": config, **result}), flush=True)
            # --one-process: the next configuration starts from empty caches (the compiled graphs stay on disk).
            torch._dynamo.reset()
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        return

    started = time.monotonic()

    def remaining_timeout(per_child: float | None) -> float | None:
        if args.budget is None:
            return per_child
        left = args.budget - (time.monotonic() - started)
        return left if per_child is None else min(per_child, left)

    def one_process(configs: list[str]) -> dict[str, dict]:
        """All configurations in one process (GPU): imports once, compiled graphs reused from the disk cache."""
        argv = [a for a in sys.argv[1:] if a != "--_memory"]
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_child", ",".join(configs)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
        timeout = remaining_timeout(None if args.timeout is None else args.timeout * len(configs))
        status, stdout = "failed", ""
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
            stdout = out.stdout
            if out.returncode:
                print(f"failed:\n{out.stderr[-3000:]}", file=sys.stderr)
        except subprocess.TimeoutExpired as err:
            stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
            status = f"timed out ({timeout:.0f} s for all)"
        done = {}
        for line in stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                done[record["config"]] = record
        return {config: done.get(config, {"status": status}) for config in configs}

    def child(config: str, memory: bool) -> dict:
        argv = [a for a in sys.argv[1:] if a != "--_memory"]
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_child", config] + (["--_memory"] if memory else [])
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1")
        if memory:
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        timeout = remaining_timeout(args.timeout)
        if timeout is not None and timeout <= 0:
            return {"status": "skipped (budget)"}
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"timed out ({timeout:.0f} s)"}
        if out.returncode:
            if not args.keep_going:
                sys.exit(f"{config} failed:\n{out.stderr[-3000:]}")
            print(f"{config} failed:\n{out.stderr[-1500:]}", file=sys.stderr)
            return {"status": "failed"}
        return json.loads(out.stdout.strip().splitlines()[-1])

    results = one_process(args.configs) if args.one_process else {}
    for round_index in range(args.rounds):
        for config in args.configs if not args.one_process else ():
            # In turn, so that a burst of load elsewhere slows one round of every configuration, not one of them.
            r = child(config, memory=False)
            best = results.get(config)
            if best is None or ("step_s" in r and ("step_s" not in best or r["step_s"] < best["step_s"])):
                results[config] = r
            if args.rounds > 1 and "step_s" in r:
                print(f"  {config:<15} round {round_index + 1}: {r['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    for config in args.configs:
        if device != "cuda" and "step_s" in results[config]:
            results[config].update(child(config, memory=True))
        r = results[config]
        status = f"{r['step_s']:.3f} s/step" if "step_s" in r else r["status"]
        print(f"  {config:<15} {status}", file=sys.stderr, flush=True)

    mode = f", compiled ({args.compile_backend})" if args.compile else ", eager"
    rounds = f", fastest of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"\n{args.pair}, {args.image_size}x{args.image_size}, batch {args.batch}, {device}"
          f"{' bf16' if args.bf16 else ' float32'}{mode}, {args.threads} threads, median of {args.steps} steps "
          f"after {args.warmup} warm-up steps{rounds}\n")  # fmt: skip
    measured = {config: r for config, r in results.items() if "step_s" in r and "peak_mib" in r}
    kd = measured.get("kd")
    print(
        "| config | s/step | images/s | peak memory above the models (MiB) | peak memory with the weights (MiB) "
        "| time / kd | memory / kd | memory with weights / kd | extra parameters |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for config, r in results.items():
        if config not in measured:
            print(f"| {config} | {r.get('status', 'no memory figure')} | | | | | | | |")
            continue
        ratio_t = f"{r['step_s'] / kd['step_s']:.2f}" if kd else "-"
        ratio_m = f"{r['peak_mib'] / kd['peak_mib']:.2f}" if kd and kd["peak_mib"] > 0 else "-"
        ratio_w = f"{r['peak_total_mib'] / kd['peak_total_mib']:.2f}" if kd and kd["peak_total_mib"] > 0 else "-"
        print(
            f"| {config} | {r['step_s']:.3f} | {args.batch / r['step_s']:.1f} | {r['peak_mib']:.0f} "
            f"| {r['peak_total_mib']:.0f} | {ratio_t} | {ratio_m} | {ratio_w} | {r.get('extra_params', 0):,} |"
        )
    if {"none", "kd", "pat"} <= set(measured):
        pat = measured["pat"]
        split = {
            "student (forward + backward)": results["none"]["step_s"],
            "plain teacher pass": results["kd"]["step_s"] - results["none"]["step_s"],
            "prompt blocks (forward + backward)": pat["prompts_s"],
            "RAA + aligners": pat["raa_s"],
            "losses (HCL)": pat["loss_s"],
        }
        split["prompted teacher pass with backward (rest)"] = pat["step_s"] - sum(split.values())
        print(f"\nPAT step split ({pat['step_s']:.3f} s):\n")
        print("| part | s | share |")
        print("|---|---|---|")
        for name, value in split.items():
            print(f"| {name} | {value:.3f} | {100 * value / pat['step_s']:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
