//! The watcher's view of kilo-egressd: read the programmed pair, set a new one. A trait, so
//! the controller is tested against a fake; the real implementation reconnects after failures.

use super::metrics::WatchMetrics;
use crate::tls::TlsFiles;
use crate::{ClientError, EgressClient, ServerAddr};
use kilo_egress_api::egress::{EgressAddrs, Family};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// What the watcher needs from kilo-egressd.
pub trait EgressServer {
    /// The pair kilo-egressd programs now (GetRules).
    fn current(&mut self) -> impl Future<Output = Result<EgressAddrs, ClientError>> + Send;
    /// Programs `entries` (SetEgress; empty clears).
    fn apply(
        &mut self,
        entries: Vec<String>,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// The families whose chosen address kilo-egressd reported as not on the node in its last
    /// reply (GetRules or SetEgress), with the reason (e.g. "198.51.100.20 is not assigned to
    /// any interface: MASQUERADE until it is usable").
    fn absent(&self) -> BTreeMap<Family, String> {
        BTreeMap::new()
    }
}

/// The absent addresses of a reply's families: the first part of their status, which names the
/// address and what is programmed meanwhile.
pub fn absent_from(families: &[crate::api::FamilyRules]) -> BTreeMap<Family, String> {
    families
        .iter()
        .filter(|f| f.address_absent)
        .filter_map(|f| {
            let family = Family::try_from(f.family).ok()?;
            let note = f.status.split("; ").next().unwrap_or_default();
            Some((family, note.to_string()))
        })
        .collect()
}

/// kilo-egressd over gRPC. The connection is made on first use and dropped after any failure,
/// so the next call reconnects (kilo-egressd restarted, socket re-created).
pub struct GrpcEgress {
    addr: ServerAddr,
    timeout: Duration,
    tls: TlsFiles,
    client: Option<EgressClient>,
    absent: BTreeMap<Family, String>,
    /// Whether the last call failed: the next connection is a reconnect.
    failed: bool,
    metrics: Arc<WatchMetrics>,
}

impl GrpcEgress {
    /// A client for the server at `addr` (with `tls` for an `https://` address), each call
    /// bounded by `timeout`.
    pub fn new(addr: ServerAddr, timeout: Duration, tls: TlsFiles) -> GrpcEgress {
        GrpcEgress {
            addr,
            timeout,
            tls,
            client: None,
            absent: BTreeMap::new(),
            failed: false,
            metrics: Arc::default(),
        }
    }

    /// The same client, counting reconnects into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<WatchMetrics>) -> GrpcEgress {
        self.metrics = metrics;
        self
    }

    async fn client(&mut self) -> Result<&mut EgressClient, ClientError> {
        if self.client.is_none() {
            if std::mem::take(&mut self.failed) {
                self.metrics.reconnect("kilo-egressd");
            }
            self.client =
                Some(EgressClient::connect_tls(&self.addr, self.timeout, &self.tls).await?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    fn forget_on_error<T>(&mut self, result: Result<T, ClientError>) -> Result<T, ClientError> {
        if result.is_err() {
            self.client = None;
            self.failed = true;
        }
        result
    }
}

/// Reads a GetRules pair: empty strings mean "none"; anything unparsable is the server's fault.
pub fn pair_from_response(
    pair: Option<crate::api::EgressPair>,
) -> Result<EgressAddrs, ClientError> {
    Ok(EgressAddrs::try_from(&pair.unwrap_or_default())?)
}

impl EgressServer for GrpcEgress {
    async fn current(&mut self) -> Result<EgressAddrs, ClientError> {
        let result = match self.client().await {
            Ok(client) => client.get_rules().await,
            Err(error) => Err(error),
        };
        let response = self.forget_on_error(result)?;
        self.absent = absent_from(&response.families);
        pair_from_response(response.egress)
    }

    async fn apply(&mut self, entries: Vec<String>) -> Result<(), ClientError> {
        let result = match self.client().await {
            Ok(client) => client.set_egress(entries, false, None).await,
            Err(error) => Err(error),
        };
        let response = self.forget_on_error(result)?;
        self.absent = absent_from(&response.rules);
        Ok(())
    }

    fn absent(&self) -> BTreeMap<Family, String> {
        self.absent.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::EgressPair;

    #[test]
    fn reads_pairs_from_get_rules() {
        assert_eq!(pair_from_response(None).unwrap(), EgressAddrs::NONE);
        let pair = pair_from_response(Some(EgressPair {
            ipv4: String::new(),
            ipv6: "2001:db8::20".into(),
        }))
        .unwrap();
        assert_eq!(pair.ipv6, Some("2001:db8::20".parse().unwrap()));
        assert_eq!(pair.ipv4, None);
    }
}
