//! Egress that follows the address: what the engine programs for a family while the chosen
//! address is, or is not, on an interface of the node ([`crate::addrwatch`] says which).
//! With `--absent-address masquerade` (the default) an absent address falls back to the
//! MASQUERADE decision until it appears, so pods keep connectivity with the node's own address;
//! with `keep` the SNAT stays (fail closed: traffic never leaves with another address). Pure:
//! the engine feeds it the node's addresses and asks.

use kilo_egress_api::egress::{EgressAddrs, Family};
use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::addrwatch::Presence;

/// What to program while the chosen address is not on the node (`--absent-address`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AbsentPolicy {
    /// MASQUERADE until the address appears: pods keep connectivity with the node's address.
    #[default]
    Masquerade,
    /// Keep the SNAT: traffic never leaves with another address (and gets no reply meanwhile).
    Keep,
}

/// The node's addresses as last reported, and the policy for absent ones.
#[derive(Debug, Clone)]
pub struct AddressPresence {
    policy: AbsentPolicy,
    /// `None` while addresses are not followed: every address counts as usable.
    view: Option<BTreeMap<IpAddr, Presence>>,
}

impl AddressPresence {
    /// Follows nothing yet: every address counts as usable until [`AddressPresence::update`].
    pub fn new(policy: AbsentPolicy) -> AddressPresence {
        AddressPresence { policy, view: None }
    }

    /// The policy for absent addresses.
    pub fn policy(&self) -> AbsentPolicy {
        self.policy
    }

    /// The node's addresses changed (or were first dumped).
    pub fn update(&mut self, view: BTreeMap<IpAddr, Presence>) {
        self.view = Some(view);
    }

    /// Stops following: every address counts as usable again (the subscription failed).
    pub fn forget(&mut self) {
        self.view = None;
    }

    /// The state of `addr`; usable while addresses are not followed.
    pub fn presence(&self, addr: IpAddr) -> Presence {
        match &self.view {
            None => Presence::Usable,
            Some(view) => view.get(&addr).copied().unwrap_or(Presence::Absent),
        }
    }

    /// The address to program for a family whose chosen address is `chosen`: `chosen` while it
    /// is usable or the policy keeps it, else `None` (MASQUERADE).
    pub fn programmed(&self, chosen: Option<IpAddr>) -> Option<IpAddr> {
        let addr = chosen?;
        (self.presence(addr).is_usable() || self.policy == AbsentPolicy::Keep).then_some(addr)
    }

    /// The chosen address and its state, when it is chosen and not usable.
    pub fn absent(&self, chosen: Option<IpAddr>) -> Option<(IpAddr, Presence)> {
        let addr = chosen?;
        let presence = self.presence(addr);
        (!presence.is_usable()).then_some((addr, presence))
    }

    /// The pair to program for the chosen pair `chosen` ([`AddressPresence::programmed`] per
    /// family).
    pub fn programmed_pair(&self, chosen: &EgressAddrs) -> EgressAddrs {
        let pick = |family| self.programmed(chosen.get(family));
        EgressAddrs {
            ipv4: pick(Family::Ipv4).and_then(|a| match a {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            }),
            ipv6: pick(Family::Ipv6).and_then(|a| match a {
                IpAddr::V6(v6) => Some(v6),
                IpAddr::V4(_) => None,
            }),
        }
    }

    /// What an operator reads about a family while its chosen address is not usable, e.g.
    /// "198.51.100.20 is not assigned to any interface: MASQUERADE until it is".
    pub fn note(&self, chosen: Option<IpAddr>) -> Option<String> {
        let (addr, presence) = self.absent(chosen)?;
        Some(match self.policy {
            AbsentPolicy::Masquerade => {
                format!("{addr} {presence}: MASQUERADE until it is usable")
            }
            AbsentPolicy::Keep => format!(
                "{addr} {presence}: SNAT kept (--absent-address keep), so egress gets no replies until it is usable"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn view(entries: &[(&str, Presence)]) -> BTreeMap<IpAddr, Presence> {
        entries.iter().map(|(a, p)| (ip(a), *p)).collect()
    }

    #[test]
    fn unfollowed_addresses_are_programmed_as_chosen() {
        let presence = AddressPresence::new(AbsentPolicy::Masquerade);
        assert_eq!(
            presence.programmed(Some(ip("198.51.100.20"))),
            Some(ip("198.51.100.20"))
        );
        assert_eq!(presence.note(Some(ip("198.51.100.20"))), None);
    }

    #[test]
    fn an_absent_address_masquerades_or_is_kept_by_policy() {
        let mut masquerade = AddressPresence::new(AbsentPolicy::Masquerade);
        masquerade.update(view(&[("192.0.2.10", Presence::Usable)]));
        let chosen = Some(ip("198.51.100.20"));
        assert_eq!(masquerade.programmed(chosen), None);
        assert_eq!(
            masquerade.note(chosen).unwrap(),
            "198.51.100.20 is not assigned to any interface: MASQUERADE until it is usable"
        );
        let mut keep = AddressPresence::new(AbsentPolicy::Keep);
        keep.update(view(&[]));
        assert_eq!(keep.programmed(chosen), chosen);
        assert!(keep.note(chosen).unwrap().contains("SNAT kept"));
    }

    #[test]
    fn a_tentative_ipv6_address_is_not_used_until_dad_completes() {
        let mut presence = AddressPresence::new(AbsentPolicy::Masquerade);
        let chosen = Some(ip("2001:db8:2::20"));
        presence.update(view(&[("2001:db8:2::20", Presence::Tentative)]));
        assert_eq!(presence.programmed(chosen), None);
        assert!(
            presence
                .note(chosen)
                .unwrap()
                .contains("duplicate address detection")
        );
        presence.update(view(&[("2001:db8:2::20", Presence::Usable)]));
        assert_eq!(presence.programmed(chosen), chosen);
    }

    #[test]
    fn no_chosen_address_is_never_absent() {
        let mut presence = AddressPresence::new(AbsentPolicy::Keep);
        presence.update(view(&[]));
        assert_eq!(presence.programmed(None), None);
        assert_eq!(presence.absent(None), None);
    }
}
