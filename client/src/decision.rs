//! What a `set`, `clear` or `--dry-run` reply means per family, in words: the request is the
//! whole desired pair, so a family it names no address for goes back to MASQUERADE, and the
//! reply says so for both families.

use kilo_egress::api;
use kilo_egress_api::egress::Family;

/// Which command produced a SetEgress reply.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `kilo-egress set ADDR..`
    Set,
    /// `kilo-egress clear`
    Clear,
}

/// Family statuses that only restate the decision (or that a dry run changes nothing).
fn restates_decision(status: &str) -> bool {
    status == "MASQUERADE"
        || status.starts_with("SNAT to ")
        || status.starts_with("dry run: ")
        || status.is_empty()
}

/// The report of `family` in a reply, if the server sent one.
pub fn report_of(reports: &[api::FamilyRules], family: Family) -> Option<&api::FamilyRules> {
    reports
        .iter()
        .find(|r| Family::try_from(r.family).is_ok_and(|f| f == family))
}

/// One line per family: the decision the reply programs (or would program), and anything that
/// keeps it from taking effect, e.g. `IPv6: MASQUERADE (no IPv6 address given)` or
/// `IPv4: SNAT to 198.51.100.20 (waiting for Kilo's agent: ...)`.
pub fn decision_lines(response: &api::SetEgressResponse, request: Request) -> Vec<String> {
    let pair = response.egress.clone().unwrap_or_default();
    Family::ALL
        .into_iter()
        .map(|family| {
            let addr = match family {
                Family::Ipv4 => &pair.ipv4,
                Family::Ipv6 => &pair.ipv6,
            };
            let report = report_of(&response.rules, family);
            // The chosen address is not on the node: what is programmed meanwhile is the news,
            // in the server's words ("198.51.100.20 is not assigned to any interface:
            // MASQUERADE until it is usable"), not "SNAT to".
            if let Some(report) = report.filter(|r| r.address_absent) {
                let note = report.status.split("; ").next().unwrap_or_default();
                return format!("{family}: {note}");
            }
            let mut line = if addr.is_empty() {
                match request {
                    Request::Set => format!("{family}: MASQUERADE (no {family} address given)"),
                    Request::Clear => format!("{family}: MASQUERADE (cleared)"),
                }
            } else {
                format!("{family}: SNAT to {addr}")
            };
            if let Some(report) = report {
                let noteworthy = !report.in_sync || report.status.starts_with("not managed");
                if noteworthy && !restates_decision(&report.status) {
                    line.push_str(&format!(" ({})", report.status));
                }
            }
            line
        })
        .collect()
}

/// The reply's warnings that its decision lines do not already say: the server repeats a family's
/// "waiting for Kilo's agent" status as a warning for API clients, which the CLI shows once.
pub fn extra_warnings<'a>(response: &'a api::SetEgressResponse, lines: &[String]) -> Vec<&'a str> {
    response
        .warnings
        .iter()
        .filter(|warning| {
            // A decision line that already says it (an absent address).
            !lines.iter().any(|line| line == *warning)
                && !response.rules.iter().any(|report| {
                    Family::try_from(report.family).is_ok_and(|family| {
                        **warning == format!("{family}: {}", report.status)
                            && lines.iter().any(|l| l.contains(&report.status))
                    })
                })
        })
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kilo_egress_api::pb;

    fn family(family: pb::Family, status: &str, in_sync: bool) -> api::FamilyRules {
        api::FamilyRules {
            family: family as i32,
            rules: Vec::new(),
            in_sync,
            status: status.to_string(),
            address_absent: false,
        }
    }

    fn reply(ipv4: &str, ipv6: &str, rules: Vec<api::FamilyRules>) -> api::SetEgressResponse {
        api::SetEgressResponse {
            egress: Some(api::EgressPair {
                ipv4: ipv4.into(),
                ipv6: ipv6.into(),
            }),
            generation: 7,
            warnings: Vec::new(),
            rules,
            dry_run: false,
        }
    }

    #[test]
    fn a_set_of_one_family_says_the_other_goes_back_to_masquerade() {
        let response = reply(
            "198.51.100.20",
            "",
            vec![
                family(pb::Family::Ipv4, "SNAT to 198.51.100.20", true),
                family(pb::Family::Ipv6, "MASQUERADE", true),
            ],
        );
        assert_eq!(
            decision_lines(&response, Request::Set),
            [
                "IPv4: SNAT to 198.51.100.20",
                "IPv6: MASQUERADE (no IPv6 address given)"
            ]
        );
        assert_eq!(
            decision_lines(&reply("", "", Vec::new()), Request::Clear),
            ["IPv4: MASQUERADE (cleared)", "IPv6: MASQUERADE (cleared)"]
        );
    }

    #[test]
    fn a_dry_run_states_the_decision_without_its_boilerplate() {
        let mut response = reply(
            "",
            "2001:db8::20",
            vec![
                family(pb::Family::Ipv4, "dry run: nothing would change", true),
                family(
                    pb::Family::Ipv6,
                    "dry run: these rules would be programmed",
                    false,
                ),
            ],
        );
        response.dry_run = true;
        assert_eq!(
            decision_lines(&response, Request::Set),
            [
                "IPv4: MASQUERADE (no IPv4 address given)",
                "IPv6: SNAT to 2001:db8::20"
            ]
        );
    }

    #[test]
    fn an_absent_address_says_what_is_programmed_meanwhile_once() {
        let note = "198.51.100.20 is not assigned to any interface: MASQUERADE until it is usable";
        let mut absent = family(pb::Family::Ipv4, &format!("{note}; MASQUERADE"), true);
        absent.address_absent = true;
        let mut response = reply(
            "198.51.100.20",
            "",
            vec![absent, family(pb::Family::Ipv6, "MASQUERADE", true)],
        );
        response.warnings = vec![format!("IPv4: {note}")];
        let lines = decision_lines(&response, Request::Set);
        assert_eq!(
            lines,
            [
                format!("IPv4: {note}"),
                "IPv6: MASQUERADE (no IPv6 address given)".to_string()
            ]
        );
        assert!(extra_warnings(&response, &lines).is_empty());
    }

    #[test]
    fn the_waiting_note_is_shown_once() {
        let waiting = "waiting for Kilo's agent: chain KILO-NAT does not exist (IPv4)";
        let mut response = reply(
            "198.51.100.20",
            "",
            vec![
                family(pb::Family::Ipv4, waiting, false),
                family(pb::Family::Ipv6, "not managed: no IPv6 --source-cidr", true),
            ],
        );
        response.warnings = vec![
            format!("IPv4: {waiting}"),
            "ignored 198.51.100.21: one IPv4 address is used".into(),
        ];
        let lines = decision_lines(&response, Request::Set);
        assert_eq!(
            lines,
            [
                format!("IPv4: SNAT to 198.51.100.20 ({waiting})"),
                "IPv6: MASQUERADE (no IPv6 address given) (not managed: no IPv6 --source-cidr)"
                    .to_string()
            ]
        );
        assert_eq!(
            extra_warnings(&response, &lines),
            ["ignored 198.51.100.21: one IPv4 address is used"]
        );
    }
}
