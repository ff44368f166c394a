#!/usr/bin/env bash
# The strategy x precision matrix on a CUDA machine: a short GPT run for every pair, and a
# markdown table of what ran, its test loss and its wall time.
#   scripts/gpu_check.sh [DEVICES] [STEPS]     (default: every GPU, 30 steps)
#   JOBS=4 scripts/gpu_check.sh 1 10           (4 runs at a time: they share the GPUs)
# Writes outputs/gpu_check.md; the logs of failed runs are kept under outputs/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."

devices="${1:-$(nvidia-smi -L 2>/dev/null | wc -l)}"
steps="${2:-30}"
jobs="${JOBS:-1}"
if [ "$devices" -lt 1 ]; then
  echo "no CUDA device found (nvidia-smi -L lists none)" >&2
  exit 1
fi
strategies="gpu ddp ddp_spawn fsdp fsdp2 tp deepspeed_zero1 deepspeed_zero2 deepspeed_zero3
            deepspeed_zero2_offload deepspeed_zero3_offload"
precisions="32-true bf16-mixed 16-mixed bf16-true"
out=outputs/gpu_check
mkdir -p "$out"
table=outputs/gpu_check.md
{
  echo "# GPU check: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $devices, $steps steps"
  echo
  echo "| strategy | precision | result | test loss | seconds |"
  echo "|---|---|---|---|---|"
} > "$table"

check_pair() {  # one strategy x precision run; its table row goes to $out/PAIR.row
  local strategy=$1 precision=$2 layout="trainer.devices=$devices" run start status loss result
  [ "$strategy" = gpu ] && layout="trainer.devices=1"
  run="$out/$strategy-$precision"
  if [ "$strategy" = tp ] && [ "$devices" -lt 2 ]; then
    echo "| $strategy | $precision | needs 2 GPUs | | |" > "$run.row"
    return
  fi
  start=$(date +%s)
  python -m lmlab.run model=gpt_tiny data=stdlib_source "strategy=$strategy" \
    "precision=$precision" "$layout" trainer.accelerator=gpu "trainer.max_steps=$steps" \
    trainer.max_epochs=-1 data.train_batches="$steps" data.val_batches=4 \
    model.sample_tokens=0 callbacks=none logger=csv "hydra.run.dir=$run" > "$run.log" 2>&1
  status=$?
  loss=$(python - "$run" 2>/dev/null <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(f"{sys.argv[1]}/csv/metrics.csv")) if r.get("test/loss")]
print(f"{float(rows[-1]['test/loss']):.4f}" if rows else "")
PY
)
  if [ "$status" -eq 0 ]; then result=ok; else result="failed (exit $status, $run.log)"; fi
  echo "| $strategy | $precision | $result | $loss | $(( $(date +%s) - start )) |" > "$run.row"
}

for strategy in $strategies; do
  for precision in $precisions; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
    check_pair "$strategy" "$precision" &
  done
done
wait
for strategy in $strategies; do
  for precision in $precisions; do
    cat "$out/$strategy-$precision.row" >> "$table"
  done
done
cat "$table"
echo "table: $table"
