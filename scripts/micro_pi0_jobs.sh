#!/usr/bin/env bash
# The micro-π0 of issue 31 (BENCHMARKS.md, "A trained micro-π0"), in order; every step resumes, so run this again
# after an interruption and finished work is skipped:
#   bash scripts/micro_pi0_jobs.sh [pi0|pi05|rows]   (default: pi0, then pi05, then rows)
# Trains micro-pi0 and micro-pi05 on the LIBERO-Spatial demonstrations and ships each in the package (bf16, the
# released layout, loadable by name); `rows` runs configs/experiment/micro_pi0_libero_spatial.yaml (edit its
# `backbone:` to micro_pi05_libero_spatial if that one does better).
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"

train() {
  local name="micro_$1_libero_spatial"
  if [ ! -f "vlacache/data/policies/$name/config.json" ]; then
    vlacache demos libero_spatial workers=2    # resumes; returns at once when all 500 episodes are recorded
    vlacache train "$name" threads=2           # resumes from runs/train/$name/checkpoints/last.ckpt
    mkdir -p "results/train/$name"
    cp "runs/train/$name"/{loss_curves.csv,loss_curves.png,train_config.json} "results/train/$name/"
    cp -r "runs/train/$name/policy" "vlacache/data/policies/$name"
  fi
}

case "$what" in
  pi0) train pi0 ;;
  pi05) train pi05 ;;
  rows) vlacache run micro_pi0_libero_spatial ;;
  all) train pi0; train pi05; vlacache run micro_pi0_libero_spatial ;;
  *) echo "usage: $0 [pi0|pi05|rows]" >&2; exit 2 ;;
esac
