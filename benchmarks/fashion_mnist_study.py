"""A reproducible distillation study on real data: Fashion-MNIST, ViT -> ResNet and ConvNeXt -> DeiT.

Trains two transformers teachers (ViT, ConvNeXt) on the 60,000 training images, then timm students on a fixed
class-balanced subset of 5,000 images with ``none`` (scratch), ``kd``, ``ofa`` and ``pat``, several seeds each,
scores them on the 10,000 test images and writes ``docs/results.md`` and ``docs/results.png`` from the per-run
JSON files. Rerunning skips finished runs.

    python benchmarks/fashion_mnist_study.py                 # the full study (3 seeds), outputs/study/
                                                             # (on a CPU, each pair in its own process)
    python benchmarks/fashion_mnist_study.py --quick         # one seed, 1 epoch each: a smoke test (~15 min, 2 CPUs)
    python benchmarks/fashion_mnist_study.py --device cuda   # on a GPU (bf16 autocast)
    python benchmarks/fashion_mnist_study.py --ablations     # also PAT without prompts / feedback / regulariser
    python benchmarks/fashion_mnist_study.py --report-only   # regenerate the page and chart from the JSON files
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

# Run as a script, Python puts benchmarks/ on the path, not the repository root that holds the study package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fashion_mnist import (
    METHODS,
    PAIRS,
    RSD_SWEEP,
    STUDENT_TRAINING_RECIPES,
    TEACHER_EPOCHS,
    StudyConfig,
    config_from_dict,
    run_study,
    write_report,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every option left out keeps the preset's value (full, or ``--quick``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, 1 teacher and 1 student epoch (smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", help="student seeds (default: 0 1 2; quick: 0)")
    parser.add_argument(
        "--output-dir", help="per-run JSON and teachers (default: outputs/study, quick: outputs/study-quick)"
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), help="auto: cuda when available (bf16 autocast)")
    parser.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    parser.add_argument(
        "--jobs",
        type=int,
        help="pairs trained side by side, one process each, sharing the CPU cores (default: one per pair on a "
        "CPU, 1 on a GPU); small models use 1 thread far better than 2",
    )
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ablations", action="store_true", help="also run the PAT ablations (first seed only)")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the report from the JSON files")
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), help="pairs to run (default: all)")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS) + list(RSD_SWEEP),
        help="methods to run (default: all; the rsd_sweep_* candidates only for the validation sweep)",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=list(STUDENT_TRAINING_RECIPES),
        help="student training recipes (default: flips; 'strong' adds RandAugment, Mixup/CutMix and EMA on "
        "ConvNeXt -> DeiT; sweep_* are the candidates it was chosen from on the validation split)",
    )
    parser.add_argument("--teacher-epochs", type=int, help=f"default: {TEACHER_EPOCHS}")
    parser.add_argument("--student-epochs", type=int, help=f"default {StudyConfig.student_epochs}")
    parser.add_argument("--data-dir", help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--markdown", default="docs/results.md", help="where the results page goes")
    parser.add_argument("--figure", default="docs/results.png", help="where the chart goes")
    # Debug/test only: cut the data and the runs (the report flags such runs).
    parser.add_argument("--max-train-images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-eval-images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_in_parallel(argv: list[str], pairs: list[str], jobs: int) -> None:
    """Runs the pairs in ``jobs`` child processes (this script again, one group of pairs each), splitting the
    CPU cores between them; they write to the same output folder, each its own run files.

    Raises:
        SystemExit: When a child fails (after all children have ended).
    """
    jobs = min(jobs, len(pairs))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    children = []
    for group in (pairs[i::jobs] for i in range(jobs)):
        # argparse keeps the last --pairs / --jobs given, so appending overrides the user's.
        command = [sys.executable, os.path.abspath(__file__), *argv, "--pairs", *group, "--jobs", "1", "--no-report"]
        print(f"Starting {' '.join(group)} in its own process ({threads} thread(s)).", flush=True)
        children.append((group, subprocess.Popen(command, env=env)))
    failed = [" ".join(group) for group, child in children if child.wait() != 0]
    if failed:
        raise SystemExit(f"The study failed for: {', '.join(failed)} (see above); rerun the same command to resume.")


def main(argv: list[str] | None = None) -> None:
    """Runs the study (resuming) and writes the report, or only the report with ``--report-only``."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    values = {k: v for k, v in vars(args).items() if v is not None}
    values.setdefault("output_dir", "outputs/study-quick" if args.quick else "outputs/study")
    config = config_from_dict(values, quick=args.quick)
    if not args.report_only:
        jobs = args.jobs or (len(config.pairs) if config.resolved_device() == "cpu" else 1)
        if jobs > 1 and len(config.pairs) > 1:
            run_in_parallel(argv if argv is not None else sys.argv[1:], config.pairs, jobs)
        else:
            run_study(config)
    if args.no_report:
        return
    print(write_report(config.output_dir, args.markdown, args.figure))
    written = [args.markdown] + ([args.figure] if os.path.isfile(args.figure) else [])
    print(f"Wrote {' and '.join(written)} from {os.path.join(config.output_dir, 'runs')}.", file=sys.stderr)


if __name__ == "__main__":
    main()
