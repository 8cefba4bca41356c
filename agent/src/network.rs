//! The pod's network in the guest: interfaces found by MAC, renamed, given their MTU and
//! addresses and brought up; then routes. Everything is checked by
//! `bulkhead_protocol::net::validate` before anything changes.

use bulkhead_netlink::{Link, Netlink, NetlinkError};
use bulkhead_protocol::net::{self, format_mac, IpNet, NetInterface, NetRoute};
use bulkhead_protocol::AgentError;

fn nl_err(e: NetlinkError) -> AgentError {
    match e.errno() {
        Some(libc::ENETUNREACH) | Some(libc::EINVAL) | Some(libc::ERANGE) => {
            AgentError::InvalidArgument(e.to_string())
        }
        _ => AgentError::Io(e.to_string()),
    }
}

/// Apply an update. Outside a guest this would rewire the host, so it is refused there.
pub fn update(
    in_guest: bool,
    interfaces: &[NetInterface],
    routes: &[NetRoute],
) -> Result<(), AgentError> {
    net::validate(interfaces, routes).map_err(AgentError::InvalidArgument)?;
    if !in_guest {
        return Err(AgentError::Unsupported(
            "UpdateNetwork outside a guest would change the host's network".into(),
        ));
    }
    let mut nl = Netlink::open().map_err(nl_err)?;
    let links = nl.links().map_err(nl_err)?;
    // Every MAC must be found before any link is touched.
    let mut found: Vec<(&NetInterface, &Link)> = Vec::new();
    for ifc in interfaces {
        let link = links
            .iter()
            .find(|l| l.mac == Some(ifc.mac))
            .ok_or_else(|| {
                AgentError::NotFound(format!(
                    "no guest interface has MAC {} (for {})",
                    format_mac(&ifc.mac),
                    ifc.name
                ))
            })?;
        found.push((ifc, link));
    }
    if let Some(lo) = links.iter().find(|l| l.name == "lo") {
        if !lo.up {
            nl.set_link(lo.index, Some(true), None, None)
                .map_err(nl_err)?;
        }
    }
    for (ifc, link) in &found {
        if link.name != ifc.name {
            nl.set_link(link.index, Some(false), None, Some(&ifc.name))
                .map_err(nl_err)?;
        }
        nl.set_link(link.index, Some(true), Some(ifc.mtu), None)
            .map_err(nl_err)?;
        for a in &ifc.addresses {
            ignore_exists(nl.add_address(link.index, a.addr, a.prefix_len))?;
        }
    }
    for r in routes {
        let (_, link) = found
            .iter()
            .find(|(i, _)| i.name == r.device)
            .ok_or_else(|| AgentError::InvalidArgument(format!("route via {}", r.device)))?;
        ignore_exists(nl.add_route(
            r.dest.map(|d| (d.addr, d.prefix_len)),
            r.gateway,
            link.index,
        ))?;
    }
    Ok(())
}

/// An address or route that is already there is what the caller wanted.
fn ignore_exists(r: Result<(), NetlinkError>) -> Result<(), AgentError> {
    match r {
        Err(e) if e.errno() == Some(libc::EEXIST) => Ok(()),
        other => other.map_err(nl_err),
    }
}

pub fn interfaces() -> Result<Vec<NetInterface>, AgentError> {
    let mut nl = Netlink::open().map_err(nl_err)?;
    let addrs = nl.addresses().map_err(nl_err)?;
    Ok(nl
        .links()
        .map_err(nl_err)?
        .into_iter()
        .filter(|l| l.name != "lo")
        .filter_map(|l| {
            Some(NetInterface {
                mac: l.mac?,
                mtu: l.mtu,
                addresses: addrs
                    .iter()
                    .filter(|a| a.index == l.index)
                    // Link-local IPv6 addresses are the kernel's, not the pod's.
                    .filter(|a| !matches!(a.addr, std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
                    .map(|a| IpNet {
                        addr: a.addr,
                        prefix_len: a.prefix_len,
                    })
                    .collect(),
                name: l.name,
            })
        })
        .collect())
}

pub fn routes() -> Result<Vec<NetRoute>, AgentError> {
    let mut nl = Netlink::open().map_err(nl_err)?;
    let links = nl.links().map_err(nl_err)?;
    Ok(nl
        .routes()
        .map_err(nl_err)?
        .into_iter()
        .filter(|r| !r.kernel)
        .filter_map(|r| {
            let device = links.iter().find(|l| Some(l.index) == r.oif)?.name.clone();
            Some(NetRoute {
                dest: r.dest.map(|(addr, prefix_len)| IpNet { addr, prefix_len }),
                gateway: r.gateway,
                device,
            })
        })
        .collect())
}
