#!/usr/bin/env bash
# Train a micro-policy from scratch on its demonstrations and ship it in the package (bf16, the released layout,
# loadable by name), its loss curves and settings under results/train/. Every step resumes: the demonstrations
# (`vlacache demos` returns at once when every episode is recorded; the demos config is the folder name of the
# train config's `demos:`, e.g. libero_spatial or maniskill_tabletop) and the training (from the newest checkpoint
# under runs/train/NAME/checkpoints/); a policy already shipped is left alone.
#   [THREADS=N] bash scripts/train_and_ship.sh NAME   (NAME: a configs/train/ config, e.g. micro_pi0_libero_spatial;
#   THREADS: torch threads of the training, default 2; 1 when another training shares the 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
name="$1"
if [ -f "vlacache/data/policies/$name/config.json" ]; then
  exit 0
fi
demos="$(sed -n 's|^demos: *data/demos/\([A-Za-z0-9_]*\) *$|\1|p' "configs/train/$name.yaml")"
if [ -z "$demos" ]; then
  echo "train_and_ship: configs/train/$name.yaml has no 'demos: data/demos/<name>' line" >&2
  exit 2
fi
vlacache demos "$demos" workers=2
vlacache train "$name" threads="${THREADS:-2}"
mkdir -p "results/train/$name"
cp "runs/train/$name"/{loss_curves.csv,loss_curves.png,train_config.json} "results/train/$name/"
cp -r "runs/train/$name/policy" "vlacache/data/policies/$name"
