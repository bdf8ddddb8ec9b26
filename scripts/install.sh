#!/usr/bin/env bash
# Install what layerstore and its test suite need, on Debian 12 (bookworm) or 13 (trixie), as root.
#
#   bash scripts/install.sh
#
# - apt packages: Podman and friends, FUSE, the build tools for pyfuse3, docker-registry,
#   containerd + ctr-remote (to make eStargz test images), busybox-static, debootstrap, jq, curl;
# - a Python venv (default: .venv in the repository; override with LAYERSTORE_VENV) with
#   `pip install -e '.[test]'`. The interpreter is `python3` from PATH (override with
#   LAYERSTORE_PYTHON) and must be >= 3.11.
#
# Idempotent: apt runs only when a package is missing, and pip only when pyproject.toml changed
# since the last successful install into that venv. No service is started and nothing under
# /etc/containers is written.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${LAYERSTORE_VENV:-$REPO/.venv}
PYTHON=${LAYERSTORE_PYTHON:-python3}
PACKAGES=(
  podman buildah skopeo runc fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev
  docker-registry containerd stargz-snapshotter busybox-static debootstrap jq curl
)

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (apt-get, FUSE and rootful podman need it)"

if [ -r /etc/os-release ]; then
  # shellcheck disable=SC1091
  . /etc/os-release
  case "${ID:-}:${VERSION_ID:-}" in
    debian:12|debian:13) ;;
    *) say "warning: tested on Debian 12 and 13 only; this is ${PRETTY_NAME:-unknown}" ;;
  esac
fi

# -- apt ------------------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # docker-registry and containerd ship services (a registry on :5000, a system containerd);
  # the tests start their own, so keep invoke-rc.d from starting them during the install.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get -o DPkg::Lock::Timeout=600 update
  apt-get -o DPkg::Lock::Timeout=600 install -y "${missing[@]}"
else
  say "apt packages already installed"
fi

[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || say "warning: /dev/fuse is missing; the store cannot mount"

# -- python ---------------------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "$PYTHON not found on PATH"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  die "$("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])') is too old; \
layerstore needs Python >= 3.11 (set LAYERSTORE_PYTHON to a newer interpreter)"
fi

# A venv whose interpreter is gone or too old (e.g. made by another Python) is rebuilt.
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    2>/dev/null; then
  say "rebuilding unusable venv $VENV"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating venv $VENV with $("$PYTHON" -c 'import sys; print(sys.executable)')"
  "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.layerstore-install"
want=$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1):$REPO
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && (cd / && "$VENV/bin/python" -c 'import sys, store, pyfuse3, trio, pytest
# editable: the command runs this checkout (a plain `pip install .` would freeze a copy)
sys.exit(not store.__file__.startswith(sys.argv[1]))' "$REPO/store/") 2>/dev/null \
    && [ -x "$VENV/bin/ruff" ]; then
  say "venv $VENV is up to date"
else
  say "pip install -e '.[test]' into $VENV"
  "$VENV/bin/python" -m pip install --quiet -e "$REPO[test]"
  "$VENV/bin/python" -c 'import store, pyfuse3, trio, pytest'
  printf '%s\n' "$want" > "$stamp"
fi
say "done: venv $VENV ($("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])'))"
