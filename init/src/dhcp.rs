//! A DHCPv4 client for one interface: DISCOVER, OFFER, REQUEST, ACK (RFC 2131), with the
//! messages encoded and parsed by `dhcproto`. Replies are asked for as broadcasts (the flag
//! servers honour for clients that cannot yet receive unicast), so a plain UDP socket bound to
//! the interface hears them before the interface has an address.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Encodable};

use crate::net::Interface;

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("DHCP socket on {iface}: {source}")]
    Socket {
        iface: String,
        source: std::io::Error,
    },
    #[error("no DHCP server answered on {iface} within {secs} s")]
    NoAnswer { iface: String, secs: u64 },
    #[error("the DHCP server {server} refused the address {address} (DHCPNAK)")]
    Refused { server: Ipv4Addr, address: Ipv4Addr },
}

/// What the server granted, checked: an address a host can have, a contiguous mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub duration: Duration,
    pub hostname: Option<String>,
}

impl Lease {
    pub fn broadcast(&self) -> Ipv4Addr {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Addr::from(u32::from(self.address) | !mask)
    }
}

/// A lease shorter than this is taken as this long: renewing every few seconds helps nobody.
const MIN_LEASE: Duration = Duration::from_secs(60);
/// Bigger datagrams are not DHCP replies we asked for.
const MAX_REPLY: usize = 1500;

/// Runs the exchange until a lease is granted or `within` has passed; the DISCOVER asks for
/// `prefer` (the address the machine had) if given.
pub fn acquire(
    iface: &Interface,
    within: Duration,
    prefer: Option<Ipv4Addr>,
) -> Result<Lease, DhcpError> {
    let socket = bind(iface)?;
    let deadline = Instant::now() + within;
    let xid = transaction_id(iface);
    let mut wait = Duration::from_secs(1);
    let mut discover = request_message(iface, xid, None);
    if let Some(address) = prefer {
        discover
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(address));
    }
    while Instant::now() < deadline {
        send(&socket, iface, &discover)?;
        let offer = receive(
            &socket,
            iface,
            xid,
            MessageType::Offer,
            wait.min(left(deadline)),
        )?;
        if let Some(offer) = offer {
            let lease = parse_lease(&offer);
            if let Some(offered) = lease {
                send(
                    &socket,
                    iface,
                    &request_message(iface, xid, Some((offered.address, offered.server))),
                )?;
                match receive(
                    &socket,
                    iface,
                    xid,
                    MessageType::Ack,
                    Duration::from_secs(4),
                )? {
                    Some(ack) => {
                        if let Some(lease) = parse_lease(&ack) {
                            return Ok(lease);
                        }
                    }
                    None => continue,
                }
            }
        }
        // RFC 2131's backoff: doubling, at most 64 s.
        wait = (wait * 2).min(Duration::from_secs(64));
    }
    Err(DhcpError::NoAnswer {
        iface: iface.name.clone(),
        secs: within.as_secs(),
    })
}

/// Asks to keep `lease`'s address (RFC 2131's INIT-REBOOT: a broadcast REQUEST naming it),
/// three times, `wait` for each answer: the server's ACK renews it, a NAK or silence means
/// starting over with [`acquire`].
pub fn renew(iface: &Interface, lease: &Lease, wait: Duration) -> Result<Lease, DhcpError> {
    let socket = bind(iface)?;
    let xid = transaction_id(iface);
    let mut msg = request_message(iface, xid, Some((lease.address, lease.server)));
    // INIT-REBOOT names no server: any server of the network may answer for the address.
    msg.opts_mut().remove(OptionCode::ServerIdentifier);
    for _ in 0..3 {
        send(&socket, iface, &msg)?;
        if let Some(ack) = receive(&socket, iface, xid, MessageType::Ack, wait)? {
            if let Some(renewed) = parse_lease(&ack) {
                return Ok(renewed);
            }
        }
    }
    Err(DhcpError::NoAnswer {
        iface: iface.name.clone(),
        secs: wait.as_secs() * 3,
    })
}

fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10))
}

fn bind(iface: &Interface) -> Result<UdpSocket, DhcpError> {
    let failed = |source| DhcpError::Socket {
        iface: iface.name.clone(),
        source,
    };
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(failed)?;
    socket.set_reuse_address(true).map_err(failed)?;
    socket.set_broadcast(true).map_err(failed)?;
    socket
        .bind_device(Some(iface.name.as_bytes()))
        .map_err(failed)?;
    socket
        .bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68).into())
        .map_err(failed)?;
    Ok(socket.into())
}

/// Unique enough per machine and boot: the MAC address's low bytes and fresh randomness.
fn transaction_id(iface: &Interface) -> u32 {
    let mut random = [0u8; 4];
    let _ = rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty());
    u32::from_be_bytes(random)
        ^ u32::from_be_bytes([iface.mac[2], iface.mac[3], iface.mac[4], iface.mac[5]])
}

/// A DISCOVER, or with `chosen` (address, server) the REQUEST for an offer.
fn request_message(iface: &Interface, xid: u32, chosen: Option<(Ipv4Addr, Ipv4Addr)>) -> Message {
    let any = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(xid, any, any, any, any, &iface.mac);
    msg.set_flags(v4::Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    let kind = if chosen.is_some() {
        MessageType::Request
    } else {
        MessageType::Discover
    };
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&iface.mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::Hostname,
        OptionCode::AddressLeaseTime,
    ]));
    if let Some((address, server)) = chosen {
        opts.insert(DhcpOption::RequestedIpAddress(address));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    msg
}

fn send(socket: &UdpSocket, iface: &Interface, msg: &Message) -> Result<(), DhcpError> {
    let bytes = msg.to_vec().map_err(|e| DhcpError::Socket {
        iface: iface.name.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    socket
        .send_to(&bytes, SocketAddrV4::new(Ipv4Addr::BROADCAST, 67))
        .map_err(|source| DhcpError::Socket {
            iface: iface.name.clone(),
            source,
        })?;
    Ok(())
}

/// The first reply of `kind` to our transaction within `wait`; a NAK ends the wait with an
/// error, anything else (other clients' replies, garbage) is ignored.
fn receive(
    socket: &UdpSocket,
    iface: &Interface,
    xid: u32,
    kind: MessageType,
    wait: Duration,
) -> Result<Option<Message>, DhcpError> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; MAX_REPLY];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(left(deadline)))
            .map_err(|source| DhcpError::Socket {
                iface: iface.name.clone(),
                source,
            })?;
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(DhcpError::Socket {
                    iface: iface.name.clone(),
                    source,
                })
            }
        };
        let Some(reply) = reply_to(&buf[..n], xid, &iface.mac) else {
            continue;
        };
        match reply.opts().msg_type() {
            Some(t) if t == kind => return Ok(Some(reply)),
            Some(MessageType::Nak) => {
                return Err(DhcpError::Refused {
                    server: server_of(&reply).unwrap_or(Ipv4Addr::UNSPECIFIED),
                    address: reply.yiaddr(),
                })
            }
            _ => continue,
        }
    }
    Ok(None)
}

/// A datagram, parsed, if it is a server's reply to transaction `xid` of the client with `mac`.
pub fn reply_to(bytes: &[u8], xid: u32, mac: &[u8; 6]) -> Option<Message> {
    Message::from_bytes(bytes)
        .ok()
        .filter(|reply| is_reply_to(reply, xid, mac))
}

fn is_reply_to(reply: &Message, xid: u32, mac: &[u8; 6]) -> bool {
    // `chaddr()` slices by the message's own hardware length: check it before calling (a
    // hostile reply's length past 16 would panic there).
    reply.opcode() == v4::Opcode::BootReply
        && reply.xid() == xid
        && reply.htype() == v4::HType::Eth
        && reply.hlen() == 6
        && reply.chaddr() == &mac[..]
}

fn server_of(reply: &Message) -> Option<Ipv4Addr> {
    match reply.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

/// The lease an OFFER or ACK grants, if it is one a host can use.
pub fn parse_lease(reply: &Message) -> Option<Lease> {
    let address = reply.yiaddr();
    if address.is_unspecified()
        || address.is_broadcast()
        || address.is_multicast()
        || address.is_loopback()
    {
        return None;
    }
    let server = server_of(reply).unwrap_or(reply.siaddr());
    let opts = reply.opts();
    let prefix = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => prefix_of(*mask)?,
        _ => default_prefix(address),
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(routers)) => routers
            .iter()
            .copied()
            .find(|r| !r.is_unspecified() && !r.is_broadcast() && !r.is_multicast()),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(list)) => list.iter().copied().take(3).collect(),
        _ => vec![],
    };
    let duration = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(secs)) => Duration::from_secs(u64::from(*secs)),
        _ => Duration::from_secs(3600),
    }
    .max(MIN_LEASE);
    let hostname = match opts.get(OptionCode::Hostname) {
        Some(DhcpOption::Hostname(name)) => valid_hostname(name),
        _ => None,
    };
    Some(Lease {
        address,
        prefix,
        router,
        dns,
        server,
        duration,
        hostname,
    })
}

/// A mask's prefix length, if it is contiguous ones and not /0.
fn prefix_of(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    (bits.checked_shl(prefix).unwrap_or(0) == 0 && prefix >= 1).then_some(prefix as u8)
}

/// The classful prefix, for a server that sends no mask.
fn default_prefix(address: Ipv4Addr) -> u8 {
    match address.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// A host name the server suggests, if it is one (RFC 1123 labels, at most 63 characters here).
fn valid_hostname(name: &str) -> Option<String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let first = name.split('.').next()?;
    (first.len() <= 63 && label_ok(first)).then(|| first.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface() -> Interface {
        Interface {
            name: "eth0".into(),
            index: 2,
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        }
    }

    /// A server's reply to `request`, as slirp's would be.
    fn reply(request: &Message, kind: MessageType, options: Vec<DhcpOption>) -> Message {
        let any = Ipv4Addr::UNSPECIFIED;
        let mut msg = Message::new_with_id(
            request.xid(),
            any,
            Ipv4Addr::new(10, 0, 2, 15),
            Ipv4Addr::new(10, 0, 2, 2),
            any,
            &request.chaddr()[..6],
        );
        msg.set_opcode(v4::Opcode::BootReply);
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in options {
            msg.opts_mut().insert(o);
        }
        msg
    }

    #[test]
    fn a_discover_asks_for_broadcast_replies_and_names_the_client() {
        let msg = request_message(&iface(), 7, None);
        let parsed = Message::from_bytes(&msg.to_vec().unwrap()).unwrap();
        assert_eq!(parsed.opts().msg_type(), Some(MessageType::Discover));
        assert!(parsed.flags().broadcast());
        assert_eq!(&parsed.chaddr()[..6], &iface().mac);
        let req = request_message(
            &iface(),
            7,
            Some((Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2))),
        );
        assert_eq!(req.opts().msg_type(), Some(MessageType::Request));
        assert!(req.opts().get(OptionCode::RequestedIpAddress).is_some());
    }

    #[test]
    fn a_lease_is_read_and_checked() {
        let req = request_message(&iface(), 9, None);
        let ack = reply(
            &req,
            MessageType::Ack,
            vec![
                DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)),
                DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 2, 2)]),
                DhcpOption::DomainNameServer(vec![Ipv4Addr::new(10, 0, 2, 3)]),
                DhcpOption::AddressLeaseTime(86400),
                DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 2, 2)),
                DhcpOption::Hostname("Node-7.lab".into()),
            ],
        );
        assert!(is_reply_to(&ack, 9, &iface().mac));
        assert!(!is_reply_to(&ack, 10, &iface().mac));
        let lease = parse_lease(&ack).unwrap();
        assert_eq!(lease.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(lease.prefix, 24);
        assert_eq!(lease.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(lease.hostname.as_deref(), Some("node-7"));
        assert_eq!(lease.broadcast(), Ipv4Addr::new(10, 0, 2, 255));
        // A server's odd values: a non-contiguous mask is no lease; a 1 s lease is a minute.
        let odd = reply(
            &req,
            MessageType::Ack,
            vec![DhcpOption::SubnetMask(Ipv4Addr::new(255, 0, 255, 0))],
        );
        assert_eq!(parse_lease(&odd), None);
        let short = reply(
            &req,
            MessageType::Ack,
            vec![DhcpOption::AddressLeaseTime(1)],
        );
        assert_eq!(parse_lease(&short).unwrap().duration, MIN_LEASE);
        assert_eq!(parse_lease(&short).unwrap().prefix, 8);
        let bad_name = reply(
            &req,
            MessageType::Ack,
            vec![DhcpOption::Hostname("-x;rm".into())],
        );
        assert_eq!(parse_lease(&bad_name).unwrap().hostname, None);
    }

    #[test]
    fn masks() {
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 252)), Some(30));
        assert_eq!(prefix_of(Ipv4Addr::new(0, 0, 0, 0)), None);
        assert_eq!(prefix_of(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(prefix_of(Ipv4Addr::new(255, 0, 255, 0)), None);
    }

    #[test]
    fn garbage_is_not_a_reply() {
        let req = request_message(&iface(), 9, None);
        // A reply to our transaction whose hardware length says 255 (chaddr is 16 bytes).
        let mut bytes = reply(&req, MessageType::Offer, vec![]).to_vec().unwrap();
        bytes[2] = 255;
        let hostile = Message::from_bytes(&bytes).unwrap();
        assert_eq!(hostile.xid(), 9);
        assert!(!is_reply_to(&hostile, 9, &iface().mac));
        bytes[2] = 6;
        bytes[1] = 32; // not Ethernet
        assert!(!is_reply_to(
            &Message::from_bytes(&bytes).unwrap(),
            9,
            &iface().mac
        ));
        bytes[1] = 1;
        assert!(is_reply_to(
            &Message::from_bytes(&bytes).unwrap(),
            9,
            &iface().mac
        ));
        // Truncations of a real reply never panic, whatever they parse to.
        for len in 0..bytes.len() {
            if let Ok(msg) = Message::from_bytes(&bytes[..len]) {
                let _ = is_reply_to(&msg, 9, &iface().mac) && parse_lease(&msg).is_some();
            }
        }
    }
}
