#!/usr/bin/env bash
# π0 at its released size on the CPU (BENCHMARKS.md "CPU: π0 at its released size"): builds a random-weight
# checkpoint of the released shape in bfloat16 once (runs/pi0_3b_random, 6.6 GB), measures its load time and
# peak memory, then runs `vlacache bench cpu_pi0` (baseline, 30 / 50 / 70% reuse, VLA-Cache; interleaved).
# About 40 minutes on the 2-core machine; run it on an otherwise idle machine.
#   bash scripts/bench_pi0_3b.sh [OUT_DIR]   (default results/bench)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/bench}"
ckpt=runs/pi0_3b_random
mkdir -p "$out"
if [ ! -f "$ckpt/config.json" ]; then
  python -c "import torch; from vlacache.backbones.pi0 import PI0Backbone, build_preset; \
build_preset(PI0Backbone, '3b', dtype=torch.bfloat16).save_pretrained('$ckpt')"
fi
/usr/bin/time -f "%e s wall, %M KiB peak resident" python -c "import time, torch; from vlacache.backbones.pi0 import PI0Backbone; \
start = time.perf_counter(); b = PI0Backbone.from_pretrained('$ckpt', dtype=torch.float32); \
print(f'load {time.perf_counter() - start:.1f} s, {sum(p.numel() for p in b.model.parameters()) / 1e9:.2f} B parameters')" \
  2>&1 | tail -2 | tee "$out/cpu_pi0_3b_load.txt"
/usr/bin/time -f "%e s wall, %M KiB peak resident" vlacache bench cpu_pi0 threads=2 --quiet --out "$out/cpu_pi0_3b.json" \
  2> >(tail -1 > "$out/cpu_pi0_3b_bench_time.txt")
