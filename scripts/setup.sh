#!/usr/bin/env bash
# Prepares a fresh clone: system packages (when missing and we are root), npm dependencies (which
# build the native addon and the TypeScript), and Debian's libkrunfw. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package that provides it
declare -A need=(
  [cc]=gcc [g++]=g++ [make]=make [python3]=python3 [pkg-config]=pkg-config [strip]=binutils
  [mkfs.xfs]=xfsprogs [losetup]=mount [file]=file
  [qemu-system-x86_64]=qemu-system-x86 [dropbear]=dropbear-bin [dropbearkey]=dropbear-bin
  [unshare]=util-linux [setpriv]=util-linux [sshd]=openssh-server
  [umoci]=umoci [skopeo]=skopeo [zstd]=zstd [readelf]=binutils
  [docker-registry]=docker-registry [htpasswd]=apache2-utils [script]=bsdutils
  [clang-format]=clang-format
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# zlib.h for the cmake-js build of the addon (node-gyp builds use Node's own copy).
[ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
# libzstd.so.1: the addon decompresses zstd layers with it (loaded at run time; the zstd binary
# is the fallback). Part of every Debian base system; listed for minimal images.
ldconfig -p 2>/dev/null | grep -q 'libzstd\.so\.1 ' || missing+=(libzstd1)
# The test image needs a statically linked busybox (the busybox package is dynamic).
if ! { command -v busybox >/dev/null && command -v file >/dev/null && file -L "$(command -v busybox)" | grep -q 'statically linked'; }; then
  missing+=(busybox-static)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    echo "setup: missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# npm ci runs the install script (native build, offline) and prepare (TypeScript build).
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
else
  npm run --silent build:native >/dev/null
  npm run --silent build:ts
fi

# Debian sid's libkrunfw5, unpacked into vendor/ (git-ignored).
bash scripts/fetch-libkrunfw.sh >/dev/null
echo "setup: ready (libkrunfw in $(bash scripts/fetch-libkrunfw.sh))" >&2
