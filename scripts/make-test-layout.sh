#!/usr/bin/env bash
# Builds an OCI image layout from a root filesystem directory with umoci: layer 1 is the tree,
# layer 2 removes /etc/motd (a whiteout) and adds /etc/layer2. Entrypoint /bin/sh.
# Usage: scripts/make-test-layout.sh ROOTFS_DIR LAYOUT_DIR [TAG]
set -euo pipefail
src=${1:?usage: make-test-layout.sh ROOTFS LAYOUT [TAG]}
dest=${2:?usage: make-test-layout.sh ROOTFS LAYOUT [TAG]}
tag=${3:-test}
# A missing tool exits 69 (EX_UNAVAILABLE): the tests then skip, naming it; any other failure fails them.
command -v umoci >/dev/null || { echo "umoci is not installed (apt-get install umoci)" >&2; exit 69; }
[ ! -e "$dest" ] || { echo "$dest exists" >&2; exit 1; }
rootless=()
[ "$(id -u)" = 0 ] || rootless=(--rootless)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umoci init --layout "$work/layout"
umoci new --image "$work/layout:$tag"
umoci unpack "${rootless[@]}" --image "$work/layout:$tag" "$work/bundle" >/dev/null
cp -a "$src/." "$work/bundle/rootfs/"
# --refresh-bundle: the next repack diffs against this layer, giving a second layer.
umoci repack --refresh-bundle --image "$work/layout:$tag" "$work/bundle"
mkdir -p "$work/bundle/rootfs/etc"
rm -f "$work/bundle/rootfs/etc/motd"
echo "from layer 2" > "$work/bundle/rootfs/etc/layer2"
umoci repack --image "$work/layout:$tag" "$work/bundle"
umoci config --image "$work/layout:$tag" --config.entrypoint /bin/sh --config.env GREETING=from-image --config.workingdir /root
umoci gc --layout "$work/layout"
mv "$work/layout" "$dest"
echo "$dest"
