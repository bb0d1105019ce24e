#!/usr/bin/env bash
# The CPU fast-path benchmarks of BENCHMARKS.md, one after the other (about 10 minutes on the 2-core machine;
# run them on an otherwise idle machine: the ratios are interleaved, the absolute times are not):
#   bash scripts/bench_cpu.sh [OUT_DIR]   (default results/bench)
set -euo pipefail
out="${1:-results/bench}"
mkdir -p "$out"
vlacache bench cpu fast_path.compile=true --quiet --out "$out/cpu_compiled.json"
vlacache bench cpu_oft policy.scheduler.fraction=0.7 policy.label=constant-70pct fast_path.compile=true --quiet --out "$out/cpu_oft_70pct_compiled.json"
vlacache bench cpu_probe --quiet --out "$out/cpu_probe.json"
vlacache bench cpu batch=8 max_steps=6 repeats=3 --quiet --out "$out/cpu_batch8.json"
