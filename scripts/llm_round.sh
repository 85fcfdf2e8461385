#!/bin/bash
# Every method instruction-tunes the embedded SmolLM2-135M-Instruct on the same file of one's own: one round of
# 4 steps of batch 4 on 2 simulated clients, 24 held-out examples, 12 answers generated (docs/llm.md's table).
#   scripts/llm_round.sh [OUT_DIR]     (about 7 minutes on 2 cores; records in OUT_DIR/<method>/)
set -eu
cd "$(dirname "$0")/.."
out="${1:-results/llm-round}"
mkdir -p "$out"
data="$out/sst2-600.jsonl"
.venv/bin/python -m scripts.glue_instructions sst2 "$data" --rows 600
for m in fedkrso fedavg fedavg-lora fedtt fedtt-plus fedspzo fedkseed; do
  .venv/bin/fedsubspace simulate --clients 2 --quiet -c "method='$m' task='$data' model='smollm2' \
    num-server-rounds=1 train.local-steps=4 krso.intervals=2 train.batch-size=4 train.max-length=128 \
    eval.max-examples=24 eval.generate=12 eval.max-new-tokens=4 results-dir='$out' run-name='$m'" | tail -4
done
