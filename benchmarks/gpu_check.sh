#!/usr/bin/env bash
# GPU check: run it whenever a GPU is at hand (the project never needs one). Sized for 8 minutes on one H100/H200:
#   1. training-step cost (benchmarks/step_cost.py --cuda --bf16, 224x224, random weights) of every configuration
#      (none kd ofa pat pat_checkpoint) on two pairs (HF ConvNeXt-T -> timm DeiT-T, HF Swin-T -> timm ResNet18),
#      eager and compiled (torch.compile by regions, inductor), at batch 64 and 256: images/s, peak GPU memory,
#      PAT's time split. Each (pair, batch, mode) is one process running the configurations in turn, in this
#      order of priority: eager 64, compiled 64, eager 256, compiled 256. A time budget (GPU_CHECK_BUDGET_S, 280 s)
#      bounds the whole part and a timeout each run: what does not fit is printed as skipped or timed out,
#      never silently dropped (cold compiles are the slow part; inductor's disk cache makes a rerun faster);
#   2. a 1-GPU `accelerate launch` of the example with --bf16 and --torch_compile on real Fashion-MNIST (PAT, a
#      randomly initialised transformers ConvNeXt teacher at 28x28): it trains compiled, evaluates and exports.
# Usage: bash benchmarks/gpu_check.sh [OUTPUT_DIR]   (Fashion-MNIST: PAT_HF_FASHION_MNIST_DIR or Debian's path)
# Settings (environment): GPU_CHECK_PAIRS, GPU_CHECK_BATCHES ("64 256"), GPU_CHECK_MODES ("eager compiled"),
# GPU_CHECK_CONFIGS, GPU_CHECK_BUDGET_S (280), GPU_CHECK_RUN_TIMEOUT_S (150), GPU_CHECK_EXAMPLE (1),
# GPU_CHECK_EXAMPLE_TIMEOUT_S (140). GPU_CHECK_PAIRS="" skips part 1, GPU_CHECK_EXAMPLE=0 part 2.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-outputs/gpu_check}
PAIRS=${GPU_CHECK_PAIRS-convnext_t-deit_t swin_t-resnet18}
BATCHES=${GPU_CHECK_BATCHES:-64 256}
MODES=${GPU_CHECK_MODES:-eager compiled}
CONFIGS=${GPU_CHECK_CONFIGS:-none kd ofa pat pat_checkpoint}
BUDGET=${GPU_CHECK_BUDGET_S:-280}
RUN_TIMEOUT=${GPU_CHECK_RUN_TIMEOUT_S:-150}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 HF_HUB_OFFLINE=1
started=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
python - <<'PY' | tee -a "$OUT_DIR/gpu.txt"
import accelerate, timm, torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
      f"accelerate {accelerate.__version__}, {torch.cuda.get_device_name()}")
PY

# Part 1. Eager runs: 2 warm-up steps, median of 5. Compiled runs: 3 warm-up steps (the compilation, then PAT's
# first step with feedback), median of 5.
deadline=$((started + BUDGET))
summary=()
for batch in $BATCHES; do
  for mode in $MODES; do
    for pair in $PAIRS; do
      name="${pair}_b${batch}_${mode}"
      left=$((deadline - $(date +%s)))
      if ((left < 30)); then
        echo "== $name: skipped (budget of ${BUDGET} s spent)"
        summary+=("$name: skipped (budget)")
        continue
      fi
      limit=$((left < RUN_TIMEOUT ? left : RUN_TIMEOUT))
      extra=(--warmup 2)
      [[ $mode == compiled ]] && extra=(--warmup 3 --compile)
      echo "== step cost, $pair, bf16, batch $batch, $mode (at most ${limit} s)"
      # step_cost stops its own process at the budget and still prints the configurations it measured; the outer
      # timeout is the backstop.
      if timeout --kill-after=15 $((limit + 20)) python benchmarks/step_cost.py --pair "$pair" --cuda --bf16 \
        --batch "$batch" --steps 5 "${extra[@]}" --configs $CONFIGS --one-process --keep-going \
        --budget "$limit" --json "$OUT_DIR/step_cost_$name.json" | tee "$OUT_DIR/step_cost_$name.md"; then
        summary+=("$name: $(grep -c '^| [a-z_]* | [0-9]' "$OUT_DIR/step_cost_$name.md" || true) configurations measured")
      else
        summary+=("$name: failed or killed (exit $?)")
      fi
    done
  done
done
echo "== step cost summary ($(($(date +%s) - started)) s)"
printf '  %s\n' "${summary[@]:-none}" | tee "$OUT_DIR/summary.txt"

if [[ ${GPU_CHECK_EXAMPLE:-1} == 1 ]]; then
  echo "== 1-GPU accelerate launch of the example (pat, bf16, --torch_compile, Fashion-MNIST)"
  TEACHER_DIR="$OUT_DIR/random-convnext-teacher"
  python - "$TEACHER_DIR" <<'PY'
import sys
import transformers as tf
from pat_hf.data import FASHION_MNIST_CLASSES
id2label = dict(enumerate(FASHION_MNIST_CLASSES))
cfg = tf.ConvNextConfig(num_channels=3, image_size=28, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                        patch_size=1, id2label=id2label, label2id={v: k for k, v in id2label.items()})
tf.ConvNextForImageClassification(cfg).save_pretrained(sys.argv[1])
tf.ConvNextImageProcessor(size={"shortest_edge": 28}, crop_pct=1.0, image_mean=[0.286] * 3,
                          image_std=[0.353] * 3).save_pretrained(sys.argv[1])
PY
  start=$(date +%s)
  timeout --kill-after=15 "${GPU_CHECK_EXAMPLE_TIMEOUT_S:-140}" \
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    examples/run_image_classification_pat.py examples/configs/default.yaml \
    --teacher_name_or_path "$TEACHER_DIR" --distill_method pat --pat_dim 128 --pat_num_queries 16 \
    --max_train_samples 2000 --num_train_epochs 2 --bf16 true --use_cpu false --report_to none \
    --torch_compile true --save_strategy no --output_dir "$OUT_DIR/example" 2>&1 | tail -n 25 | tee "$OUT_DIR/example.log"
  echo "example: $(($(date +%s) - start)) s"
  ls "$OUT_DIR/example" | tee -a "$OUT_DIR/example.log"
  test -f "$OUT_DIR/example/model.safetensors"
fi
echo "== gpu_check done in $(($(date +%s) - started)) s; tables in $OUT_DIR/step_cost_*.md"
