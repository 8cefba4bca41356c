//! Blocking rtnetlink calls for a pod's network, shared by bulkheadd (which plumbs the
//! pod's network namespace on the host) and the agent (which sets the guest's interfaces
//! up). Messages are built and parsed by `netlink-packet-route`; this crate only sends a
//! request and collects the kernel's answer, on a socket bound to the network namespace
//! of the thread that opened it.

mod socket;
pub mod tap;

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use serde::{Deserialize, Serialize};

pub use socket::Netlink;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        source: std::io::Error,
    },
    #[error("netlink: cannot parse the kernel's answer: {0}")]
    Decode(String),
    #[error("{0}")]
    Invalid(String),
}

impl NetlinkError {
    /// The errno the kernel answered with, if it was the kernel that refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    /// `veth`, `tun`, `bridge`...; `None` for loopback and physical devices.
    pub kind: Option<String>,
    /// The kernel's counters for the interface, seen from the host side.
    pub counters: Option<LinkCounters>,
}

/// Frames and bytes through an interface, as the kernel counts them (`IFLA_STATS64`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_errors: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tx_errors: u64,
}

/// An address with its prefix length, on interface `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfAddr {
    pub index: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// A unicast route in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteEntry {
    /// `None`: the default route.
    pub dest: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    /// Link scope: the destination is on the link (no gateway).
    pub link_scope: bool,
    /// Made by the kernel for an address's subnet (proto kernel), not by a caller.
    pub kernel: bool,
}

fn family(ip: &IpAddr) -> AddressFamily {
    match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// EtherType "every protocol" (ETH_P_ALL), as tc wants it: network byte order.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

impl Netlink {
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let msg = RouteNetlinkMessage::GetLink(LinkMessage::default());
        let mut out = Vec::new();
        for m in self.request("list links", msg, NLM_F_DUMP)? {
            if let RouteNetlinkMessage::NewLink(l) = m {
                out.push(link_from(l));
            }
        }
        Ok(out)
    }

    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|l| l.name == name))
    }

    /// Every address of both families.
    pub fn addresses(&mut self) -> Result<Vec<IfAddr>> {
        let msg = RouteNetlinkMessage::GetAddress(AddressMessage::default());
        let mut out = Vec::new();
        for m in self.request("list addresses", msg, NLM_F_DUMP)? {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS
            // otherwise.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                out.push(IfAddr {
                    index: a.header.index,
                    addr,
                    prefix_len: a.header.prefix_len,
                });
            }
        }
        Ok(out)
    }

    /// Unicast routes of the main table, both families.
    pub fn routes(&mut self) -> Result<Vec<RouteEntry>> {
        let mut out = Vec::new();
        for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = RouteMessage::default();
            m.header.address_family = fam;
            let msg = RouteNetlinkMessage::GetRoute(m);
            for m in self.request("list routes", msg, NLM_F_DUMP)? {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    continue;
                };
                let table = r
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        RouteAttribute::Table(t) => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u32::from(r.header.table));
                if table != u32::from(RouteHeader::RT_TABLE_MAIN)
                    || r.header.kind != RouteType::Unicast
                {
                    continue;
                }
                let dest = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(d) => route_ip(d),
                    _ => None,
                });
                let gateway = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(g) => route_ip(g),
                    _ => None,
                });
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                let plen = r.header.destination_prefix_length;
                out.push(RouteEntry {
                    dest: match dest {
                        Some(d) => Some((d, plen)),
                        None if plen == 0 => None,
                        None => continue,
                    },
                    gateway,
                    oif,
                    link_scope: r.header.scope == RouteScope::Link,
                    kernel: r.header.protocol == RouteProtocol::Kernel,
                });
            }
        }
        Ok(out)
    }

    /// Change a link: bring it up or down, set its MTU, rename it. A rename needs the
    /// link down, which the caller arranges.
    pub fn set_link(
        &mut self,
        index: u32,
        up: Option<bool>,
        mtu: Option<u32>,
        name: Option<&str>,
    ) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if let Some(up) = up {
            m.header.change_mask = LinkFlags::Up;
            if up {
                m.header.flags = LinkFlags::Up;
            }
        }
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(n) = name {
            m.attributes.push(LinkAttribute::IfName(n.to_string()));
        }
        self.ack(
            &format!("set link {index}"),
            RouteNetlinkMessage::SetLink(m),
            0,
        )
    }

    pub fn del_link(&mut self, index: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.ack(
            &format!("delete link {index}"),
            RouteNetlinkMessage::DelLink(m),
            0,
        )
    }

    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(NetlinkError::Invalid(format!("{addr}/{prefix_len}")));
        }
        let mut m = AddressMessage::default();
        m.header.family = family(&addr);
        m.header.prefix_len = prefix_len;
        m.header.index = index;
        m.header.scope = AddressScope::Universe;
        m.attributes.push(AddressAttribute::Address(addr));
        if addr.is_ipv4() {
            m.attributes.push(AddressAttribute::Local(addr));
        }
        self.ack(
            &format!("add address {addr}/{prefix_len} to link {index}"),
            RouteNetlinkMessage::NewAddress(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Add a route to `dest` (`None`: default) through `gateway` or on the link.
    pub fn add_route(
        &mut self,
        dest: Option<(IpAddr, u8)>,
        gateway: Option<IpAddr>,
        oif: u32,
    ) -> Result<()> {
        let fam_of = dest.map(|d| d.0).or(gateway).ok_or_else(|| {
            NetlinkError::Invalid("a route needs a destination or a gateway".into())
        })?;
        let mut m = RouteMessage::default();
        m.header.address_family = family(&fam_of);
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Static;
        m.header.kind = RouteType::Unicast;
        m.header.scope = if gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if let Some((d, plen)) = dest {
            m.header.destination_prefix_length = plen;
            m.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(d)));
        }
        if let Some(g) = gateway {
            m.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(g)));
        }
        m.attributes.push(RouteAttribute::Oif(oif));
        let what = format!(
            "add route {} via {} dev {oif}",
            dest.map(|(d, p)| format!("{d}/{p}"))
                .unwrap_or_else(|| "default".into()),
            gateway.map(|g| g.to_string()).unwrap_or_else(|| "-".into())
        );
        self.ack(
            &what,
            RouteNetlinkMessage::NewRoute(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Add the ingress qdisc (`tc qdisc add dev <index> ingress`).
    pub fn add_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        let mut m = ingress_qdisc(index);
        m.attributes.push(TcAttribute::Kind("ingress".into()));
        self.ack(
            &format!("add ingress qdisc to link {index}"),
            RouteNetlinkMessage::NewQueueDiscipline(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Remove the ingress qdisc and with it every filter under it.
    pub fn del_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        self.ack(
            &format!("delete ingress qdisc of link {index}"),
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
            0,
        )
    }

    /// Redirect every frame arriving on `from` to the egress of `to`:
    /// `tc filter add dev <from> parent ffff: protocol all u32 match u8 0 0
    ///  action mirred egress redirect dev <to>`.
    pub fn add_redirect(&mut self, from: u32, to: u32) -> Result<()> {
        let mut m = TcMessage::with_index(from as i32);
        m.header.parent = TcHandle::from(INGRESS_HANDLE);
        m.header.info = u32::from(TcHandle {
            major: 1,
            minor: ETH_P_ALL_BE,
        });
        let mut sel = TcU32Selector::default();
        sel.flags = TcU32SelectorFlags::Terminal;
        sel.nkeys = 1;
        sel.keys = vec![TcU32Key::default()];
        let mut mirror = TcMirror::default();
        mirror.generic = TcActionGeneric::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        m.attributes
            .push(TcAttribute::Kind(TcFilterU32::KIND.to_string()));
        m.attributes.push(TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(sel)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]));
        self.ack(
            &format!("redirect link {from} to link {to}"),
            RouteNetlinkMessage::NewTrafficFilter(m),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// The ingress filters on link `index`, as (kind, redirect target) pairs: how a test
    /// or an operator sees that the mirroring is in place.
    pub fn ingress_redirects(&mut self, index: u32) -> Result<Vec<u32>> {
        let mut m = TcMessage::with_index(index as i32);
        m.header.parent = TcHandle::from(INGRESS_HANDLE);
        let mut out = Vec::new();
        for r in self.request(
            &format!("list filters of link {index}"),
            RouteNetlinkMessage::GetTrafficFilter(m),
            NLM_F_DUMP,
        )? {
            let RouteNetlinkMessage::NewTrafficFilter(f) = r else {
                continue;
            };
            for a in &f.attributes {
                let TcAttribute::Options(opts) = a else {
                    continue;
                };
                for o in opts {
                    let TcOption::U32(TcFilterU32Option::Action(acts)) = o else {
                        continue;
                    };
                    for act in acts {
                        for aa in &act.attributes {
                            let TcActionAttribute::Options(aopts) = aa else {
                                continue;
                            };
                            for ao in aopts {
                                if let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = ao {
                                    out.push(p.ifindex);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn ack(&mut self, what: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
        self.request(what, msg, flags).map(|_| ())
    }
}

/// The ingress qdisc's handle (`ffff:`), which is also the parent of its filters.
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// The ingress qdisc of link `index`, as add and delete name it.
fn ingress_qdisc(index: u32) -> TcMessage {
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = TcHandle::from(INGRESS_HANDLE);
    m
}

fn link_from(l: LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: l.header.flags.contains(LinkFlags::Up),
        kind: None,
        counters: None,
    };
    for a in l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(mac) if mac.len() == 6 => {
                let mut m = [0u8; 6];
                m.copy_from_slice(&mac);
                link.mac = Some(m);
            }
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::Stats64(c) => {
                link.counters = Some(LinkCounters {
                    rx_packets: c.rx_packets,
                    rx_bytes: c.rx_bytes,
                    rx_dropped: c.rx_dropped,
                    rx_errors: c.rx_errors,
                    tx_packets: c.tx_packets,
                    tx_bytes: c.tx_bytes,
                    tx_dropped: c.tx_dropped,
                    tx_errors: c.tx_errors,
                })
            }
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// The flags every request carries besides the caller's.
const REQUEST: u16 = NLM_F_REQUEST;

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `f` on a thread in a new, empty network namespace (only that thread moves).
    /// `None` where this process may not make one (not root).
    fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            // SAFETY: unshare with one flag; it only moves the calling thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "skipped: cannot make a network namespace ({})",
                    std::io::Error::last_os_error()
                );
                return None;
            }
            Some(f())
        })
        .join()
        .expect("test thread")
    }

    #[test]
    fn taps_addresses_routes_and_redirects() {
        in_new_netns(|| {
            let mut nl = Netlink::open().unwrap();
            let lo = nl.link_by_name("lo").unwrap().expect("lo");
            assert!(!lo.up);
            let a = tap::open("bhtest0", false).unwrap();
            let _b = tap::open("bhtest1", false).unwrap();
            tap::set_offload(&a, tap::TUN_F_CSUM | tap::TUN_F_TSO4 | tap::TUN_F_TSO6).unwrap();
            let ta = nl.link_by_name("bhtest0").unwrap().expect("tap a");
            let tb = nl.link_by_name("bhtest1").unwrap().expect("tap b");
            assert_eq!(ta.kind.as_deref(), Some("tun"));
            assert!(ta.mac.is_some());

            nl.set_link(ta.index, Some(true), Some(1400), None).unwrap();
            let ta2 = nl.link_by_name("bhtest0").unwrap().unwrap();
            assert!(ta2.up);
            assert_eq!(ta2.mtu, 1400);
            // A frame written to the tap is one the host received on it, counted.
            let before = ta2.counters.expect("counters").rx_packets;
            let mut frame = vec![0u8; tap::VNET_HDR_LEN];
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
            frame.resize(tap::VNET_HDR_LEN + 60, 0);
            std::io::Write::write_all(&mut &a, &frame).unwrap();
            let c = nl
                .link_by_name("bhtest0")
                .unwrap()
                .unwrap()
                .counters
                .unwrap();
            assert_eq!(c.rx_packets, before + 1, "{c:?}");
            assert_eq!(c.rx_bytes, 60, "{c:?}");

            let ip: IpAddr = "10.99.0.2".parse().unwrap();
            nl.add_address(ta.index, ip, 24).unwrap();
            let dup = nl.add_address(ta.index, ip, 24).unwrap_err();
            assert_eq!(dup.errno(), Some(libc::EEXIST), "{dup}");
            assert!(nl
                .addresses()
                .unwrap()
                .iter()
                .any(|a| a.index == ta.index && a.addr == ip && a.prefix_len == 24));
            let gw: IpAddr = "10.99.0.1".parse().unwrap();
            nl.add_route(None, Some(gw), ta.index).unwrap();
            let routes = nl.routes().unwrap();
            assert!(
                routes
                    .iter()
                    .any(|r| r.dest.is_none() && r.gateway == Some(gw) && !r.kernel),
                "{routes:?}"
            );
            assert!(
                routes
                    .iter()
                    .any(|r| r.dest == Some(("10.99.0.0".parse().unwrap(), 24))
                        && r.kernel
                        && r.link_scope),
                "{routes:?}"
            );
            // A gateway off every subnet is refused by the kernel, with its errno.
            let off = nl
                .add_route(
                    Some(("10.50.0.0".parse().unwrap(), 16)),
                    Some("192.0.2.1".parse().unwrap()),
                    ta.index,
                )
                .unwrap_err();
            assert_eq!(off.errno(), Some(libc::ENETUNREACH), "{off}");

            nl.add_ingress_qdisc(ta.index).unwrap();
            nl.add_redirect(ta.index, tb.index).unwrap();
            assert_eq!(nl.ingress_redirects(ta.index).unwrap(), vec![tb.index]);
            nl.del_ingress_qdisc(ta.index).unwrap();
            assert!(nl.ingress_redirects(ta.index).unwrap().is_empty());

            nl.set_link(tb.index, Some(false), None, Some("bhrenamed"))
                .unwrap();
            assert!(nl.link_by_name("bhrenamed").unwrap().is_some());
            nl.del_link(tb.index).unwrap();
            assert!(nl.link_by_name("bhrenamed").unwrap().is_none());
            let gone = nl.del_link(tb.index).unwrap_err();
            assert_eq!(gone.errno(), Some(libc::ENODEV), "{gone}");
        });
    }

    #[test]
    fn persistent_tap_outlives_its_descriptor() {
        in_new_netns(|| {
            let mut nl = Netlink::open().unwrap();
            drop(tap::open("bhpersist", true).unwrap());
            let l = nl.link_by_name("bhpersist").unwrap().expect("still there");
            // Attach again, as a restarted back end does.
            drop(tap::open("bhpersist", true).unwrap());
            nl.del_link(l.index).unwrap();
            drop(tap::open("bhtransient", false).unwrap());
            assert!(nl.link_by_name("bhtransient").unwrap().is_none());
            assert!(tap::open("bad/name", false).is_err());
        });
    }
}
