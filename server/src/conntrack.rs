//! Conntrack entries of an old egress decision (`--conntrack-flush`): parsing a
//! `conntrack -L -o extended,id` listing, choosing the flows the old decision NATed and only
//! those, the sources that jump to KILO-NAT in kilo mode, and the ctnetlink message that deletes
//! one entry by its exact tuple and id. Pure: nothing here runs a process or opens a socket
//! (`crate::ctflush` does, off the engine thread).
//!
//! A flow is chosen when its original source is one of the NATed sources, it was source-NATed
//! (the reply goes to another address than the one that sent it), it was not destination-NATed
//! (kube-proxy's service NAT: the reply comes from another address or port than the one
//! addressed), and its NATed source is the old decision's: the SNAT address, or, for MASQUERADE,
//! any address but the new SNAT address. Everything else of the node stays: its own
//! connections, service NAT, and flows to destinations that were never NATed.

use ipnet::IpNet;
use kilo_egress_api::egress::Family;
use std::fmt;
use std::net::IpAddr;

use crate::rules::{KILO_NAT, Rule, tokenize};

/// What a family programs: SNAT to an address, or MASQUERADE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `-j MASQUERADE` (ours, or kg's in kilo mode).
    Masquerade,
    /// `-j SNAT --to-source ADDR`.
    Snat(IpAddr),
}

impl From<Option<IpAddr>> for Decision {
    fn from(addr: Option<IpAddr>) -> Decision {
        addr.map_or(Decision::Masquerade, Decision::Snat)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Masquerade => f.write_str("MASQUERADE"),
            Decision::Snat(addr) => write!(f, "SNAT to {addr}"),
        }
    }
}

/// The layer-4 part of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP, UDP, UDP-Lite, SCTP, DCCP.
    Ports {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
    },
    /// ICMP and ICMPv6.
    Icmp {
        /// Message type.
        kind: u8,
        /// Message code.
        code: u8,
        /// Identifier.
        id: u16,
    },
    /// A protocol whose tuple this module does not know (GRE keys, ...): never deleted.
    Other,
}

/// One direction of a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Ports or ICMP fields.
    pub l4: L4,
}

/// One conntrack entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its family.
    pub family: Family,
    /// The IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    /// The original direction, as the pod sent it.
    pub orig: Tuple,
    /// The reply direction, as NAT rewrote it.
    pub reply: Tuple,
    /// The conntrack zone, when not the default one.
    pub zone: Option<u16>,
    /// The entry's id (`-o id`): a delete by tuple and id never hits a newer entry of the same
    /// tuple.
    pub id: Option<u32>,
}

impl Entry {
    /// The reply goes to another address than the one that sent it: SNAT or MASQUERADE.
    pub fn source_natted(&self) -> bool {
        self.reply.dst != self.orig.src
    }

    /// The reply comes from another address or port than the one addressed: DNAT.
    pub fn destination_natted(&self) -> bool {
        if self.orig.dst != self.reply.src {
            return true;
        }
        match (self.orig.l4, self.reply.l4) {
            (L4::Ports { dst, .. }, L4::Ports { src, .. }) => dst != src,
            _ => false,
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (o, r) = (&self.orig, &self.reply);
        match (o.l4, r.l4) {
            (L4::Ports { src, dst }, L4::Ports { dst: rdst, .. }) => write!(
                f,
                "proto {} {}:{src} > {}:{dst} NATed to {}:{rdst}",
                self.protocol, o.src, o.dst, r.dst
            ),
            _ => write!(
                f,
                "proto {} {} > {} NATed to {}",
                self.protocol, o.src, o.dst, r.dst
            ),
        }
    }
}

/// Parses a `conntrack -L -f FAMILY -o extended,id` listing; lines that are no entry (the
/// summary line, an unknown family) are skipped.
pub fn parse_listing(listing: &str) -> Vec<Entry> {
    listing.lines().filter_map(parse_line).collect()
}

/// Parses one entry line, e.g. `ipv4 2 udp 17 29 src=10.4.0.2 dst=192.0.2.1 sport=54356
/// dport=9000 [UNREPLIED] src=192.0.2.1 dst=198.51.100.20 sport=9000 dport=54356 mark=0 use=1
/// id=1807765879`.
pub fn parse_line(line: &str) -> Option<Entry> {
    let mut words = line.split_whitespace();
    let family = match words.next()? {
        "ipv4" => Family::Ipv4,
        "ipv6" => Family::Ipv6,
        _ => return None,
    };
    let _l3num = words.next()?;
    let _name = words.next()?;
    let protocol: u8 = words.next()?.parse().ok()?;
    // Tuple fields come as key=value; the second `src=` starts the reply tuple; after it, the
    // first key that is no tuple field ends the tuples, and a later `id=` is the entry's id.
    let mut tuples: [Vec<(&str, &str)>; 2] = [Vec::new(), Vec::new()];
    let mut direction = None;
    let mut id = None;
    let mut zone = None;
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        match (key, direction) {
            ("src", None) => direction = Some(0),
            ("src", Some(0)) => direction = Some(1),
            _ => {}
        }
        let tuple_field = matches!(
            key,
            "src" | "dst" | "sport" | "dport" | "type" | "code" | "id"
        );
        match direction {
            Some(d) if d < 2 && tuple_field => tuples[d].push((key, value)),
            // A field of the original tuple this module does not read (`srckey=` of GRE).
            Some(0) => {}
            Some(_) => {
                direction = Some(2);
                match key {
                    "id" => id = value.parse().ok(),
                    "zone" => zone = value.parse().ok(),
                    _ => {}
                }
            }
            None => {}
        }
    }
    let [orig, reply] = tuples;
    Some(Entry {
        family,
        protocol,
        orig: tuple(&orig)?,
        reply: tuple(&reply)?,
        zone,
        id,
    })
}

fn tuple(fields: &[(&str, &str)]) -> Option<Tuple> {
    let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    let src = get("src")?.parse().ok()?;
    let dst = get("dst")?.parse().ok()?;
    let l4 = match (
        get("sport"),
        get("dport"),
        get("type"),
        get("code"),
        get("id"),
    ) {
        (Some(s), Some(d), ..) => L4::Ports {
            src: s.parse().ok()?,
            dst: d.parse().ok()?,
        },
        (None, None, Some(t), Some(c), Some(i)) => L4::Icmp {
            kind: t.parse().ok()?,
            code: c.parse().ok()?,
            id: i.parse().ok()?,
        },
        _ => L4::Other,
    };
    Some(Tuple { src, dst, l4 })
}

/// What to delete after a family's decision changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The sources whose traffic the family NATs.
    pub sources: Vec<IpNet>,
    /// The decisions replaced since the last deletion (one, unless switches came quickly).
    pub old: Vec<Decision>,
    /// The decision now programmed: flows it NATed stay.
    pub new: Decision,
}

impl Selection {
    /// Whether `entry` is a flow an old decision NATed (and the new one did not).
    pub fn chooses(&self, entry: &Entry) -> bool {
        let natted_by = |decision: &Decision| match decision {
            Decision::Snat(addr) => entry.reply.dst == *addr,
            Decision::Masquerade => true,
        };
        entry.orig.l4 != L4::Other
            && self.sources.iter().any(|net| net.contains(&entry.orig.src))
            && entry.source_natted()
            && !entry.destination_natted()
            && self.old.iter().any(natted_by)
            && !matches!(self.new, Decision::Snat(addr) if entry.reply.dst == addr)
    }

    /// The entries of `entries` to delete.
    pub fn select<'a>(&self, entries: &'a [Entry]) -> Vec<&'a Entry> {
        entries.iter().filter(|e| self.chooses(e)).collect()
    }
}

/// Kilo mode: the sources of the POSTROUTING rules of `family` that jump to KILO-NAT (kg's
/// `-s <pod subnet> ... -j KILO-NAT`); a jump without `-s` NATs every source.
pub fn jump_sources(postrouting: &[Rule], family: Family) -> Vec<IpNet> {
    let any = match family {
        Family::Ipv4 => "0.0.0.0/0",
        Family::Ipv6 => "::/0",
    };
    postrouting
        .iter()
        .filter(|rule| rule.target().as_deref() == Some(KILO_NAT))
        .filter_map(|rule| {
            let tokens = tokenize(&rule.args);
            let source = tokens
                .iter()
                .position(|t| t == "-s")
                .and_then(|i| tokens.get(i + 1))
                .map_or(any, String::as_str);
            source.parse().ok()
        })
        .collect()
}

// ctnetlink (linux/netfilter/nfnetlink_conntrack.h).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLA_F_NESTED: u16 = 0x8000;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// One netlink attribute: header, payload, padding to 4 bytes.
fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(len.next_multiple_of(4), 0);
    out
}

fn nested(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
    attr(kind | NLA_F_NESTED, &children.concat())
}

fn ip_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The ctnetlink request that deletes `entry`: its original tuple, its zone, and its id when
/// the listing had one (the kernel then refuses with ENOENT if the tuple now belongs to a newer
/// entry). `None` for a protocol whose tuple is not known ([`L4::Other`]).
pub fn delete_message(entry: &Entry, seq: u32) -> Option<Vec<u8>> {
    let o = &entry.orig;
    let src_attr = match o.src {
        IpAddr::V4(_) => CTA_IP_V4_SRC,
        IpAddr::V6(_) => CTA_IP_V6_SRC,
    };
    let ip = nested(
        CTA_TUPLE_IP,
        &[
            attr(src_attr, &ip_bytes(o.src)),
            attr(src_attr + 1, &ip_bytes(o.dst)),
        ],
    );
    let mut proto = vec![attr(CTA_PROTO_NUM, &[entry.protocol])];
    match o.l4 {
        L4::Ports { src, dst } => {
            proto.push(attr(CTA_PROTO_SRC_PORT, &src.to_be_bytes()));
            proto.push(attr(CTA_PROTO_DST_PORT, &dst.to_be_bytes()));
        }
        L4::Icmp { kind, code, id } => {
            let (id_attr, type_attr, code_attr) = match entry.family {
                Family::Ipv4 => (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE),
                Family::Ipv6 => (
                    CTA_PROTO_ICMPV6_ID,
                    CTA_PROTO_ICMPV6_TYPE,
                    CTA_PROTO_ICMPV6_CODE,
                ),
            };
            proto.push(attr(id_attr, &id.to_be_bytes()));
            proto.push(attr(type_attr, &[kind]));
            proto.push(attr(code_attr, &[code]));
        }
        L4::Other => return None,
    }
    let mut attrs = vec![nested(
        CTA_TUPLE_ORIG,
        &[ip, nested(CTA_TUPLE_PROTO, &proto)],
    )];
    if let Some(zone) = entry.zone {
        attrs.push(attr(CTA_ZONE, &zone.to_be_bytes()));
    }
    if let Some(id) = entry.id {
        attrs.push(attr(CTA_ID, &id.to_be_bytes()));
    }
    let family = match entry.family {
        Family::Ipv4 => AF_INET,
        Family::Ipv6 => AF_INET6,
    };
    // nfgenmsg: family, version 0, resource id 0.
    let body = [vec![family, 0, 0, 0], attrs.concat()].concat();
    let len = 16 + body.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend(body);
    Some(msg)
}

/// The answer to a request with `NLM_F_ACK`: `Some((seq, errno))` for an `NLMSG_ERROR`
/// message (errno 0 is the acknowledgement), `None` for anything else.
pub fn parse_ack(datagram: &[u8]) -> Option<(u32, i32)> {
    let word = |at: usize| -> Option<[u8; 4]> { datagram.get(at..at + 4)?.try_into().ok() };
    let kind = u16::from_ne_bytes(datagram.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    let seq = u32::from_ne_bytes(word(8)?);
    let error = i32::from_ne_bytes(word(16)?);
    Some((seq, -error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::parse_listing as parse_rules;

    /// Captured on this project's lab (pod 10.4.0.2 → node → upstream 192.0.2.1) with
    /// `conntrack -L -f ipv4 -o extended,id`, the node SNATing 10.4.0.0/16 to 198.51.100.20:
    /// a DNATed service flow (10.96.0.10:53 → 192.0.2.1:5353, also SNATed), an ICMP echo, the
    /// node's own flow, a TCP connection, a flow to a destination KILO-NAT RETURNs, a UDP flow.
    const IPV4_SNAT: &str = include_str!("../testdata/conntrack/ipv4-snat.txt");
    /// The same lab, IPv6 under MASQUERADE (fd00:4::/64 → 2001:db8:1::10): the node's own flow,
    /// a TCP connection, a UDP flow, an ICMPv6 echo.
    const IPV6_MASQUERADE: &str = include_str!("../testdata/conntrack/ipv6-masquerade.txt");

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn chosen(listing: &str, selection: &Selection) -> Vec<String> {
        let entries = parse_listing(listing);
        selection
            .select(&entries)
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn parses_every_entry_of_a_real_listing() {
        let v4 = parse_listing(IPV4_SNAT);
        assert_eq!(v4.len(), 6);
        assert_eq!(
            v4[0],
            Entry {
                family: Family::Ipv4,
                protocol: 17,
                orig: Tuple {
                    src: ip("10.4.0.2"),
                    dst: ip("10.96.0.10"),
                    l4: L4::Ports {
                        src: 51253,
                        dst: 53
                    },
                },
                reply: Tuple {
                    src: ip("192.0.2.1"),
                    dst: ip("198.51.100.20"),
                    l4: L4::Ports {
                        src: 5353,
                        dst: 51253
                    },
                },
                zone: None,
                id: Some(617477981),
            }
        );
        // ICMP: the tuple's id= is not the entry's id=.
        assert_eq!(
            v4[1].orig.l4,
            L4::Icmp {
                kind: 8,
                code: 0,
                id: 4660
            }
        );
        assert_eq!(v4[1].id, Some(2985781653));
        assert_eq!(v4[3].protocol, 6);
        let v6 = parse_listing(IPV6_MASQUERADE);
        assert_eq!(v6.len(), 4);
        assert!(v6.iter().all(|e| e.family == Family::Ipv6));
        assert_eq!(
            v6[3].orig.l4,
            L4::Icmp {
                kind: 128,
                code: 0,
                id: 17185
            }
        );
        assert_eq!(v6[3].id, Some(1678478633));
        assert!(parse_listing("conntrack v1.4.7 (conntrack-tools): 3 flow entries").is_empty());
    }

    #[test]
    fn zone_and_listing_without_ids() {
        let e = parse_line(
            "ipv4     2 udp      17 29 src=10.4.0.2 dst=192.0.2.1 sport=45136 dport=9000 [UNREPLIED] src=192.0.2.1 dst=192.0.2.10 sport=9000 dport=45136 mark=0 zone=3 use=1",
        )
        .unwrap();
        assert_eq!((e.zone, e.id), (Some(3), None));
    }

    #[test]
    fn snat_to_the_old_address_chooses_pod_flows_only() {
        let selection = Selection {
            sources: vec![net("10.4.0.0/16")],
            old: vec![Decision::Snat(ip("198.51.100.20"))],
            new: Decision::Masquerade,
        };
        assert_eq!(
            chosen(IPV4_SNAT, &selection),
            [
                "proto 1 10.4.0.2 > 192.0.2.1 NATed to 198.51.100.20",
                "proto 6 10.4.0.2:39638 > 192.0.2.1:7000 NATed to 198.51.100.20:39638",
                "proto 17 10.4.0.2:54356 > 192.0.2.1:9000 NATed to 198.51.100.20:54356",
            ],
            "not the service flow (DNAT), not the node's own flow, not the RETURNed flow"
        );
    }

    #[test]
    fn other_sources_and_other_addresses_stay() {
        let other_source = Selection {
            sources: vec![net("10.5.0.0/16")],
            old: vec![Decision::Snat(ip("198.51.100.20"))],
            new: Decision::Masquerade,
        };
        assert!(chosen(IPV4_SNAT, &other_source).is_empty());
        let other_address = Selection {
            sources: vec![net("10.4.0.0/16")],
            old: vec![Decision::Snat(ip("198.51.100.21"))],
            new: Decision::Masquerade,
        };
        assert!(chosen(IPV4_SNAT, &other_address).is_empty());
    }

    #[test]
    fn masquerade_chooses_pod_flows_but_not_those_already_on_the_new_address() {
        let selection = Selection {
            sources: vec![net("fd00:4::/64")],
            old: vec![Decision::Masquerade],
            new: Decision::Snat(ip("2001:db8:2::20")),
        };
        assert_eq!(
            chosen(IPV6_MASQUERADE, &selection),
            [
                "proto 6 fd00:4::2:39348 > 2001:db8:1::1:7000 NATed to 2001:db8:1::10:39348",
                "proto 17 fd00:4::2:40387 > 2001:db8:1::1:9002 NATed to 2001:db8:1::10:40387",
                "proto 58 fd00:4::2 > 2001:db8:1::1 NATed to 2001:db8:1::10",
            ]
        );
        // Flows a quick earlier switch already put on the new address stay.
        let on_new = Selection {
            sources: vec![net("fd00:4::/64")],
            old: vec![Decision::Masquerade],
            new: Decision::Snat(ip("2001:db8:1::10")),
        };
        assert!(chosen(IPV6_MASQUERADE, &on_new).is_empty());
    }

    #[test]
    fn kilo_mode_sources_are_the_jumps_to_kilo_nat() {
        let postrouting = parse_rules(concat!(
            "-P POSTROUTING ACCEPT\n",
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
            "-A POSTROUTING -s 10.4.0.0/24 -m comment --comment \"Kilo: jump to KILO-NAT chain\" -j KILO-NAT\n",
            "-A POSTROUTING -s 10.4.1.0/24 -j KILO-NAT\n",
        ));
        let rules: Vec<Rule> = postrouting.into_iter().map(|o| o.rule).collect();
        assert_eq!(
            jump_sources(&rules, Family::Ipv4),
            [net("10.4.0.0/24"), net("10.4.1.0/24")]
        );
        let any = parse_rules("-A POSTROUTING -j KILO-NAT\n");
        let any: Vec<Rule> = any.into_iter().map(|o| o.rule).collect();
        assert_eq!(jump_sources(&any, Family::Ipv6), [net("::/0")]);
    }

    #[test]
    fn delete_message_names_the_tuple_and_the_id() {
        let entries = parse_listing(IPV4_SNAT);
        let msg = delete_message(&entries[5], 7).unwrap();
        let expected: Vec<u8> = [
            &(msg.len() as u32).to_ne_bytes()[..],
            &0x0102u16.to_ne_bytes(),
            &5u16.to_ne_bytes(),
            &7u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
            &[2, 0, 0, 0],
            // CTA_TUPLE_ORIG { CTA_TUPLE_IP { src, dst }, CTA_TUPLE_PROTO { 17, sport, dport } }
            &52u16.to_ne_bytes(),
            &0x8001u16.to_ne_bytes(),
            &20u16.to_ne_bytes(),
            &0x8001u16.to_ne_bytes(),
            &8u16.to_ne_bytes(),
            &1u16.to_ne_bytes(),
            &[10, 4, 0, 2],
            &8u16.to_ne_bytes(),
            &2u16.to_ne_bytes(),
            &[192, 0, 2, 1],
            &28u16.to_ne_bytes(),
            &0x8002u16.to_ne_bytes(),
            &5u16.to_ne_bytes(),
            &1u16.to_ne_bytes(),
            &[17, 0, 0, 0],
            &6u16.to_ne_bytes(),
            &2u16.to_ne_bytes(),
            &54356u16.to_be_bytes(),
            &[0, 0],
            &6u16.to_ne_bytes(),
            &3u16.to_ne_bytes(),
            &9000u16.to_be_bytes(),
            &[0, 0],
            // CTA_ID
            &8u16.to_ne_bytes(),
            &12u16.to_ne_bytes(),
            &1807765879u32.to_be_bytes(),
        ]
        .concat();
        assert_eq!(msg, expected);
        let icmp6 = &parse_listing(IPV6_MASQUERADE)[3];
        let msg = delete_message(icmp6, 1).unwrap();
        assert_eq!(msg[16], 10, "AF_INET6");
    }

    #[test]
    fn unknown_protocols_are_never_chosen_nor_deleted() {
        let gre = parse_line(
            "ipv4     2 gre      47 179 src=10.4.0.2 dst=192.0.2.1 srckey=0x0 dstkey=0x0 src=192.0.2.1 dst=192.0.2.10 srckey=0x0 dstkey=0x0 mark=0 use=1 id=5",
        )
        .unwrap();
        assert_eq!(gre.orig.l4, L4::Other);
        let selection = Selection {
            sources: vec![net("10.4.0.0/16")],
            old: vec![Decision::Masquerade],
            new: Decision::Snat(ip("198.51.100.20")),
        };
        assert!(!selection.chooses(&gre));
        assert!(delete_message(&gre, 1).is_none());
    }

    #[test]
    fn acks_are_read_with_their_errno() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&2u16.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&9u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-2i32).to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        assert_eq!(parse_ack(&ack), Some((9, 2)));
        assert_eq!(parse_ack(&ack[..10]), None);
    }
}
