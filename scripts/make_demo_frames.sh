#!/usr/bin/env bash
# Regenerate vlacache/data/demo_frames.npz, the embedded default's frame sequence: 16 observations (agent view,
# wrist view, 8-d proprio) of LIBERO-Spatial task 0, init state 0, driven by the tiny random-weight OpenVLA.
set -euo pipefail
cd "$(dirname "$0")/.."
vlacache record tiny_libero_smoke --out vlacache/data/demo_frames.npz --steps 16 "policies=[no_cache]"
