#!/usr/bin/env bash
# The long jobs of "When is reuse safe" (BENCHMARKS.md), in order. Every step resumes: run this script again
# after an interruption (or in a later session) and finished work is skipped, so only what is missing runs.
# On the 2-core CPU machine: the cadence rows ~3 h (chunk 1) and ~2 h (chunk 2), the demonstrations ~85 min,
# the 8-layer training ~6 h, the 16-layer ~10 h+ (a core each). Commit results/, trained policies as made.
#
#   bash scripts/reuse_safety_jobs.sh [cadence|deep8|deep16|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-all}"

cadence() {
  vlacache run micro_oft_libero_spatial_cadence1
  vlacache run micro_oft_libero_spatial_cadence2
}

# Train the micro-deep<depth> policy from scratch with the shipped recipe and ship it in the package (bf16, the
# released layout, loaded by name), its loss curves and settings under results/train/.
deep() {
  local name="micro_oft_libero_spatial_deep$1"
  bash scripts/train_and_ship.sh "$name"
  if [ -f "configs/experiment/$name.yaml" ]; then
    vlacache run "$name"
    python scripts/static_feature_drift.py --backbone "$name" --out "results/bench/${name}_static_drift.json"
  else
    echo "reuse_safety_jobs: $name is trained, but configs/experiment/$name.yaml is missing" \
         "(restore it from git), then run this again" >&2
  fi
}

case "$what" in
  cadence) cadence ;;
  deep8) deep 8 ;;
  deep16) deep 16 ;;
  all) cadence; deep 8; deep 16 ;;
  *) echo "usage: $0 [cadence|deep8|deep16|all]" >&2; exit 2 ;;
esac
python scripts/reuse_safety.py
