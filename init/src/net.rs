//! The network interface: finding it, and configuring it through rtnetlink (link up, the
//! leased address, the default route), as `ip` would.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::dhcp::Lease;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no network interface {0} appeared within {1} s (is its driver in the image?)")]
    NoInterface(String, u64),
    #[error("interface {name}: cannot read {what} from /sys: {detail}")]
    Sysfs {
        name: String,
        what: &'static str,
        detail: String,
    },
    #[error("rtnetlink: {0}")]
    Netlink(String),
}

/// An Ethernet interface, as the kernel names and numbers it.
#[derive(Debug, Clone)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
}

impl Interface {
    /// `52-54-00-12-34-56`: the form a machine is known by before it has a name.
    pub fn mac_text(&self) -> String {
        mac_hex(&self.mac)
    }
}

const SYS_NET: &str = "/sys/class/net";
/// ARPHRD_ETHER, in /sys/class/net/NAME/type.
const ETHERNET: &str = "1";

/// Which interface to configure: the one named, the one with this MAC address (the one the
/// machine booted from, as the deployer's boot script says), or the first Ethernet one.
#[derive(Debug, Clone, Copy)]
pub enum Wanted<'a> {
    Name(&'a str),
    Mac([u8; 6]),
    FirstEthernet,
}

/// Waits for the interface `wanted` to exist.
pub fn wait_for_interface(wanted: Wanted, within: Duration) -> Result<Interface, NetError> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = find(wanted) {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            let which = match wanted {
                Wanted::Name(name) => format!("{name:?}"),
                Wanted::Mac(mac) => format!("with MAC address {}", mac_hex(&mac)),
                Wanted::FirstEthernet => "of type Ethernet".into(),
            };
            return Err(NetError::NoInterface(which, within.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn find(wanted: Wanted) -> Option<Interface> {
    let mut names: Vec<String> = std::fs::read_dir(SYS_NET)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name != "lo")
        .collect();
    names.sort();
    names.into_iter().find_map(|name| {
        let is_ethernet = std::fs::read_to_string(Path::new(SYS_NET).join(&name).join("type"))
            .is_ok_and(|t| t.trim() == ETHERNET);
        let iface = read_interface(&name).ok()?;
        let chosen = match wanted {
            Wanted::Name(w) => name == w,
            Wanted::Mac(mac) => is_ethernet && iface.mac == mac,
            Wanted::FirstEthernet => is_ethernet,
        };
        chosen.then_some(iface)
    })
}

fn read_interface(name: &str) -> Result<Interface, NetError> {
    let read = |what: &'static str| {
        std::fs::read_to_string(Path::new(SYS_NET).join(name).join(what))
            .map(|s| s.trim().to_owned())
            .map_err(|e| NetError::Sysfs {
                name: name.into(),
                what,
                detail: e.to_string(),
            })
    };
    let bad = |what: &'static str, text: &str| NetError::Sysfs {
        name: name.into(),
        what,
        detail: format!("{text:?} is not a valid value"),
    };
    let index_text = read("ifindex")?;
    let index = index_text
        .parse()
        .map_err(|_| bad("ifindex", &index_text))?;
    let mac_text = read("address")?;
    let mac = parse_mac(&mac_text).ok_or_else(|| bad("address", &mac_text))?;
    Ok(Interface {
        name: name.into(),
        index,
        mac,
    })
}

/// iPXE's `hexhyp` form, which the deployer also names machines by.
fn mac_hex(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join("-")
}

/// `52:54:00:12:34:56` (as /sys writes it) or `52-54-00-12-34-56` (as iPXE does).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let separator = if text.contains('-') { '-' } else { ':' };
    let mut parts = text.split(separator);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A route-netlink socket that sends requests and waits for each one's acknowledgement.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Self, NetError> {
        let failed = |e: std::io::Error| NetError::Netlink(e.to_string());
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(failed)?;
        socket.bind_auto().map_err(failed)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(failed)?;
        Ok(Self { socket, seq: 0 })
    }

    /// Sets the link up (`ip link set NAME up`).
    pub fn link_up(&mut self, iface: &Interface) -> Result<(), NetError> {
        let mut msg = LinkMessage::default();
        msg.header.index = iface.index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(|e| NetError::Netlink(format!("setting {} up: {e}", iface.name)))
    }

    /// Gives the interface the leased address (`ip addr replace ADDR/PREFIX dev NAME`).
    pub fn set_address(&mut self, iface: &Interface, lease: &Lease) -> Result<(), NetError> {
        let mut msg = address_message(iface, lease);
        msg.attributes
            .push(AddressAttribute::Broadcast(lease.broadcast()));
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| {
            NetError::Netlink(format!(
                "adding {}/{} to {}: {e}",
                lease.address, lease.prefix, iface.name
            ))
        })
    }

    /// Takes an address off the interface (`ip addr del ADDR/PREFIX dev NAME`).
    pub fn delete_address(&mut self, iface: &Interface, lease: &Lease) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::DelAddress(address_message(iface, lease)),
            0,
        )
        .map_err(|e| {
            NetError::Netlink(format!(
                "removing {} from {}: {e}",
                lease.address, iface.name
            ))
        })
    }

    /// The default route through `router` (`ip route replace default via ROUTER dev NAME`).
    pub fn set_default_route(
        &mut self,
        iface: &Interface,
        router: Ipv4Addr,
    ) -> Result<(), NetError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Dhcp;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes = vec![
            RouteAttribute::Gateway(RouteAddress::Inet(router)),
            RouteAttribute::Oif(iface.index),
        ];
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|e| NetError::Netlink(format!("default route via {router}: {e}")))
    }

    fn request(&mut self, payload: RouteNetlinkMessage, flags: u16) -> Result<(), String> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(payload));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(|e| e.to_string())?;
        self.await_ack()
    }

    /// Reads until the kernel's answer to our latest request: an error message whose code is
    /// none (an ack) or an errno.
    fn await_ack(&mut self) -> Result<(), String> {
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self
                .socket
                .recv(&mut &mut buf[..], 0)
                .map_err(|e| e.to_string())?;
            let mut offset = 0;
            while offset < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                    .map_err(|e| format!("unreadable reply: {e}"))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == self.seq {
                    if let NetlinkPayload::Error(e) = reply.payload {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => {
                                Err(std::io::Error::from_raw_os_error(-code.get()).to_string())
                            }
                        };
                    }
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

/// The leased address on the interface, as `ip addr` names it (local and peer the same).
fn address_message(iface: &Interface, lease: &Lease) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.prefix_len = lease.prefix;
    msg.header.index = iface.index;
    let addr = IpAddr::V4(lease.address);
    msg.attributes = vec![
        AddressAttribute::Local(addr),
        AddressAttribute::Address(addr),
    ];
    msg
}

/// Brings the interface up with the lease: address, then default route. A route the kernel
/// refuses (a router outside the leased prefix) is said and left out: the machine still
/// reaches its own network.
pub fn configure(iface: &Interface, lease: &Lease) -> Result<(), NetError> {
    let mut rtnl = Rtnl::open()?;
    rtnl.link_up(iface)?;
    promote_secondaries(iface);
    rtnl.set_address(iface, lease)?;
    if let Some(router) = lease.router {
        if let Err(e) = rtnl.set_default_route(iface, router) {
            crate::say!("{e}; going on without a default route");
        }
    }
    Ok(())
}

/// With it, taking the first address of a subnet off keeps the others (the kernel's default
/// takes them all): a renewal that moves to a new address of the same subnet adds the new one,
/// then removes the old.
fn promote_secondaries(iface: &Interface) {
    let path = format!("/proc/sys/net/ipv4/conf/{}/promote_secondaries", iface.name);
    if let Err(e) = std::fs::write(&path, "1") {
        crate::say!("cannot write {path}: {e}");
    }
}

/// Moves the interface from the `old` lease to `new` (configuring it again even if they are the
/// same: the address is put back if something took it off): the new address first, then the
/// old one off if it differs, so the machine never answers for an address it no longer holds.
pub fn reconfigure(iface: &Interface, old: &Lease, new: &Lease) -> Result<(), NetError> {
    configure(iface, new)?;
    if old.address != new.address || old.prefix != new.prefix {
        Rtnl::open()?.delete_address(iface, old)?;
    }
    Ok(())
}

/// The loopback interface, which nothing else brings up here.
pub fn loopback_up() -> Result<(), NetError> {
    let lo = read_interface("lo")?;
    Rtnl::open()?.link_up(&lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5f"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x5f])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        let iface = Interface {
            name: "eth0".into(),
            index: 2,
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x5f],
        };
        assert_eq!(iface.mac_text(), "52-54-00-12-34-5f");
    }
}
