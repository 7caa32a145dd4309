//! Who may change the egress address. Over mutual TLS only the `--writer` identities may call
//! SetEgress, matched against the client certificate's names; every other verified client may
//! read. On the unix socket the file's owner and group decide who connects at all
//! (`--socket-group`), and whoever connects may write; plaintext TCP exists on loopback only and
//! is treated the same way.

use std::collections::BTreeSet;

use crate::peer::{PeerInfo, PeerKind};

/// A SetEgress call refused because the caller is not a writer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "client certificate {identity:?} may read (GetRules) but not change the egress address: it is not one of the --writer identities"
)]
pub struct WriteDenied {
    /// The caller's certificate names, comma-separated.
    pub identity: String,
}

impl From<WriteDenied> for tonic::Status {
    fn from(denied: WriteDenied) -> tonic::Status {
        tonic::Status::permission_denied(denied.to_string())
    }
}

/// The write policy: the identities given with `--writer`.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    writers: BTreeSet<String>,
}

impl Authorizer {
    /// A policy that lets `writers` (certificate DNS/URI SANs or CNs) call SetEgress over TLS.
    pub fn new(writers: impl IntoIterator<Item = String>) -> Authorizer {
        Authorizer {
            writers: writers.into_iter().collect(),
        }
    }

    /// The `--writer` identities.
    pub fn writers(&self) -> impl Iterator<Item = &str> {
        self.writers.iter().map(String::as_str)
    }

    /// Decides whether `peer` may call SetEgress. A request that did not come through one of
    /// the server's listeners (no [`PeerInfo`]) is refused.
    pub fn may_write(&self, peer: Option<&PeerInfo>) -> Result<(), WriteDenied> {
        match peer.map(|p| &p.kind) {
            Some(PeerKind::Unix { .. } | PeerKind::Tcp { .. }) => Ok(()),
            Some(PeerKind::Tls { names, .. }) if names.iter().any(|n| self.writers.contains(n)) => {
                Ok(())
            }
            Some(PeerKind::Tls { names, .. }) => Err(WriteDenied {
                identity: names.join(","),
            }),
            None => Err(WriteDenied {
                identity: "unknown connection".to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(names: &[&str]) -> PeerInfo {
        PeerInfo::new(PeerKind::Tls {
            remote: "192.0.2.1:4000".parse().unwrap(),
            names: names.iter().map(|n| n.to_string()).collect(),
        })
    }

    #[test]
    fn only_listed_certificate_names_may_write() {
        let authz = Authorizer::new(["ops.example".to_string(), "spiffe://c/ops".to_string()]);
        assert_eq!(authz.may_write(Some(&tls(&["ops.example"]))), Ok(()));
        assert_eq!(
            authz.may_write(Some(&tls(&["other.example", "spiffe://c/ops"]))),
            Ok(()),
            "any of the certificate's names may match"
        );
        let denied = authz
            .may_write(Some(&tls(&["viewer.example"])))
            .unwrap_err();
        assert!(
            denied.to_string().contains("\"viewer.example\""),
            "{denied}"
        );
        let status = tonic::Status::from(denied);
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(authz.may_write(Some(&tls(&[]))).is_err());
        assert!(authz.may_write(None).is_err());
    }

    #[test]
    fn unix_socket_callers_may_write_the_socket_permissions_decide() {
        let authz = Authorizer::default();
        let unix = PeerInfo::new(PeerKind::Unix {
            uid: Some(1000),
            gid: Some(1000),
            pid: Some(7),
        });
        assert_eq!(authz.may_write(Some(&unix)), Ok(()));
        assert!(authz.may_write(Some(&tls(&["ops.example"]))).is_err());
    }
}
