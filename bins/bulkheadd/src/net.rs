//! The pod's network, carried into the VM. The caller (CNI, netavark, a test) made a
//! network namespace with interfaces in it; for each one with an address, a persistent
//! tap is made beside it and tc mirrors traffic both ways (ingress qdisc + mirred
//! redirect), so whatever arrives on the interface leaves through the tap to the guest
//! and back. The guest's NIC takes the interface's MAC, addresses, MTU and routes.
//! Teardown removes every tap and filter this made; it runs again after a crash, from the
//! sandbox record.

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use bulkhead_netlink::{tap, Netlink, NetlinkError};
use bulkhead_protocol::net::{self as pnet, IpNet, NetInterface, NetRoute};
use serde::{Deserialize, Serialize};

/// Taps are named `bhtap<N>` in the pod's namespace (each pod has its own namespace, so
/// the names never meet).
const TAP_PREFIX: &str = "bhtap";

/// One interface of the pod and the tap that mirrors it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlumbedLink {
    /// The caller's interface (a veth, usually).
    pub link: String,
    pub tap: String,
    /// What the guest gets.
    pub guest: NetInterface,
}

/// What was plumbed, kept in the sandbox record so teardown can undo it after a crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRec {
    pub netns: PathBuf,
    pub links: Vec<PlumbedLink>,
    pub routes: Vec<NetRoute>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network namespace {path}: {source}")]
    Netns {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("tap {name}: {source}")]
    Tap {
        name: String,
        source: std::io::Error,
    },
    #[error("the pod's network would be refused by the guest: {0}")]
    Invalid(String),
}

/// Run `f` on a thread that has joined the network namespace at `netns`; sockets and taps
/// it opens belong to that namespace. The calling thread is never moved.
pub fn in_netns<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    let ns_err = |source| NetError::Netns {
        path: netns.display().to_string(),
        source,
    };
    let ns = File::open(netns).map_err(ns_err)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on a descriptor we hold; it moves only this scoped thread,
            // which ends when `f` returns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(ns_err(std::io::Error::last_os_error()));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetError::Invalid(
                "network namespace thread panicked".into(),
            ))
        })
    })
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Plumb every interface of `netns` that has an address. A namespace with nothing but
/// loopback gives a pod without a NIC.
pub fn plumb(netns: &Path) -> Result<NetRec, NetError> {
    let links = in_netns(netns, || {
        let mut nl = Netlink::open()?;
        clear_stale(&mut nl)?;
        let addrs = nl.addresses()?;
        let routes = nl.routes()?;
        let candidates: Vec<_> = nl
            .links()?
            .into_iter()
            .filter(|l| l.name != "lo" && l.kind.as_deref() != Some("tun"))
            .filter_map(|l| {
                let mac = l.mac?;
                let addresses: Vec<IpNet> = addrs
                    .iter()
                    .filter(|a| a.index == l.index && !is_link_local(&a.addr))
                    .map(|a| IpNet {
                        addr: a.addr,
                        prefix_len: a.prefix_len,
                    })
                    .collect();
                (!addresses.is_empty()).then_some((l, mac, addresses))
            })
            .collect();
        let mut done: Vec<PlumbedLink> = Vec::new();
        let mut guest_routes = Vec::new();
        for (i, (l, mac, addresses)) in candidates.iter().enumerate() {
            let guest = NetInterface {
                name: format!("eth{i}"),
                mac: *mac,
                mtu: l.mtu,
                addresses: addresses.clone(),
            };
            let tap_name = format!("{TAP_PREFIX}{i}");
            if let Err(e) = mirror(&mut nl, l.index, l.mtu, &tap_name) {
                undo(&mut nl, &done);
                undo_one(&mut nl, &l.name, &tap_name);
                return Err(e);
            }
            for r in routes
                .iter()
                .filter(|r| !r.kernel && r.oif == Some(l.index))
            {
                if r.gateway.is_some_and(|g| is_link_local(&g)) {
                    continue;
                }
                guest_routes.push(NetRoute {
                    dest: r.dest.map(|(addr, prefix_len)| IpNet { addr, prefix_len }),
                    gateway: r.gateway,
                    device: guest.name.clone(),
                });
            }
            done.push(PlumbedLink {
                link: l.name.clone(),
                tap: tap_name,
                guest,
            });
        }
        let ifs: Vec<NetInterface> = done.iter().map(|p| p.guest.clone()).collect();
        if let Err(e) = pnet::validate(&ifs, &guest_routes) {
            undo(&mut nl, &done);
            return Err(NetError::Invalid(e));
        }
        Ok((done, guest_routes))
    })?;
    Ok(NetRec {
        netns: netns.to_path_buf(),
        links: links.0,
        routes: links.1,
    })
}

/// A persistent tap beside link `index`, up with its MTU, and a redirect each way.
fn mirror(nl: &mut Netlink, index: u32, mtu: u32, tap_name: &str) -> Result<(), NetError> {
    drop(tap::open(tap_name, true).map_err(|source| NetError::Tap {
        name: tap_name.into(),
        source,
    })?);
    let t = nl.link_by_name(tap_name)?.ok_or_else(|| NetError::Tap {
        name: tap_name.into(),
        source: std::io::Error::from_raw_os_error(libc::ENODEV),
    })?;
    nl.set_link(t.index, Some(true), Some(mtu), None)?;
    nl.add_ingress_qdisc(index)?;
    nl.add_ingress_qdisc(t.index)?;
    nl.add_redirect(index, t.index)?;
    nl.add_redirect(t.index, index)?;
    Ok(())
}

/// Taps and filters left by a bulkheadd that died while plumbing this namespace. Only
/// ingress qdiscs whose filters redirect to one of our taps are ours; any other (a CNI
/// bandwidth plugin's, say) is left alone.
fn clear_stale(nl: &mut Netlink) -> Result<(), NetError> {
    let links = nl.links()?;
    let taps: Vec<u32> = links
        .iter()
        .filter(|l| l.name.starts_with(TAP_PREFIX) && l.kind.as_deref() == Some("tun"))
        .map(|l| l.index)
        .collect();
    for l in links
        .iter()
        .filter(|l| l.name != "lo" && !taps.contains(&l.index))
    {
        let ours = nl
            .ingress_redirects(l.index)
            .is_ok_and(|r| r.iter().any(|t| taps.contains(t)));
        if ours {
            let _ = nl.del_ingress_qdisc(l.index);
        }
    }
    for t in taps {
        let _ = nl.del_link(t);
    }
    Ok(())
}

/// Remove the tap and the link's ingress qdisc, if that qdisc is ours (it redirects to
/// the tap): a qdisc the caller made, one that refused ours, stays.
fn undo_one(nl: &mut Netlink, link: &str, tap_name: &str) {
    let Ok(Some(t)) = nl.link_by_name(tap_name) else {
        return;
    };
    if let Ok(Some(l)) = nl.link_by_name(link) {
        if nl
            .ingress_redirects(l.index)
            .is_ok_and(|r| r.contains(&t.index))
        {
            // The qdisc goes with every filter under it.
            let _ = nl.del_ingress_qdisc(l.index);
        }
    }
    let _ = nl.del_link(t.index);
}

fn undo(nl: &mut Netlink, done: &[PlumbedLink]) {
    for p in done {
        undo_one(nl, &p.link, &p.tap);
    }
}

/// Remove every tap and filter `rec` made. A namespace that is already gone took them
/// with it.
pub fn unplumb(rec: &NetRec) -> Result<(), NetError> {
    if !rec.netns.exists() {
        return Ok(());
    }
    in_netns(&rec.netns, || {
        let mut nl = Netlink::open()?;
        undo(&mut nl, &rec.links);
        Ok(())
    })
}

/// Open the persistent tap `name` in `netns` again, for a (re)started back end.
pub fn open_tap(netns: &Path, name: &str) -> Result<OwnedFd, NetError> {
    // A back end killed a moment ago may still hold the tap while the kernel tears the
    // process down (its jailer is reported dead first): give that a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let r = in_netns(netns, || {
            tap::open(name, true)
                .map(OwnedFd::from)
                .map_err(|source| NetError::Tap {
                    name: name.into(),
                    source,
                })
        });
        match r {
            Err(NetError::Tap { source, .. })
                if source.kind() == std::io::ErrorKind::ResourceBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Each pod interface's counters read from its tap, for a sandbox whose frames the
/// kernel's vhost-net moves, named as `bulkhead-net` names its own: seen from the guest,
/// so what the tap sent is what the guest received.
/// Keyed by the guest's interface name.
pub fn tap_counters(net: &NetRec) -> Result<HashMap<String, HashMap<String, u64>>, NetError> {
    let links = in_netns(&net.netns, || Ok(Netlink::open()?.links()?))?;
    Ok(net
        .links
        .iter()
        .filter_map(|l| {
            let c = links.iter().find(|k| k.name == l.tap)?.counters?;
            let named = [
                ("rx_frames", c.tx_packets),
                ("rx_bytes", c.tx_bytes),
                ("rx_dropped", c.tx_dropped),
                ("tx_frames", c.rx_packets),
                ("tx_bytes", c.rx_bytes),
                ("tx_errors", c.rx_errors + c.rx_dropped),
            ];
            Some((
                l.guest.name.clone(),
                named.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ))
        })
        .collect())
}

/// The kernel's vhost-net device, for sandboxes whose `net_backend` is `vhost-net`.
pub const VHOST_NET: &str = "/dev/vhost-net";

/// A descriptor of [`VHOST_NET`] for the VMM (which gets no access to /dev in its jail).
pub fn open_vhost_net() -> std::io::Result<OwnedFd> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(VHOST_NET)
        .map(OwnedFd::from)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{VHOST_NET}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A named network namespace for the test, removed on drop; `None` without root.
    struct TestNs(PathBuf);

    impl TestNs {
        fn new(tag: &str) -> Option<TestNs> {
            let name = format!("bh-nettest-{tag}-{}", std::process::id());
            let ok = std::process::Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("skipped: cannot make a network namespace (ip netns add)");
                return None;
            }
            Some(TestNs(PathBuf::from("/run/netns").join(name)))
        }
        fn ip(&self, args: &str) {
            let name = self.0.file_name().unwrap().to_str().unwrap();
            let st = std::process::Command::new("ip")
                .args(["-n", name])
                .args(args.split_whitespace())
                .status()
                .unwrap();
            assert!(st.success(), "ip -n {name} {args}");
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let name = self.0.file_name().unwrap().to_str().unwrap().to_string();
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status();
        }
    }

    #[test]
    fn plumbs_a_cni_like_namespace_and_undoes_it() {
        let Some(ns) = TestNs::new("plumb") else {
            return;
        };
        // What a CNI bridge plugin leaves: a veth with an address and a default route.
        ns.ip("link add eth0 type veth peer name peer0");
        ns.ip("link set eth0 mtu 1400 up");
        ns.ip("link set peer0 up");
        ns.ip("addr add 10.77.0.5/24 dev eth0");
        ns.ip("route add default via 10.77.0.1");
        ns.ip("route add 10.78.0.0/16 via 10.77.0.254");
        // A link with no address is not the pod's.
        ns.ip("link add bare0 type veth peer name bare1");

        let rec = plumb(&ns.0).unwrap();
        assert_eq!(rec.links.len(), 1, "{rec:?}");
        let p = &rec.links[0];
        assert_eq!((p.link.as_str(), p.tap.as_str()), ("eth0", "bhtap0"));
        assert_eq!(p.guest.name, "eth0");
        assert_eq!(p.guest.mtu, 1400);
        assert_eq!(p.guest.addresses.len(), 1);
        assert_eq!(p.guest.addresses[0].to_string(), "10.77.0.5/24");
        let mut routes: Vec<String> = rec
            .routes
            .iter()
            .map(|r| {
                format!(
                    "{}>{}",
                    r.dest.map(|d| d.to_string()).unwrap_or("default".into()),
                    r.gateway.unwrap()
                )
            })
            .collect();
        routes.sort();
        assert_eq!(
            routes,
            vec!["10.78.0.0/16>10.77.0.254", "default>10.77.0.1"]
        );

        let (veth_redirects, tap_redirects, tap) = in_netns(&ns.0, || {
            let mut nl = Netlink::open()?;
            let v = nl.link_by_name("eth0")?.unwrap();
            let t = nl.link_by_name("bhtap0")?.unwrap();
            Ok((
                nl.ingress_redirects(v.index)?,
                nl.ingress_redirects(t.index)?,
                t,
            ))
        })
        .unwrap();
        assert_eq!(veth_redirects.len(), 1);
        assert_eq!(veth_redirects[0], tap.index);
        assert_eq!(tap_redirects.len(), 1);
        assert!(tap.up);
        assert_eq!(tap.mtu, 1400);
        // The tap can be opened again, as a restarted back end's is.
        drop(open_tap(&ns.0, "bhtap0").unwrap());

        // Plumbing again (a crash before the record was saved) starts from a clean slate.
        let again = plumb(&ns.0).unwrap();
        assert_eq!(again, rec);
        // An ingress qdisc that is not ours (on a link without an address, so not
        // plumbed) survives that clean-up.
        ns.ip("link set bare0 up");
        ns.ip("link set bare1 up");
        assert!(std::process::Command::new("tc")
            .args(["-n", ns.0.file_name().unwrap().to_str().unwrap()])
            .args(["qdisc", "add", "dev", "bare0", "ingress"])
            .status()
            .unwrap()
            .success());
        let again = plumb(&ns.0).unwrap();
        assert_eq!(again, rec);
        let foreign = in_netns(&ns.0, || {
            let mut nl = Netlink::open()?;
            let b = nl.link_by_name("bare0")?.unwrap();
            // Our own qdisc would be refused with EEXIST if the foreign one is there.
            Ok(nl.add_ingress_qdisc(b.index).err().and_then(|e| e.errno()))
        })
        .unwrap();
        assert_eq!(
            foreign,
            Some(libc::EEXIST),
            "the foreign ingress qdisc was removed"
        );
        // A namespace whose plumbed link already has a foreign ingress qdisc: plumbing
        // fails with the cause named, and the foreign qdisc is not taken down with ours.
        unplumb(&rec).unwrap();
        let name = ns.0.file_name().unwrap().to_str().unwrap().to_string();
        assert!(std::process::Command::new("tc")
            .args(["-n", &name, "qdisc", "add", "dev", "eth0", "ingress"])
            .status()
            .unwrap()
            .success());
        let e = plumb(&ns.0).unwrap_err();
        assert!(e.to_string().contains("ingress qdisc"), "{e}");
        let kept = std::process::Command::new("tc")
            .args(["-n", &name, "qdisc", "show", "dev", "eth0", "ingress"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&kept.stdout).contains("ingress"));
        let left = in_netns(&ns.0, || {
            let mut nl = Netlink::open()?;
            Ok(nl.link_by_name("bhtap0")?.is_some())
        })
        .unwrap();
        assert!(!left, "the tap of a failed plumbing is removed");
        std::process::Command::new("tc")
            .args(["-n", &name, "qdisc", "del", "dev", "eth0", "ingress"])
            .status()
            .unwrap();
        let rec = plumb(&ns.0).unwrap();

        unplumb(&rec).unwrap();
        let (links, redirects) = in_netns(&ns.0, || {
            let mut nl = Netlink::open()?;
            let v = nl.link_by_name("eth0")?.unwrap();
            let names: Vec<String> = nl.links()?.into_iter().map(|l| l.name).collect();
            Ok((names, nl.ingress_redirects(v.index)?))
        })
        .unwrap();
        assert!(!links.iter().any(|n| n.starts_with("bhtap")), "{links:?}");
        assert!(redirects.is_empty());
        // Undoing twice, or in a namespace already gone, is not an error.
        unplumb(&rec).unwrap();
        drop(ns);
        unplumb(&rec).unwrap();
    }

    #[test]
    fn loopback_only_namespace_gives_no_nic_and_a_missing_one_is_an_error() {
        let Some(ns) = TestNs::new("empty") else {
            return;
        };
        let rec = plumb(&ns.0).unwrap();
        assert!(rec.links.is_empty() && rec.routes.is_empty());
        let e = plumb(Path::new("/run/netns/bh-no-such-ns")).unwrap_err();
        assert!(e.to_string().contains("bh-no-such-ns"), "{e}");
    }
}
