#!/usr/bin/env python3
"""Build the bulkhead guest image: vmlinux, bzImage and an initramfs with the agent.

The kernel is bulkhead's own by default: Debian's kernel source package (linux-source-6.1,
pinned below) with the patches in patches/, configured from `make tinyconfig` plus
kernel.config beside this file, everything built in, no modules. BULKHEAD_GUEST_KERNEL=debian takes Debian's generic
linux-image-<abi>-cloud-amd64 instead, with its modules in the initramfs (override the
packages with BULKHEAD_KERNEL_SOURCE_PKG / BULKHEAD_KERNEL_PKG / BULKHEAD_KERNEL_VERSION).
Output: <cache>/guest/<key>/{vmlinux,bzImage,initramfs.cpio,modules.txt,kernel-release}
where <key> hashes every input, so an unchanged rebuild costs nothing; the kernel itself is
cached the same way under <cache>/kernel/<key>. Prints the output directory on stdout.
"""
import argparse, glob, gzip, hashlib, io, lzma, os, re, shutil, struct, subprocess, sys, tempfile

KERNEL_PKG = os.environ.get("BULKHEAD_KERNEL_PKG", "linux-image-6.1.0-56-cloud-amd64")
KERNEL_VERSION = os.environ.get("BULKHEAD_KERNEL_VERSION", "")  # empty: the archive's candidate
SOURCE_PKG = os.environ.get("BULKHEAD_KERNEL_SOURCE_PKG", "linux-source-6.1")
GUEST_KERNEL = os.environ.get("BULKHEAD_GUEST_KERNEL", "bulkhead")
KERNEL_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel.config")
# Applied in name order to the kernel source, `patch -p1`; each says why in its header.
PATCHES = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "patches", "*.patch")))
# What the guest needs; their dependencies are added in load order automatically.
WANTED = ["virtio_mmio", "vmw_vsock_virtio_transport", "virtio_console", "virtiofs",
          "overlay", "virtio_blk", "virtio_net", "virtio-rng", "virtio_balloon"]


def log(msg):
    print(f"build-guest: {msg}", file=sys.stderr)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_deb(cache, pkg=None, version=None, arch="amd64"):
    """Debian's package `pkg` (the cloud kernel by default), downloaded once into
    <cache>/debs."""
    pkg = pkg or KERNEL_PKG
    version = KERNEL_VERSION if version is None else version
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    spec = pkg + (f"={version}" if version else "")
    pattern = os.path.join(debs, f"{pkg}_{version or '*'}_{arch}.deb")
    found = sorted(glob.glob(pattern))
    if found:
        return found[-1]
    log(f"downloading {spec}")
    r = subprocess.run(["apt-get", "download", spec], cwd=debs, capture_output=True, text=True)
    found = sorted(glob.glob(pattern))
    if r.returncode != 0 or not found:
        sys.exit(f"build-guest: cannot download {spec}: {r.stderr.strip()}\n"
                 "  (run apt-get update, or set BULKHEAD_KERNEL_PKG / BULKHEAD_KERNEL_VERSION)")
    return found[-1]


def config_lines(path):
    """The settings in a config fragment: `CONFIG_X=...` and `# CONFIG_X is not set`."""
    return [l.strip() for l in open(path)
            if l.startswith("CONFIG_") or re.fullmatch(r"# CONFIG_\w+ is not set\n?", l)]


def missing_config(wanted, config_text):
    """The lines of `wanted` that `make olddefconfig` did not keep (a dependency left
    out, or a name this kernel version does not have)."""
    have = set(config_text.splitlines())
    return [w for w in wanted if w not in have]


def build_kernel(cache):
    """bulkhead's guest kernel: the source package, `make tinyconfig` plus
    kernel.config. Returns (directory with vmlinux, bzImage and kernel-release, key)."""
    deb = fetch_deb(cache, SOURCE_PKG, "", "all")
    cc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256()
    for part in (sha256_file(__file__), sha256_file(deb), sha256_file(KERNEL_CONFIG), cc,
                 *map(sha256_file, PATCHES)):
        key.update(part.encode())
    key = key.hexdigest()[:16]
    outdir = os.path.join(cache, "kernel", key)
    if os.path.exists(os.path.join(outdir, "kernel-release")):
        return outdir, key
    jobs = str(os.cpu_count() or 1)
    log(f"building the guest kernel from {os.path.basename(deb)} with {jobs} jobs "
        "(about 5 minutes on 2 cores; cached afterwards)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tar = subprocess.run(f"dpkg-deb --fsys-tarfile {deb} | tar -x -C {tmp} --wildcards "
                             "'*/linux-source-*.tar.xz'", shell=True)
        found = glob.glob(os.path.join(tmp, "usr", "src", "linux-source-*.tar.xz"))
        if tar.returncode != 0 or not found:
            sys.exit(f"build-guest: no kernel source tarball in {deb}")
        subprocess.run(["tar", "-xJf", found[0], "-C", tmp], check=True)
        src = glob.glob(os.path.join(tmp, "linux-source-*/"))[0]
        for patch in PATCHES:
            r = subprocess.run(["patch", "-p1", "-s", "-d", src, "-i", patch], capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"build-guest: {os.path.basename(patch)} does not apply:\n{r.stdout}{r.stderr}")

        def make(*args, **kw):
            r = subprocess.run(["make", "-C", src, "-s", *args], capture_output=True, text=True, **kw)
            if r.returncode != 0:
                sys.exit(f"build-guest: make {' '.join(args)} failed:\n{r.stdout[-4000:]}{r.stderr[-4000:]}")
            return r.stdout

        make("tinyconfig")
        r = subprocess.run([os.path.join(src, "scripts", "kconfig", "merge_config.sh"), "-m",
                            "-O", src, os.path.join(src, ".config"), KERNEL_CONFIG],
                           cwd=src, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"build-guest: merge_config.sh failed: {r.stderr[-2000:]}")
        make("olddefconfig")
        lost = missing_config(config_lines(KERNEL_CONFIG), open(os.path.join(src, ".config")).read())
        if lost:
            sys.exit("build-guest: kernel.config asks for what the kernel's Kconfig did not keep:\n  "
                     + "\n  ".join(lost))
        make(f"-j{jobs}", "bzImage")
        stage = os.path.join(tmp, "out")
        os.makedirs(stage)
        shutil.copy(os.path.join(src, "arch", "x86", "boot", "bzImage"), os.path.join(stage, "bzImage"))
        # Symbols stay (KALLSYMS has its own table); the ELF symbol table is 1/3 of the file.
        subprocess.run(["strip", "-o", os.path.join(stage, "vmlinux"), os.path.join(src, "vmlinux")],
                       check=True)
        shutil.copy(os.path.join(src, ".config"), os.path.join(stage, "config"))
        release = make("kernelrelease").strip()
        open(os.path.join(stage, "kernel-release"), "w").write(release + "\n")
        os.makedirs(os.path.dirname(outdir), exist_ok=True)
        shutil.rmtree(outdir, ignore_errors=True)
        os.rename(stage, outdir)
    log(f"built kernel {release} in {outdir}")
    return outdir, key


def decompress_payload(bz):
    """The bzImage's compressed vmlinux, decompressed whatever its codec."""
    setup_sects = bz[0x1f1] or 4
    off, length = struct.unpack_from("<II", bz, 0x248)
    data = bz[(setup_sects + 1) * 512 + off:][:length]
    if data[:2] == b"\x1f\x8b":
        out = gzip.decompress(data)
    elif data[:6] == b"\xfd7zXZ\x00":
        out = lzma.decompress(data, format=lzma.FORMAT_XZ)
    elif data[:3] == b"\x5d\x00\x00":
        out = lzma.decompress(data, format=lzma.FORMAT_ALONE)
    else:
        tools = {b"\x02\x21\x4c\x18": ["lz4", "-dc"], b"\x28\xb5\x2f\xfd": ["zstd", "-dcq"],
                 b"BZh": ["bzip2", "-dc"], b"\x89LZO": ["lzop", "-dc"]}
        cmd = next((c for m, c in tools.items() if data.startswith(m)), None)
        if cmd is None:
            sys.exit(f"build-guest: unknown kernel payload codec (magic {data[:4].hex()})")
        r = subprocess.run(cmd, input=data, capture_output=True)
        out = r.stdout
        if not out:
            sys.exit(f"build-guest: {cmd[0]} failed: {r.stderr.decode(errors='replace')}")
    if out[:4] != b"\x7fELF":
        sys.exit("build-guest: decompressed payload is not an ELF vmlinux")
    return out


def modinfo(ko_bytes, key):
    tag = key.encode() + b"="
    i = ko_bytes.find(b"\x00" + tag)
    if i < 0:
        return ""
    i += 1 + len(tag)
    return ko_bytes[i:ko_bytes.index(b"\x00", i)].decode()


def module_order(moddir):
    """Every wanted module plus its dependencies, dependencies first."""
    paths = {}
    for p in glob.glob(os.path.join(moddir, "kernel", "**", "*.ko*"), recursive=True):
        name = os.path.basename(p).split(".ko")[0]
        paths[name] = p
        paths.setdefault(name.replace("-", "_"), p)
    builtin = set()
    bfile = os.path.join(moddir, "modules.builtin")
    if os.path.exists(bfile):
        for line in open(bfile):
            builtin.add(os.path.basename(line.strip()).split(".ko")[0].replace("-", "_"))
    order, seen = [], set()

    def read(p):
        data = open(p, "rb").read()
        if p.endswith(".xz"):
            data = lzma.decompress(data)
        elif p.endswith(".zst"):
            data = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True).stdout
        return data

    def visit(name):
        key = name.replace("-", "_")
        if key in seen or key in builtin:
            return
        seen.add(key)
        p = paths.get(name) or paths.get(key)
        if p is None:
            sys.exit(f"build-guest: module {name} is neither built in nor in the package")
        data = read(p)
        for dep in filter(None, modinfo(data, "depends").split(",")):
            visit(dep)
        order.append((os.path.basename(p).split(".ko")[0] + ".ko", data))

    for m in WANTED:
        visit(m)
    return order


def shared_libs(binary):
    r = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if "not a dynamic executable" in (r.stdout + r.stderr):
        return []
    libs = []
    for line in r.stdout.splitlines():
        parts = line.split()
        if "=>" in parts and parts[parts.index("=>") + 1].startswith("/"):
            libs.append(parts[parts.index("=>") + 1])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


# Device nodes the kernel needs before anything is mounted: it opens /dev/console as
# init's stdio, and Rust's runtime aborts at start-up if fds 0-2 are closed and /dev/null
# cannot be opened.
DEV_NODES = [("dev/console", 0o020600, 5, 1), ("dev/null", 0o020666, 1, 3)]


def cpio_newc(root, devices=()):
    """A newc cpio archive of `root` plus `devices` (name, mode, major, minor),
    deterministic (sorted, fixed mtimes and owners)."""
    out = io.BytesIO()
    ino = 1
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        if rel != ".":
            entries.append(rel)
        entries += [os.path.normpath(os.path.join(rel, f)) for f in sorted(filenames)]
    rdev = {}
    for name, mode, major, minor in devices:
        rdev[name] = (mode, major, minor)
        entries.append(name)
    for name in entries + ["TRAILER!!!"]:
        major = minor = 0
        if name == "TRAILER!!!":
            mode, data = 0, b""
        elif name in rdev:
            (mode, major, minor), data = rdev[name], b""
        else:
            st = os.lstat(os.path.join(root, name))
            mode = st.st_mode
            if os.path.islink(os.path.join(root, name)):
                data = os.readlink(os.path.join(root, name)).encode()
            elif os.path.isdir(os.path.join(root, name)):
                data = b""
            else:
                data = open(os.path.join(root, name), "rb").read()
        nb = name.encode() + b"\x00"
        hdr = b"070701" + b"".join(b"%08X" % v for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(nb), 0))
        ino += 1
        out.write(hdr + nb)
        out.write(b"\x00" * ((4 - (110 + len(nb)) % 4) % 4))
        out.write(data)
        out.write(b"\x00" * ((4 - len(data) % 4) % 4))
    return out.getvalue()


def debian_kernel(cache):
    """Debian's cloud kernel: (a function that lays vmlinux, bzImage and kernel-release
    into a directory and returns the modules the initramfs must load, key)."""
    deb = fetch_deb(cache)

    def lay(stage, tmp):
        x = os.path.join(tmp, "deb")
        subprocess.run(["dpkg-deb", "-x", deb, x], check=True)
        moddir = glob.glob(os.path.join(x, "lib", "modules", "*"))[0]
        bz = open(glob.glob(os.path.join(x, "boot", "vmlinuz-*"))[0], "rb").read()
        open(os.path.join(stage, "bzImage"), "wb").write(bz)
        open(os.path.join(stage, "vmlinux"), "wb").write(decompress_payload(bz))
        open(os.path.join(stage, "kernel-release"), "w").write(os.path.basename(moddir) + "\n")
        return module_order(moddir)

    return lay, sha256_file(deb) + ",".join(WANTED)


def own_kernel(cache):
    """bulkhead's own kernel, everything built in: the same pair as debian_kernel."""
    kdir, key = build_kernel(cache)

    def lay(stage, _tmp):
        for f in ("vmlinux", "bzImage", "kernel-release", "config"):
            shutil.copy(os.path.join(kdir, f), os.path.join(stage, f))
        return []

    return lay, key


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", required=True, help="bulkhead-agent binary")
    ap.add_argument("--cache", default=os.environ.get("BULKHEAD_CACHE", os.path.join(os.path.dirname(__file__), "..", "..", ".cache")))
    a = ap.parse_args()
    cache = os.path.abspath(a.cache)
    kernels = {"bulkhead": own_kernel, "debian": debian_kernel}
    if GUEST_KERNEL not in kernels:
        sys.exit(f"build-guest: BULKHEAD_GUEST_KERNEL={GUEST_KERNEL}: not one of {', '.join(kernels)}")
    lay_kernel, kernel_key = kernels[GUEST_KERNEL](cache)
    key = hashlib.sha256()
    for part in (sha256_file(__file__), GUEST_KERNEL, kernel_key, sha256_file(a.agent)):
        key.update(part.encode())
    outdir = os.path.join(cache, "guest", key.hexdigest()[:16])
    if os.path.exists(os.path.join(outdir, "initramfs.cpio")):
        log(f"cached: {outdir}")
        print(outdir)
        return
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        stage = os.path.join(tmp, "out")
        os.makedirs(stage)
        modules = lay_kernel(stage, tmp)
        root = os.path.join(tmp, "root")
        for d in ("proc", "sys", "dev", "run", "tmp", "etc/bulkhead", "lib/modules", "mnt"):
            os.makedirs(os.path.join(root, d))
        # Stripped: the initramfs stays in guest RAM for the VM's life, and the symbol
        # table (2 MB of 9) is of no use there.
        init = os.path.join(root, "init")
        if subprocess.run(["strip", "-o", init, a.agent], capture_output=True).returncode != 0:
            shutil.copy(a.agent, init)
        os.chmod(init, 0o755)
        for lib in shared_libs(a.agent):
            dst = os.path.join(root, lib.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(lib, dst)
        names = []
        for name, data in modules:
            open(os.path.join(root, "lib", "modules", name), "wb").write(data)
            names.append(f"/lib/modules/{name}")
        listing = "".join(f"{n}\n" for n in names)
        open(os.path.join(root, "etc", "bulkhead", "modules"), "w").write(listing)
        # Not compressed: gunzip of these 5 MB was the longest single step of the
        # guest's boot under TCG (0.13-0.18 s of about 1 s), and the VMM loads the
        # larger file from the page cache in one read.
        with open(os.path.join(stage, "initramfs.cpio"), "wb") as f:
            f.write(cpio_newc(root, DEV_NODES))
        open(os.path.join(stage, "modules.txt"), "w").write(listing)
        os.makedirs(os.path.dirname(outdir), exist_ok=True)
        shutil.rmtree(outdir, ignore_errors=True)
        os.rename(stage, outdir)
    log(f"built {outdir}")
    print(outdir)


if __name__ == "__main__":
    main()
