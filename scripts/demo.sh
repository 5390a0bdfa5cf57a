#!/usr/bin/env bash
# The toolkit end to end as one study folder, offline, in a few minutes on 2 CPU cores: a synthetic cohort,
# a study file, the smoke grid (features of two tiny backbones, full-data and few-shot probes, BitFit and LoRA
# on one of them for one fold), the three commands users type inside a study, and the report.
# Tiny and random-init backbones stand in for real ones (`featcache weights` shows how to add real weights);
# every table and figure of the report says so.
set -euo pipefail
BIN=$(cd "${1:-.venv/bin}" && pwd)
OUT=${DEMO_OUT:-demo_out}
fc() { echo "+ featcache $*"; "$BIN/featcache" "$@"; }
ad() { echo "+ adapters $*"; "$BIN/adapters" "$@"; }

unset FEATCACHE_STUDY  # the study is the one made below
rm -rf "$OUT" && mkdir -p "$OUT" && cd "$OUT"
fc synth --out cohort --patients 60 --positive-rate 0.5 --centers 3 --images-per-patient 1 1
fc init --manifest cohort/manifest.csv --task SYN --model medclip --weights medclip=random-init --grid smoke
fc manifest validate                  # the study's manifest
fc study plan                         # the smoke grid: runs per stage, nothing recorded yet
fc study run                          # splits, features once per backbone, every probe, BitFit and LoRA
ad methods --model resnet18-tiny      # what each method trains on the backbone the grid adapted
fc study plan                         # now everything is recorded; a rerun would do nothing
# The three commands users type, verbatim: the study supplies manifest, task, model, store, weights, records.
fc extract --model medclip            # medclip -> medclip-vit, random-init as study.yaml states
fc probe --shots 16
# Inside a study, `adapters train` takes the grid's folds, draws, head LRs and schedule; flags override them
# (its first line says which came from where). The demo's one real-size training stays short: one head LR,
# one epoch.
ad train --method bitfit --head-lr 1e-3 --max-epochs 1 --warmup 0
fc results                            # every record -> runs/results.csv
fc report                             # report/report.md and report/figures/*.png
echo "Demo done: study file $OUT/study.yaml, records in $OUT/runs/, report in $OUT/report/report.md"
