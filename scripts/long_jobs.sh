#!/usr/bin/env bash
# Every long job of the open studies, as lanes (run one lane per core of the 2-core machine), each a sequence of
# resumable steps: run a lane again after an interruption, or in a later session, and finished work is skipped.
# Results land under results/ and trained policies under vlacache/data/policies/: commit them as they come.
#   bash scripts/long_jobs.sh cogact     # the CogACT-style ManiSkill policy: demos, training, no-cache row, ablation
#   bash scripts/long_jobs.sh openvla    # the OpenVLA-style ManiSkill policy: the same steps
#   bash scripts/long_jobs.sh depth      # "When is reuse safe": the 8- then 16-layer OFT policies, their rows
#   bash scripts/long_jobs.sh pi05       # the micro-π0.5 (the second try of the micro-π0)
# The ManiSkill demonstrations take ~30 min on 2 workers, LIBERO-Spatial's ~85 min; a lane waits for nothing in
# another (two lanes that both need demonstrations not yet recorded: start one, then the other once they exist).
# Trainings use one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
export THREADS=1

maniskill() {  # micro_<family>_maniskill: train and ship, its no-cache row first (the goal), then every row
  local name="micro_$1_maniskill"
  bash scripts/train_and_ship.sh "$name"
  vlacache run "${name}_ablation" "policies=[no_cache]" launcher.devices=1 threads=1
  vlacache run "${name}_ablation" launcher.devices=1 threads=1
}

case "${1:-}" in
  cogact) maniskill cogact ;;
  openvla) maniskill openvla ;;
  depth)
    bash scripts/reuse_safety_jobs.sh deep8
    bash scripts/reuse_safety_jobs.sh deep16
    ;;
  pi05) bash scripts/micro_pi0_jobs.sh pi05 ;;
  *) echo "usage: $0 cogact|openvla|depth|pi05" >&2; exit 2 ;;
esac
