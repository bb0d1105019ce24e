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

case "$what" in
  pi0) bash scripts/train_and_ship.sh micro_pi0_libero_spatial ;;
  pi05) bash scripts/train_and_ship.sh micro_pi05_libero_spatial ;;
  rows) vlacache run micro_pi0_libero_spatial ;;
  all) bash scripts/train_and_ship.sh micro_pi0_libero_spatial; bash scripts/train_and_ship.sh micro_pi05_libero_spatial
       vlacache run micro_pi0_libero_spatial ;;
  *) echo "usage: $0 [pi0|pi05|rows]" >&2; exit 2 ;;
esac
