//! Tap devices: made persistent, so they outlive the process that holds them (the
//! network back end can be killed and started again without the pod losing its tap or
//! its tc filters), and opened with a virtio-net header on every frame, so checksum and
//! segmentation offloads pass between the guest and the host kernel untouched.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

/// `struct ifreq` as the tun ioctls read it: a name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Offload bits for [`set_offload`] (`TUN_F_*`): what the reader of the tap accepts.
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// Size of the virtio-net header on every frame (`struct virtio_net_hdr_mrg_rxbuf`, the
/// header of virtio 1.0 devices).
pub const VNET_HDR_LEN: usize = 12;

fn ioctl(f: &File, req: libc::c_ulong, arg: libc::c_ulong, what: &str) -> std::io::Result<()> {
    // SAFETY: every request used here takes an integer or a pointer to an IfReq that
    // lives across the call; the result is checked.
    if unsafe { libc::ioctl(f.as_raw_fd(), req as _, arg) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Open (creating if needed) the tap `name` in the calling thread's network namespace,
/// with a 12-byte virtio-net header on every frame. `persist`: the device stays when the
/// last descriptor closes.
pub fn open(name: &str, persist: bool) -> std::io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', '\0', ' ']) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("tap name {name:?}"),
        ));
    }
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| std::io::Error::new(e.kind(), format!("/dev/net/tun: {e}")))?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    ioctl(
        &f,
        TUNSETIFF,
        &mut req as *mut IfReq as libc::c_ulong,
        &format!("TUNSETIFF {name}"),
    )?;
    let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
    ioctl(
        &f,
        TUNSETVNETHDRSZ,
        &hdr as *const libc::c_int as libc::c_ulong,
        "TUNSETVNETHDRSZ",
    )?;
    if persist {
        ioctl(&f, TUNSETPERSIST, 1, "TUNSETPERSIST")?;
    }
    Ok(f)
}

/// Tell the tap which offloads its reader handles (`TUN_F_*`): frames larger than the
/// MTU or with partial checksums are only handed over when the reader accepts them.
pub fn set_offload(f: &File, flags: u32) -> std::io::Result<()> {
    ioctl(
        f,
        TUNSETOFFLOAD,
        libc::c_ulong::from(flags),
        "TUNSETOFFLOAD",
    )
}
