//! Which families the engine programs, decided once from the configuration: a family is left
//! alone when `--ip-families` excludes it, or (own mode) when no `--source-cidr` is of it.

use kilo_egress_api::egress::Family;
use std::collections::BTreeMap;

use crate::rules::ModeConfig;

/// The families the engine manages, and why it leaves the others alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedFamilies {
    unmanaged: BTreeMap<Family, String>,
}

impl ManagedFamilies {
    /// Decides, for each family, whether `--ip-families` (`configured`) and `mode` manage it.
    pub fn new(configured: &[Family], mode: &ModeConfig) -> ManagedFamilies {
        let unmanaged = Family::ALL
            .into_iter()
            .filter_map(|family| {
                let why = if !configured.contains(&family) {
                    format!("--ip-families excludes {family}")
                } else if !mode.manages(family) {
                    format!("no {family} --source-cidr")
                } else {
                    return None;
                };
                Some((family, why))
            })
            .collect();
        ManagedFamilies { unmanaged }
    }

    /// Why the engine leaves `family` alone, or `None` when it programs it.
    pub fn unmanaged_reason(&self, family: Family) -> Option<&str> {
        self.unmanaged.get(&family).map(String::as_str)
    }

    /// Whether the engine programs `family`.
    pub fn is_managed(&self, family: Family) -> bool {
        !self.unmanaged.contains_key(&family)
    }

    /// The families the engine programs, IPv4 first.
    pub fn managed(&self) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| self.is_managed(*f))
            .collect()
    }

    /// The families the engine leaves alone, IPv4 first.
    pub fn unmanaged(&self) -> Vec<Family> {
        self.unmanaged.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_is_managed_when_configured_and_the_mode_has_work_there() {
        let own_v4 = ModeConfig::Own {
            source_cidrs: vec!["10.44.0.0/24".parse().unwrap()],
            no_nat_cidrs: vec![],
        };
        let families = ManagedFamilies::new(&Family::ALL, &own_v4);
        assert_eq!(families.managed(), vec![Family::Ipv4]);
        assert_eq!(
            families.unmanaged_reason(Family::Ipv6),
            Some("no IPv6 --source-cidr")
        );
        let kilo_v6 = ManagedFamilies::new(&[Family::Ipv6], &ModeConfig::Kilo);
        assert_eq!(kilo_v6.unmanaged(), vec![Family::Ipv4]);
        assert_eq!(
            kilo_v6.unmanaged_reason(Family::Ipv4),
            Some("--ip-families excludes IPv4")
        );
    }
}
