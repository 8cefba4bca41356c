#!/usr/bin/env python3
"""Two bulkhead-vmm binaries side by side in one nested node: what a VMM change did.

    python3 tests/nested/ab.py --old PATH [--new PATH] [--rounds N] [--disk-mib N] [--stream-mib N]

Boots the same 128 MiB guest (vmlinux, the agent's initramfs, a virtio-blk disk of
--disk-mib MiB) under each binary in turn, the order alternating by round, in one L1.
Each boot is a `bulkhead-probe`: exec to the agent's first answer, L1 KVM's exit counts
for the VM by then, then the disk read through the agent (/dev/vda, --stream-mib MiB,
virtio-blk and vsock) and the agent's own /init read the same way (vsock alone), each
with its rate and exits per MiB. Prints medians per binary. Exit counts move little from
boot to boot in this node, where times move 2-3x (docs/testing.md), so they are what a
few rounds can compare. --new defaults to target/.../release/bulkhead-vmm; --old is
usually that file copied aside before the change was built.
"""
import argparse, os, re, statistics, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import node  # noqa: E402

SCRIPT = r"""
truncate -s DISK_MIBM /tmp/disk.img
mount -t debugfs none /sys/kernel/debug 2>/dev/null
one() {  # label binary
  rm -f /tmp/v.sock
  echo "AB $1 round $i"
  bulkhead-probe --socket /tmp/v.sock --timeout 240 --guest-mib 128 \
    --stream /dev/vda:STREAM_MIB --stream /init:STREAM_MIB --shutdown -- \
    $2 --kernel /opt/guest/vmlinux --initrd /opt/guest/initramfs.cpio --cmdline 'L2CMD' \
    --cpus 1 --memory 128 --vsock cid=3,socket=/tmp/v.sock --serial none \
    --disk path=/tmp/disk.img,readonly
}
for i in $(seq 1 ROUNDS); do
  if [ $((i % 2)) = 1 ]; then one old /opt/bulkhead/ab-old; one new /opt/bulkhead/bulkhead-vmm
  else one new /opt/bulkhead/bulkhead-vmm; one old /opt/bulkhead/ab-old; fi
done
"""


def parse(out):
    """{label: [{"answer": ms, "kvm": {...}, "/dev/vda": (rate, {counter: per MiB}), ...}]}"""
    res, cur = {}, None
    for line in out.splitlines():
        m = re.match(r"AB (\w+) round", line)
        if m:
            cur = {}
            res.setdefault(m.group(1), []).append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"first_answer_ms=(\d+)", line)
        if m:
            cur["answer"] = int(m.group(1))
        if line.startswith("PROBE kvm "):
            cur["kvm"] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        m = re.match(r"PROBE stream (\S+) bytes=(\d+) ms=\d+ mib_per_s=([\d.]+)(.*)", line)
        if m:
            mib = int(m.group(2)) / (1 << 20)
            cur[m.group(1)] = (float(m.group(3)),
                               {k: int(v) / mib for k, v in re.findall(r"(\w+)=(\d+)", m.group(4))})
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the bulkhead-vmm binary before the change")
    ap.add_argument("--new", default=node.release_bins()["bulkhead-vmm"])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--disk-mib", type=int, default=64)
    ap.add_argument("--stream-mib", type=int, default=48)
    ap.add_argument("--timeout", type=int, default=1500)
    a = ap.parse_args()
    if a.stream_mib > a.disk_mib:
        sys.exit("ab: --stream-mib past --disk-mib would read the guest's page cache, not the disk")
    bins = node.release_bins()
    bins["bulkhead-vmm"] = a.new
    guest = node.guest_image(bins)
    script = (SCRIPT.replace("DISK_MIB", str(a.disk_mib)).replace("STREAM_MIB", str(a.stream_mib))
              .replace("ROUNDS", str(a.rounds)).replace("L2CMD", node.L2_CMDLINE))
    with tempfile.TemporaryDirectory() as w:
        l1, vmlinux = node.l1_initramfs(guest, bins, False, w, extra_bins={"ab-old": a.old})
        node.log(f"ab: {a.rounds} rounds of {a.old} against {a.new}, alternating, in one L1")
        out, secs = node.run_l1(l1, vmlinux, script, a.timeout)
    res = parse(out)
    if set(res) != {"old", "new"} or any("/init" not in r for rs in res.values() for r in rs):
        print(out[-6000:])
        print("ab FAILED: a boot gave no figures")
        return 1
    med = statistics.median
    counters = ("exits", "mmio_exits", "io_exits", "irq_exits", "halt_exits")
    print(f"\n{a.rounds} rounds, medians; first answer: exec to the agent's answer and L1 KVM's "
          f"exits by then")
    print(f"{'':6}{'answer ms':>10}" + "".join(f"{c:>12}" for c in counters))
    for label in ("old", "new"):
        rs = res[label]
        print(f"{label:6}{med(r['answer'] for r in rs):>10.0f}"
              + "".join(f"{med(r['kvm'].get(c, 0) for r in rs):>12.0f}" for c in counters))
    for path, what in (("/dev/vda", "virtio-blk and vsock"), ("/init", "vsock alone")):
        print(f"\n{path} read through the agent, {a.stream_mib} MiB ({what}), per MiB:")
        print(f"{'':6}{'MiB/s':>10}" + "".join(f"{c:>12}" for c in counters))
        for label in ("old", "new"):
            rs = [r[path] for r in res[label]]
            print(f"{label:6}{med(r[0] for r in rs):>10.1f}"
                  + "".join(f"{med(r[1].get(c, 0) for r in rs):>12.1f}" for c in counters))
    print(f"(whole run {secs:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
