#!/usr/bin/env bash
# Builds a small root filesystem from this machine's Debian packages: busybox-static (shell and
# tools) and dropbear (SSH server) with the shared libraries it needs. Used by the end-to-end tests
# and the demo. Usage: scripts/make-test-image.sh DEST   (DEST must not exist yet)
set -euo pipefail
dest=${1:?usage: make-test-image.sh DEST}
[ ! -e "$dest" ] || { echo "$dest exists" >&2; exit 1; }
busybox=$(command -v busybox || true)
dropbear=$(command -v dropbear || echo /usr/sbin/dropbear)
# A missing tool exits 69 (EX_UNAVAILABLE): the tests then skip, naming it; any other failure fails them.
[ -n "$busybox" ] && file -L "$busybox" | grep -q 'statically linked' || { echo "busybox-static is not installed (apt-get install busybox-static)" >&2; exit 69; }
[ -x "$dropbear" ] || { echo "dropbear is not installed (apt-get install dropbear-bin)" >&2; exit 69; }

tmp="$dest.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,sbin,etc,root,tmp,proc,sys,dev,run,var/log,etc/dropbear,usr/bin,usr/sbin}
chmod 700 "$tmp/root"
chmod 1777 "$tmp/tmp"
cp "$busybox" "$tmp/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$tmp/bin/$applet" ] || ln -s busybox "$tmp/bin/$applet"
done
cp "$dropbear" "$tmp/usr/sbin/dropbear"
# The shared libraries dropbear links (and the dynamic loader), at the same paths.
for lib in $(ldd "$dropbear" | awk '/=>/ { print $3 } /^[ \t]*\// { print $1 }'); do
  mkdir -p "$tmp$(dirname "$lib")"
  cp -L "$lib" "$tmp$lib"
done
cat > "$tmp/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$tmp/etc/group" <<'G'
root:x:0:
nogroup:x:65534:
G
echo /bin/sh > "$tmp/etc/shells"
# A host key made now, so the guest's first SSH handshake does not wait for key generation under
# software emulation. Start the server with: dropbear -F -E -r /etc/dropbear/dropbear_ed25519_host_key
if command -v dropbearkey >/dev/null; then
  dropbearkey -t ed25519 -f "$tmp/etc/dropbear/dropbear_ed25519_host_key" >/dev/null 2>&1
fi
echo "node-microvm test image" > "$tmp/etc/motd"
mv "$tmp" "$dest"
trap - EXIT
echo "$dest"
