//! Property tests of the parsing and conversion every request and annotation goes through:
//! nothing panics on any input, an error always names the bad entry, a valid pair survives the
//! trip through its wire form, and the rules of kilo issue #361 hold for every list.

use kilo_egress_api::egress::{
    EgressAddrs, Family, InvalidEgress, MAX_ENTRIES, parse_addr, parse_annotation,
    parse_egress_list,
};
use kilo_egress_api::pb;
use proptest::prelude::*;
use std::net::IpAddr;

/// Any address at all, valid or not as an egress address.
fn any_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u16; 8]>().prop_map(IpAddr::from),
    ]
}

/// Entries as requests carry them: addresses, near-addresses and garbage.
fn any_entry() -> impl Strategy<Value = String> {
    prop_oneof![
        any_addr().prop_map(|a| a.to_string()),
        any_addr().prop_map(|a| format!("{a}/32")),
        any_addr().prop_map(|a| format!(" {a}")),
        "[0-9a-f:.%/ ]{0,50}",
        ".{0,80}",
    ]
}

proptest! {
    #[test]
    fn parsing_never_panics_and_errors_name_the_entry(entries in prop::collection::vec(any_entry(), 0..20)) {
        match parse_egress_list(&entries) {
            Ok(parsed) => {
                prop_assert!(entries.len() <= MAX_ENTRIES);
                // Every entry was a valid address; the first of each family was chosen.
                let addrs: Vec<IpAddr> = entries.iter().map(|e| e.parse().unwrap()).collect();
                for family in Family::ALL {
                    let first = addrs.iter().find(|a| Family::of(a) == family).copied();
                    prop_assert_eq!(parsed.addrs.get(family), first);
                }
                prop_assert_eq!(parsed.ignored.len() + usize::from(parsed.addrs.ipv4.is_some()) + usize::from(parsed.addrs.ipv6.is_some()), entries.len());
            }
            Err(InvalidEgress::TooMany { count }) => prop_assert!(count > MAX_ENTRIES),
            Err(InvalidEgress::Entry { position, entry, .. }) => {
                prop_assert!(position >= 1 && position <= entries.len());
                let given = &entries[position - 1];
                prop_assert!(given.starts_with(entry.trim_end_matches('…')), "{:?} vs {:?}", given, entry);
                prop_assert!(parse_addr(given).is_err());
                // Every entry before it was fine.
                for earlier in &entries[..position - 1] {
                    prop_assert!(parse_addr(earlier).is_ok());
                }
            }
        }
    }

    #[test]
    fn a_valid_pair_survives_the_wire_and_the_annotation(a in any_addr(), b in any_addr()) {
        let entries = [a.to_string(), b.to_string()];
        if let Ok(parsed) = parse_egress_list(&entries) {
            let wire = pb::EgressPair::from(&parsed.addrs);
            prop_assert_eq!(EgressAddrs::try_from(&wire), Ok(parsed.addrs));
            let annotation = parse_annotation(&format!(" {} ,{} ", a, b)).unwrap();
            prop_assert_eq!(annotation.addrs, parsed.addrs);
        }
    }

    #[test]
    fn wire_pairs_never_panic(ipv4 in ".{0,60}", ipv6 in ".{0,60}") {
        let _ = EgressAddrs::try_from(&pb::EgressPair { ipv4, ipv6 });
    }

    #[test]
    fn enums_convert_or_name_the_number(value in any::<i32>()) {
        match Family::try_from(value) {
            Ok(family) => prop_assert_eq!(pb::Family::from(family) as i32, value),
            Err(e) => prop_assert!(e.to_string().contains(&value.to_string())),
        }
    }
}
