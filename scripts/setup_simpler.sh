#!/usr/bin/env bash
# Set up the SIMPLER / ManiSkill3 env (envs/simpler.py) on a CPU-only Debian 12 (bookworm) machine.
# Idempotent and non-interactive: safe to run again; it only changes what is missing.
#
#   1. apt: Mesa lavapipe (CPU Vulkan) >= 25 from bookworm-backports + libvulkan1 (stock Debian 12 Mesa 22
#      does not work with SAPIEN 3), and the X11/GL/glib libraries that sapien and opencv link against.
#      NOTE: this upgrades the system Mesa (libegl-mesa0, libgl1-mesa-dri, libglx-mesa0, libgbm1, libdrm*)
#      from 22.3 to 25.0 as well; EGL/OSMesa rendering for MuJoCo keeps working.
#   2. pip: mani-skill==3.0.1 + sapien==3.0.3, with the installed torch pinned by a constraints file so pip
#      never swaps in a CUDA torch. Neither package needs torchvision (checked: Requires-Dist of both wheels).
#   3. A check that renders PickCube-v1 (ships in the wheel) on the CPU. SIMPLER_SKIP_CHECK=1 skips it.
#
# The Bridge tasks' assets (scene data + WidowX robot) cannot be fetched on machines without internet; on a
# networked machine run
#     python -m mani_skill.utils.download_asset bridge_v2_real2sim -y
#     python -m mani_skill.utils.download_asset widowx250s -y
# and copy ~/.maniskill/data/tasks/bridge_v2_real2sim_dataset and ~/.maniskill/data/robots/widowx to the
# same places under this machine's ${MS_ASSET_DIR:-~/.maniskill}/data/.
#
# Env: PYTHON (default: python), SIMPLER_SKIP_APT=1, SIMPLER_SKIP_CHECK=1.
set -euo pipefail

PYTHON="${PYTHON:-python}"
MESA_MIN_MAJOR=25
LVP_ICD=/usr/share/vulkan/icd.d/lvp_icd.json
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup_simpler] %s\n' "$*"; }
die() { printf '[setup_simpler] ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else SUDO=""; fi
fi

mesa_major() {  # installed mesa-vulkan-drivers major version, or 0
  local v
  v="$(dpkg-query -W -f='${Status} ${Version}' mesa-vulkan-drivers 2>/dev/null || true)"
  case "$v" in
    "install ok installed "*) v="${v#install ok installed }"; v="${v#*:}"; echo "${v%%.*}" ;;
    *) echo 0 ;;
  esac
}

# ---------------------------------------------------------------------------------------------------- apt
if [ "${SIMPLER_SKIP_APT:-0}" != "1" ]; then
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install Mesa lavapipe >= ${MESA_MIN_MAJOR} (mesa-vulkan-drivers) and libvulkan1 by hand, or set SIMPLER_SKIP_APT=1"
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then die "apt steps need root (or passwordless sudo); rerun as root or set SIMPLER_SKIP_APT=1"; fi
  need_apt=0
  [ "$(mesa_major)" -ge "$MESA_MIN_MAJOR" ] || need_apt=1
  for pkg in libvulkan1 libgl1 libglib2.0-0 libx11-6; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt=1
  done
  if [ "$need_apt" = "1" ]; then
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [ "$codename" = "bookworm" ] || log "warning: this script targets Debian 12 bookworm (found '${codename}'); trying anyway"
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      log "adding bookworm-backports to /etc/apt/sources.list.d/bookworm-backports.sources"
      $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    log "apt-get update"
    $SUDO apt-get update -q
    log "installing mesa-vulkan-drivers (lavapipe) from bookworm-backports, libvulkan1, libgl1, libglib2.0-0, libx11-6"
    # Mesa's EGL/GL/DRI from backports too, so the whole Mesa stack is one version (what MuJoCo EGL for LIBERO
    # and SAPIEN were verified with); the glvnd front-ends (libegl1, libgl1) are version-independent.
    $SUDO apt-get install -y -q --no-install-recommends -t bookworm-backports mesa-vulkan-drivers \
      libegl-mesa0 libgl1-mesa-dri libglx-mesa0
    $SUDO apt-get install -y -q --no-install-recommends libvulkan1 libgl1 libglib2.0-0 libx11-6
  fi
  [ "$(mesa_major)" -ge "$MESA_MIN_MAJOR" ] || die "mesa-vulkan-drivers is $(mesa_major).x after install; SAPIEN needs lavapipe >= ${MESA_MIN_MAJOR} (bookworm-backports)"
  [ -f "$LVP_ICD" ] || die "lavapipe ICD $LVP_ICD not found after installing mesa-vulkan-drivers"
  log "Mesa lavapipe $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers) ok ($LVP_ICD)"
fi

# ---------------------------------------------------------------------------------------------------- pip
torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
[ -n "$torch_version" ] || die "torch is not installed for $PYTHON: install the CPU (or CUDA) build you want first, e.g. pip install torch --index-url https://download.pytorch.org/whl/cpu"
have="$("$PYTHON" - <<'EOF'
from importlib.metadata import version, PackageNotFoundError
def v(n):
    try:
        return version(n)
    except PackageNotFoundError:
        return "-"
print(v("mani-skill"), v("sapien"))
EOF
)"
if [ "$have" = "3.0.1 3.0.3" ]; then
  log "mani-skill 3.0.1 and sapien 3.0.3 already installed"
else
  constraints="$(mktemp)"
  trap 'rm -f "$constraints"' EXIT
  echo "torch==${torch_version}" > "$constraints"   # keep the installed torch (CPU) whatever the resolver thinks
  log "pip install mani-skill==3.0.1 sapien==3.0.3 (torch pinned to ${torch_version}; ~1.2 GB, ~30 s)"
  "$PYTHON" -m pip install -q --disable-pip-version-check -c "$constraints" "mani-skill==3.0.1" "sapien==3.0.3"
fi
after="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
[ "$after" = "$torch_version" ] || die "torch changed from ${torch_version} to ${after}"
if "$PYTHON" -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("torchvision") is None)'; then
  log "note: torchvision is installed (not needed by mani-skill; transformers imports it when present)"
fi

# -------------------------------------------------------------------------------------------------- check
if [ "${SIMPLER_SKIP_CHECK:-0}" != "1" ]; then
  log "checking: PickCube-v1 rendered by SAPIEN on the CPU"
  check_py="$(cat <<'EOF'
import os, time
if not os.getenv("VK_ICD_FILENAMES") and os.path.exists("/usr/share/vulkan/icd.d/lvp_icd.json") \
        and not os.path.exists("/usr/share/vulkan/icd.d/nvidia_icd.json"):
    os.environ["VK_ICD_FILENAMES"] = "/usr/share/vulkan/icd.d/lvp_icd.json"
start = time.perf_counter()
import gymnasium as gym
import mani_skill.envs  # noqa: F401
env = gym.make("PickCube-v1", obs_mode="rgb", control_mode="pd_ee_delta_pose", num_envs=1)
obs, _ = env.reset(seed=0)
for _ in range(3):
    obs, *_ = env.step(env.action_space.sample())
img = obs["sensor_data"]["base_camera"]["rgb"][0].numpy()
env.close()
assert img.dtype.name == "uint8" and img.std() > 5, "rendered image is blank: Vulkan/lavapipe is not working"
print(f"[setup_simpler] ok: PickCube-v1 image {img.shape} rendered in {time.perf_counter() - start:.1f} s")
EOF
)"
  "$PYTHON" -c "$check_py" </dev/null  # stdin closed: a ManiSkill prompt could never block
fi

assets="${MS_ASSET_DIR:-$HOME/.maniskill}/data"
if [ -f "$assets/robots/widowx/wx250s.urdf" ] && [ -d "$assets/tasks/bridge_v2_real2sim_dataset" ]; then
  log "Bridge assets found under $assets"
else
  log "Bridge assets NOT found under $assets (needed only for the SIMPLER Bridge tasks; see the header of this script)"
fi
