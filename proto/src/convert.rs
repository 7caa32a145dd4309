//! The one place where domain values ([`Family`], [`Mode`], [`EgressAddrs`]) and their protobuf
//! wire forms are mapped to each other, for the server and every client alike. Wire values that
//! have no domain meaning convert to a named error: [`UnknownEnum`] for an unspecified or unknown
//! enum number, [`InvalidEgress`] for a pair that does not parse.

use crate::egress::{EgressAddrs, Family, InvalidEgress, Mode, parse_egress_list};
use crate::pb;

/// An enum field holds `UNSPECIFIED` or a number this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is {value}, which is not a known {field}")]
pub struct UnknownEnum {
    /// The enum's name (`family`, `mode`).
    pub field: &'static str,
    /// The number on the wire.
    pub value: i32,
}

impl From<Family> for pb::Family {
    fn from(family: Family) -> pb::Family {
        match family {
            Family::Ipv4 => pb::Family::Ipv4,
            Family::Ipv6 => pb::Family::Ipv6,
        }
    }
}

impl TryFrom<i32> for Family {
    type Error = UnknownEnum;

    /// Reads a `kilo.egress.v1.Family` field.
    fn try_from(value: i32) -> Result<Family, UnknownEnum> {
        match pb::Family::try_from(value) {
            Ok(pb::Family::Ipv4) => Ok(Family::Ipv4),
            Ok(pb::Family::Ipv6) => Ok(Family::Ipv6),
            _ => Err(UnknownEnum {
                field: "family",
                value,
            }),
        }
    }
}

impl From<Mode> for pb::Mode {
    fn from(mode: Mode) -> pb::Mode {
        match mode {
            Mode::Own => pb::Mode::Own,
            Mode::Kilo => pb::Mode::Kilo,
        }
    }
}

impl TryFrom<i32> for Mode {
    type Error = UnknownEnum;

    /// Reads a `kilo.egress.v1.Mode` field.
    fn try_from(value: i32) -> Result<Mode, UnknownEnum> {
        match pb::Mode::try_from(value) {
            Ok(pb::Mode::Own) => Ok(Mode::Own),
            Ok(pb::Mode::Kilo) => Ok(Mode::Kilo),
            _ => Err(UnknownEnum {
                field: "mode",
                value,
            }),
        }
    }
}

impl From<&EgressAddrs> for pb::EgressPair {
    /// An empty string stands for "no address: MASQUERADE".
    fn from(addrs: &EgressAddrs) -> pb::EgressPair {
        pb::EgressPair {
            ipv4: addrs.ipv4.map(|a| a.to_string()).unwrap_or_default(),
            ipv6: addrs.ipv6.map(|a| a.to_string()).unwrap_or_default(),
        }
    }
}

impl TryFrom<&pb::EgressPair> for EgressAddrs {
    type Error = InvalidEgress;

    /// Empty strings mean "none"; any other entry must be a valid egress address.
    fn try_from(pair: &pb::EgressPair) -> Result<EgressAddrs, InvalidEgress> {
        let entries: Vec<&str> = [pair.ipv4.as_str(), pair.ipv6.as_str()]
            .into_iter()
            .filter(|entry| !entry.is_empty())
            .collect();
        Ok(parse_egress_list(&entries)?.addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_modes_round_trip() {
        for family in Family::ALL {
            let wire = pb::Family::from(family) as i32;
            assert_eq!(Family::try_from(wire), Ok(family));
        }
        for mode in [Mode::Own, Mode::Kilo] {
            let wire = pb::Mode::from(mode) as i32;
            assert_eq!(Mode::try_from(wire), Ok(mode));
        }
    }

    #[test]
    fn unspecified_enums_are_named() {
        let error = Family::try_from(pb::Family::Unspecified as i32).unwrap_err();
        assert_eq!(
            error.to_string(),
            "family is 0, which is not a known family"
        );
        assert!(Mode::try_from(7).is_err());
    }

    #[test]
    fn pairs_round_trip_and_empty_means_none() {
        let addrs = EgressAddrs {
            ipv4: Some("198.51.100.20".parse().unwrap()),
            ipv6: None,
        };
        let wire = pb::EgressPair::from(&addrs);
        assert_eq!(wire.ipv6, "");
        assert_eq!(EgressAddrs::try_from(&wire), Ok(addrs));
        assert_eq!(
            EgressAddrs::try_from(&pb::EgressPair::default()),
            Ok(EgressAddrs::NONE)
        );
        let bad = pb::EgressPair {
            ipv4: "not an address".into(),
            ipv6: String::new(),
        };
        assert!(EgressAddrs::try_from(&bad).is_err());
    }
}
