#!/usr/bin/env bash
# Fetches Debian sid's libkrunfw5 into vendor/libkrunfw (git-ignored) without touching the
# system's apt state: a private sources list, a private lists directory, `apt-get download`,
# `dpkg -x`. Prints the directory that holds libkrunfw.so.5.
#
# Usage: scripts/fetch-libkrunfw.sh [DEST]   (default: <repo>/vendor/libkrunfw)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-"$root/vendor/libkrunfw"}
libdir="$dest/usr/lib/x86_64-linux-gnu"

if [ -e "$libdir/libkrunfw.so.5" ]; then
  echo "$libdir"
  exit 0
fi

# The machine's own Debian mirror (deb822 or one-line format), so no other host is contacted.
mirror=""
if [ -r /etc/apt/sources.list.d/debian.sources ]; then
  mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}
case "$mirror" in *security*) mirror=http://deb.debian.org/debian ;; esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt drops to the _apt user for downloads; let it write there (and nobody else).
chmod 755 "$work"; if id _apt >/dev/null 2>&1; then chown _apt "$work" 2>/dev/null || true; fi
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror sid main" > "$work/sources.list"

apt_opts=(
  -o "Dir::Etc::SourceList=$work/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache::Archives=$work/archives"
  -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
  -o "APT::Get::List-Cleanup=0"
  -o "Acquire::Languages=none"
  -o "APT::Architecture=amd64"
)
command -v apt-get >/dev/null && command -v dpkg >/dev/null || {
  echo "fetch-libkrunfw: this needs apt-get and dpkg (Debian, Ubuntu); elsewhere install your distribution's libkrunfw package" >&2
  exit 69
}
apt-get "${apt_opts[@]}" -qq update >&2
(cd "$work" && apt-get "${apt_opts[@]}" -qq download libkrunfw5 >&2)
deb=$(ls "$work"/libkrunfw5_*.deb)
mkdir -p "$dest.tmp"
dpkg -x "$deb" "$dest.tmp"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
test -e "$libdir/libkrunfw.so.5" || { echo "libkrunfw.so.5 missing from $deb" >&2; exit 1; }
echo "$libdir"
