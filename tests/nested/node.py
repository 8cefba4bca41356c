#!/usr/bin/env python3
"""The nested test node: real KVM for bulkhead-vmm on hosts whose own KVM cannot boot a
stock kernel.

It boots an L1 Linux (Debian's cloud kernel) under QEMU TCG with `-cpu max -smp 1`,
where kvm-amd gives a working /dev/kvm, carries the project's binaries and the guest image
in L1's initramfs, and runs a script there. Results come back on L1's serial console as
lines this harness parses.

  node.py test   bulkhead-vmm boots the guest; health over vsock, a virtio-blk read and a
                 virtio-fs read of a host file must all succeed (exit 0 if they do)
  node.py demo   the same, printing the agent's answer and the boot time
  node.py bench  N rounds of boots of bulkhead-vmm and QEMU -M microvm on L1's KVM, each
                 round in its own shuffled order, same kernel and initramfs, at several memory
                 sizes, with and without virtio-fs (and bulkhead-vmm booting 128 MiB with the
                 rest hot-pluggable); prints a table of medians (start phases, faults, CPU, RSS) and ratios
  node.py soak   #38's hostile-guest soak: five pods created and exec'd into for --minutes
                 (10), then as long again beside a hostile pod; latency medians and p99,
                 and every L1 file's hash and the mount table before and after
  node.py netbench  iperf3 and ping from a container in a VM to a server in L1, through
                 bulkhead-vmm + bulkhead-net, QEMU + bulkhead-net and QEMU + the kernel's
                 vhost-net, all three pods up at once and measured in turn; a table of
                 medians and the ratios against vhost-net
"""
import argparse, glob, gzip, hashlib, os, random, re, shutil, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "packaging", "guest"))
import build  # noqa: E402  (the guest image builder: cpio writer, module resolver)

L2_CMDLINE = "console=ttyS0 quiet panic=-1 pci=off"


def log(msg):
    print(f"nested: {msg}", file=sys.stderr, flush=True)


def tsc_khz():
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return 0


def release_bins():
    out = os.path.join(ROOT, "target", "x86_64-unknown-linux-gnu", "release")
    bins = {b: os.path.join(out, b) for b in ("bulkhead-vmm", "bulkhead", "bulkheadd", "bulkhead-agent", "agent-api-tests",
                                              "containerd-shim-bulkhead-v2", "bulkhead-net", "bulkhead-jailer",
                                              "bulkhead-metrics", "bulkhead-probe")}
    for b, p in bins.items():
        if not os.path.exists(p):
            sys.exit(f"nested: {p} missing: run cargo build --release first")
    return bins


def find_virtiofsd():
    for p in (os.environ.get("VIRTIOFSD", ""), shutil.which("virtiofsd") or "",
              "/opt/virtiofsd/bin/virtiofsd", "/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"):
        if p and os.path.exists(p):
            return p
    sys.exit("nested: virtiofsd not found (cargo install virtiofsd, or set VIRTIOFSD)")


def guest_image(bins):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "packaging", "guest", "build.py"),
                        "--agent", bins["bulkhead-agent"]], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr.strip() or "nested: guest image build failed")
    return r.stdout.strip().splitlines()[-1]


def copy_with_libs(root, binary, dest):
    dst = os.path.join(root, dest.lstrip("/"))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(binary, dst)
    os.chmod(dst, 0o755)
    for lib in build.shared_libs(binary):
        d = os.path.join(root, lib.lstrip("/"))
        if not os.path.exists(d):
            os.makedirs(os.path.dirname(d), exist_ok=True)
            shutil.copy(lib, d)


def find_vsock_backend():
    for p in (shutil.which("vhost-device-vsock") or "", "/opt/vhost-device-vsock/bin/vhost-device-vsock"):
        if p and os.path.exists(p):
            return p
    sys.exit("nested: vhost-device-vsock missing (bash scripts/install-deps.sh)")


def find_tool(name):
    p = shutil.which(name)
    if not p:
        sys.exit(f"nested: {name} missing (bash scripts/install-deps.sh)")
    return p


def oci_archive(rootfs, archive, workdir):
    """The busybox rootfs as an OCI archive (umoci), for `ctr images import` in L1."""
    layout = os.path.join(workdir, "oci-layout")
    bundle = os.path.join(workdir, "oci-bundle")
    img = f"{layout}:latest"

    def umoci(*a):
        subprocess.run(["umoci", *a], check=True, capture_output=True)
    umoci("init", "--layout", layout)
    umoci("new", "--image", img)
    umoci("unpack", "--image", img, bundle)
    subprocess.run(["cp", "-a", f"{rootfs}/.", os.path.join(bundle, "rootfs")], check=True)
    umoci("repack", "--image", img, bundle)
    umoci("config", "--image", img, "--config.cmd", "sh",
          "--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    subprocess.run(["tar", "-C", layout, "-cf", archive, "."], check=True)
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.rmtree(layout, ignore_errors=True)


def busybox_rootfs(dest):
    """The same layout as tests/agent-api/src/rootfs.rs builds on the host."""
    busybox = "/bin/busybox"
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "var"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    shutil.copy(busybox, os.path.join(dest, "bin", "busybox"))
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for a in applets:
        if a != "busybox" and "/" not in a:
            os.symlink("busybox", os.path.join(dest, "bin", a))
    os.symlink("bin", os.path.join(dest, "sbin"))
    open(os.path.join(dest, "etc", "passwd"), "w").write(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    open(os.path.join(dest, "etc", "group"), "w").write("root:x:0:\nnogroup:x:65534:\n")


def l1_initramfs(guest_dir, bins, with_qemu, workdir, with_podman=False, with_netbench=False,
                 with_runc_shim=False, extra_bins=None, with_soak=False):
    """Build L1's initramfs; cached under .cache/nested by the hash of its inputs.
    `extra_bins` ({name: path}) go to /opt/bulkhead/<name> beside ours (ab.py's other VMM)."""
    extra_bins = extra_bins or {}
    deb = build.fetch_deb(os.path.join(ROOT, ".cache"))
    inputs = [build.sha256_file(__file__), build.sha256_file(deb), guest_dir]
    inputs += [build.sha256_file(p) for p in sorted(bins.values())]
    inputs += [f"{n}={build.sha256_file(p)}" for n, p in sorted(extra_bins.items())]
    inputs += [build.sha256_file(find_virtiofsd()), str(with_qemu)]
    if with_podman:
        inputs += ["podman"] + [build.sha256_file(find_tool(t)) for t in PODMAN_TOOLS]
    if with_runc_shim:
        inputs += ["runc-shim"] + [build.sha256_file(find_tool(t)) for t in RUNC_SHIM_TOOLS]
    if with_netbench:
        inputs += ["netbench", build.sha256_file(find_tool("iperf3"))]
    if with_soak:
        inputs += ["soak"] + [build.sha256_file(find_tool(t)) for t in SOAK_TOOLS]
    if with_netbench or with_runc_shim:
        inputs += [build.sha256_file(find_vsock_backend()), build.sha256_file(find_tool("qemu-system-x86_64"))]
    inputs += [build.sha256_file(find_tool(t)) for t in ("containerd", "ctr")]
    key = hashlib.sha256("|".join(inputs).encode()).hexdigest()[:16]
    cache = os.path.join(ROOT, ".cache", "nested", key)
    out = os.path.join(cache, "l1.cpio.gz")
    if os.path.exists(out):
        return out, os.path.join(cache, "vmlinux")
    root = os.path.join(workdir, "l1root")
    for d in ("bin", "sbin", "proc", "sys", "dev", "tmp", "opt/bulkhead", "opt/guest", "opt/data",
              "opt/share", "lib/modules", "etc", "root"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy(busybox, os.path.join(root, "bin", "busybox"))
    for b in ("bulkhead-vmm", "bulkhead", "bulkheadd", "agent-api-tests", "containerd-shim-bulkhead-v2",
              "bulkhead-net", "bulkhead-jailer", "bulkhead-metrics", "bulkhead-probe"):
        copy_with_libs(root, bins[b], f"/opt/bulkhead/{b}")
    for n, p in extra_bins.items():
        copy_with_libs(root, p, f"/opt/bulkhead/{n}")
    # iproute2, for the network namespaces and veths of the pod networking case (busybox's
    # ip has no netns).
    copy_with_libs(root, shutil.which("ip") or "/usr/sbin/ip", "/opt/bulkhead/ip2")
    # containerd and ctr, for `ctr run` through our shim on bulkhead-vmm.
    for t in ("containerd", "ctr"):
        copy_with_libs(root, find_tool(t), f"/opt/bulkhead/{t}")
    # The embedded bus for `bulkhead run` (dbus-daemon resolves the policy's users).
    copy_with_libs(root, shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon", "/opt/bulkhead/dbus-daemon")
    open(os.path.join(root, "etc", "passwd"), "w").write("root:x:0:0:root:/root:/bin/sh\n")
    open(os.path.join(root, "etc", "group"), "w").write("root:x:0:\n")
    # The agent API list's busybox rootfs: shared into the guest over virtio-fs, and as
    # an ext4 image on a virtio-blk disk for the block-rootfs case.
    rootfs = os.path.join(root, "opt", "share", "rootfs")
    busybox_rootfs(rootfs)
    oci_archive(rootfs, os.path.join(root, "opt", "data", "busybox-oci.tar"), workdir)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", rootfs, os.path.join(root, "opt", "data", "rootfs.ext4"), "16M"],
                   check=True)
    copy_with_libs(root, find_virtiofsd(), "/opt/bulkhead/virtiofsd")
    for f in ("vmlinux", "bzImage", "initramfs.cpio", "kernel-release"):
        shutil.copy(os.path.join(guest_dir, f), os.path.join(root, "opt", "guest", f))
    disk = bytearray(1 << 20)
    disk[:16] = b"BULKHEAD-DISK-OK"
    open(os.path.join(root, "opt", "data", "disk.img"), "wb").write(disk)
    open(os.path.join(root, "opt", "share", "hello.txt"), "w").write("BULKHEAD-VIRTIOFS-OK\n")
    with tempfile.TemporaryDirectory(dir=workdir) as x:
        subprocess.run(["dpkg-deb", "-x", deb, x], check=True)
        moddir = glob.glob(os.path.join(x, "lib", "modules", "*"))[0]
        # L1 runs Debian's cloud kernel (its modules are the ones below); L2, the guest,
        # runs the image's own kernel.
        bz = open(glob.glob(os.path.join(x, "boot", "vmlinuz-*"))[0], "rb").read()
        open(os.path.join(workdir, "l1-vmlinux"), "wb").write(build.decompress_payload(bz))
        # overlay: containerd's default snapshotter.
        # veth, tun, ingress qdisc, u32 and mirred: a pod's network, plumbed as on a node.
        wanted = ["kvm-amd", "overlay", "veth", "tun", "sch_ingress", "cls_u32", "act_mirred"]
        wanted += ["vhost_vsock"] if with_qemu else []
        # The kernel's vhost-net: the reference the network benchmark measures against.
        wanted += ["vhost_net"] if with_netbench else []
        saved = build.WANTED
        build.WANTED = wanted
        try:
            mods = build.module_order(moddir)
        finally:
            build.WANTED = saved
        names = []
        for name, data in mods:
            open(os.path.join(root, "lib", "modules", name), "wb").write(data)
            names.append(name)
        open(os.path.join(root, "etc", "modules"), "w").write("\n".join(names) + "\n")
    if with_podman:
        # podman + conmon + runc, the peer of `bulkhead run` in the start benchmark.
        for t in PODMAN_TOOLS:
            copy_with_libs(root, find_tool(t), f"/opt/bulkhead/{t}")
        os.makedirs(os.path.join(root, "etc", "containers"), exist_ok=True)
        shutil.copy("/etc/containers/policy.json", os.path.join(root, "etc", "containers", "policy.json"))
        open(os.path.join(root, "etc", "resolv.conf"), "w").write("")
        open(os.path.join(root, "etc", "hosts"), "w").write("127.0.0.1 localhost\n")
    if with_runc_shim:
        # containerd's runc shim and runc: the peer of our shim in the pod benchmark.
        for t in RUNC_SHIM_TOOLS:
            copy_with_libs(root, find_tool(t), f"/opt/bulkhead/{t}")
    if with_soak:
        for t in SOAK_TOOLS:
            copy_with_libs(root, find_tool(t), f"/opt/bulkhead/{t}")
    if with_netbench or with_runc_shim:
        # The QEMU backend as bulkheadd runs it: QEMU where it looks for its firmware,
        # and vhost-device-vsock beside bulkheadd.
        copy_with_libs(root, find_vsock_backend(), "/opt/bulkhead/vhost-device-vsock")
        copy_with_libs(root, shutil.which("qemu-system-x86_64"), "/usr/bin/qemu-system-x86_64")
        os.makedirs(os.path.join(root, "usr", "share", "qemu"), exist_ok=True)
        # QEMU's own names first: Debian's bios-microvm.bin there is qboot, SeaBIOS's
        # file of that name is another firmware.
        for rom in ("bios-microvm.bin", "qboot.rom", "pvh.bin", "linuxboot_dma.bin", "kvmvapic.bin"):
            src = next(iter(glob.glob(f"/usr/share/qemu/{rom}") + glob.glob(f"/usr/share/seabios/{rom}")), None)
            if src:
                shutil.copy(src, os.path.join(root, "usr", "share", "qemu", rom))
    if with_netbench:
        # iperf3 on L1 (the server) and in the container's rootfs (the client).
        iperf3 = find_tool("iperf3")
        copy_with_libs(root, iperf3, "/opt/bulkhead/iperf3")
        netroot = os.path.join(root, "opt", "share", "netroot")
        busybox_rootfs(netroot)
        copy_with_libs(netroot, iperf3, "/bin/iperf3")
    if with_qemu:
        qemu = shutil.which("qemu-system-x86_64")
        if not qemu:
            sys.exit("nested: qemu-system-x86_64 missing (apt-get install qemu-system-x86)")
        copy_with_libs(root, qemu, "/opt/qemu/qemu-system-x86_64")
        for rom in ("qboot.rom", "bios-microvm.bin", "linuxboot_dma.bin", "kvmvapic.bin"):
            for src in glob.glob(f"/usr/share/qemu/{rom}") + glob.glob(f"/usr/share/seabios/{rom}"):
                shutil.copy(src, os.path.join(root, "opt", "qemu", rom))
    init = os.path.join(root, "init")
    open(init, "w").write(L1_INIT)
    os.chmod(init, 0o755)
    os.makedirs(cache, exist_ok=True)
    tmp_out = out + ".tmp"
    with open(tmp_out, "wb") as f:
        f.write(gzip.compress(build.cpio_newc(root, build.DEV_NODES), compresslevel=1, mtime=0))
    shutil.copy(os.path.join(workdir, "l1-vmlinux"), os.path.join(cache, "vmlinux"))
    os.rename(tmp_out, out)
    return out, os.path.join(cache, "vmlinux")


L1_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/opt/bulkhead
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /tmp
for m in $(cat /etc/modules); do insmod /lib/modules/$m 2>/dev/null || echo "L1: insmod $m failed"; done
echo "NESTED-KVM $(ls /dev/kvm 2>&1) $(grep -o -w svm /proc/cpuinfo | head -1)"
# A heartbeat: if it stops, L1 itself froze; if it goes on, something inside it is stuck.
(while sleep 60; do echo "L1-ALIVE up=$(cut -d' ' -f1 /proc/uptime) load=$(cut -d' ' -f1-3 /proc/loadavg) $(ps -o comm= 2>/dev/null | grep -E '^(bulkhead|agent-api|virtiofsd)' | sort -u | tr '\n' ' ')"; done) &
# The harness writes a newline to this console every second (see run_l1): no echo, and
# nothing here reads the console.
stty -echo 2>/dev/null
# As systemd/bulkhead-memory.conf does on a node: shared guest RAM may use huge pages.
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
sh /opt/script.sh </dev/null
echo "NESTED-EXIT $?"
poweroff -f
"""


PODMAN_TOOLS = ("podman", "conmon", "runc")
RUNC_SHIM_TOOLS = ("containerd-shim-runc-v2", "runc")
# The soak's bus client (the hostile pod's privileged container, the floods of calls)
# and its local user.
SOAK_TOOLS = ("busctl", "setpriv")

# `bulkhead run --rm` on bulkhead-vmm beside `podman run --rm --runtime runc`, the same
# busybox image, interleaved, in one L1. Times from L1's /proc/uptime (10 ms steps).
RUNBENCH_SCRIPT = r"""
export BULKHEAD_ROOT=/tmp/bhroot BULKHEAD_GUEST_DIR=/opt/guest BULKHEAD_DATA=/tmp/bhdata TMPDIR=/tmp
mkdir -p /sys/fs/cgroup /dev/shm /var/tmp && mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null; mount -t tmpfs shm /dev/shm
# L1 runs from its initramfs, where pivot_root is refused: runc moves the root instead.
printf '[engine]\nno_pivot_root = true\n' > /tmp/containers.conf; export CONTAINERS_CONF=/tmp/containers.conf
P="podman --root /tmp/pm/root --runroot /tmp/pm/run --storage-driver vfs --cgroup-manager cgroupfs --events-backend file --conmon /opt/bulkhead/conmon --runtime /opt/bulkhead/runc"
$P load -q -i /opt/data/busybox-oci.tar >/tmp/load.log 2>&1 || cat /tmp/load.log
img=$($P images -q | head -1)
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
one_bulkhead() {
  t0=$(ms); out=$(BULKHEAD_TIMINGS=1 timeout 300 bulkhead run --rm --rootfs /opt/share/rootfs echo hello 2>/tmp/b.err); rc=$?; t1=$(ms)
  echo "RUNBENCH bulkhead rc=$rc out=$out total_ms=$((t1 - t0)) $(grep -h 'timings ms' /tmp/b.err | tail -1)"
  [ $rc = 0 ] || tail -5 /tmp/b.err
}
one_podman() {
  t0=$(ms); out=$(timeout 300 $P run --rm --network none $img echo hello 2>/tmp/p.err); rc=$?; t1=$(ms)
  echo "RUNBENCH podman-runc rc=$rc out=$out total_ms=$((t1 - t0))"
  [ $rc = 0 ] || tail -5 /tmp/p.err
}
# One of each first, not counted: caches, the bus, the manager.
one_bulkhead >/dev/null; one_podman >/dev/null
for i in $(seq 1 NRUNS); do one_bulkhead; one_podman; done
"""


def poke_serial(p, every=1.0):
    """Keep an external interrupt arriving at L1 while it runs.

    QEMU 7.2's TCG, emulating nested SVM, now and then leaves L1 halted with its LAPIC
    timer vector pending in IRR, interrupts enabled and nothing to wake it: QEMU missed
    re-raising the interrupt after an L2 exit (seen in the monitor as HLT=1, IRR 236,
    ISR empty; about one run in ten under load, each one a stall until the timeout).
    Any other interrupt makes QEMU re-evaluate the APIC, and the timer is delivered; a
    byte on the serial line each second bounds such a stall to a second.
    """
    while p.poll() is None:
        try:
            p.stdin.write(b"\n")
            p.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            return
        time.sleep(every)


def run_l1(l1_initrd, vmlinux, script, timeout, mem_mib=1536):
    """Boot L1 with `script` appended to its initramfs as /opt/script.sh; return its output."""
    with tempfile.TemporaryDirectory() as d:
        # A second, tiny initramfs carries the script: the kernel unpacks both.
        sroot = os.path.join(d, "s")
        os.makedirs(os.path.join(sroot, "opt"))
        open(os.path.join(sroot, "opt", "script.sh"), "w").write(script)
        extra = os.path.join(d, "script.cpio")
        open(extra, "wb").write(build.cpio_newc(sroot))
        combined = os.path.join(d, "initrd")
        with open(combined, "wb") as f:
            first = open(l1_initrd, "rb").read()
            f.write(first)
            # The kernel skips zero padding between archives; a new one must start aligned.
            f.write(b"\x00" * (-len(first) % 512))
            f.write(open(extra, "rb").read())
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1",
               "-M", "microvm,acpi=on", "-m", str(mem_mib), "-nographic", "-no-reboot",
               "-nodefaults", "-serial", "stdio",
               "-kernel", vmlinux, "-initrd", combined,
               "-append", f"console=ttyS0 quiet panic=-1 tsc_early_khz={tsc_khz()} rdinit=/init"]
        t0 = time.monotonic()
        # L1's console goes to a file as it runs, so a slow or stuck run can be watched.
        # One file per run: two runs side by side must not write into each other's log.
        named = os.environ.get("BULKHEAD_NESTED_LOG")
        live = named or os.path.join(tempfile.gettempdir(), f"bulkhead-nested-l1-{os.getpid()}.log")
        log(f"L1 console: {live}")
        # A monitor socket beside the log, to look inside an L1 that stalls.
        cmd += ["-monitor", f"unix:{live}.mon,server=on,wait=off"]
        with open(live, "w") as lf:
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=lf, stderr=subprocess.STDOUT)
            threading.Thread(target=poke_serial, args=(p,), daemon=True).start()
            try:
                p.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                timed_out = True
        out = open(live, errors="replace").read()
        if timed_out:
            out += f"\nNESTED-TIMEOUT after {timeout}s\n"
        # A run whose script ended well leaves nothing behind; any other keeps its console.
        if not named and "NESTED-EXIT 0" in out:
            for f in (live, f"{live}.mon"):
                try:
                    os.unlink(f)
                except FileNotFoundError:
                    pass
        else:
            log(f"kept the L1 console: {live}")
        return out, time.monotonic() - t0


def vmm_cmd(extra="", verbose=False):
    env = "BULKHEAD_LOG=info " if verbose else ""
    return (f"{env}/opt/bulkhead/bulkhead-vmm --kernel /opt/guest/vmlinux --initrd /opt/guest/initramfs.cpio "
            f"--cmdline '{L2_CMDLINE.replace(' quiet', '') if verbose else L2_CMDLINE}' --cpus 1 --memory 256 --vsock cid=3,socket=/tmp/v.sock "
            f"--serial file:/tmp/l2-serial.log {extra}")


# containerd on a private socket with the busybox image imported, as L1's scripts use it:
# $C is its ctr, $ctd its pid.
CONTAINERD_UP = r"""mkdir -p /run /tmp/ctd
cat > /tmp/ctd/config.toml <<CTDCONF
version = 2
root = "/tmp/ctd/root"
state = "/tmp/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "/tmp/ctd/containerd.sock"
CTDCONF
containerd --config /tmp/ctd/config.toml >/tmp/ctd/log 2>&1 &
ctd=$!
C="ctr --address /tmp/ctd/containerd.sock"
for i in $(seq 1 600); do $C version >/dev/null 2>&1 && break; sleep 0.2; done
$C images import --base-name docker.io/test/busybox --digests /opt/data/busybox-oci.tar >/tmp/ctd/import.log 2>&1
"""

TEST_SCRIPT = r"""
virtiofsd --socket-path=/tmp/fs.sock --shared-dir=/opt/share --sandbox=none --cache=never >/tmp/virtiofsd.log 2>&1 &
fs1=$!
for i in $(seq 1 100); do [ -S /tmp/fs.sock ] && break; sleep 0.1; done
bulkhead-probe --socket /tmp/v.sock --timeout 240 --mount share:/mnt/share \
  --read /dev/vda:BULKHEAD-DISK-OK --read /mnt/share/hello.txt:BULKHEAD-VIRTIOFS-OK --shutdown \
  -- env VMMCMD --disk path=/opt/data/disk.img,readonly --rng --fs tag=share,socket=/tmp/fs.sock
rc=$?
echo "NESTED-CASE vmlinux rc=$rc"
# The same ELF kernel through its PVH note, for kernels without the 64-bit entry.
rm -f /tmp/v.sock
timeout 300 bulkhead-probe --socket /tmp/v.sock --timeout 240 --shutdown \
  -- env BULKHEAD_LOG=info VMMCMD --boot pvh >/tmp/case-pvh.log 2>&1
rcp=$?
grep -q "Pvh" /tmp/case-pvh.log || rcp=1  # the start log's entry field
echo "NESTED-CASE pvh-vmlinux rc=$rcp"
[ $rcp = 0 ] || { cat /tmp/case-pvh.log; rc=1; }
# The 64-bit bzImage path, two vCPUs, more memory, the virtio console.
timeout 300 bulkhead-probe --socket /tmp/v.sock --timeout 240 --read /sys/class/tty/hvc0/dev:229 --shutdown \
  -- env BULKHEAD_LOG=info VMMCMD2 --console /tmp/l2-hvc.log >/tmp/case2.log 2>&1
rc2=$?
cat /tmp/case2.log
grep -q "cpus=2 " /tmp/case2.log || rc2=1
grep -q "Linux64" /tmp/case2.log || rc2=1
echo "NESTED-CASE bzimage-2cpu rc=$rc2"
[ $rc2 = 0 ] || rc=1
# The agent API list inside the guest: rootfs over virtio-fs, the ext4 copy on virtio-blk.
virtiofsd --socket-path=/tmp/fs3.sock --shared-dir=/opt/share --sandbox=none --cache=never >/tmp/virtiofsd3.log 2>&1 &
fs3=$!
for i in $(seq 1 100); do [ -S /tmp/fs3.sock ] && break; sleep 0.1; done
rm -f /tmp/v.sock
VMMCMD3 --fs tag=share,socket=/tmp/fs3.sock --disk path=/opt/data/rootfs.ext4,readonly >/tmp/vmm3.log 2>&1 &
vmm3=$!
timeout 300 agent-api-tests --vsock /tmp/v.sock --wait-agent 180 --mount-virtiofs share:/run/bulkhead/shared \
  --rootfs /run/bulkhead/shared/rootfs --bench BENCHRUNS >/tmp/api-bench.log 2>&1
rc3=$?
sed 's/^/API /' /tmp/api-bench.log
if [ $rc3 = 0 ]; then
  timeout 400 agent-api-tests --vsock /tmp/v.sock \
    --rootfs /run/bulkhead/shared/rootfs --in-guest --block-rootfs /dev/vda --share /opt/share:/run/bulkhead/shared \
    --shutdown >/tmp/api.log 2>&1
  rc3=$?
  sed 's/^/API /' /tmp/api.log
fi
# The guest powers off after --shutdown; never wait on a VMM that did not get there.
for i in $(seq 1 300); do kill -0 $vmm3 2>/dev/null || break; sleep 0.1; done
if kill -0 $vmm3 2>/dev/null; then echo "API VMM still running after the tests: killed"; kill -9 $vmm3; rc3=1; fi
if [ $rc3 != 0 ] || [ -n "$VERBOSE" ]; then
  echo "--- L2 serial (agent API)"; tail -80 /tmp/l2-serial3.log; echo "--- VMM log (agent API)"; tail -40 /tmp/vmm3.log
fi
echo "NESTED-CASE agent-api"
if [ $rc != 0 ] || [ -n "$VERBOSE" ]; then echo "--- L2 serial"; cat /tmp/l2-serial.log; echo "--- virtiofsd"; cat /tmp/virtiofsd.log; fi
kill $fs1 $fs3 2>/dev/null
[ $rc3 = 0 ] || rc=1
# bulkhead run as a user runs it: the embedded bus and bulkheadd start on demand, and
# bulkhead check picks bulkhead-vmm on this KVM.
export BULKHEAD_ROOT=/tmp/bhroot BULKHEAD_GUEST_DIR=/opt/guest BULKHEAD_DATA=/tmp/bhdata
# Components log what they did (the VMM otherwise logs warnings only).
export BULKHEAD_LOG=info,bulkhead_vhost_net=debug
backend=$(bulkhead check | sed -n 's/^backend: //p')
out=$(BULKHEAD_TIMINGS=1 timeout 300 bulkhead run --rm --rootfs /opt/share/rootfs sh -c 'uname -r; exit 7' 2>/tmp/run.err)
rc4=$?
cat /tmp/run.err
echo "NESTED-RUN backend=$backend rc=$rc4 out=$out"
if [ "$backend" != bulkhead-vmm ] || [ $rc4 != 7 ] || [ "$out" != "$(cat /opt/guest/kernel-release)" ]; then
  rc=1; echo "--- bulkheadd.log"; tail -30 /tmp/bhroot/bulkheadd.log; bulkhead check
fi
left=$(ls /tmp/bhroot/run /tmp/bhroot/sandboxes 2>/dev/null | grep -v : | grep -c .)
echo "NESTED-CASE bulkhead-run backend=$backend rc=$rc4 left=$left"
[ "$left" = 0 ] || rc=1
# Pod networking on bulkhead-vmm: a server namespace and a pod namespace joined by a
# veth; the VM gets the pod's interface through bulkhead-net and the VMM's vhost-user-net
# front end. Then kill -9 bulkhead-net while the container streams 200 lines over one
# TCP connection: every line must arrive, in order, on that one connection.
mkdir -p /run
IP=/opt/bulkhead/ip2
$IP netns add srv && $IP netns add pod
$IP -n srv link add s0 type veth peer name eth0 netns pod
$IP -n srv addr add 10.9.0.1/24 dev s0; $IP -n srv link set s0 up; $IP -n srv link set lo up
$IP -n pod addr add 10.9.0.2/24 dev eth0; $IP -n pod link set eth0 up; $IP -n pod route add default via 10.9.0.1
mkdir -p /tmp/www; echo NESTED-NET-OK > /tmp/www/index.html
$IP netns exec srv httpd -p 10.9.0.1:8080 -h /tmp/www
out=$(timeout 300 bulkhead run --rm --netns /run/netns/pod --rootfs /opt/share/rootfs wget -q -O- http://10.9.0.1:8080/index.html 2>/tmp/net.err)
rc6=$?
echo "NESTED-CASE net-reach rc=$rc6 out=$out"
if [ $rc6 != 0 ] || [ "$out" != NESTED-NET-OK ]; then rc=1; cat /tmp/net.err; tail -20 /tmp/bhroot/bulkheadd.log; fi
timeout 300 bulkhead run -d --name np --netns /run/netns/pod --rootfs /opt/share/rootfs sleep 600 >/dev/null 2>/tmp/net.err || { rc=1; cat /tmp/net.err; }
# Every host process of the pod is jailed: bulkhead-vmm, bulkhead-net and virtiofsd.
bulkhead inspect np --check > /tmp/inspect.txt; jr=$?
sed 's/^/NESTED-JAIL /' /tmp/inspect.txt
grep -h '"root_change"\|"status"' /tmp/bhroot/run/*/vmm.jail.json | tr -d ' ,' | sed 's/^/NESTED-JAIL vmm /'
echo "NESTED-CASE jail rc=$jr"
[ $jr = 0 ] || rc=1
# busybox nc closes the connection when its stdin ends: a fifo held open keeps it open.
mkfifo /tmp/hold
$IP netns exec srv nc -l -p 9000 < /tmp/hold > /tmp/recv.txt &
srvnc=$!
exec 9>/tmp/hold
sleep 0.5
bulkhead exec np sh -c 'i=0; while [ $i -lt 500 ]; do echo $i; i=$((i+1)); usleep 20000; done | nc 10.9.0.1 9000' &
cl=$!
# The back end itself, not its jailer (whose arguments name it too).
netpid() { ps -o pid,args | awk '$2 ~ /bulkhead-net$/ {print $1}'; }
lines() { wc -l < /tmp/recv.txt; }
up() { cut -d' ' -f1 /proc/uptime; }
# Kill it five times mid-stream (issue #10's restart gap, median of 5): each time, the
# gap is from the kill to the first line of the same TCP stream arriving after it. What
# was already past the back end lands within 30 ms of the kill and is not counted.
first=$(netpid); gaps=""; kr=0; at=""
for mark in 20 100 180 260 340; do
  for i in $(seq 1 240); do [ "$(lines)" -ge $mark ] && break; sleep 0.25; done
  cur=$(netpid)
  [ -n "$cur" ] || { kr=1; break; }
  at="$at $(lines)"; t0=$(up)
  kill -9 $cur
  sleep 0.03
  n0=$(lines); t=never
  for i in $(seq 1 6000); do
    [ "$(lines)" -gt $n0 ] && { t=$(awk "BEGIN{printf \"%d\", ($(up) - $t0) * 1000}"); break; }
    sleep 0.01
  done
  [ "$t" = never ] && { kr=1; break; }
  gaps="$gaps $t"
  for i in $(seq 1 100); do n=$(netpid); [ -n "$n" ] && [ "$n" != "$cur" ] && break; sleep 0.1; done
done
# Every line must arrive; give the restarted back end 60 s (L2 under nested KVM is slow).
for i in $(seq 1 120); do [ "$(lines)" -ge 500 ] && break; sleep 0.5; done
kill $cl 2>/dev/null
new=$(netpid)
seq 0 499 > /tmp/want.txt
if [ $kr = 0 ] && cmp -s /tmp/want.txt /tmp/recv.txt && [ -n "$new" ] && [ "$new" != "$first" ]; then kr=0; else kr=1; fi
median=$(echo $gaps | tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "none"}')
echo "NESTED-NET-GAP gaps_ms=$(echo $gaps | tr ' ' ',') median_ms=$median"
echo "NESTED-CASE net-restart rc=$kr lines=$(lines) killed-at-lines=$(echo $at | tr ' ' ',') first=$first last=$new"
grep -h "taken back" /tmp/bhroot/run/*/vmm.log 2>/dev/null | tail -1 | sed 's/^/NESTED-NET-LOG /'
[ $kr = 0 ] || { rc=1; tail -20 /tmp/bhroot/bulkheadd.log; tail -30 /tmp/bhroot/run/*/vmm.log; tail -30 /tmp/bhroot/run/*/net0.log; head -c 300 /tmp/recv.txt
  $IP -n pod -s link show bhtap0; bulkhead exec np sh -c 'cat /proc/net/dev; grep -i virtio /proc/interrupts; cat /proc/net/snmp | grep -A1 Tcp:'; }
exec 9>&-
kill $srvnc 2>/dev/null
bulkhead rm -f np >/dev/null 2>&1
left=$($IP -n pod -o link show | grep -c bhtap)
echo "NESTED-CASE net-teardown taps-left=$left"
[ "$left" = 0 ] || rc=1
# Memory handed back: a container holds 400 MiB for a few seconds and frees it; the guest
# reports the free pages through the balloon and the VMM's RSS must fall back within
# seconds. Then a balloon target set through bulkheadd: inflate 128 MiB, deflate.
timeout 300 bulkhead run -d --name bal --memory 768 --rootfs /opt/share/rootfs sleep 600 >/dev/null 2>/tmp/bal.err || { rc=1; cat /tmp/bal.err; }
vp=$(ps -o pid,args | awk '$2 ~ /bulkhead-vmm$/ {print $1}')
rss() { awk '/^VmRSS/ {print int($2/1024)}' /proc/$vp/status 2>/dev/null || echo 0; }
up() { cut -d' ' -f1 /proc/uptime; }
before=$(rss); peak=$before
bulkhead exec bal sh -c 'dd if=/dev/zero bs=419430400 count=1 2>/dev/null | sleep 10' &
ex=$!
while kill -0 $ex 2>/dev/null; do r=$(rss); [ $r -gt $peak ] && peak=$r; sleep 0.5; done
t0=$(up); back=never
for i in $(seq 1 60); do
  if [ $(rss) -le $((peak - 300)) ]; then back=$(awk "BEGIN{printf \"%.1f\", $(up) - $t0}"); break; fi; sleep 0.5
done
after=$(rss)
# Through bulkheadd (Sandbox1.VmStatus / SetBalloonTarget), which asks the VMM over its
# org.bulkhead.Vmm1 peer socket.
vmj() { bulkhead vm "$@" bal --json | tr -d ' \n'; }
bulkhead vm bal | sed 's/^/NESTED-BALLOON /'
vmj --balloon 128 >/dev/null
inflated=no
for i in $(seq 1 60); do vmj | grep -q '"actual_mib":128,' && { inflated=yes; break; }; sleep 0.5; done
# The same figures as Prometheus sees them: bulkhead-metrics on loopback, reading
# bulkheadd over the bus, which asks the VMM.
$IP link set lo up
bulkhead-metrics --listen 127.0.0.1:9469 --min-interval-ms 0 >/dev/null 2>/tmp/metrics.err &
mp=$!
for i in $(seq 1 20); do busybox wget -q -O /tmp/metrics.txt http://127.0.0.1:9469/metrics 2>/dev/null && break; sleep 0.3; done
kill $mp 2>/dev/null
grep -E '^bulkhead_vm_|^bulkhead_up|component="vmm"' /tmp/metrics.txt | sed 's/^/NESTED-METRICS /'
metrics=no
grep -q '^bulkhead_vm_balloon_actual_bytes{sandbox="bal"} 134217728' /tmp/metrics.txt &&
  grep -q '^bulkhead_vm_memory_info{sandbox="bal",backing=' /tmp/metrics.txt &&
  grep -q '^bulkhead_vm_start_phase_seconds{sandbox="bal",phase="guest init"}' /tmp/metrics.txt && metrics=yes
[ $metrics = yes ] || cat /tmp/metrics.err
vmj --balloon 0 >/dev/null
deflated=no
for i in $(seq 1 60); do vmj | grep -q '"actual_mib":0,' && { deflated=yes; break; }; sleep 0.5; done
bulkhead vm bal | grep balloon | sed 's/^/NESTED-BALLOON /'
br=0
[ $((peak - before)) -ge 350 ] && [ "$back" != never ] && [ $inflated = yes ] && [ $deflated = yes ] && [ $metrics = yes ] || br=1
echo "NESTED-CASE balloon rc=$br rss_mib_before=$before peak=$peak after=$after back_in_s=$back inflate=$inflated deflate=$deflated metrics=$metrics"
[ $br = 0 ] || { rc=1; tail -20 /tmp/bhroot/run/*/vmm.log; }
bulkhead rm -f bal >/dev/null 2>&1
# Memory added while the pod runs (virtio-mem): the guest boots with 256 MiB beside a
# 1 GiB region; 512 MiB of it is asked for through bulkheadd, plugged by the guest's
# driver and seen in its MemTotal, then taken back.
timeout 300 bulkhead run -d --name hp --memory 256 --hotplug 1024 --rootfs /opt/share/rootfs sleep 600 >/dev/null 2>/tmp/hp.err || { rc=1; cat /tmp/hp.err; }
memtotal() { bulkhead exec hp awk '/^MemTotal/ {print int($2/1024)}' /proc/meminfo; }
hpj() { bulkhead vm "$@" hp --json | tr -d ' \n'; }
waitfor() { for i in $(seq 1 120); do hpj | grep -qE "$1" && { echo yes; return; }; sleep 0.5; done; echo no; }
m0=$(memtotal)
t0=$(up)
hpj --hotplug 512 >/dev/null
plugged=$(waitfor '"plugged_mib":512[,}]')
plug_s=$(awk "BEGIN{printf \"%.1f\", $(up) - $t0}")
m1=$(memtotal)
t0=$(up)
hpj --hotplug 0 >/dev/null
unplugged=$(waitfor '"plugged_mib":0[,}]')
unplug_s=$(awk "BEGIN{printf \"%.1f\", $(up) - $t0}")
m2=$(memtotal)
bulkhead vm hp | grep hotplug | sed 's/^/NESTED-HOTPLUG /'
hr=0
[ $plugged = yes ] && [ $((m1 - m0)) -ge 500 ] && [ $unplugged = yes ] && [ $((m1 - m2)) -ge 500 ] || hr=1
echo "NESTED-CASE hotplug rc=$hr memtotal_mib=$m0,$m1,$m2 plugged=$plugged in_s=$plug_s unplugged=$unplugged in_s=$unplug_s"
[ $hr = 0 ] || { rc=1; grep -h -i virtio_mem $(find /tmp/bhroot/run -name serial.log) | tail -20; }
# The VM follows its containers' memory limits: a container limited to 512 MiB joins
# (the VM grows by 512 + 64 - 256 = 320 MiB before it starts, and the container sees it
# in MemTotal beside its cgroup's limit); once it is gone the region is emptied again.
t0=$(up)
lim=$(timeout 120 bulkhead run --rm --sandbox hp --name lim --container-memory 512 --rootfs /opt/share/rootfs sh -c 'awk "/^MemTotal/ {print int(\$2/1024)}" /proc/meminfo; cat /sys/fs/cgroup/memory.max' 2>/tmp/lim.err | tr '\n' ' ')
lim_s=$(awk "BEGIN{printf \"%.1f\", $(up) - $t0}")
set -- $lim
grown=no
[ "${1:-0}" -ge $((m0 + 300)) ] && [ "${2:-}" = 536870912 ] && grown=yes
[ $grown = yes ] || cat /tmp/lim.err
shrunk=$(waitfor '"requested_mib":0,.*"plugged_mib":0[,}]|"plugged_mib":0,.*"requested_mib":0[,}]')
lr=0
[ $grown = yes ] && [ $shrunk = yes ] || lr=1
echo "NESTED-CASE hotplug-follows-limits rc=$lr memtotal_and_limit=${lim% } grown=$grown run_s=$lim_s shrunk=$shrunk"
[ $lr = 0 ] || { rc=1; grep -h 'hot-plug' /tmp/bhroot/bulkheadd.log 2>/dev/null | tail -5; }
# A limit raised in place (Kubernetes' resize reaches the shim as Update, and the shim
# passes it on as this does): 256 MiB needs 64 beyond boot, 768 needs 576, plugged
# before the guest is told; lowered to 128, the region empties again.
plugged() { hpj | grep -o '"plugged_mib":[0-9]*' | cut -d: -f2; }
timeout 120 bulkhead run -d --sandbox hp --name lim2 --container-memory 256 --rootfs /opt/share/rootfs sleep 600 >/dev/null 2>/tmp/lim2.err || cat /tmp/lim2.err
q1=$(plugged)
timeout 60 bulkhead update --sandbox hp --memory $((768 << 20)) lim2 2>>/tmp/lim2.err || cat /tmp/lim2.err
q2=$(plugged)
# Past the region (2048 + 64 - 256 = 1856 > 1024): all of it, and the shortfall said.
timeout 60 bulkhead update --sandbox hp --memory $((2048 << 20)) lim2 2>>/tmp/lim2.err || cat /tmp/lim2.err
capped=$(hpj | grep -oE '"(limits_mib|requested_mib|short_mib)":[0-9]*' | tr '\n' ' ')
timeout 60 bulkhead update --sandbox hp --memory $((128 << 20)) lim2 2>>/tmp/lim2.err || cat /tmp/lim2.err
q3=$(waitfor '"plugged_mib":0,')
ur=0
[ "$q1" = 64 ] && [ "$q2" = 576 ] && [ "$q3" = yes ] || ur=1
[ "$capped" = '"limits_mib":2048 "requested_mib":1024 "short_mib":832 ' ] || ur=1
echo "NESTED-CASE hotplug-update-grows-vm rc=$ur plugged_mib=$q1,$q2 capped=${capped% } emptied=$q3"
[ $ur = 0 ] || { rc=1; cat /tmp/lim2.err; grep -h 'hot-plug' /tmp/bhroot/bulkheadd.log 2>/dev/null | tail -5; }
bulkhead rm -f hp >/dev/null 2>&1
# On hugetlbfs the region takes pool pages only as it is plugged: a pool of 200 pages
# covers the 256 MiB VM (128) and 144 MiB more; asked for 512, the guest gets what the
# pool holds, the rest is refused (not a SIGBUS in the VMM), and the VM goes on.
sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory 2>/dev/null
echo 200 > /proc/sys/vm/nr_hugepages
timeout 300 bulkhead run -d --name hh --memory 256 --hotplug 1024 --rootfs /opt/share/rootfs sleep 600 >/dev/null 2>/tmp/hh.err || { rc=1; cat /tmp/hh.err; }
pages=$(bulkhead vm hh --json | tr -d ' \n' | grep -o '"pages":"[^"]*"')
free0=$(awk '/^HugePages_Free/ {print $2}' /proc/meminfo)
bulkhead vm hh --hotplug 512 >/dev/null
sleep 8
hh=$(bulkhead vm hh --json | tr -d ' \n')
hplugged=$(echo "$hh" | grep -o '"plugged_mib":[0-9]*' | cut -d: -f2)
hrefused=$(echo "$hh" | grep -o '"refused":[0-9]*' | tail -1 | cut -d: -f2)
free1=$(awk '/^HugePages_Free/ {print $2}' /proc/meminfo)
alive=$(bulkhead exec hh echo alive 2>&1)
hhr=0
[ "$pages" = '"pages":"hugetlb-2m"' ] && [ "${hplugged:-0}" -gt 0 ] && [ "${hplugged:-512}" -lt 512 ] && [ "${hrefused:-0}" -gt 0 ] && [ "$alive" = alive ] || hhr=1
echo "NESTED-CASE hotplug-hugetlb rc=$hhr $pages pool=$(awk '/^HugePages_Total/ {print $2}' /proc/meminfo) pool_free=$free0,$free1 plugged_mib=$hplugged refused=$hrefused exec=$alive"
[ $hhr = 0 ] || { rc=1; tail -5 /tmp/bhroot/run/*/vmm.log; grep -h -i virtio_mem $(find /tmp/bhroot/run -name serial.log) | tail -5; }
bulkhead rm -f hh >/dev/null 2>&1
echo 0 > /proc/sys/vm/nr_hugepages
# containerd with our shim, as a node runs it: ctr run on bulkhead-vmm through bulkheadd.
CONTAINERD_UP
t0=$(date +%s)
out=$(timeout 300 $C run --rm --runtime io.containerd.bulkhead.v2 docker.io/test/busybox:latest n1 sh -c 'uname -r; exit 7' 2>/tmp/ctd/run.err)
rc5=$?
t1=$(date +%s)
echo "NESTED-CTR rc=$rc5 secs=$((t1 - t0)) out=$out"
if [ $rc5 != 7 ] || [ "$out" != "$(cat /opt/guest/kernel-release)" ]; then
  rc=1; cat /tmp/ctd/import.log /tmp/ctd/run.err; echo "--- containerd"; grep -E 'level=(error|warn)' /tmp/ctd/log | tail -20
  echo "--- bulkheadd.log"; tail -20 /tmp/bhroot/bulkheadd.log
fi
grep -h "timings" /tmp/ctd/log | sed 's/^/NESTED-CTR-LOG /'
left=$(ls /tmp/bhroot/run /tmp/bhroot/sandboxes 2>/dev/null | grep -v : | grep -c .)
echo "NESTED-CASE ctr-run backend=$backend rc=$rc5 left=$left"
[ "$left" = 0 ] || rc=1
kill $ctd 2>/dev/null
# Calls a seccomp filter stopped or logged (audit type 1326), by thread name and number.
dmesg | grep 'type=1326' | sed -E 's/.*comm="([^"]*)".*syscall=([0-9]+).*/\1 \2/' | sort | uniq -c | sed 's/^/NESTED-SECCOMP /'
exit $rc
""".replace("CONTAINERD_UP\n", CONTAINERD_UP)

BENCH_SCRIPT = r"""
N=NRUNS
SIZES="SIZELIST"
# L1 KVM's per-VM exit counters, which the probe reads at the first answer.
mount -t debugfs none /sys/kernel/debug 2>/dev/null
share() {  # a virtiofsd on $1 for one boot; it exits when its VMM goes
  rm -f $1
  virtiofsd --socket-path=$1 --shared-dir=/opt/share --sandbox=none --cache=never >/dev/null 2>&1 &
  fsd=$!
  for k in $(seq 1 200); do [ -S $1 ] && break; sleep 0.05; done
}
unshare_fs() { [ -n "$fsd" ] && { kill $fsd 2>/dev/null; wait $fsd 2>/dev/null; }; fsd=; }
# The node's memory counters a boot is compared on.
memstat() { grep -E '^(compact_|thp_|pgmajfault |allocstall)' /proc/vmstat; }
vmm() {  # label mib fs=yes|no [jailed|hotplug]
  echo "BENCH $1 mib=$2 fs=$3 run $i"
  extra=; sock=/tmp/v.sock; pre=; boot=$2
  # Boot with 128 MiB and the rest as a virtio-mem region, plugged once the pod is up
  # (the test's hotplug case times that): the size the guest starts with stays flat.
  if [ "$4" = hotplug ]; then boot=128; extra="--hotplug $(($2 - 128))"; fi
  if [ $3 = yes ]; then share /tmp/bfs.sock; extra="--fs tag=share,socket=/tmp/bfs.sock"; fi
  if [ "$4" = jailed ]; then
    # The jail bulkheadd gives the VMM (own root and namespaces, a uid, no capabilities,
    # landlock, seccomp); exec of the jailer to the agent's first answer.
    mkdir -p /tmp/jroot /tmp/jvm; chown 1000000000:1000000000 /tmp/jvm; sock=/tmp/jvm/v.sock
    pre="/opt/bulkhead/bulkhead-jailer --sandbox bench --name vmm --root /tmp/jroot --uid 1000000000 --gid 1000000000 --ro /lib --ro /lib64 --ro /opt/bulkhead/bulkhead-vmm --ro /opt/guest --ro /sys/kernel/mm/transparent_hugepage --rw /tmp/jvm --dev kvm --dev null --dev urandom --"
  fi
  memstat > /tmp/vmstat0
  NO_COLOR=1 BULKHEAD_LOG=info bulkhead-probe --socket $sock --timeout 240 --guest-mib $boot --stream /init:STREAM_MIB --shutdown -- \
    $pre /opt/bulkhead/bulkhead-vmm --kernel /opt/guest/vmlinux --initrd /opt/guest/initramfs.cpio \
    --cmdline 'L2CMD' --cpus 1 --memory $boot --vsock cid=3,socket=$sock --serial none $extra 2>/tmp/vmm.err
  grep -h "guest init reached" /tmp/vmm.err | tail -1 | sed 's/^/BENCH-PHASES /'
  # The node's memory events over this boot: compaction stalls and huge-page fallbacks
  # are where a huge page costs more than its zeroing.
  memstat \
    | awk 'NR==FNR {a[$1]=$2; next} {d=$2-a[$1]; if (d) printf "%s=%d ", $1, d} END {print ""}' /tmp/vmstat0 - \
    | sed 's/^/BENCH-VMSTAT /'
  grep -h "VM started" /tmp/vmm.err | sed -E 's/.* pages=([^ ]*) .*/BENCH-PAGES \1/'
  grep -h "ERROR\|WARN" /tmp/vmm.err | head -3
  unshare_fs
}
qemu() {  # mib fs=yes|no
  echo "BENCH qemu-microvm mib=$1 fs=$2 run $i"
  extra=; mach=microvm,acpi=on,x-option-roms=off
  if [ $2 = yes ]; then
    share /tmp/qfs.sock
    mach=$mach,memory-backend=mem
    extra="-object memory-backend-memfd,id=mem,size=$1M,share=on -chardev socket,id=fs0,path=/tmp/qfs.sock -device vhost-user-fs-device,chardev=fs0,tag=share"
  fi
  bulkhead-probe --cid 3 --timeout 240 --guest-mib $1 --stream /init:STREAM_MIB -- \
    /opt/qemu/qemu-system-x86_64 -M $mach -accel kvm -cpu host -m $1 -smp 1 \
    -nodefaults -no-user-config -nographic -no-reboot -serial none -bios /opt/qemu/qboot.rom \
    -kernel /opt/guest/vmlinux -initrd /opt/guest/initramfs.cpio -append 'L2CMD' \
    -device vhost-vsock-device,guest-cid=3 $extra
  unshare_fs
  sleep 0.3
}
shmem=/sys/kernel/mm/transparent_hugepage/shmem_enabled
ROUNDS
"""

NETBENCH_SCRIPT = r"""
# Issue #10's network benchmark: three pods up at once, each with its own veth to the
# server namespace, measured in turn (the order rotated each round): iperf3 both ways
# and ping, from the container to a server in L1.
export BULKHEAD_ROOT=/tmp/bhroot BULKHEAD_GUEST_DIR=/opt/guest BULKHEAD_DATA=/tmp/bhdata TMPDIR=/tmp
export PATH=$PATH:/usr/bin
mkdir -p /run
IP=/opt/bulkhead/ip2
$IP link set lo up
bulkhead check | sed 's/^/NETBENCH-CHECK /'
$IP netns add srv; $IP -n srv link set lo up
for k in 1 2 3; do
  $IP netns add p$k
  $IP -n srv link add s$k type veth peer name eth0 netns p$k
  $IP -n srv addr add 10.9.$k.1/24 dev s$k; $IP -n srv link set s$k up
  $IP -n p$k addr add 10.9.$k.2/24 dev eth0; $IP -n p$k link set eth0 up; $IP -n p$k route add default via 10.9.$k.1
done
$IP netns exec srv iperf3 -s -D --logfile /tmp/iperf-srv.log
rc=0
start() {  # name k backend net-backend
  timeout 400 bulkhead run -d --name $1 --netns /run/netns/p$2 --backend $3 --net-backend $4 \
    --rootfs /opt/share/netroot sleep 100000 >/dev/null 2>/tmp/$1.err \
    || { rc=1; echo "NETBENCH-ERR start $1: $(tail -3 /tmp/$1.err | tr '\n' ' ')"; tail -20 /tmp/bhroot/bulkheadd.log; }
}
start nb-vmm 1 bulkhead-vmm bulkhead-net
start nb-qemu 2 qemu bulkhead-net
start nb-vhost 3 qemu vhost-net
# bulkhead-vmm refuses the kernel's vhost-net by name.
bulkhead run --rm --netns /run/netns/p1 --backend bulkhead-vmm --net-backend vhost-net --rootfs /opt/share/netroot true 2>&1 \
  | grep -q "only the qemu backend" && echo "NETBENCH-REFUSED vmm+vhost-net ok" || { rc=1; echo "NETBENCH-REFUSED vmm+vhost-net NOT refused"; }
n() { ps -o args | awk -v p="$1" '$1 ~ p' | wc -l; }
echo "NETBENCH-PROCS bulkhead-net=$(n 'bulkhead-net$') qemu=$(n 'qemu-system-x86_64$') bulkhead-vmm=$(n 'bulkhead-vmm$')"
one() {  # label sandbox k
  for dir in up down; do
    flag=; [ $dir = down ] && flag=-R
    out=$(timeout 120 bulkhead exec $2 iperf3 $flag -c 10.9.$3.1 -t SECS -f m 2>&1)
    line=$(echo "$out" | grep receiver | tail -1)
    [ -n "$line" ] && echo "NETBENCH $1 $dir $line" || { rc=1; echo "NETBENCH-ERR $1 $dir: $(echo "$out" | tail -3 | tr '\n' ' ')"; }
  done
  # The round trip from the server's side (the container has no CAP_NET_RAW): the same
  # path both ways.
  out=$(timeout 60 $IP netns exec srv ping -c 20 -i 0.2 10.9.$3.2 2>&1)
  line=$(echo "$out" | grep round-trip)
  [ -n "$line" ] && echo "NETBENCH $1 ping $line" || { rc=1; echo "NETBENCH-ERR $1 ping: $(echo "$out" | tail -3 | tr '\n' ' ')"; }
}
set -- "bulkhead-vmm+bulkhead-net nb-vmm 1" "qemu+bulkhead-net nb-qemu 2" "qemu+vhost-net nb-vhost 3"
for i in $(seq 1 NRUNS); do
  echo "NETBENCH-ROUND $i"
  for c in "$@"; do one $c; done
  set -- "$2" "$3" "$1"
done
# kill -9 bulkhead-net under a running iperf3 (#10's fault case), on each backend that
# has one: it is started again, the front end reconnects, and the same TCP stream ends
# well. Each 1 s interval is printed; the slowest one holds the gap.
for c in "nb-vmm 1" "nb-qemu 2"; do
  set -- $c
  dir=$(sed -n 's/.*"run_dir": *"\([^"]*\)".*/\1/p' /tmp/bhroot/sandboxes/$1.json)
  netpid() { ps -o pid,args | awk -v d="$dir/vm/net0.sock" '$2 ~ /bulkhead-net$/ && index($0, d) {print $1}'; }
  before=$(netpid)
  timeout 120 bulkhead exec $1 iperf3 -c 10.9.$2.1 -t 8 -i 1 -f m >/tmp/kill-$1.txt 2>&1 &
  ip3=$!
  sleep 3; kill -9 $before
  wait $ip3; krc=$?
  after=$(netpid)
  slowest=$(grep -E '^\[ *5\] +[0-9.]+-[0-9.]+ +sec' /tmp/kill-$1.txt | grep -v -e sender -e receiver | awk '{print $7}' | sort -n | head -1)
  got=$(grep receiver /tmp/kill-$1.txt | awk '{print $7}')
  ok=0; [ $krc = 0 ] && [ -n "$got" ] && [ -n "$after" ] && [ "$after" != "$before" ] || { ok=1; rc=1; tail -5 /tmp/kill-$1.txt; }
  echo "NETBENCH-KILL $1 rc=$ok iperf3_rc=$krc receiver_mbits=$got slowest_interval_mbits=$slowest backend_pid=$before->$after"
done
# The counters as Prometheus sees them (the vhost-net pod's from its tap).
bulkhead-metrics --listen 127.0.0.1:9469 --min-interval-ms 0 >/dev/null 2>/tmp/metrics.err &
mp=$!
for i in $(seq 1 20); do busybox wget -q -O /tmp/metrics.txt http://127.0.0.1:9469/metrics 2>/dev/null && break; sleep 0.3; done
kill $mp 2>/dev/null
grep -E '^bulkhead_network_(receive|transmit)_frames' /tmp/metrics.txt | sed 's/^/NETBENCH-METRICS /'
for n in nb-vmm nb-qemu nb-vhost; do bulkhead rm -f $n >/dev/null 2>&1; done
left=$(for k in 1 2 3; do $IP -n p$k -o link show; done | grep -c bhtap)
echo "NETBENCH-TEARDOWN taps-left=$left"
[ "$left" = 0 ] || rc=1
exit $rc
"""

PODBENCH_SCRIPT = r"""
# Issue #9's two measures through containerd, in one L1: `ctr run --rm` of a busybox echo
# through our shim (bulkhead-vmm) beside containerd's runc shim, interleaved; then the
# host-side footprint of 10 busybox pods running at once, on bulkhead-vmm, then on QEMU.
export BULKHEAD_ROOT=/tmp/bhroot BULKHEAD_GUEST_DIR=/opt/guest BULKHEAD_DATA=/tmp/bhdata TMPDIR=/tmp
export PATH=$PATH:/usr/bin
mkdir -p /etc/bulkhead /sys/fs/cgroup
mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
CONTAINERD_UP
IMG=docker.io/test/busybox:latest
rc=0
now() { busybox adjtimex | awk '/tv_sec/ {s=$2} /tv_usec/ {u=$2} END {printf "%d%06d", s, u}'; }
# runc cannot pivot_root out of L1's initramfs: it moves the root instead.
one() {  # runtime id
  extra=; [ $1 = runc ] && extra=--no-pivot
  t0=$(now); out=$(timeout 300 $C run --rm $extra --runtime io.containerd.$1.v2 $IMG $2 echo hello 2>/tmp/ctd/err); r=$?; t1=$(now)
  echo "PODBENCH-RUN $1 id=$2 rc=$r out=$out t0_us=$t0 t1_us=$t1"
  [ $r = 0 ] || { rc=1; tail -3 /tmp/ctd/err; }
}
one bulkhead warm-b; one runc warm-r
for i in $(seq 1 NRUNS); do one bulkhead b$i; one runc r$i; done
grep -h "timings" /tmp/ctd/log | sed 's/^/PODBENCH-LOG /'
# Footprint: every process's PSS (and, for a VMM, the PSS of its guest-RAM mapping:
# the one mapping of 64 MiB or more), with its parent and command line.
fp() {  # backend
  for k in $(seq 1 NPODS); do
    timeout 300 $C run -d --runtime io.containerd.bulkhead.v2 $IMG fp$k sleep 100000 >/dev/null 2>/tmp/ctd/err || { rc=1; echo "PODBENCH-ERR $1 fp$k: $(tail -2 /tmp/ctd/err | tr '\n' ' ')"; }
  done
  sleep 10
  echo "PODBENCH-LS $1 $(bulkhead ls --json | tr -d '\n')"
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    pss=$(awk '/^Pss:/ {print $2}' $p/smaps_rollup 2>/dev/null); [ -n "$pss" ] || continue
    big=$(awk '/^Size:/ {b = ($2 >= 65536)} /^Pss:/ && b {s += $2} END {print s+0}' $p/smaps 2>/dev/null)
    ppid=$(awk '{print $4}' $p/stat 2>/dev/null)
    echo "PODBENCH-PROC $1 pid=$pid ppid=$ppid pss=$pss big=${big:-0} args=$(tr '\0' ' ' < $p/cmdline | cut -c1-160)"
  done
  free -m | sed "s/^/PODBENCH-FREE $1 /"
  # What the guest itself says it uses (one pod's view; every pod runs the same).
  $C task exec --exec-id mi fp1 cat /proc/meminfo 2>&1 | grep -E '^(MemTotal|MemFree|Cached|Shmem|AnonPages|Slab|SReclaimable|SUnreclaim|KernelStack|PageTables|Percpu|VmallocUsed):' | tr -s ' ' | sed "s/^/PODBENCH-GUEST $1 /"
  for k in $(seq 1 NPODS); do $C task kill -s SIGKILL fp$k >/dev/null 2>&1; done
  for k in $(seq 1 NPODS); do
    for i in $(seq 1 50); do $C task delete fp$k >/dev/null 2>&1 && break; sleep 0.2; done
    $C container delete fp$k >/dev/null 2>&1
  done
}
fp bulkhead-vmm
# The same again with guest RAM on 4 KiB pages (a host whose shmem_enabled is never):
# what huge pages cost in touched memory.
echo never > /sys/kernel/mm/transparent_hugepage/shmem_enabled
fp bulkhead-vmm-4k
echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled
# The same pods on the QEMU backend: bulkheadd started again with it as the default.
kill $(ps -o pid,args | awk '$2 ~ /bulkheadd$/ {print $1}') 2>/dev/null; sleep 2
echo '{"default_backend": "qemu"}' > /etc/bulkhead/config.json
fp qemu
left=$(ls /tmp/bhroot/run /tmp/bhroot/sandboxes 2>/dev/null | grep -v : | grep -c .)
echo "PODBENCH-LEFT $left"
exit $rc
""".replace("CONTAINERD_UP\n", CONTAINERD_UP)


def parse_probe(out):
    return re.findall(r"^PROBE (.*)$", out, re.M)


def cmd_test(args, demo=False):
    bins = release_bins()
    guest = guest_image(bins)
    with tempfile.TemporaryDirectory() as w:
        l1, vmlinux = l1_initramfs(guest, bins, False, w)
        script = TEST_SCRIPT.replace("VMMCMD2", vmm_cmd(verbose=args.verbose).replace(
            "/opt/guest/vmlinux", "/opt/guest/bzImage").replace("--cpus 1 --memory 256", "--cpus 2 --memory 512"))
        # The API VM logs its boot (serial and VMM) so that a stall can be read afterwards.
        script = script.replace("VMMCMD3", vmm_cmd(verbose=True).replace(
            "--memory 256", "--memory 512").replace("/tmp/l2-serial.log", "/tmp/l2-serial3.log"))
        script = script.replace("VMMCMD", vmm_cmd(verbose=args.verbose)).replace("BENCHRUNS", "21")
        log("booting L1 under QEMU TCG; bulkhead-vmm runs in it on kvm-amd")
        out, secs = run_l1(l1, vmlinux, script, args.timeout)
    api = re.findall(r"^API (.*)$", out, re.M)
    for line in api:
        print(f"in guest: {line}")
    api_ok = any(re.match(r"summary: \d+ passed, \d+ skipped, 0 failed", l) for l in api)
    ok = "NESTED-EXIT 0" in out and api_ok
    kvm_line = re.search(r"^NESTED-KVM (.*)$", out, re.M)
    if demo or not ok:
        print(f"host /dev/kvm cannot boot a stock kernel here; bulkhead-vmm ran inside a nested node "
              f"(L1 under QEMU TCG, L1 kvm: {kvm_line.group(1).strip() if kvm_line else 'unknown'})")
    for line in parse_probe(out):
        print(line)
    for line in re.findall(r"^(NESTED-CASE .*|NESTED-RUN .*|NESTED-CTR.*|NESTED-JAIL.*|NESTED-SECCOMP.*|NESTED-BALLOON.*|NESTED-HOTPLUG.*|NESTED-METRICS.*|NESTED-NET-GAP.*|bulkhead: timings.*)$",
                           out, re.M):
        print(line)
    if not ok:
        print(out[-6000:])
        print(f"nested node FAILED after {secs:.1f}s")
        return 1
    m = re.search(r"first_answer_ms=(\d+)", out)
    first = f"{int(m.group(1)) / 1000:.2f}s" if m else "(no figure)"
    print(f"nested node ok: agent answered {first} after bulkhead-vmm exec "
          f"(L2 time under nested KVM; whole run {secs:.1f}s)")
    return 0


def parse_bench(out):
    """BENCH/PROBE/BENCH-PHASES lines → {(vmm, mib, fs): [run dicts]}."""
    res, cur, order = {}, None, 0
    for line in out.splitlines():
        m = re.match(r"BENCH (\S+) mib=(\d+) fs=(\w+) run", line)
        if m:
            cur = (m.group(1), int(m.group(2)), m.group(3))
            order += 1
            continue
        if cur is None:
            continue
        m = re.search(r"first_answer_ms=(\d+) .*guest_uptime_ms=(\d+)", line)
        if m:
            res.setdefault(cur, []).append({"answer": int(m.group(1)), "order": order,
                                            "clock": int(m.group(1)) - int(m.group(2))})
            continue
        run = res.get(cur, [None])[-1]
        if run is None:
            continue
        m = re.search(r"non_guest_kib=(\d+) total_kib=(\d+) cpu_ms=(\d+) faults=(\d+)", line)
        if m:
            run.update(rss=int(m.group(1)), cpu=int(m.group(3)), faults=int(m.group(4)))
        m = re.search(r"non_guest_anon_kib=(\d+)", line)
        if m:
            run["anon"] = int(m.group(1))
        if line.startswith("BENCH-PHASES"):
            for name, ms, flt, cpu in re.findall(r"(\w+)=([\d.]+)ms/(\d+)flt/([\d.]+)cpu", line):
                run[name] = (float(ms), int(flt), float(cpu))
        m = re.match(r"PROBE stream \S+ bytes=(\d+) ms=(\d+) mib_per_s=([\d.]+)(.*)", line)
        if m:
            run["stream"] = {"mib": int(m.group(1)) / (1 << 20), "rate": float(m.group(3)),
                             **{k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(4))}}
        if line.startswith("PROBE kvm "):
            run["kvm"] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        if line.startswith("BENCH-VMSTAT"):
            run["vmstat"] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        m = re.match(r"BENCH-PAGES (\S+)", line)
        if m:
            run["pages"] = m.group(1).strip('"')
    return res


def bench_rounds(runs, sizes):
    """The boots of BENCH_SCRIPT, each round in an order of its own (seeded by the round):
    in this node a boot's cost depends on what ran just before it, so no row may always
    follow the same other boot."""
    lines = []
    for i in range(1, runs + 1):
        boots = []
        for m in sizes:
            for fs in ("no", "yes"):
                boots += [f"vmm bulkhead-vmm {m} {fs}", f"qemu {m} {fs}"]
            if m > 128:
                boots.append(f"vmm bulkhead-vmm-hotplug {m} no hotplug")
        boots.append("vmm bulkhead-vmm-jailed 128 no jailed")
        # The same node without shmem huge pages (a host that never set shmem_enabled).
        boots.append("echo never > $shmem; vmm bulkhead-vmm-shmem-never 128 yes; echo advise > $shmem")
        random.Random(i).shuffle(boots)
        lines += [f"i={i}", *boots]
    return "\n".join(lines)


def cmd_bench(args):
    bins = release_bins()
    guest = guest_image(bins)
    sizes = [int(x) for x in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as w:
        l1, vmlinux = l1_initramfs(guest, bins, True, w)
        script = (BENCH_SCRIPT.replace("ROUNDS", bench_rounds(args.runs, sizes))
                  .replace("NRUNS", str(args.runs)).replace("L2CMD", L2_CMDLINE)
                  .replace("SIZELIST", " ".join(map(str, sizes)))
                  .replace("STREAM_MIB", str(args.stream_mib)))
        log(f"bench: {args.runs} rounds of shuffled boots, bulkhead-vmm and QEMU microvm at "
            f"{sizes} MiB, with and without virtio-fs, in one L1")
        out, secs = run_l1(l1, vmlinux, script, args.timeout, mem_mib=max(sizes) + 1536)
    res = parse_bench(out)
    if not any(k[0] == "bulkhead-vmm" for k in res) or not any(k[0] == "qemu-microvm" for k in res):
        print(out[-8000:])
        print("bench FAILED: missing results")
        return 1

    def med(xs, f):
        v = [f(x) for x in xs if f(x) is not None]
        return statistics.median(v) if v else None

    def fmt(v, spec=".0f"):
        return "-" if v is None else format(v, spec)

    print(f"\nNested node (L1: QEMU TCG -cpu max -smp 1, kvm-amd, shmem_enabled=advise; L2: Debian "
          f"kernel {open(os.path.join(guest, 'kernel-release')).read().strip()} vmlinux + agent "
          f"initramfs, 1 vCPU). Medians of {args.runs} rounds; times from the VMM's exec.")
    head = (f"{'VMM':<27}{'MiB':>5}{'fs':>4}{'n':>3}{'clock start':>12}{'init':>7}{'answer':>8}"
            f"{'faults@entry':>13}{'cpu@entry':>10}{'faults@answer':>14}{'cpu@answer':>11}"
            f"{'RSS MiB':>8}{'anon':>6}  pages")
    print(head)
    print("-" * len(head))
    phase = lambda name, i: (lambda x: x[name][i] if name in x else None)
    for k in sorted(res, key=lambda k: (k[1], k[2], k[0])):
        xs = res[k]
        pages = sorted({x.get("pages", "-") for x in xs})
        print(f"{k[0]:<27}{k[1]:>5}{k[2]:>4}{len(xs):>3}"
              f"{fmt(med(xs, lambda x: x['clock'])):>12}{fmt(med(xs, phase('guest_init', 0))):>7}"
              f"{fmt(med(xs, lambda x: x['answer'])):>8}"
              f"{fmt(med(xs, phase('first_vCPU_entry', 1))):>13}{fmt(med(xs, phase('first_vCPU_entry', 2))):>10}"
              f"{fmt(med(xs, lambda x: x.get('faults'))):>14}{fmt(med(xs, lambda x: x.get('cpu'))):>11}"
              f"{fmt(med(xs, lambda x: x['rss'] / 1024 if 'rss' in x else None), '.1f'):>8}"
              f"{fmt(med(xs, lambda x: x['anon'] / 1024 if 'anon' in x else None), '.1f'):>6}  {','.join(pages)}")
    print("clock start: exec to the guest's clock starting (first answer minus guest uptime); init: the "
          "agent's boot-timer write (bulkhead-vmm only); entry: first vCPU entry (bulkhead-vmm's phase "
          "record); RSS: outside guest RAM at the first answer, anon: the part of it that is the "
          "process's own (the rest is code shared through the page cache)")
    # Exits are counts, not times: they do not move with the node's load, so they compare
    # the two VMMs' guests where the times cannot.
    counters = ("exits", "mmio_exits", "io_exits", "irq_exits", "halt_exits")
    if any("kvm" in x for xs in res.values() for x in xs):
        print(f"\nL1 KVM's exits from exec to the first answer (debugfs), medians:")
        print(f"{'VMM':<27}{'MiB':>5}{'fs':>4}" + "".join(f"{c:>12}" for c in counters))
        for k in sorted(res, key=lambda k: (k[1], k[2], k[0])):
            xs = [x["kvm"] for x in res[k] if "kvm" in x]
            if xs:
                print(f"{k[0]:<27}{k[1]:>5}{k[2]:>4}"
                      + "".join(f"{fmt(med(xs, lambda x, c=c: x.get(c))):>12}" for c in counters))
    if any("stream" in x for xs in res.values() for x in xs):
        print(f"\nGuest to host through vsock once the agent answered: the agent's /init read "
              f"again and again, {args.stream_mib} MiB (bulkhead-vmm's own device; QEMU's is the "
              f"host kernel's vhost-vsock), medians:")
        print(f"{'VMM':<27}{'MiB':>5}{'fs':>4}{'MiB/s':>8}" + "".join(f"{c + '/MiB':>16}" for c in counters))
        for k in sorted(res, key=lambda k: (k[1], k[2], k[0])):
            xs = [x["stream"] for x in res[k] if "stream" in x]
            if xs:
                print(f"{k[0]:<27}{k[1]:>5}{k[2]:>4}{fmt(med(xs, lambda x: x['rate']), '.1f'):>8}"
                      + "".join(f"{fmt(med(xs, lambda x, c=c: x[c] / x['mib'] if c in x else None), '.1f'):>16}"
                                for c in counters))
    for fs in ("no", "yes"):
        ratios, clocks = [], []
        for m in sizes:
            q, b = res.get(("qemu-microvm", m, fs)), res.get(("bulkhead-vmm", m, fs))
            if q and b:
                ratios.append(f"{m} MiB {med(q, lambda x: x['answer']) / med(b, lambda x: x['answer']):.2f}x")
            if b:
                clocks.append(med(b, lambda x: x["clock"]))
        flat = (f"; bulkhead-vmm clock start spread across sizes {100 * (max(clocks) - min(clocks)) / min(clocks):.0f}%"
                if len(clocks) > 1 and min(clocks) > 0 else "")
        print(f"virtio-fs {fs}: QEMU / bulkhead-vmm, exec to answer: {', '.join(ratios)}{flat}")
    ratios, answers = [], []
    for m in sizes:
        q, h = res.get(("qemu-microvm", m, "no")), res.get(("bulkhead-vmm-hotplug", m, "no"))
        if q and h:
            ratios.append(f"{m} MiB {med(q, lambda x: x['answer']) / med(h, lambda x: x['answer']):.2f}x")
            answers.append(med(h, lambda x: x["answer"]))
    if ratios:
        b = res.get(("bulkhead-vmm", 128, "no"))
        if b:
            answers.append(med(b, lambda x: x["answer"]))
        print(f"hotplug (128 MiB at boot, the rest virtio-mem): QEMU / bulkhead-vmm, exec to answer: "
              f"{', '.join(ratios)}; answer spread across sizes, 128 MiB included, "
              f"{100 * (max(answers) - min(answers)) / min(answers):.0f}%")
    # Each bulkhead-vmm boot in the order it ran: where the time before the clock starts
    # goes (loading the kernel) beside what the node's memory did meanwhile.
    keys = ("compact_stall", "compact_fail", "thp_fault_alloc", "thp_fault_fallback",
            "thp_file_alloc", "thp_file_fallback")
    print(f"\nbulkhead-vmm boots in run order: load = kernel loaded minus memory ready (ms / CPU ms); "
          f"guest = the guest's uptime at the answer; the node's /proc/vmstat deltas over the boot")
    print(f"{'#':>3}{'MiB':>6}{'fs':>4}{'clock':>7}{'load':>7}{'cpu':>7}{'guest':>7}{'answer':>7}  "
          + " ".join(keys))
    for k, x in sorted(((k, x) for k in res for x in res[k] if k[0] == "bulkhead-vmm"),
                       key=lambda kx: kx[1]["order"]):
        mr, kl = x.get("memory_ready"), x.get("kernel_loaded")
        load = (kl[0] - mr[0], kl[2] - mr[2]) if mr and kl else (None, None)
        vm = x.get("vmstat", {})
        print(f"{x['order']:>3}{k[1]:>6}{k[2]:>4}{x['clock']:>7}{fmt(load[0]):>7}{fmt(load[1]):>7}"
              f"{x['answer'] - x['clock']:>7}{x['answer']:>7}  "
              + " ".join(str(vm.get(n, 0)) for n in keys))
    j, b = res.get(("bulkhead-vmm-jailed", 128, "no")), res.get(("bulkhead-vmm", 128, "no"))
    if j and b:
        print(f"the jail's cost, exec to answer at 128 MiB: "
              f"{med(j, lambda x: x['answer']) - med(b, lambda x: x['answer']):+.0f} ms")
    print(f"(whole run {secs:.0f}s)")
    return 0


def bench_in_l1(message, script, timeout, mem_mib=1536, **tools):
    """Build L1 with `tools` (l1_initramfs's with_* flags), run `script` in it; (out, secs)."""
    bins = release_bins()
    guest = guest_image(bins)
    with tempfile.TemporaryDirectory() as w:
        l1, vmlinux = l1_initramfs(guest, bins, False, w, **tools)
        log(message)
        return run_l1(l1, vmlinux, script, timeout, mem_mib=mem_mib)


def cmd_runbench(args):
    """`bulkhead run --rm` on bulkhead-vmm beside podman + runc in the nested node."""
    out, secs = bench_in_l1(
        f"runbench: {args.runs} interleaved runs of bulkhead run --rm and podman run --runtime runc in one L1",
        RUNBENCH_SCRIPT.replace("NRUNS", str(args.runs)), args.timeout, with_podman=True)
    rows = {"bulkhead": [], "podman-runc": []}
    for m in re.finditer(r"^RUNBENCH (\S+) rc=(\d+) out=(\S*) total_ms=(\d+)(.*)$", out, re.M):
        who, rc, said, total, rest = m.groups()
        if rc != "0" or said != "hello":
            print(f"runbench: a failed run: {m.group(0)}")
            continue
        r = {"total": float(total)}
        if who == "bulkhead":
            f = lambda k: float(m2.group(1)) if (m2 := re.search(rf"{k} ([0-9.]+)", rest)) else None
            bus, vexec, agent, exited = f("bus\\+manager"), f("vmm exec"), f("agent ready"), f("exited")
            if None not in (bus, vexec, agent, exited):
                r.update(pre=bus + vexec, boot=agent - vexec, run=exited - (bus + agent), teardown=float(total) - exited)
        rows[who].append(r)
    if not rows["bulkhead"] or not rows["podman-runc"]:
        print(out[-6000:])
        print("runbench FAILED: missing results")
        return 1
    med = lambda xs, k: statistics.median([x[k] for x in xs if k in x]) if any(k in x for x in xs) else None
    fmt = lambda v: "-" if v is None else f"{v:.0f}"
    print(f"\nNested node (L1: QEMU TCG -cpu max -smp 1, kvm-amd). `echo hello` in the busybox image, "
          f"medians of {len(rows['bulkhead'])} and {len(rows['podman-runc'])} interleaved runs, ms (10 ms steps).")
    head = f"{'runtime':<14}{'n':>3}{'total':>8}{'pre-VMM':>9}{'VMM exec->agent':>17}{'agent->exit':>13}{'teardown':>10}"
    print(head)
    print("-" * len(head))
    for who, xs in rows.items():
        print(f"{who:<14}{len(xs):>3}{fmt(med(xs, 'total')):>8}{fmt(med(xs, 'pre')):>9}{fmt(med(xs, 'boot')):>17}"
              f"{fmt(med(xs, 'run')):>13}{fmt(med(xs, 'teardown')):>10}")
    b, p = med(rows["bulkhead"], "total"), med(rows["podman-runc"], "total")
    print(f"bulkhead / podman+runc, total: {b / p:.2f}x (whole run {secs:.0f} s)")
    return 0


def cmd_netbench(args):
    """iperf3 and ping through each network back end, side by side in one L1 (#10)."""
    out, secs = bench_in_l1(
        f"netbench: {args.runs} rounds of iperf3 ({args.secs} s each way) and ping through three pods in one L1",
        NETBENCH_SCRIPT.replace("NRUNS", str(args.runs)).replace("SECS", str(args.secs)),
        args.timeout, mem_mib=2560, with_netbench=True)
    for line in re.findall(r"^(NETBENCH-(?:CHECK|ERR|REFUSED|PROCS|KILL|METRICS|TEARDOWN).*)$", out, re.M):
        print(line)
    rows = {}
    for m in re.finditer(r"^NETBENCH (\S+) (up|down) .*?([\d.]+) Mbits/sec.*receiver", out, re.M):
        rows.setdefault(m.group(1), {}).setdefault(m.group(2), []).append(float(m.group(3)))
    for m in re.finditer(r"^NETBENCH (\S+) ping .*= [\d.]+/([\d.]+)/[\d.]+ ms", out, re.M):
        rows.setdefault(m.group(1), {}).setdefault("ping", []).append(float(m.group(2)))
    ref = rows.get("qemu+vhost-net", {})
    if not rows or not ref or "NESTED-EXIT 0" not in out:
        print(out[-6000:])
        print("netbench FAILED")
        return 1
    med = lambda xs: statistics.median(xs) if xs else None
    fmt = lambda v, f=".1f": "-" if v is None else format(v, f)
    print(f"\nNested node (L1: QEMU TCG -cpu max -smp 1, kvm-amd; L2: 1 vCPU, 256 MiB). Container to a "
          f"server in L1 over a veth: iperf3 TCP {args.secs} s each way (Mbit/s at the receiver), ping -i 0.2 x20 from the "
          f"server (average ms); medians of {args.runs} rounds, the three pods measured in turn.")
    head = f"{'path':<28}{'n':>3}{'up Mbit/s':>11}{'down Mbit/s':>13}{'ping ms':>9}{'up/ref':>8}{'down/ref':>10}{'ping/ref':>10}"
    print(head)
    print("-" * len(head))
    for name in ("bulkhead-vmm+bulkhead-net", "qemu+bulkhead-net", "qemu+vhost-net"):
        r = rows.get(name, {})
        up, down, ping = med(r.get("up", [])), med(r.get("down", [])), med(r.get("ping", []))
        ratio = lambda v, k: None if v is None or not med(ref.get(k, [])) else v / med(ref[k])
        print(f"{name:<28}{len(r.get('up', [])):>3}{fmt(up):>11}{fmt(down):>13}{fmt(ping, '.2f'):>9}"
              f"{fmt(ratio(up, 'up'), '.2f'):>8}{fmt(ratio(down, 'down'), '.2f'):>10}{fmt(ratio(ping, 'ping'), '.2f'):>10}")
    print(f"ref: qemu+vhost-net, the kernel's back end (whole run {secs:.0f} s)")
    return 0


GUEST_RAM = "guest RAM the guest touched (VMM and back ends)"


def podbench_footprint(out, backend, npods):
    """Average per-pod PSS (MiB) by kind, from one backend's PODBENCH-LS/PROC lines."""
    import json
    m = re.search(rf"^PODBENCH-LS {backend} (.*)$", out, re.M)
    if not m:
        return None
    try:
        pods = json.loads(m.group(1))
    except ValueError:
        return None
    procs = {}
    for m in re.finditer(rf"^PODBENCH-PROC {backend} pid=(\d+) ppid=(\d+) pss=(\d+) big=(\d+) args=(.*)$", out, re.M):
        procs[int(m.group(1))] = (int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5))

    def tree(pid):  # a component and what it started (a jailer's child, say)
        seen, todo = [], [pid]
        while todo:
            p = todo.pop()
            if p in procs and p not in seen:
                seen.append(p)
                todo += [c for c, v in procs.items() if v[0] == p]
        return seen
    sums, counted = {}, 0
    for sb in pods:
        if not str(sb.get("id", "")).startswith("fp"):
            continue
        counted += 1
        for comp in sb.get("components", []):
            # The jailer's tree holds the component: count both.
            for p in tree(comp.get("supervisor_pid") or comp.get("pid", 0)):
                # Guest RAM is shared memory: its pages' PSS is split between the VMM
                # and every back end that mapped them. One row for all of it.
                _, pss, big, _ = procs[p]
                sums[GUEST_RAM] = sums.get(GUEST_RAM, 0) + big
                name = comp.get("name", "?") + " (outside guest RAM)"
                sums[name] = sums.get(name, 0) + pss - min(big, pss)
        shim = [p for p, v in procs.items() if "containerd-shim-bulkhead-v2" in v[3] and f"-id {sb['id']} " in v[3]]
        sums["shim"] = sums.get("shim", 0) + sum(procs[p][1] for p in shim)
    if counted == 0:
        return None
    shared = {"bulkheadd + its spawner (share)": lambda a: a.split(" ")[0].endswith("bulkheadd"),
              "embedded bus (share)": lambda a: "dbus-daemon" in a.split(" ")[0]}
    for name, is_it in shared.items():
        sums[name] = sum(v[1] for v in procs.values() if is_it(v[3]))
    return counted, {k: v / 1024 / counted for k, v in sums.items()}


def cmd_podbench(args):
    """#9 in the nested node: ctr run --rm against runc, and the footprint of 10 pods."""
    out, secs = bench_in_l1(
        f"podbench: {args.runs} interleaved ctr runs (bulkhead, runc), then {args.pods} pods at once per backend",
        PODBENCH_SCRIPT.replace("NRUNS", str(args.runs)).replace("NPODS", str(args.pods)),
        args.timeout, mem_mib=4096, with_runc_shim=True)
    for line in re.findall(r"^(PODBENCH-(?:ERR|LEFT).*)$", out, re.M):
        print(line)
    guest = {}
    for who, k, v in re.findall(r"^PODBENCH-GUEST (\S+) (\w+): (\d+) kB$", out, re.M):
        guest.setdefault(who, []).append(f"{k} {int(v) / 1024:.1f}")
    for who, kv in guest.items():
        print(f"guest's /proc/meminfo in one {who} pod (MiB): {', '.join(kv)}")
    runs = {"bulkhead": [], "runc": []}
    logs = re.findall(r"^PODBENCH-LOG (.*)$", out, re.M)
    for m in re.finditer(r"^PODBENCH-RUN (\w+) id=(\S+) rc=(\d+) out=(\S*) t0_us=(\d+) t1_us=(\d+)$", out, re.M):
        who, rid, rc, said, t0, t1 = m.groups()
        if rid.startswith("warm") or rc != "0" or said != "hello":
            continue
        t0, t1 = float(t0), float(t1)
        r = {"total": (t1 - t0) / 1e3}
        if who == "bulkhead":
            sb = next((l for l in logs if f"timings sandbox={rid} " in l), None)
            ex = next((l for l in logs if f"timings exited id={rid} " in l), None)
            f = lambda l, k: float(x.group(1)) if l and (x := re.search(rf"\b{k}=([\d.]+)", l)) else None
            received, called = f(sb, "create_received_unix_us"), f(sb, "create_sandbox_unix_us")
            vexec, ready, exited = f(sb, "vmm_exec_us"), f(sb, "agent_ready_us"), f(ex, "unix_us")
            if None not in (received, called, vexec, ready, exited):
                vmm, rdy = called + vexec, called + ready
                r.update(to_shim=(received - t0) / 1e3, pre=(vmm - t0) / 1e3, ours=(vmm - received) / 1e3,
                         boot=(rdy - vmm) / 1e3,
                         run=(exited - rdy) / 1e3, teardown=(t1 - exited) / 1e3)
        runs[who].append(r)
    if not runs["bulkhead"] or not runs["runc"]:
        print(out[-6000:])
        print("podbench FAILED: missing ctr runs")
        return 1
    med = lambda xs, k: statistics.median([x[k] for x in xs if k in x]) if any(k in x for x in xs) else None
    fmt = lambda v: "-" if v is None else f"{v:.0f}"
    b = runs["bulkhead"]
    print(f"\nNested node (L1: QEMU TCG -cpu max -smp 1, kvm-amd). `ctr run --rm` of a busybox echo, "
          f"{len(b)} and {len(runs['runc'])} interleaved runs, medians, ms; bulkhead's phases from the shim's timings.")
    for name, k in (("before the VMM is exec'd (ctr, containerd, shim, bus, manager)", "pre"),
                    ("  of which ctr + containerd + shim start, to the shim's Create", "to_shim"),
                    ("  of which the shim's Create -> VMM exec (shim, bus, manager)", "ours"),
                    ("VMM exec -> agent ready", "boot"), ("agent ready -> container exit", "run"),
                    ("teardown (exit -> ctr returns)", "teardown"), ("whole ctr run --rm, bulkhead", "total")):
        print(f"{name:<66}{fmt(med(b, k)):>8}")
    print(f"{'whole ctr run --rm, runc':<66}{fmt(med(runs['runc'], 'total')):>8}")
    print(f"ratio bulkhead / runc: {med(b, 'total') / med(runs['runc'], 'total'):.1f}x")
    for backend in ("bulkhead-vmm", "bulkhead-vmm-4k", "qemu"):
        fp = podbench_footprint(out, backend, args.pods)
        if fp is None:
            print(f"\n{backend}: no footprint (see PODBENCH-ERR above)")
            continue
        n, rows = fp
        what = "bulkhead-vmm, guest RAM on 4 KiB pages (shmem_enabled=never)" if backend.endswith("-4k") else backend
        print(f"\nHost-side PSS of one running busybox pod on {what}, average of {n} pods at once (MiB)")
        total = host = 0.0
        for k in sorted(rows):
            print(f"{k:<50}{rows[k]:>8.1f}")
            total += rows[k]
            host += 0 if k == GUEST_RAM else rows[k]
        print(f"{'total per pod':<50}{total:>8.1f}")
        print(f"{'total per pod outside guest RAM':<50}{host:>8.1f}")
    print(f"(whole run {secs:.0f} s)")
    return 0 if "NESTED-EXIT 0" in out else 1



# The soak's hostile pod: a container with every capability (these), in the guest's
# PID namespace, so it reaches the share as the agent mounted it (through PID 1's root).
SOAK_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
             "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_ADMIN", "CAP_NET_RAW",
             "CAP_SYS_CHROOT", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE", "CAP_MKNOD", "CAP_SETFCAP"]

# What it does, round after round (#38's items 1, 5 and 6 from the guest's side):
# plants links where bulkheadd makes the next containers' directories and mount points
# (the host creates soak1, soak2, ... in this sandbox meanwhile), fills its 64 MiB layer
# and frees it, writes to its console, makes files until refused and removes them.
SOAK_ATTACK = r"""S=/proc/1/root/run/bulkhead/shared
mknod /dev/ttyS0 c 4 64 2>/dev/null
while :; do
  c=1
  while [ $c -le 300 ]; do
    ln -sfn /etc $S/soak$c 2>/dev/null; mkdir -p $S/soak$c/mounts 2>/dev/null
    ln -sfn /etc/passwd $S/soak$c/mounts/0 2>/dev/null; ln -sfn /opt $S/soak$c/rootfs 2>/dev/null
    c=$((c+1))
  done
  dd if=/dev/zero of=/fill bs=1M count=100 2>/dev/null; rm -f /fill
  head -c 2000000 /dev/zero > /dev/ttyS0 2>/dev/null
  mkdir -p /many; n=0
  while [ $n -lt 5000 ] && echo -n 2>/dev/null > /many/$n; do n=$((n+1)); done
  rm -rf /many
done
"""


def soak_spec(args, caps=None):
    """An OCI spec for the soak's containers in the sandbox made over the bus."""
    process = {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "cwd": "/",
               "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}
    namespaces = [{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]
    if caps:
        process["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps}
    else:
        namespaces.append({"type": "pid"})
    return {
        "ociVersion": "1.0.2", "process": process, "hostname": "soak",
        "root": {"path": "rootfs", "readonly": not caps},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {"namespaces": namespaces, "maskedPaths": [], "readonlyPaths": [],
                  "resources": {"devices": [{"allow": True, "access": "rwm"}]}},
    }


# #38's soak in L1: five pods created and exec'd into for SECS seconds, then the same
# for SECS seconds beside a hostile pod (the attacks above from its guest; from the host
# side, containers made and removed in its sandbox while it plants links, its VMM
# stopped for 15 s of every minute while 50 Stats calls wait on it, and uid 65534
# looping on Security()). Before and after: every file's hash and the mount table.
SOAK_SCRIPT = r"""
export BULKHEAD_ROOT=/tmp/bhroot BULKHEAD_GUEST_DIR=/opt/guest BULKHEAD_DATA=/tmp/bhdata TMPDIR=/tmp
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
R=/opt/share/rootfs
B="busctl --address=unix:path=/tmp/bhroot/bus/socket"
M=org.bulkhead.Manager1
H=/org/bulkhead/Manager1/sandbox/hostile
S1=org.bulkhead.Sandbox1
cat > /tmp/hostile.json <<'SPEC'
HOSTILE_JSON
SPEC
cat > /tmp/plain.json <<'SPEC'
PLAIN_JSON
SPEC
snapshot() {
  find / -xdev -type f | sort > $1.list
  xargs sha256sum < $1.list > $1.sha
  sort /proc/mounts > $1.mounts
}
t0=$(ms); snapshot /tmp/before; echo "SOAK-INFO hashed $(wc -l < /tmp/before.list) files in $(( $(ms) - t0 )) ms"
bulkhead ls >/dev/null 2>&1
for n in 0 1 2 3 4; do
  bulkhead run -d --name normal$n --rootfs $R sleep 1000000 >/dev/null 2>/tmp/n.err || echo "SOAK-ERR normal$n: $(tail -2 /tmp/n.err)"
done
phase() {
  end=$(( $(ms) + $2 * 1000 )); i=0
  while [ $(ms) -lt $end ]; do
    i=$((i+1))
    t0=$(ms); bulkhead run --rm --name $1$i --rootfs $R true >/dev/null 2>/tmp/c.err; rc=$?; t1=$(ms)
    echo "SOAK $1 create rc=$rc ms=$((t1 - t0))"; [ $rc = 0 ] || echo "SOAK-ERR $1 create: $(tail -1 /tmp/c.err)"
    t0=$(ms); bulkhead exec normal$((i % 5)) true >/dev/null 2>/tmp/e.err; rc=$?; t1=$(ms)
    echo "SOAK $1 exec rc=$rc ms=$((t1 - t0))"; [ $rc = 0 ] || echo "SOAK-ERR $1 exec: $(tail -1 /tmp/e.err)"
  done
}
phase calm SECS
$B call $M /org/bulkhead/Manager1 $M CreateSandbox 'sa{sv}' hostile 1 layers_mib u 64 >/dev/null || echo "SOAK-ERR hostile sandbox"
$B call $M $H $S1 CreateContainer 'sssa{sv}' attacker "$(cat /tmp/hostile.json)" $R 1 overlay b true >/dev/null || echo "SOAK-ERR attacker create"
$B call $M $H $S1 StartContainer s attacker >/dev/null || echo "SOAK-ERR attacker start"
rm -f /tmp/stop
( j=0
  while [ ! -e /tmp/stop ]; do
    j=$((j+1))
    if $B call $M $H $S1 CreateContainer 'sssa{sv}' soak$j "$(cat /tmp/plain.json)" $R 0 >/dev/null 2>/tmp/h.err; then
      $B call $M $H $S1 DeleteContainer sb soak$j true >/dev/null 2>&1; echo "SOAK-HOSTILE create ok"
    else echo "SOAK-HOSTILE create failed: $(tail -1 /tmp/h.err)"; fi
    sleep 1
  done ) &
p1=$!
( while [ ! -e /tmp/stop ]; do
    sleep 45; [ -e /tmp/stop ] && break
    vmm=$($B get-property $M $H $S1 Components | awk '{for (i = 1; i <= NF; i++) if ($i == "\"vmm\"") print $(i + 1)}')
    kill -STOP $vmm
    k=0; while [ $k -lt 50 ]; do $B call $M $H $S1 Stats s attacker >/dev/null 2>&1 & k=$((k+1)); done
    sleep 15; kill -CONT $vmm; echo "SOAK-HOSTILE stopped vmm $vmm for 15 s"
  done ) &
p2=$!
( n=0; while [ ! -e /tmp/stop ]; do
    setpriv --reuid=65534 --regid=65534 --clear-groups $B call $M $H $S1 Security >/dev/null 2>&1; n=$((n+1))
  done; echo "SOAK-HOSTILE uid 65534 made $n Security calls" ) &
p3=$!
phase hostile SECS
touch /tmp/stop; wait $p1 $p2 $p3
$B call $M $H $S1 Stats s attacker >/dev/null 2>&1 && echo "SOAK-INFO the hostile pod answers at the end" || echo "SOAK-INFO the hostile pod does not answer at the end"
$B call $M /org/bulkhead/Manager1 $M RemoveSandbox sb hostile true >/dev/null || echo "SOAK-ERR hostile remove"
for n in 0 1 2 3 4; do bulkhead rm -f normal$n >/dev/null 2>&1 || echo "SOAK-ERR rm normal$n"; done
sleep 2
snapshot /tmp/after
if cmp -s /tmp/before.list /tmp/after.list && cmp -s /tmp/before.sha /tmp/after.sha; then
  echo "SOAK-HASH same: $(wc -l < /tmp/after.list) files"
else
  echo "SOAK-HASH differs"; diff /tmp/before.sha /tmp/after.sha | head -20 | sed 's/^/SOAK-DIFF /'
  diff /tmp/before.list /tmp/after.list | head -20 | sed 's/^/SOAK-DIFF /'
fi
if cmp -s /tmp/before.mounts /tmp/after.mounts; then echo "SOAK-MOUNTS same"; else
  echo "SOAK-MOUNTS differ"; diff /tmp/before.mounts /tmp/after.mounts | head -20 | sed 's/^/SOAK-DIFF /'; fi
"""


def cmd_soak(args):
    """#38's hostile-guest soak: latencies of five normal pods beside a hostile one."""
    import json
    secs = int(args.minutes * 60)
    script = (SOAK_SCRIPT.replace("SECS", str(secs))
              .replace("HOSTILE_JSON", json.dumps(soak_spec(["sh", "-c", SOAK_ATTACK], SOAK_CAPS)))
              .replace("PLAIN_JSON", json.dumps(soak_spec(["true"]))))
    out, took = bench_in_l1(f"soak: {secs} s calm, then {secs} s beside a hostile pod", script,
                            2 * secs + args.timeout, mem_mib=4096, with_soak=True)
    rows = {}
    for phase, op, rc, ms in re.findall(r"^SOAK (calm|hostile) (create|exec) rc=(\d+) ms=(\d+)$", out, re.M):
        r = rows.setdefault((op, phase), {"ok": [], "failed": 0})
        if rc == "0":
            r["ok"].append(int(ms))
        else:
            r["failed"] += 1
    for line in re.findall(r"^(SOAK-(?:INFO|ERR|HASH|MOUNTS|DIFF).*)$", out, re.M):
        print(line)
    hostile = {}
    for line in re.findall(r"^SOAK-HOSTILE (.*)$", out, re.M):
        if line.startswith("uid"):
            print(f"host side of the hostile pod: {line}")
            continue
        key = re.sub(r"\d+", "N", line)[:90]
        hostile[key] = hostile.get(key, 0) + 1
    for k, n in sorted(hostile.items()):
        print(f"host side of the hostile pod: {k} x{n}")
    if not rows:
        print(out[-6000:])
        print("soak FAILED: no results")
        return 1
    p99 = lambda xs: sorted(xs)[min(len(xs) - 1, int(len(xs) * 0.99))]
    print(f"\nNested node (L1: QEMU TCG -cpu max -smp 1, kvm-amd, bulkhead-vmm). Five pods; each "
          f"phase {secs} s of `bulkhead run --rm true` and `bulkhead exec` into them in turn, ms.")
    print(f"{'op':<8}{'phase':<9}{'n':>5}{'failed':>8}{'median':>9}{'p99':>9}{'median vs calm':>16}")
    for op in ("create", "exec"):
        calm = rows.get((op, "calm"), {"ok": []})["ok"]
        for phase in ("calm", "hostile"):
            r = rows.get((op, phase))
            if not r or not r["ok"]:
                print(f"{op:<8}{phase:<9}{'-':>5}")
                continue
            med = statistics.median(r["ok"])
            ratio = f"{med / statistics.median(calm):.2f}x" if calm else "-"
            print(f"{op:<8}{phase:<9}{len(r['ok']):>5}{r['failed']:>8}{med:>9.0f}{p99(r['ok']):>9}{ratio:>16}")
    print(f"(whole run {took:.0f} s)")
    same = "SOAK-HASH same" in out and "SOAK-MOUNTS same" in out
    failed = sum(r["failed"] for (op, phase), r in rows.items())
    return 0 if same and failed == 0 and "NESTED-EXIT 0" in out else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["test", "demo", "bench", "runbench", "netbench", "podbench", "soak"])
    ap.add_argument("--minutes", type=float, default=10, help="soak: minutes of each phase")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="128,1024,2048", help="bench: guest MiB, comma-separated")
    ap.add_argument("--stream-mib", type=int, default=16,
                    help="bench: MiB read from the guest through vsock after each first answer")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--secs", type=int, default=5, help="netbench: seconds of each iperf3 run")
    ap.add_argument("--pods", type=int, default=10, help="podbench: pods running at once for the footprint")
    ap.add_argument("--verbose", action="store_true", help="guest kernel log and VMM info log")
    a = ap.parse_args()
    if a.mode == "bench":
        sys.exit(cmd_bench(a))
    if a.mode == "runbench":
        sys.exit(cmd_runbench(a))
    if a.mode == "netbench":
        sys.exit(cmd_netbench(a))
    if a.mode == "podbench":
        sys.exit(cmd_podbench(a))
    if a.mode == "soak":
        sys.exit(cmd_soak(a))
    sys.exit(cmd_test(a, demo=a.mode == "demo"))


if __name__ == "__main__":
    main()
