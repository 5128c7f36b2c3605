#!/usr/bin/env bash
# GPU check: run it whenever a GPU is at hand (the project never needs one). About 3-5 minutes on one
# H100-class GPU:
#   1. bf16 training steps of `kd` and `pat` (and `ofa`) on two realistic pairs at 224x224, random weights:
#      images/s and peak GPU memory (benchmarks/step_cost.py --cuda --bf16);
#   2. a short 1-GPU `accelerate launch` of the example with `--bf16` on real Fashion-MNIST (PAT, a
#      randomly initialised transformers ConvNeXt teacher at 28x28), checking that it trains, evaluates and
#      exports.
# Usage: bash benchmarks/gpu_check.sh [OUTPUT_DIR]   (Fashion-MNIST: PAT_HF_FASHION_MNIST_DIR or Debian's path)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-outputs/gpu_check}
BATCH=${GPU_CHECK_BATCH:-64}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/gpu.txt"
python - <<'PY' | tee -a "$OUT_DIR/gpu.txt"
import accelerate, timm, torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
      f"accelerate {accelerate.__version__}, {torch.cuda.get_device_name()}")
PY

# GPU_CHECK_PAIRS="" skips part 1.
for pair in ${GPU_CHECK_PAIRS-convnext_t-deit_t swin_t-resnet18}; do
  echo "== step cost, $pair, bf16, batch $BATCH"
  python benchmarks/step_cost.py --pair "$pair" --cuda --bf16 --batch "$BATCH" --steps 10 --warmup 3 \
    --configs none kd ofa pat --json "$OUT_DIR/step_cost_$pair.json" | tee "$OUT_DIR/step_cost_$pair.md"
done

echo "== 1-GPU accelerate launch of the example (pat, bf16, Fashion-MNIST)"
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
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  examples/run_image_classification_pat.py examples/configs/default.yaml \
  --teacher_name_or_path "$TEACHER_DIR" --distill_method pat --pat_dim 128 --pat_num_queries 16 \
  --max_train_samples 2000 --num_train_epochs 2 --bf16 true --use_cpu false --report_to none \
  --save_strategy no --output_dir "$OUT_DIR/example" 2>&1 | tail -n 25 | tee "$OUT_DIR/example.log"
echo "example: $(( $(date +%s) - start )) s"
ls "$OUT_DIR/example" | tee -a "$OUT_DIR/example.log"
test -f "$OUT_DIR/example/model.safetensors"
