#!/usr/bin/env bash
# System packages the tests need on Debian/Ubuntu: Xvfb (PsychoPy windows), Chromium (dashboard
# browser tests), docker-compose (the compose file check). Idempotent and quiet: when every
# package is installed it does nothing; otherwise one `apt-get update`, then one install.
# Runs as root (CI) or through sudo. Extra packages: SYSTEM_DEPS_EXTRA="pkg1 pkg2".
set -euo pipefail

packages=(xvfb chromium docker-compose)
# shellcheck disable=SC2206
packages+=(${SYSTEM_DEPS_EXTRA:-})

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for pkg in "${packages[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]}, and this is not a Debian-like system (no apt-get);" \
       "install them with your package manager" >&2
  exit 1
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
  else
    echo "system-deps: missing ${missing[*]}; run this script as root (or install sudo)" >&2
    exit 1
  fi
fi

echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq >/dev/null
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for pkg in "${missing[@]}"; do
  if ! installed "$pkg"; then
    echo "system-deps: $pkg is still not installed after apt-get install" >&2
    exit 1
  fi
done
