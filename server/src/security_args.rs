//! The kilo-egressd binary's command-line flags for who may call the API: mutual TLS for TCP
//! listeners, the writer identities, the unix socket's group and the write limits. (A module of
//! the binary, not of the library.)

use anyhow::{Context, bail};
use clap::Args;
use kilo_egressd::authz::Authorizer;
use kilo_egressd::listen::resolve_group;
use kilo_egressd::server::Security;
use kilo_egressd::tls::{TlsFiles, TlsReloader};
use kilo_egressd::write_limit::WriteLimits;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Flags for authentication and authorization.
#[derive(Args)]
pub struct SecurityArgs {
    /// Server certificate chain (PEM) for mutual TLS on TCP listeners; re-read when it changes.
    #[arg(long, env = "KILO_EGRESS_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM); re-read when it changes.
    #[arg(long, env = "KILO_EGRESS_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) that sign client certificates; clients without one are refused
    /// at the TLS handshake. Re-read when it changes.
    #[arg(long, env = "KILO_EGRESS_CLIENT_CA", value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// How often the TLS files are checked for changes.
    #[arg(long, env = "KILO_EGRESS_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    tls_reload_interval: Duration,
    /// A client identity that may call SetEgress over TLS: a DNS or URI subject alternative name
    /// of its certificate, or its common name when it has none (repeatable or comma-separated).
    /// Other verified clients may only read.
    #[arg(
        long,
        env = "KILO_EGRESS_WRITERS",
        value_delimiter = ',',
        value_name = "IDENTITY"
    )]
    writer: Vec<String>,
    /// The group that owns the unix socket (mode 0660): its members may call the API.
    #[arg(long, env = "KILO_EGRESS_SOCKET_GROUP", value_name = "GROUP")]
    socket_group: Option<String>,
    /// SetEgress calls in flight on one connection; more wait their turn.
    #[arg(long, default_value_t = WriteLimits::default().per_connection, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_writes_per_connection: usize,
    /// SetEgress calls in flight for one identity; more wait their turn.
    #[arg(long, default_value_t = WriteLimits::default().per_identity, value_name = "N", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_writes_per_identity: usize,
    /// SetEgress calls that may wait for one connection's or identity's turn; more fail with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = WriteLimits::default().max_queued, value_name = "N")]
    max_queued_writes: usize,
    /// The longest a SetEgress call waits for its turn before it fails with RESOURCE_EXHAUSTED.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    max_write_wait: std::time::Duration,
}

impl SecurityArgs {
    /// Loads the TLS material and resolves the group: the server's [`Security`].
    pub fn security(&self) -> anyhow::Result<Security> {
        let tls = match (&self.tls_cert, &self.tls_key, &self.client_ca) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(client_ca)) => {
                let files = TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: client_ca.clone(),
                };
                Some(Arc::new(
                    TlsReloader::load(files).context("loading the TLS material")?,
                ))
            }
            _ => {
                let missing: Vec<&str> = [
                    ("--tls-cert", self.tls_cert.is_none()),
                    ("--tls-key", self.tls_key.is_none()),
                    ("--client-ca", self.client_ca.is_none()),
                ]
                .into_iter()
                .filter_map(|(flag, missing)| missing.then_some(flag))
                .collect();
                bail!(
                    "--tls-cert, --tls-key and --client-ca go together (mutual TLS); add {}",
                    missing.join(" and ")
                );
            }
        };
        if tls.is_none() && !self.writer.is_empty() {
            bail!("--writer applies to TLS clients; add --tls-cert, --tls-key and --client-ca");
        }
        if self.max_writes_per_connection == 0 || self.max_writes_per_identity == 0 {
            bail!("--max-writes-per-connection and --max-writes-per-identity must be at least 1");
        }
        let socket_group = self
            .socket_group
            .as_deref()
            .map(resolve_group)
            .transpose()?;
        Ok(Security {
            tls,
            tls_reload_interval: self.tls_reload_interval,
            authorizer: Authorizer::new(self.writer.iter().cloned()),
            write_limits: WriteLimits {
                per_connection: self.max_writes_per_connection,
                per_identity: self.max_writes_per_identity,
                max_queued: self.max_queued_writes,
                max_wait: self.max_write_wait,
            },
            socket_group,
        })
    }
}
