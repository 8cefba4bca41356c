//! The pod's network as the guest gets it: interfaces found by MAC, their addresses and
//! MTU, and routes. The host reads these from the pod's network namespace; the agent
//! checks them again (they cross a trust boundary in neither direction unchecked).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Most interfaces, addresses per interface and routes one update may carry.
pub const MAX_INTERFACES: usize = 16;
pub const MAX_ADDRESSES: usize = 32;
pub const MAX_ROUTES: usize = 256;

/// An address and its prefix length: `10.88.0.5/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpNet {
    pub fn max_prefix(&self) -> u8 {
        if self.addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// Does this subnet hold `ip`?
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let m = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(a) & m == u32::from(*b) & m
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(a) & m == u128::from(*b) & m
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// One guest interface: the NIC with this MAC is renamed `name` and given `mtu` and
/// `addresses`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
}

/// A route through `device` (an interface's name), to `dest` (`None`: the default route),
/// by `gateway` or, without one, on the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    pub dest: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    pub device: String,
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn valid_ifname(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Check an update before anything is changed. The rules: names are interface names and
/// unique; MACs are unicast and unique; the MTU is 68 to 65535; addresses are unicast with
/// a prefix that fits; a route goes through one of these interfaces, and its gateway lies
/// in a subnet of that interface's addresses (a route cannot point the pod's traffic at a
/// next hop outside the subnets it was given).
pub fn validate(interfaces: &[NetInterface], routes: &[NetRoute]) -> Result<(), String> {
    if interfaces.len() > MAX_INTERFACES || routes.len() > MAX_ROUTES {
        return Err(format!(
            "at most {MAX_INTERFACES} interfaces and {MAX_ROUTES} routes"
        ));
    }
    for (i, ifc) in interfaces.iter().enumerate() {
        if !valid_ifname(&ifc.name) || ifc.name == "lo" {
            return Err(format!("interface name {:?}", ifc.name));
        }
        let mac = format_mac(&ifc.mac);
        if ifc.mac[0] & 1 != 0 || ifc.mac == [0; 6] {
            return Err(format!("{}: MAC {mac} is not a unicast address", ifc.name));
        }
        if interfaces[..i]
            .iter()
            .any(|o| o.name == ifc.name || o.mac == ifc.mac)
        {
            return Err(format!("{}: name or MAC {mac} given twice", ifc.name));
        }
        if !(68..=65535).contains(&ifc.mtu) {
            return Err(format!("{}: MTU {} (want 68 to 65535)", ifc.name, ifc.mtu));
        }
        if ifc.addresses.len() > MAX_ADDRESSES {
            return Err(format!("{}: more than {MAX_ADDRESSES} addresses", ifc.name));
        }
        for a in &ifc.addresses {
            if a.prefix_len > a.max_prefix()
                || a.addr.is_unspecified()
                || a.addr.is_loopback()
                || a.addr.is_multicast()
            {
                return Err(format!("{}: address {a}", ifc.name));
            }
        }
    }
    for r in routes {
        let what = format!(
            "route {} via {} dev {}",
            r.dest
                .map(|d| d.to_string())
                .unwrap_or_else(|| "default".into()),
            r.gateway
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
            r.device
        );
        let dev = interfaces
            .iter()
            .find(|i| i.name == r.device)
            .ok_or_else(|| format!("{what}: no such interface in this update"))?;
        if let Some(d) = &r.dest {
            if d.prefix_len > d.max_prefix() || d.addr.is_multicast() {
                return Err(format!("{what}: bad destination"));
            }
            if r.gateway.is_some_and(|g| g.is_ipv4() != d.addr.is_ipv4()) {
                return Err(format!("{what}: gateway and destination differ in family"));
            }
        }
        match &r.gateway {
            Some(g) if !dev.addresses.iter().any(|a| a.contains(g)) || g.is_unspecified() => {
                return Err(format!(
                    "{what}: the gateway is outside every subnet of {}",
                    dev.name
                ));
            }
            None if r.dest.is_none() => {
                return Err(format!("{what}: a default route needs a gateway"));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        let (a, p) = s.split_once('/').unwrap();
        IpNet {
            addr: a.parse().unwrap(),
            prefix_len: p.parse().unwrap(),
        }
    }

    fn eth0() -> NetInterface {
        NetInterface {
            name: "eth0".into(),
            mac: [0x02, 0, 0, 0, 0, 1],
            mtu: 1500,
            addresses: vec![net("10.88.0.5/16"), net("fd00::5/64")],
        }
    }

    fn route(dest: Option<&str>, gw: Option<&str>) -> NetRoute {
        NetRoute {
            dest: dest.map(net),
            gateway: gw.map(|g| g.parse().unwrap()),
            device: "eth0".into(),
        }
    }

    #[test]
    fn subnets_contain_their_addresses() {
        assert!(net("10.88.0.0/16").contains(&"10.88.255.1".parse().unwrap()));
        assert!(!net("10.88.0.0/16").contains(&"10.89.0.1".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains(&"1.2.3.4".parse().unwrap()));
        assert!(net("fd00::/64").contains(&"fd00::1".parse().unwrap()));
        assert!(!net("fd00::/64").contains(&"10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn a_pod_network_as_cni_makes_it_passes() {
        let routes = vec![
            route(None, Some("10.88.0.1")),
            route(Some("10.99.0.0/16"), Some("10.88.0.254")),
            route(Some("192.168.7.0/24"), None),
            route(None, Some("fd00::1")),
        ];
        validate(&[eth0()], &routes).unwrap();
        validate(&[], &[]).unwrap();
    }

    #[test]
    fn what_leaves_the_plan_is_refused() {
        let bad: Vec<(Vec<NetInterface>, Vec<NetRoute>, &str)> = vec![
            (
                vec![eth0()],
                vec![route(None, Some("192.0.2.1"))],
                "outside every subnet",
            ),
            (vec![eth0()], vec![route(None, None)], "needs a gateway"),
            (
                vec![eth0()],
                vec![NetRoute {
                    device: "eth9".into(),
                    ..route(None, Some("10.88.0.1"))
                }],
                "no such interface",
            ),
            (
                vec![eth0()],
                vec![route(Some("10.1.0.0/16"), Some("fd00::1"))],
                "family",
            ),
            (vec![NetInterface { mtu: 10, ..eth0() }], vec![], "MTU"),
            (
                vec![NetInterface {
                    mac: [1, 0, 0, 0, 0, 1],
                    ..eth0()
                }],
                vec![],
                "unicast",
            ),
            (vec![eth0(), eth0()], vec![], "twice"),
            (
                vec![NetInterface {
                    name: "../x".into(),
                    ..eth0()
                }],
                vec![],
                "interface name",
            ),
            (
                vec![NetInterface {
                    addresses: vec![net("10.0.0.1/33")],
                    ..eth0()
                }],
                vec![],
                "address",
            ),
            (
                vec![NetInterface {
                    addresses: vec![net("127.0.0.1/8")],
                    ..eth0()
                }],
                vec![],
                "address",
            ),
        ];
        for (ifs, routes, want) in bad {
            let e = validate(&ifs, &routes).unwrap_err();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
        let many = vec![route(Some("10.1.0.0/16"), None); MAX_ROUTES + 1];
        assert!(validate(&[eth0()], &many).is_err());
    }
}
