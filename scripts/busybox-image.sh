#!/usr/bin/env bash
# Build a busybox OCI image layout from Debian's busybox-static with umoci, cached under
# .cache/images/busybox-<hash of the busybox binary>; prints the layout's directory.
# Nothing comes from a registry: this is how the demo and the benchmarks get an image.
set -euo pipefail
cd "$(dirname "$0")/.."
bb=/bin/busybox
key=$(sha256sum "$bb" | cut -c1-16)
out=$PWD/.cache/images/busybox-$key
if [ -f "$out/oci-layout" ]; then echo "$out"; exit 0; fi
tmp=$(mktemp -d "$PWD/.cache/images-tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
umoci init --layout "$tmp/layout" >/dev/null
umoci new --image "$tmp/layout:latest" >/dev/null
umoci unpack --image "$tmp/layout:latest" "$tmp/bundle" >/dev/null
r=$tmp/bundle/rootfs
mkdir -p "$r"/{bin,etc,proc,sys,dev,tmp,root,run,var}
cp "$bb" "$r/bin/busybox"
for a in $("$bb" --list); do [ -e "$r/bin/$a" ] || ln -s busybox "$r/bin/$a"; done
echo 'root:x:0:0:root:/root:/bin/sh' > "$r/etc/passwd"
echo 'root:x:0:' > "$r/etc/group"
umoci repack --image "$tmp/layout:latest" "$tmp/bundle" >/dev/null
umoci config --image "$tmp/layout:latest" --config.cmd sh \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin >/dev/null
mkdir -p "$(dirname "$out")"
mv "$tmp/layout" "$out"
echo "$out"
