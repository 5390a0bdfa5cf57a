#!/usr/bin/env bash
# The toolkit end to end on a small synthetic cohort, offline, in a few minutes on 2 CPU cores:
# cohort -> manifest check -> splits -> feature store -> linear probes (full data and few-shot) -> BitFit and
# LoRA trained end to end on one fold -> results.
# Tiny random-weight backbones stand in for real ones (`featcache weights` shows how to add real weights).
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=${DEMO_OUT:-demo_out}
MODEL=${DEMO_MODEL:-resnet18-tiny}
fc() { echo "+ featcache $*"; "$BIN/featcache" "$@"; }

rm -rf "$OUT"
fc synth --out "$OUT/cohort" --patients 120 --positive-rate 0.3 --centers 3 --format png
fc manifest validate "$OUT/cohort/manifest.csv"
fc splits --manifest "$OUT/cohort/manifest.csv" --task SYN --draws 20
fc extract --model "$MODEL" --manifest "$OUT/cohort/manifest.csv" --store "$OUT/features.zarr"
fc extract --model "$MODEL" --manifest "$OUT/cohort/manifest.csv" --store "$OUT/features.zarr"  # cached: instant
fc probe --model "$MODEL" --task SYN --manifest "$OUT/cohort/manifest.csv" --store "$OUT/features.zarr" --full --out "$OUT/runs"
fc probe --model "$MODEL" --task SYN --manifest "$OUT/cohort/manifest.csv" --store "$OUT/features.zarr" --shots 2,4,8,16 --draws 20 --out "$OUT/runs"
ad() { echo "+ adapters $*"; "$BIN/adapters" "$@"; }
# Stage 2 on one fold, short schedules so the demo stays quick (the protocol's defaults: up to 1000 epochs).
for method in bitfit lora; do
  ad train --method "$method" --model "$MODEL" --task SYN --manifest "$OUT/cohort/manifest.csv" --fold fold0 \
    --head-lr 1e-2,1e-3 --max-epochs 40 --warmup 5 --patience 15 --plateau-patience 5 --out "$OUT/runs"
done
fc results "$OUT/runs" --out "$OUT/results.csv"
echo "+ adapters methods --model $MODEL"
"$BIN/adapters" methods --model "$MODEL"
echo "Demo done: records in $OUT/runs/, one row per run in $OUT/results.csv"
