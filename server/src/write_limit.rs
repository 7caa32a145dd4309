//! A tower layer that bounds SetEgress calls in flight per connection and per identity (see
//! [`PeerInfo::identity`]), so one runaway script cannot queue up writes in front of everyone
//! else: a call over either limit fails at once with `RESOURCE_EXHAUSTED` instead of waiting.
//! Reads are not limited here (the server's per-connection and global limits cover them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::peer::PeerInfo;

/// The gRPC path of the write method.
pub const SET_EGRESS_PATH: &str = "/kilo.egress.v1.EgressService/SetEgress";

/// The write limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteLimits {
    /// SetEgress calls in flight on one connection.
    pub per_connection: usize,
    /// SetEgress calls in flight for one identity, across all its connections.
    pub per_identity: usize,
}

impl Default for WriteLimits {
    fn default() -> WriteLimits {
        WriteLimits {
            per_connection: 2,
            per_identity: 4,
        }
    }
}

/// Semaphores by key, dropped again when no call holds them.
#[derive(Debug, Default)]
struct Pool<K> {
    semaphores: Mutex<HashMap<K, Arc<Semaphore>>>,
}

impl<K: std::hash::Hash + Eq + Clone> Pool<K> {
    fn try_acquire(self: &Arc<Self>, key: &K, limit: usize) -> Option<Permit<K>> {
        let mut map = self.semaphores.lock().expect("write limit lock");
        let semaphore = map
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(limit)))
            .clone();
        let permit = semaphore.try_acquire_owned().ok()?;
        Some(Permit {
            pool: self.clone(),
            key: key.clone(),
            permit: Some(permit),
        })
    }
}

/// A held slot; frees the key's entry when it was the last one.
struct Permit<K: std::hash::Hash + Eq> {
    pool: Arc<Pool<K>>,
    key: K,
    permit: Option<OwnedSemaphorePermit>,
}

impl<K: std::hash::Hash + Eq> Drop for Permit<K> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut map = self.pool.semaphores.lock().expect("write limit lock");
        // Only the map holds the semaphore: no call uses this key any more.
        if map
            .get(&self.key)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            map.remove(&self.key);
        }
    }
}

/// The layer; cheap to clone, all clones share the counters.
#[derive(Debug, Clone)]
pub struct WriteLimitLayer {
    limits: WriteLimits,
    connections: Arc<Pool<u64>>,
    identities: Arc<Pool<String>>,
}

impl WriteLimitLayer {
    /// A layer enforcing `limits`.
    pub fn new(limits: WriteLimits) -> WriteLimitLayer {
        WriteLimitLayer {
            limits,
            connections: Arc::default(),
            identities: Arc::default(),
        }
    }
}

impl<S> Layer<S> for WriteLimitLayer {
    type Service = WriteLimit<S>;

    fn layer(&self, inner: S) -> WriteLimit<S> {
        WriteLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service built by [`WriteLimitLayer`].
#[derive(Debug, Clone)]
pub struct WriteLimit<S> {
    inner: S,
    layer: WriteLimitLayer,
}

impl<S, B> Service<http::Request<B>> for WriteLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util_lite::BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != SET_EGRESS_PATH {
            let future = self.inner.call(request);
            return Box::pin(future);
        }
        let peer = request.extensions().get::<PeerInfo>().cloned();
        let (connection, identity) = match &peer {
            Some(peer) => (peer.connection, peer.identity()),
            None => (0, "unknown".to_string()),
        };
        let limits = self.layer.limits;
        let Some(by_connection) = self
            .layer
            .connections
            .try_acquire(&connection, limits.per_connection)
        else {
            return exhausted(format!(
                "too many SetEgress calls in flight on this connection (limit {}); wait for the earlier ones to finish",
                limits.per_connection
            ));
        };
        let Some(by_identity) = self
            .layer
            .identities
            .try_acquire(&identity, limits.per_identity)
        else {
            return exhausted(format!(
                "too many SetEgress calls in flight for {identity} (limit {}); wait for the earlier ones to finish",
                limits.per_identity
            ));
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            drop((by_connection, by_identity));
            response
        })
    }
}

fn exhausted<E: Send + 'static>(
    message: String,
) -> futures_util_lite::BoxFuture<Result<http::Response<tonic::body::Body>, E>> {
    tracing::warn!(%message, "SetEgress refused by the write limits");
    let response = tonic::Status::resource_exhausted(message).into_http();
    Box::pin(std::future::ready(Ok(response)))
}

/// The boxed future type, without pulling in the futures crate.
mod futures_util_lite {
    /// A boxed, sendable future.
    pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::PeerKind;
    use tower::ServiceExt;

    fn request(path: &str, peer: &PeerInfo) -> http::Request<()> {
        let mut request = http::Request::builder().uri(path).body(()).unwrap();
        request.extensions_mut().insert(peer.clone());
        request
    }

    fn tls(name: &str) -> PeerInfo {
        PeerInfo::new(PeerKind::Tls {
            remote: "192.0.2.1:4000".parse().unwrap(),
            names: vec![name.to_string()],
        })
    }

    fn grpc_status(response: &http::Response<tonic::body::Body>) -> Option<String> {
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    }

    /// A service whose SetEgress calls block until `release` is notified.
    fn blocking_service(
        release: Arc<tokio::sync::Notify>,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Send + 'static,
    > + Clone {
        tower::service_fn(move |_req: http::Request<()>| {
            let release = release.clone();
            async move {
                release.notified().await;
                Ok(http::Response::new(tonic::body::Body::empty()))
            }
        })
    }

    #[tokio::test]
    async fn a_flooding_identity_is_refused_while_others_still_write() {
        let release = Arc::new(tokio::sync::Notify::new());
        let layer = WriteLimitLayer::new(WriteLimits {
            per_connection: 1,
            per_identity: 2,
        });
        let service = layer.layer(blocking_service(release.clone()));
        let (a1, a2, a3) = (tls("runaway"), tls("runaway"), tls("runaway"));
        // Two calls of "runaway" on two connections hold both of its identity slots.
        let first = tokio::spawn(service.clone().oneshot(request(SET_EGRESS_PATH, &a1)));
        let second = tokio::spawn(service.clone().oneshot(request(SET_EGRESS_PATH, &a2)));
        tokio::task::yield_now().await;
        // The limits are taken synchronously in `call`, so the third sees them at once.
        let poll_held = || layer.identities.semaphores.lock().unwrap().len();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while layer
            .identities
            .semaphores
            .lock()
            .unwrap()
            .get("runaway")
            .is_none_or(|s| s.available_permits() != 0)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "calls never started"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(poll_held(), 1);
        let third = service
            .clone()
            .oneshot(request(SET_EGRESS_PATH, &a3))
            .await
            .unwrap();
        assert_eq!(
            grpc_status(&third).as_deref(),
            Some("8"),
            "RESOURCE_EXHAUSTED"
        );
        // A second call on the same connection as `a1` is over the per-connection limit.
        let same_connection = service
            .clone()
            .oneshot(request(SET_EGRESS_PATH, &a1))
            .await
            .unwrap();
        assert_eq!(grpc_status(&same_connection).as_deref(), Some("8"));
        // Reads of the same identity pass.
        let read = tokio::spawn(
            service
                .clone()
                .oneshot(request("/kilo.egress.v1.EgressService/GetRules", &a3)),
        );
        // Another identity still writes.
        let other = tokio::spawn(
            service
                .clone()
                .oneshot(request(SET_EGRESS_PATH, &tls("ops"))),
        );
        while !(first.is_finished()
            && second.is_finished()
            && read.is_finished()
            && other.is_finished())
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "calls never finished"
            );
            release.notify_waiters();
            tokio::task::yield_now().await;
        }
        for call in [first, second, read, other] {
            let response = call.await.unwrap().unwrap();
            assert_eq!(grpc_status(&response), None, "passed through");
        }
        assert!(
            layer.identities.semaphores.lock().unwrap().is_empty()
                && layer.connections.semaphores.lock().unwrap().is_empty(),
            "no counters are kept for finished calls"
        );
    }
}
