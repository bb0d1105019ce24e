#!/usr/bin/env bash
# Every long job of the open studies, in two lanes (one per core of the 2-core machine), each a sequence of
# resumable steps: run both lanes again after an interruption, or in a later session, and finished work is skipped.
# Results land under results/ and trained policies under vlacache/data/policies/: commit them as they come.
#   bash scripts/long_jobs.sh depth      # "When is reuse safe": the 8- then 16-layer OFT policies, their rows
#   bash scripts/long_jobs.sh families   # the micro-π0 rows, the micro-π0.5, then the SIMPLER-side policies
# A lane waits for nothing in the other; both train with one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
export THREADS=1

case "${1:-}" in
  depth)
    bash scripts/reuse_safety_jobs.sh deep8
    bash scripts/reuse_safety_jobs.sh deep16
    ;;
  families)
    vlacache run micro_pi0_libero_spatial launcher.devices=1 threads=1 --verify-code-change
    bash scripts/micro_pi0_jobs.sh pi05
    bash scripts/train_and_ship.sh micro_cogact_maniskill
    bash scripts/train_and_ship.sh micro_openvla_maniskill
    vlacache run micro_cogact_maniskill_ablation launcher.devices=1 threads=1
    vlacache run micro_openvla_maniskill_ablation launcher.devices=1 threads=1
    ;;
  *) echo "usage: $0 depth|families" >&2; exit 2 ;;
esac
