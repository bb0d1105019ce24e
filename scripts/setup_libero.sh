#!/usr/bin/env bash
# System libraries for LIBERO's offscreen rendering on the CPU (Mesa llvmpipe), Debian/Ubuntu.
# Idempotent and non-interactive: installs only what is missing, prints what it did.
#
#   scripts/setup_libero.sh            # EGL (the default renderer: renderer: egl)
#   scripts/setup_libero.sh osmesa     # OSMesa instead (renderer: osmesa)
#   scripts/setup_libero.sh all        # both
#
# The Python side is separate: pip install -e ".[libero]" (from the clone).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

mode="${1:-egl}"
case "$mode" in
  egl)    packages=(libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 libgl1) ;;
  osmesa) packages=(libosmesa6 libgl1-mesa-dri) ;;
  all)    packages=(libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 libgl1 libosmesa6) ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "usage: $0 [egl|osmesa|all]" >&2; exit 2 ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_libero.sh: not a Debian/Ubuntu system; install the equivalents of: ${packages[*]}" >&2
  echo "(Mesa EGL + DRI/llvmpipe for renderer: egl, or OSMesa for renderer: osmesa)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "setup_libero.sh: all present (${packages[*]})"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup_libero.sh: need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1
  fi
fi

echo "setup_libero.sh: installing ${missing[*]}"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "setup_libero.sh: done"
