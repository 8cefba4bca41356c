#!/usr/bin/env bash
# Install what building, the guest image and the nested test node need (Debian 12).
# Idempotent: safe to run again; skips what is already there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
    qemu-system-x86 busybox-static cpio lz4 xz-utils zstd dpkg-dev \
    libseccomp-dev libcap-ng-dev pkg-config gcc python3 \
    runc crun e2fsprogs util-linux iproute2 \
    dbus dbus-bin systemd bsdutils libssl-dev \
    podman conmon umoci skopeo docker-registry docker.io containerd \
    containernetworking-plugins protobuf-compiler iperf3 iptables \
    make bc bison flex libelf-dev patch >/dev/null
# virtiofsd, the vhost-user-fs back end (the crate's binary), pinned. Both are built from
# /, so that this repository's .cargo/config.toml (static glibc) does not apply to them.
VIRTIOFSD_VERSION=1.14.0
if ! /opt/virtiofsd/bin/virtiofsd --version 2>/dev/null | grep -q "$VIRTIOFSD_VERSION"; then
    echo "install-deps: building virtiofsd $VIRTIOFSD_VERSION (about 2 minutes)" >&2
    (cd / && $SUDO cargo install virtiofsd --version "$VIRTIOFSD_VERSION" --locked --root /opt/virtiofsd -q)
fi
# vhost-device-vsock, the vhost-user vsock back end the QEMU backend uses (hybrid vsock
# over unix sockets, the same protocol bulkhead-vmm's own vsock speaks), pinned.
VSOCK_VERSION=0.3.0
if ! /opt/vhost-device-vsock/bin/vhost-device-vsock --version 2>/dev/null | grep -q "$VSOCK_VERSION"; then
    echo "install-deps: building vhost-device-vsock $VSOCK_VERSION (about 2 minutes)" >&2
    (cd / && $SUDO cargo install vhost-device-vsock --version "$VSOCK_VERSION" --locked --root /opt/vhost-device-vsock -q)
fi
