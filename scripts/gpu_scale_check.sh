#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md, in one go (about 10 minutes on one H100):
#   1. GPT-2 small at bf16 with compile and SDPA: lmlab against a plain loop, tokens/s and
#      MFU (python -m benchmarks.gpu_gpt2);
#   2. the seq2seq base size and the LSTM classifier at bf16: step time and tokens/s, from
#      each run's metrics.json, on the embedded corpora;
#   3. the strategy x precision matrix (scripts/gpu_check.sh, 4 runs at a time).
#   scripts/gpu_scale_check.sh [STEPS]
# Writes outputs/gpu_scale_check.md (and the matrix's outputs/gpu_check.md).
set -uo pipefail
cd "$(dirname "$0")/.."
steps="${1:-50}"
accelerator="${LMLAB_CHECK_ACCELERATOR:-gpu}"   # cpu: try the script itself on a CPU
out=outputs/gpu_scale_check
mkdir -p "$out"
table=outputs/gpu_scale_check.md
gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
echo "# GPU check: ${gpu:-no GPU ($accelerator)}, $(date -u +%F)" > "$table"

echo -e "\n## GPT-2 small, bf16-mixed, compile, lmlab against a plain loop\n" >> "$table"
if [ "$accelerator" = gpu ]; then
  timeout 300 python -m benchmarks.gpu_gpt2 --steps 30 --repeats 3 2> "$out/gpt2.log" \
    | grep -E '^\||parameters' >> "$table" || echo "failed: $out/gpt2.log" >> "$table"
else
  timeout 300 python -m benchmarks.gpu_gpt2 --size tiny --device cpu --precision 32-true \
    --steps 3 --repeats 1 2> "$out/gpt2.log" | grep -E '^\||parameters' >> "$table"
fi

echo -e "\n## Step time at bf16-mixed\n" >> "$table"
echo "| model | ms/step | tokens/s | peak GB |" >> "$table"
echo "|---|---:|---:|---:|" >> "$table"
strategy=$([ "$accelerator" = gpu ] && echo gpu || echo cpu)
precision=$([ "$accelerator" = gpu ] && echo bf16-mixed || echo 32-true)
for spec in "transformer_base:data=stdlib_summaries data.joint_vocab=true data.batch_size=64 model.beam=1" \
            "lstm:data=stdlib_docs data.batch_size=64"; do
  model="${spec%%:*}"
  run="$out/$model"
  # shellcheck disable=SC2086
  timeout 240 python -m lmlab.run "model=$model" ${spec#*:} "strategy=$strategy" \
    "precision=$precision" "trainer.max_steps=$steps" trainer.max_epochs=-1 \
    trainer.limit_val_batches=1 trainer.limit_test_batches=1 logger=csv "hydra.run.dir=$run" \
    > "$run.log" 2>&1
  python - "$run" "$model" >> "$table" <<'PY' || echo "| $model | failed: $run.log | | |" >> "$table"
import json, sys
t = json.load(open(f"{sys.argv[1]}/metrics.json"))["throughput"]
print(f"| {sys.argv[2]} | {t['step_time_s'] * 1e3:.1f} | {t['tokens_per_s']:,.0f} | "
      f"{t['peak_mem_gb']:.2f} |")
PY
done

if [ "$accelerator" = gpu ]; then
  JOBS=4 timeout 420 scripts/gpu_check.sh 1 10 > "$out/matrix.log" 2>&1
  echo -e "\n## Strategy x precision (1 GPU, 10 steps)\n" >> "$table"
  tail -n +3 outputs/gpu_check.md >> "$table"
fi
cat "$table"
