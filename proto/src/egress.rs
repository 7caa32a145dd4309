//! The egress address pair and the parser for lists of egress addresses.
//!
//! Rules (kilo issue #361): at most one IPv4 and one IPv6 address, in either order; when several
//! of one family are given, the first wins and the others are reported as ignored. Every entry
//! must be a plain unicast address: no prefix length, no hostname, no zone id, no whitespace.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The most entries one request or annotation may carry.
pub const MAX_ENTRIES: usize = 16;
/// The longest entry accepted, in bytes (the longest IPv6 text form is 45).
pub const MAX_ENTRY_LEN: usize = 64;

/// An IP address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (iptables).
    Ipv4,
    /// IPv6 (ip6tables).
    Ipv6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        })
    }
}

/// Who writes the chain `KILO-NAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// kilo-egressd writes the whole chain and the POSTROUTING jumps into it.
    Own,
    /// Kilo's agent writes the chain; kilo-egressd keeps one SNAT rule before its MASQUERADE.
    Kilo,
}

impl fmt::Display for Mode {
    /// The mode as the command line spells it: `own` or `kilo`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Own => "own",
            Mode::Kilo => "kilo",
        })
    }
}

/// The chosen egress source address per family; `None` means MASQUERADE for that family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EgressAddrs {
    /// The IPv4 source address, if one is chosen.
    pub ipv4: Option<Ipv4Addr>,
    /// The IPv6 source address, if one is chosen.
    pub ipv6: Option<Ipv6Addr>,
}

impl EgressAddrs {
    /// No address chosen: MASQUERADE for both families.
    pub const NONE: EgressAddrs = EgressAddrs {
        ipv4: None,
        ipv6: None,
    };

    /// The chosen address of one family.
    pub fn get(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::Ipv4 => self.ipv4.map(IpAddr::V4),
            Family::Ipv6 => self.ipv6.map(IpAddr::V6),
        }
    }

    /// True when neither family has an address chosen.
    pub fn is_empty(&self) -> bool {
        self.ipv4.is_none() && self.ipv6.is_none()
    }
}

impl fmt::Display for EgressAddrs {
    /// Formats as `ipv4=198.51.100.20 ipv6=MASQUERADE`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show =
            |a: Option<IpAddr>| a.map_or_else(|| "MASQUERADE".to_string(), |a| a.to_string());
        write!(
            f,
            "ipv4={} ipv6={}",
            show(self.get(Family::Ipv4)),
            show(self.get(Family::Ipv6))
        )
    }
}

/// The result of parsing a list of egress addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedEgress {
    /// The chosen pair.
    pub addrs: EgressAddrs,
    /// Valid addresses that were not used because an earlier one of the same family was.
    pub ignored: Vec<IpAddr>,
}

impl ParsedEgress {
    /// One human-readable warning per ignored address.
    pub fn warnings(&self) -> Vec<String> {
        self.ignored
            .iter()
            .map(|ignored| {
                let family = Family::of(ignored);
                let used = self
                    .addrs
                    .get(family)
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                format!("ignored {ignored}: only the first {family} address is used ({used})")
            })
            .collect()
    }
}

/// Why an egress entry was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidReason {
    /// The entry is the empty string.
    Empty,
    /// The entry is longer than [`MAX_ENTRY_LEN`].
    TooLong,
    /// The entry has whitespace or control characters around or inside it.
    Whitespace,
    /// The entry carries a prefix length such as `/32`.
    Prefix,
    /// The entry carries an IPv6 zone id such as `%eth0`.
    ZoneId,
    /// The entry looks like a host name; names are not resolved.
    Hostname,
    /// The entry is not an IP address at all.
    NotAnAddress,
    /// `0.0.0.0` or `::`.
    Unspecified,
    /// `127.0.0.0/8` or `::1`.
    Loopback,
    /// `224.0.0.0/4` or `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `169.254.0.0/16` or `fe80::/10`.
    LinkLocal,
    /// `::ffff:0:0/96`: an IPv4 address written as IPv6.
    Ipv4Mapped,
    /// `0.0.0.0/8`, `240.0.0.0/4` or the deprecated IPv4-compatible `::/96`.
    Reserved,
}

impl fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InvalidReason::Empty => "is empty",
            InvalidReason::TooLong => "is too long to be an IP address",
            InvalidReason::Whitespace => {
                "contains whitespace or control characters; give the bare address"
            }
            InvalidReason::Prefix => {
                "is a prefix, not an address; give the plain address without /N"
            }
            InvalidReason::ZoneId => {
                "has a zone id (%...); zoned link-local addresses cannot be egress addresses"
            }
            InvalidReason::Hostname => {
                "is a host name; give an IP address (names are not resolved)"
            }
            InvalidReason::NotAnAddress => "is not a valid IPv4 or IPv6 address",
            InvalidReason::Unspecified => "is the unspecified address",
            InvalidReason::Loopback => "is a loopback address",
            InvalidReason::Multicast => "is a multicast address",
            InvalidReason::Broadcast => "is the broadcast address",
            InvalidReason::LinkLocal => "is a link-local address",
            InvalidReason::Ipv4Mapped => {
                "is an IPv4-mapped IPv6 address; give the IPv4 address itself"
            }
            InvalidReason::Reserved => {
                "is in a reserved range (0.0.0.0/8, 240.0.0.0/4, ::/96) and cannot be a source address"
            }
        })
    }
}

/// An entry that is not a usable egress address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEgress {
    /// One entry is invalid.
    #[error("egress address #{position} {entry:?} {reason}")]
    Entry {
        /// 1-based position of the entry in the list.
        position: usize,
        /// The entry as given (shortened when very long).
        entry: String,
        /// What is wrong with it.
        reason: InvalidReason,
    },
    /// The list has more entries than allowed.
    #[error(
        "too many egress addresses: {count} given, at most {MAX_ENTRIES} accepted (only one IPv4 and one IPv6 are used)"
    )]
    TooMany {
        /// How many entries were given.
        count: usize,
    },
}

/// Parses one entry as a plain unicast IP address usable as an egress source.
pub fn parse_addr(entry: &str) -> Result<IpAddr, InvalidReason> {
    if entry.is_empty() {
        return Err(InvalidReason::Empty);
    }
    if entry.len() > MAX_ENTRY_LEN {
        return Err(InvalidReason::TooLong);
    }
    if entry.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InvalidReason::Whitespace);
    }
    if entry.contains('/') {
        return Err(InvalidReason::Prefix);
    }
    if entry.contains('%') {
        return Err(InvalidReason::ZoneId);
    }
    let addr: IpAddr = entry.parse().map_err(|_| {
        let hostname_like = entry.starts_with(|c: char| c.is_ascii_alphabetic())
            && !entry.contains(':')
            && entry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if hostname_like {
            InvalidReason::Hostname
        } else {
            InvalidReason::NotAnAddress
        }
    })?;
    check_unicast(addr).map(|()| addr)
}

fn check_unicast(addr: IpAddr) -> Result<(), InvalidReason> {
    if addr.is_unspecified() {
        return Err(InvalidReason::Unspecified);
    }
    if addr.is_loopback() {
        return Err(InvalidReason::Loopback);
    }
    if addr.is_multicast() {
        return Err(InvalidReason::Multicast);
    }
    match addr {
        IpAddr::V4(v4) if v4.is_broadcast() => Err(InvalidReason::Broadcast),
        IpAddr::V4(v4) if v4.is_link_local() => Err(InvalidReason::LinkLocal),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Err(InvalidReason::LinkLocal),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Err(InvalidReason::Ipv4Mapped),
        IpAddr::V4(v4) if v4.octets()[0] == 0 || v4.octets()[0] >= 240 => {
            Err(InvalidReason::Reserved)
        }
        IpAddr::V6(v6) if v6.segments()[..6] == [0; 6] => Err(InvalidReason::Reserved),
        _ => Ok(()),
    }
}

/// Parses a list of egress addresses (as a request carries them): every entry is checked, the
/// first address of each family is chosen, later ones are ignored. An empty list clears.
pub fn parse_egress_list<S: AsRef<str>>(entries: &[S]) -> Result<ParsedEgress, InvalidEgress> {
    if entries.len() > MAX_ENTRIES {
        return Err(InvalidEgress::TooMany {
            count: entries.len(),
        });
    }
    let mut parsed = ParsedEgress::default();
    for (index, entry) in entries.iter().enumerate() {
        let entry = entry.as_ref();
        let addr = parse_addr(entry).map_err(|reason| InvalidEgress::Entry {
            position: index + 1,
            entry: shorten(entry),
            reason,
        })?;
        match addr {
            IpAddr::V4(v4) if parsed.addrs.ipv4.is_none() => parsed.addrs.ipv4 = Some(v4),
            IpAddr::V6(v6) if parsed.addrs.ipv6.is_none() => parsed.addrs.ipv6 = Some(v6),
            other => parsed.ignored.push(other),
        }
    }
    Ok(parsed)
}

/// Parses the value of the node annotation `kilo.squat.ai/egress-ip`: a comma-separated list,
/// spaces around entries tolerated. An empty or all-blank value clears.
pub fn parse_annotation(value: &str) -> Result<ParsedEgress, InvalidEgress> {
    if value.trim().is_empty() {
        return Ok(ParsedEgress::default());
    }
    let entries: Vec<&str> = value.split(',').map(str::trim).collect();
    parse_egress_list(&entries)
}

fn shorten(entry: &str) -> String {
    const SHOWN: usize = MAX_ENTRY_LEN;
    if entry.len() <= SHOWN {
        return entry.to_string();
    }
    let mut cut = SHOWN;
    while !entry.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &entry[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(entry: &str) -> InvalidReason {
        parse_addr(entry).expect_err(entry)
    }

    #[test]
    fn accepts_plain_unicast_addresses() {
        for ok in [
            "198.51.100.20",
            "192.0.2.10",
            "10.0.0.1",
            "2001:db8::20",
            "2001:DB8:0::20",
            "fd00::1",
        ] {
            assert!(parse_addr(ok).is_ok(), "{ok} should be accepted");
        }
    }

    #[test]
    fn rejects_each_invalid_kind_with_its_reason() {
        let cases = [
            ("", InvalidReason::Empty),
            ("198.51.100.20/32", InvalidReason::Prefix),
            ("2001:db8::/64", InvalidReason::Prefix),
            ("node-a.example", InvalidReason::Hostname),
            ("localhost", InvalidReason::Hostname),
            (" 198.51.100.20", InvalidReason::Whitespace),
            ("198.51.100.20\n", InvalidReason::Whitespace),
            ("198.51.100.20x", InvalidReason::NotAnAddress),
            ("[2001:db8::1]", InvalidReason::NotAnAddress),
            ("198.51.100.256", InvalidReason::NotAnAddress),
            ("fe80::1%eth0", InvalidReason::ZoneId),
            ("0.0.0.0", InvalidReason::Unspecified),
            ("::", InvalidReason::Unspecified),
            ("127.0.0.1", InvalidReason::Loopback),
            ("127.1.2.3", InvalidReason::Loopback),
            ("::1", InvalidReason::Loopback),
            ("224.0.0.1", InvalidReason::Multicast),
            ("ff02::1", InvalidReason::Multicast),
            ("255.255.255.255", InvalidReason::Broadcast),
            ("169.254.1.1", InvalidReason::LinkLocal),
            ("fe80::1", InvalidReason::LinkLocal),
            ("::ffff:192.0.2.1", InvalidReason::Ipv4Mapped),
            ("0.1.2.3", InvalidReason::Reserved),
            ("240.0.0.1", InvalidReason::Reserved),
            ("::192.0.2.1", InvalidReason::Reserved),
        ];
        for (entry, expected) in cases {
            assert_eq!(reason(entry), expected, "entry {entry:?}");
        }
        assert_eq!(reason(&"1".repeat(65)), InvalidReason::TooLong);
    }

    #[test]
    fn first_address_of_each_family_wins_in_either_order() {
        let parsed = parse_egress_list(&["2001:db8::20", "198.51.100.20"]).unwrap();
        assert_eq!(parsed.addrs.ipv4, Some("198.51.100.20".parse().unwrap()));
        assert_eq!(parsed.addrs.ipv6, Some("2001:db8::20".parse().unwrap()));
        assert!(parsed.ignored.is_empty());

        let parsed = parse_egress_list(&[
            "198.51.100.20",
            "198.51.100.21",
            "2001:db8::20",
            "2001:db8::21",
        ])
        .unwrap();
        assert_eq!(parsed.addrs.ipv4, Some("198.51.100.20".parse().unwrap()));
        assert_eq!(parsed.ignored.len(), 2);
        let warnings = parsed.warnings();
        assert!(warnings[0].contains("198.51.100.21"), "{warnings:?}");
        assert!(warnings[1].contains("2001:db8::21"), "{warnings:?}");
    }

    #[test]
    fn empty_list_clears() {
        let parsed = parse_egress_list::<&str>(&[]).unwrap();
        assert!(parsed.addrs.is_empty());
    }

    #[test]
    fn error_names_entry_position_and_reason() {
        let err = parse_egress_list(&["198.51.100.20", "198.51.100.21/32"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("#2"), "{text}");
        assert!(text.contains("\"198.51.100.21/32\""), "{text}");
        assert!(text.contains("prefix"), "{text}");
    }

    #[test]
    fn bounds_the_number_of_entries() {
        let many = vec!["198.51.100.20"; MAX_ENTRIES + 1];
        assert!(matches!(
            parse_egress_list(&many),
            Err(InvalidEgress::TooMany { count }) if count == MAX_ENTRIES + 1
        ));
    }

    #[test]
    fn annotation_tolerates_spaces_and_either_order() {
        let parsed = parse_annotation(" 2001:db8::20 , 198.51.100.20 ").unwrap();
        assert_eq!(
            parsed.addrs.to_string(),
            "ipv4=198.51.100.20 ipv6=2001:db8::20"
        );
        assert!(parse_annotation("  ").unwrap().addrs.is_empty());
        assert!(parse_annotation("198.51.100.20,,2001:db8::1").is_err());
    }
}
