//! The watcher's decision, kept pure: from the annotation's value and the pair kilo-egressd
//! reports, what to do. No I/O here, so every case is a plain unit test.

use kilo_egress_api::egress::{EgressAddrs, InvalidEgress, ParsedEgress, parse_annotation};

/// What the watcher does for one observation of the annotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// kilo-egressd already programs what the annotation says: no call.
    InSync,
    /// Call SetEgress with this pair (an empty pair clears: MASQUERADE again).
    Apply(ParsedEgress),
    /// The annotation is invalid: report it and keep whatever is programmed now.
    Reject(InvalidEgress),
}

/// Decides what to do when the node's annotation is `annotation` (`None`: absent) and
/// kilo-egressd programs `current`. An absent or blank annotation means "no egress address":
/// MASQUERADE for both families.
pub fn decide(annotation: Option<&str>, current: &EgressAddrs) -> Action {
    let parsed = match parse_annotation(annotation.unwrap_or("")) {
        Ok(parsed) => parsed,
        Err(invalid) => return Action::Reject(invalid),
    };
    if parsed.addrs == *current {
        Action::InSync
    } else {
        Action::Apply(parsed)
    }
}

/// The SetEgress request entries for a pair: the IPv4 address first, then the IPv6 one; none
/// for a cleared pair.
pub fn request_entries(addrs: &EgressAddrs) -> Vec<String> {
    [
        addrs.ipv4.map(|a| a.to_string()),
        addrs.ipv6.map(|a| a.to_string()),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// A pair as an event note and log field shows it: `198.51.100.20, 2001:db8::20`, one family
/// only, or `none (MASQUERADE)`.
pub fn describe(addrs: &EgressAddrs) -> String {
    let entries = request_entries(addrs);
    if entries.is_empty() {
        "none (MASQUERADE)".to_string()
    } else {
        entries.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kilo_egress_api::egress::InvalidReason;

    fn pair(ipv4: Option<&str>, ipv6: Option<&str>) -> EgressAddrs {
        EgressAddrs {
            ipv4: ipv4.map(|a| a.parse().unwrap()),
            ipv6: ipv6.map(|a| a.parse().unwrap()),
        }
    }

    fn applied(action: Action) -> EgressAddrs {
        match action {
            Action::Apply(parsed) => parsed.addrs,
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    #[test]
    fn added_annotation_applies_the_pair() {
        let action = decide(Some("198.51.100.20,2001:db8::20"), &EgressAddrs::NONE);
        assert_eq!(
            applied(action),
            pair(Some("198.51.100.20"), Some("2001:db8::20"))
        );
    }

    #[test]
    fn changed_annotation_applies_the_new_pair() {
        let current = pair(Some("198.51.100.20"), None);
        let action = decide(Some("198.51.100.21"), &current);
        assert_eq!(applied(action), pair(Some("198.51.100.21"), None));
    }

    #[test]
    fn unchanged_annotation_is_in_sync_in_any_spelling() {
        let current = pair(Some("198.51.100.20"), Some("2001:db8::20"));
        for value in [
            "198.51.100.20,2001:db8::20",
            " 2001:DB8:0::20 , 198.51.100.20 ",
            "198.51.100.20,2001:db8::20,198.51.100.99",
        ] {
            assert_eq!(decide(Some(value), &current), Action::InSync, "{value:?}");
        }
    }

    #[test]
    fn removed_or_blank_annotation_clears() {
        let current = pair(Some("198.51.100.20"), None);
        assert_eq!(applied(decide(None, &current)), EgressAddrs::NONE);
        assert_eq!(applied(decide(Some("  "), &current)), EgressAddrs::NONE);
        assert_eq!(decide(None, &EgressAddrs::NONE), Action::InSync);
    }

    #[test]
    fn invalid_annotation_is_rejected_naming_entry_and_rule() {
        let current = pair(Some("198.51.100.20"), None);
        let Action::Reject(invalid) = decide(Some("198.51.100.21/32"), &current) else {
            panic!("a prefix must be rejected");
        };
        assert!(matches!(
            &invalid,
            InvalidEgress::Entry { position: 1, entry, reason: InvalidReason::Prefix }
                if entry == "198.51.100.21/32"
        ));
        let text = invalid.to_string();
        assert!(text.contains("\"198.51.100.21/32\""), "{text}");
        assert!(text.contains("without /N"), "{text}");
    }

    #[test]
    fn later_addresses_of_a_family_are_ignored_not_applied() {
        let Action::Apply(parsed) = decide(
            Some("2001:db8::20, 198.51.100.20, 198.51.100.21"),
            &EgressAddrs::NONE,
        ) else {
            panic!("expected Apply");
        };
        assert_eq!(
            request_entries(&parsed.addrs),
            ["198.51.100.20", "2001:db8::20"]
        );
        assert_eq!(parsed.warnings().len(), 1);
    }

    #[test]
    fn describes_pairs_for_people() {
        assert_eq!(describe(&EgressAddrs::NONE), "none (MASQUERADE)");
        assert_eq!(describe(&pair(None, Some("2001:db8::20"))), "2001:db8::20");
    }
}
