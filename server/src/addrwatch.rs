//! The node's addresses, followed through rtnetlink: one dump at start, then the kernel's
//! `RTM_NEWADDR`/`RTM_DELADDR` notifications, so the engine knows at once whether a chosen egress
//! address is on an interface of this network namespace. An IPv6 address is usable only once
//! duplicate address detection is over (not tentative) and did not fail; a link going down
//! removes nothing (the address stays assigned). Parsing and bookkeeping are pure
//! ([`NodeAddresses::apply`]); the socket lives in one thread that forwards each changed view.

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::IpAddr;

/// `RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR` (linux/rtnetlink.h).
const ADDRESS_GROUPS: u32 = 0x10 | 0x100;

/// Whether an address can be the source of egress traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Presence {
    /// Not assigned to any interface of the node.
    Absent,
    /// IPv6 duplicate address detection found another holder.
    DadFailed,
    /// IPv6 duplicate address detection is still running.
    Tentative,
    /// Assigned and usable.
    Usable,
}

impl Presence {
    /// Whether packets may leave with this address as their source.
    pub fn is_usable(self) -> bool {
        self == Presence::Usable
    }
}

impl fmt::Display for Presence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Presence::Absent => "is not assigned to any interface",
            Presence::DadFailed => "failed duplicate address detection",
            Presence::Tentative => "is still in duplicate address detection",
            Presence::Usable => "is assigned",
        })
    }
}

/// Every address of the node's interfaces, with its state, keyed by interface and address:
/// the same address on two interfaces is two entries, and removing one leaves the other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    entries: BTreeMap<(u32, IpAddr), Presence>,
}

impl NodeAddresses {
    /// The state of `addr`: the best of its entries, [`Presence::Absent`] without one.
    pub fn presence(&self, addr: IpAddr) -> Presence {
        self.entries
            .iter()
            .filter(|((_, a), _)| *a == addr)
            .map(|(_, presence)| *presence)
            .max()
            .unwrap_or(Presence::Absent)
    }

    /// The state of every address, as the engine compares it: moving an address from one
    /// interface to another leaves this unchanged.
    pub fn view(&self) -> BTreeMap<IpAddr, Presence> {
        let mut view = BTreeMap::new();
        for ((_, addr), presence) in &self.entries {
            let best = view.entry(*addr).or_insert(*presence);
            *best = (*best).max(*presence);
        }
        view
    }

    /// Records one address message: a new or changed address (`added`) or a removed one.
    pub fn apply(&mut self, message: &AddressMessage, added: bool) {
        let Some(addr) = address_of(message) else {
            return;
        };
        let key = (message.header.index, addr);
        if added {
            self.entries.insert(key, presence_of(message));
        } else {
            self.entries.remove(&key);
        }
    }

    /// Records every address message in one netlink datagram; true when any was seen.
    pub fn apply_datagram(&mut self, datagram: &[u8]) -> bool {
        let mut seen = false;
        let mut rest = datagram;
        while rest.len() >= 16 {
            let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            if length < 16 || length > rest.len() {
                break;
            }
            if let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..length])
                && let NetlinkPayload::InnerMessage(inner) = message.payload
            {
                match inner {
                    RouteNetlinkMessage::NewAddress(m) => {
                        self.apply(&m, true);
                        seen = true;
                    }
                    RouteNetlinkMessage::DelAddress(m) => {
                        self.apply(&m, false);
                        seen = true;
                    }
                    _ => {}
                }
            }
            rest = &rest[align4(length).min(rest.len())..];
        }
        seen
    }
}

fn align4(length: usize) -> usize {
    (length + 3) & !3
}

/// The local address of a message: `IFA_LOCAL` where present (IPv4, where `IFA_ADDRESS` is the
/// peer of a point-to-point link), else `IFA_ADDRESS`.
fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(addr) => Some(*addr),
        _ => None,
    });
    local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(addr) => Some(*addr),
            _ => None,
        })
    })
}

/// Tentative or failed duplicate address detection, from the 32-bit `IFA_FLAGS` attribute when
/// present, else from the header's 8 bits (the same bit values).
fn presence_of(message: &AddressMessage) -> Presence {
    let flags = message
        .attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(flags) => Some(*flags),
            _ => None,
        })
        .unwrap_or_else(|| AddressFlags::from_bits_retain(message.header.flags.bits().into()));
    if flags.contains(AddressFlags::Dadfailed) {
        Presence::DadFailed
    } else if flags.contains(AddressFlags::Tentative) {
        Presence::Tentative
    } else {
        Presence::Usable
    }
}

/// A route netlink socket subscribed to address changes, with the addresses dumped after
/// subscribing (so no change between the two goes unseen).
pub struct AddressSubscription {
    socket: Socket,
    addresses: NodeAddresses,
}

/// Subscribes to address changes and dumps the node's addresses.
pub fn subscribe() -> io::Result<AddressSubscription> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, ADDRESS_GROUPS))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetAddress(AddressMessage::default())),
    );
    request.finalize();
    let mut buffer = vec![0; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0)?;
    let mut addresses = NodeAddresses::default();
    let mut datagram = Vec::with_capacity(64 * 1024);
    loop {
        datagram.clear();
        socket.recv(&mut datagram, 0)?;
        addresses.apply_datagram(&datagram);
        if dump_done(&datagram)? {
            break;
        }
    }
    Ok(AddressSubscription { socket, addresses })
}

/// Whether a datagram ends the dump (`NLMSG_DONE`); an `NLMSG_ERROR` fails it.
fn dump_done(datagram: &[u8]) -> io::Result<bool> {
    let mut rest = datagram;
    while rest.len() >= 16 {
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if length < 16 || length > rest.len() {
            break;
        }
        match kind {
            3 => return Ok(true), // NLMSG_DONE
            2 => {
                // NLMSG_ERROR: a negative errno follows the header.
                let errno = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno));
                }
            }
            _ => {}
        }
        rest = &rest[align4(length).min(rest.len())..];
    }
    Ok(false)
}

impl AddressSubscription {
    /// The addresses as dumped at subscription.
    pub fn addresses(&self) -> &NodeAddresses {
        &self.addresses
    }

    /// Forwards the node's addresses after every change until `forward` returns false; on a
    /// socket error forwards `Err` once and stops.
    pub fn spawn(
        self,
        mut forward: impl FnMut(Result<NodeAddresses, String>) -> bool + Send + 'static,
    ) {
        let AddressSubscription {
            mut socket,
            mut addresses,
        } = self;
        std::thread::Builder::new()
            .name("address-watch".into())
            .spawn(move || {
                let mut datagram = Vec::with_capacity(64 * 1024);
                loop {
                    datagram.clear();
                    if let Err(e) = socket.recv(&mut datagram, 0) {
                        // ENOBUFS: notifications were lost; a new subscription and dump
                        // resynchronise.
                        match subscribe_again(&e) {
                            Ok(fresh) => {
                                (socket, addresses) = (fresh.socket, fresh.addresses);
                                if !forward(Ok(addresses.clone())) {
                                    return;
                                }
                                continue;
                            }
                            Err(why) => {
                                forward(Err(why));
                                return;
                            }
                        }
                    }
                    if addresses.apply_datagram(&datagram) && !forward(Ok(addresses.clone())) {
                        return;
                    }
                }
            })
            .expect("spawn address-watch thread");
    }
}

/// After a receive error: a new subscription and dump, or why that failed too.
fn subscribe_again(error: &io::Error) -> Result<AddressSubscription, String> {
    subscribe().map_err(|again| {
        format!("address notifications failed ({error}) and a new subscription failed ({again})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::AddressFamily;
    use netlink_packet_route::address::AddressHeaderFlags;

    fn message(index: u32, addr: &str, flags: AddressFlags) -> AddressMessage {
        let addr: IpAddr = addr.parse().unwrap();
        let mut m = AddressMessage::default();
        m.header.index = index;
        m.header.family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        m.header.flags = AddressHeaderFlags::from_bits_truncate(flags.bits() as u8);
        m.attributes.push(AddressAttribute::Address(addr));
        m.attributes.push(AddressAttribute::Flags(flags));
        m
    }

    fn datagram(messages: &[(AddressMessage, bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (m, added) in messages {
            let inner = if *added {
                RouteNetlinkMessage::NewAddress(m.clone())
            } else {
                RouteNetlinkMessage::DelAddress(m.clone())
            };
            let mut message = NetlinkMessage::new(NetlinkHeader::default(), inner.into());
            message.finalize();
            let mut buffer = vec![0; message.buffer_len()];
            message.serialize(&mut buffer);
            out.extend_from_slice(&buffer);
        }
        out
    }

    const V4: &str = "198.51.100.20";
    const V6: &str = "2001:db8:2::20";

    #[test]
    fn an_address_is_usable_while_one_interface_holds_it() {
        let mut node = NodeAddresses::default();
        let ip: IpAddr = V4.parse().unwrap();
        assert_eq!(node.presence(ip), Presence::Absent);
        assert!(node.apply_datagram(&datagram(&[(
            message(2, V4, AddressFlags::Permanent),
            true
        )])));
        assert_eq!(node.presence(ip), Presence::Usable);
        // Moved: added on interface 3, then removed from 2. The view never loses it.
        let before = node.view();
        node.apply_datagram(&datagram(&[(
            message(3, V4, AddressFlags::Permanent),
            true,
        )]));
        node.apply_datagram(&datagram(&[(
            message(2, V4, AddressFlags::Permanent),
            false,
        )]));
        assert_eq!(node.view(), before);
        node.apply_datagram(&datagram(&[(
            message(3, V4, AddressFlags::Permanent),
            false,
        )]));
        assert_eq!(node.presence(ip), Presence::Absent);
    }

    #[test]
    fn ipv6_is_usable_only_after_duplicate_address_detection() {
        let mut node = NodeAddresses::default();
        let ip: IpAddr = V6.parse().unwrap();
        node.apply_datagram(&datagram(&[(
            message(2, V6, AddressFlags::Tentative),
            true,
        )]));
        assert_eq!(node.presence(ip), Presence::Tentative);
        assert!(!node.presence(ip).is_usable());
        node.apply_datagram(&datagram(&[(
            message(2, V6, AddressFlags::Permanent),
            true,
        )]));
        assert_eq!(node.presence(ip), Presence::Usable);
        node.apply_datagram(&datagram(&[(
            message(2, V6, AddressFlags::Tentative | AddressFlags::Dadfailed),
            true,
        )]));
        assert_eq!(node.presence(ip), Presence::DadFailed);
    }

    #[test]
    fn header_flags_count_without_the_flags_attribute() {
        let mut m = message(2, V6, AddressFlags::Tentative);
        m.attributes
            .retain(|a| !matches!(a, AddressAttribute::Flags(_)));
        let mut node = NodeAddresses::default();
        node.apply(&m, true);
        assert_eq!(node.presence(V6.parse().unwrap()), Presence::Tentative);
    }

    #[test]
    fn ipv4_local_wins_over_the_peer_address() {
        let mut m = message(2, "192.0.2.99", AddressFlags::Permanent);
        m.attributes
            .push(AddressAttribute::Local(V4.parse().unwrap()));
        let mut node = NodeAddresses::default();
        node.apply(&m, true);
        assert_eq!(node.presence(V4.parse().unwrap()), Presence::Usable);
        assert_eq!(
            node.presence("192.0.2.99".parse().unwrap()),
            Presence::Absent
        );
    }

    #[test]
    fn garbage_and_truncated_datagrams_change_nothing() {
        let mut node = NodeAddresses::default();
        assert!(!node.apply_datagram(&[0xff; 40]));
        let good = datagram(&[(message(2, V4, AddressFlags::Permanent), true)]);
        assert!(!node.apply_datagram(&good[..good.len() - 4]));
        assert_eq!(node, NodeAddresses::default());
    }

    #[test]
    fn the_dump_ends_at_done_and_fails_on_an_error() {
        let mut done = vec![0u8; 20];
        done[..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&3u16.to_ne_bytes());
        assert!(dump_done(&done).unwrap());
        let mut error = done.clone();
        error[4..6].copy_from_slice(&2u16.to_ne_bytes());
        error[16..20].copy_from_slice(&(-1i32).to_ne_bytes());
        assert!(dump_done(&error).is_err());
    }
}
