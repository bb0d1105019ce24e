#!/usr/bin/env bash
# Train a micro-policy from scratch on the LIBERO-Spatial demonstrations and ship it in the package (bf16, the
# released layout, loadable by name), its loss curves and settings under results/train/. Every step resumes:
# the demonstrations (`vlacache demos` returns at once when all 500 are recorded) and the training (from
# runs/train/NAME/checkpoints/last.ckpt); a policy already shipped is left alone.
#   [THREADS=N] bash scripts/train_and_ship.sh NAME   (NAME: a configs/train/ config, e.g. micro_pi0_libero_spatial;
#   THREADS: torch threads of the training, default 2; 1 when another training shares the 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1"
if [ -f "vlacache/data/policies/$name/config.json" ]; then
  exit 0
fi
vlacache demos libero_spatial workers=2
vlacache train "$name" threads="${THREADS:-2}"
mkdir -p "results/train/$name"
cp "runs/train/$name"/{loss_curves.csv,loss_curves.png,train_config.json} "results/train/$name/"
cp -r "runs/train/$name/policy" "vlacache/data/policies/$name"
