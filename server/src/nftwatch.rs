//! nftables change notifications: a netlink socket in the multicast group `NFNLGRP_NFTABLES`
//! tells the engine the moment anyone changes a nat chain it cares about, so drift is repaired
//! within milliseconds instead of at the next poll. Parsing is pure ([`relevant_families`]); the
//! socket lives in one thread that forwards [`KernelEvent`]s.
//!
//! Only rule, chain and table messages of the `ip`/`ip6` nat table that touch `KILO-NAT` or
//! `POSTROUTING` count: kube-proxy rewriting its own chains costs the engine nothing.

use kilo_egress_api::egress::Family;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use std::collections::BTreeSet;
use std::io;

use crate::rules::{KILO_NAT, POSTROUTING};

/// The nf_tables multicast group (`NFNLGRP_NFTABLES` in linux/netfilter/nfnetlink.h).
const NFNLGRP_NFTABLES: u32 = 7;
/// The nfnetlink subsystem of nf_tables (`NFNL_SUBSYS_NFTABLES`).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// Message types of linux/netfilter/nf_tables.h that this module reads.
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
/// Attribute numbers: the table name is 1 in tables, chains and rules; the chain name is 3 in
/// chain messages and 2 in rule messages.
const NFTA_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_CHAIN: u16 = 2;
/// `nfgenmsg.nfgen_family` values.
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
/// netlink header sizes.
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
/// `ENOBUFS`: the socket's receive buffer overflowed and messages were dropped.
const ENOBUFS: i32 = 105;
/// Receive buffer requested for bursts (kube-proxy rewriting thousands of rules).
const RECEIVE_BUFFER: usize = 4 << 20;

/// What the notification thread tells the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    /// Something changed in these families' nat chains of interest (both when messages were
    /// lost and it is not known which).
    Changed(BTreeSet<Family>),
    /// The socket failed; no more notifications will come.
    Lost(String),
}

/// The families whose `KILO-NAT` or `POSTROUTING` (or whole nat table) a datagram of nfnetlink
/// messages changes. Malformed or unrelated messages are skipped.
pub fn relevant_families(datagram: &[u8]) -> BTreeSet<Family> {
    let mut families = BTreeSet::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let length = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        if length < NLMSG_HDRLEN || length > rest.len() {
            break;
        }
        let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
        if let Some(family) = relevant_message(kind, &rest[NLMSG_HDRLEN..length]) {
            families.insert(family);
        }
        rest = &rest[align4(length).min(rest.len())..];
    }
    families
}

/// The family a single nf_tables message changes, when it touches a chain of interest.
fn relevant_message(kind: u16, payload: &[u8]) -> Option<Family> {
    if kind >> 8 != NFNL_SUBSYS_NFTABLES || payload.len() < NFGENMSG_LEN {
        return None;
    }
    let family = match payload[0] {
        NFPROTO_IPV4 => Family::Ipv4,
        NFPROTO_IPV6 => Family::Ipv6,
        _ => return None,
    };
    let attrs = attributes(&payload[NFGENMSG_LEN..]);
    let text = |wanted: u16| -> Option<&[u8]> {
        attrs
            .iter()
            .find(|(kind, _)| *kind == wanted)
            .map(|(_, value)| value.split(|b| *b == 0).next().unwrap_or_default())
    };
    let chain_of_interest = |name: Option<&[u8]>| {
        name.is_some_and(|n| n == KILO_NAT.as_bytes() || n == POSTROUTING.as_bytes())
    };
    let in_nat = text(NFTA_TABLE) == Some(b"nat".as_slice());
    let relevant = in_nat
        && match kind & 0xff {
            NFT_MSG_NEWTABLE | NFT_MSG_DELTABLE => true,
            NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN => chain_of_interest(text(NFTA_CHAIN_NAME)),
            NFT_MSG_NEWRULE | NFT_MSG_DELRULE => chain_of_interest(text(NFTA_RULE_CHAIN)),
            _ => false,
        };
    relevant.then_some(family)
}

/// The top-level netlink attributes of a message body as (type, value) pairs.
fn attributes(mut body: &[u8]) -> Vec<(u16, &[u8])> {
    let mut attrs = Vec::new();
    while body.len() >= 4 {
        let length = u16::from_ne_bytes([body[0], body[1]]) as usize;
        // The top two bits are flags (nested, network byte order).
        let kind = u16::from_ne_bytes([body[2], body[3]]) & 0x3fff;
        if length < 4 || length > body.len() {
            break;
        }
        attrs.push((kind, &body[4..length]));
        body = &body[align4(length).min(body.len())..];
    }
    attrs
}

fn align4(length: usize) -> usize {
    (length + 3) & !3
}

/// A netlink socket subscribed to nf_tables notifications in the current network namespace.
pub struct Subscription {
    socket: Socket,
}

/// Opens the socket and joins the group. Fails without CAP_NET_ADMIN or without nf_tables.
pub fn subscribe() -> io::Result<Subscription> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind(&SocketAddr::new(0, 0))?;
    socket.add_membership(NFNLGRP_NFTABLES)?;
    // Best effort: a small buffer only means more "lost, re-check everything" events.
    let _ = socket.set_rx_buf_sz(RECEIVE_BUFFER);
    Ok(Subscription { socket })
}

impl Subscription {
    /// Forwards events from a thread of its own until `forward` returns false (the engine is
    /// gone) or the socket fails.
    pub fn spawn(self, mut forward: impl FnMut(KernelEvent) -> bool + Send + 'static) {
        let spawned = std::thread::Builder::new()
            .name("nft-notify".into())
            .spawn(move || {
                let mut buffer = vec![0u8; 1 << 16];
                loop {
                    let event = match self.socket.recv(&mut &mut buffer[..], 0) {
                        Ok(length) => {
                            let families = relevant_families(&buffer[..length]);
                            if families.is_empty() {
                                continue;
                            }
                            KernelEvent::Changed(families)
                        }
                        // The kernel dropped messages: which chains changed is unknown.
                        Err(e) if e.raw_os_error() == Some(ENOBUFS) => {
                            KernelEvent::Changed(Family::ALL.into_iter().collect())
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            forward(KernelEvent::Lost(e.to_string()));
                            return;
                        }
                    };
                    if !forward(event) {
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the notification thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds one nfnetlink message as the kernel sends it.
    fn message(kind: u16, family: u8, attrs: &[(u16, &str)]) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        for (attr, value) in attrs {
            let mut value = value.as_bytes().to_vec();
            value.push(0);
            body.extend(((4 + value.len()) as u16).to_ne_bytes());
            body.extend(attr.to_ne_bytes());
            body.extend(&value);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut msg = Vec::new();
        msg.extend(((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        msg.extend(((NFNL_SUBSYS_NFTABLES << 8) | kind).to_ne_bytes());
        msg.extend([0u8; 10]);
        msg.extend(body);
        msg
    }

    fn rule(family: u8, table: &str, chain: &str) -> Vec<u8> {
        message(
            NFT_MSG_DELRULE,
            family,
            &[(NFTA_TABLE, table), (NFTA_RULE_CHAIN, chain)],
        )
    }

    #[test]
    fn rule_changes_in_our_chains_count() {
        assert_eq!(
            relevant_families(&rule(NFPROTO_IPV4, "nat", "KILO-NAT")),
            BTreeSet::from([Family::Ipv4])
        );
        assert_eq!(
            relevant_families(&rule(NFPROTO_IPV6, "nat", "POSTROUTING")),
            BTreeSet::from([Family::Ipv6])
        );
    }

    #[test]
    fn foreign_chains_tables_and_families_do_not() {
        for msg in [
            rule(NFPROTO_IPV4, "nat", "KUBE-SVC-ABCDEF"),
            rule(NFPROTO_IPV4, "filter", "KILO-NAT"),
            rule(1, "nat", "KILO-NAT"),
            message(15, NFPROTO_IPV4, &[]),
        ] {
            assert!(relevant_families(&msg).is_empty(), "{msg:?}");
        }
    }

    #[test]
    fn chain_and_table_messages_count() {
        let chain = message(
            NFT_MSG_DELCHAIN,
            NFPROTO_IPV4,
            &[(NFTA_TABLE, "nat"), (NFTA_CHAIN_NAME, "KILO-NAT")],
        );
        let table = message(NFT_MSG_DELTABLE, NFPROTO_IPV6, &[(NFTA_TABLE, "nat")]);
        let mut both = chain.clone();
        both.extend(&table);
        assert_eq!(
            relevant_families(&both),
            BTreeSet::from([Family::Ipv4, Family::Ipv6])
        );
    }

    #[test]
    fn truncated_input_is_ignored() {
        let msg = rule(NFPROTO_IPV4, "nat", "KILO-NAT");
        assert!(relevant_families(&msg[..msg.len() - 6]).is_empty());
        assert!(relevant_families(&[1, 2, 3]).is_empty());
    }
}
