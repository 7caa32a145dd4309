//! A tower layer that bounds SetEgress calls in flight per connection and per identity (see
//! [`PeerInfo::identity`]). A call over a limit waits its turn, first come first served within
//! its connection and identity (tokio's semaphores are fair), so one runaway script holds at most
//! its share of the engine's queue while everyone else's calls get in. A call is refused, with
//! `RESOURCE_EXHAUSTED` naming the bound, only when [`WriteLimits::max_queued`] calls of its
//! identity (or connection) already wait, or when it waited [`WriteLimits::max_wait`]; refusals
//! are logged as one summary line per interval, not one line each. Reads are not limited here
//! (the server's per-connection and global limits cover them).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::peer::PeerInfo;

/// The gRPC path of the write method.
pub const SET_EGRESS_PATH: &str = "/kilo.egress.v1.EgressService/SetEgress";

/// How often refusals are summed up in one log line.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The write limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteLimits {
    /// SetEgress calls in flight on one connection; more wait.
    pub per_connection: usize,
    /// SetEgress calls in flight for one identity, across all its connections; more wait.
    pub per_identity: usize,
    /// Calls that may wait for one connection's or identity's turn; more are refused.
    pub max_queued: usize,
    /// The longest a call waits for its turn before it is refused.
    pub max_wait: Duration,
}

impl Default for WriteLimits {
    fn default() -> WriteLimits {
        WriteLimits {
            per_connection: 2,
            per_identity: 4,
            max_queued: 1024,
            max_wait: Duration::from_secs(20),
        }
    }
}

/// One key's turnstile: its semaphore and how many calls wait on it.
#[derive(Debug)]
struct Turnstile {
    semaphore: Arc<Semaphore>,
    waiting: usize,
}

/// Semaphores by key, dropped again when no call holds or waits for them.
#[derive(Debug, Default)]
struct Pool<K> {
    turnstiles: Mutex<HashMap<K, Turnstile>>,
}

/// Why a call did not get its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// `max_queued` calls already wait.
    QueueFull,
    /// It waited `max_wait`.
    Waited,
}

impl<K: std::hash::Hash + Eq + Clone> Pool<K> {
    /// Takes one of `limit` slots for `key`, waiting (bounded) for one to free up.
    async fn acquire(
        self: &Arc<Self>,
        key: &K,
        limit: usize,
        limits: &WriteLimits,
    ) -> Result<Permit<K>, Refused> {
        let semaphore = {
            let mut map = self.turnstiles.lock().expect("write limit lock");
            let turnstile = map.entry(key.clone()).or_insert_with(|| Turnstile {
                semaphore: Arc::new(Semaphore::new(limit)),
                waiting: 0,
            });
            if let Ok(permit) = turnstile.semaphore.clone().try_acquire_owned() {
                return Ok(self.permit(key, permit));
            }
            if turnstile.waiting >= limits.max_queued {
                return Err(Refused::QueueFull);
            }
            turnstile.waiting += 1;
            turnstile.semaphore.clone()
        };
        let waited = tokio::time::timeout(limits.max_wait, semaphore.acquire_owned()).await;
        let permit = {
            let mut map = self.turnstiles.lock().expect("write limit lock");
            if let Some(turnstile) = map.get_mut(key) {
                turnstile.waiting -= 1;
            }
            match waited {
                Ok(Ok(permit)) => Ok(self.permit(key, permit)),
                _ => Err(Refused::Waited),
            }
        };
        if permit.is_err() {
            self.forget_if_idle(key);
        }
        permit
    }

    fn permit(self: &Arc<Self>, key: &K, permit: OwnedSemaphorePermit) -> Permit<K> {
        Permit {
            pool: self.clone(),
            key: key.clone(),
            permit: Some(permit),
        }
    }

    /// Drops the key's turnstile once no call holds or waits for it.
    fn forget_if_idle(&self, key: &K) {
        let mut map = self.turnstiles.lock().expect("write limit lock");
        if map
            .get(key)
            .is_some_and(|t| t.waiting == 0 && Arc::strong_count(&t.semaphore) == 1)
        {
            map.remove(key);
        }
    }
}

/// A held slot; frees the key's entry when it was the last one.
struct Permit<K: std::hash::Hash + Eq + Clone> {
    pool: Arc<Pool<K>>,
    key: K,
    permit: Option<OwnedSemaphorePermit>,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Permit<K> {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.pool.forget_if_idle(&self.key);
    }
}

/// Counts refusals and logs them as one line per [`REFUSAL_LOG_INTERVAL`].
#[derive(Debug)]
struct RefusalLog {
    refused: AtomicU64,
    last: Mutex<(Instant, String)>,
}

impl RefusalLog {
    fn new() -> RefusalLog {
        RefusalLog {
            refused: AtomicU64::new(0),
            last: Mutex::new((Instant::now() - REFUSAL_LOG_INTERVAL, String::new())),
        }
    }

    fn note(&self, message: &str) {
        let count = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().expect("refusal log lock");
        if last.0.elapsed() >= REFUSAL_LOG_INTERVAL {
            self.refused.store(0, Ordering::Relaxed);
            tracing::warn!(
                refused = count,
                interval = ?REFUSAL_LOG_INTERVAL,
                last = %message,
                "SetEgress calls refused by the write limits (one line per interval)"
            );
            *last = (Instant::now(), message.to_string());
        }
    }
}

/// The layer; cheap to clone, all clones share the counters.
#[derive(Debug, Clone)]
pub struct WriteLimitLayer {
    limits: WriteLimits,
    connections: Arc<Pool<u64>>,
    identities: Arc<Pool<String>>,
    refusals: Arc<RefusalLog>,
}

impl WriteLimitLayer {
    /// A layer enforcing `limits`.
    pub fn new(limits: WriteLimits) -> WriteLimitLayer {
        WriteLimitLayer {
            limits,
            connections: Arc::default(),
            identities: Arc::default(),
            refusals: Arc::new(RefusalLog::new()),
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
        let layer = self.layer.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            let limits = layer.limits;
            let refused = |what: String, why: Refused| {
                let bound = match why {
                    Refused::QueueFull => format!(
                        "{} calls already wait (--max-queued-writes)",
                        limits.max_queued
                    ),
                    Refused::Waited => format!(
                        "waited {} for a turn (--max-write-wait)",
                        humantime::format_duration(limits.max_wait)
                    ),
                };
                let message = format!("too many SetEgress calls {what}: {bound}; try again later");
                layer.refusals.note(&message);
                Ok(tonic::Status::resource_exhausted(message).into_http())
            };
            let by_connection = match layer
                .connections
                .acquire(&connection, limits.per_connection, &limits)
                .await
            {
                Ok(permit) => permit,
                Err(why) => return refused("on this connection".to_string(), why),
            };
            let by_identity = match layer
                .identities
                .acquire(&identity, limits.per_identity, &limits)
                .await
            {
                Ok(permit) => permit,
                Err(why) => return refused(format!("from {identity}"), why),
            };
            let response = future.await;
            drop((by_connection, by_identity));
            response
        })
    }
}

/// The boxed future type, without pulling in the futures crate.
pub(crate) mod futures_util_lite {
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

    fn limits(max_queued: usize, max_wait: Duration) -> WriteLimits {
        WriteLimits {
            per_connection: 1,
            per_identity: 2,
            max_queued,
            max_wait,
        }
    }

    /// How many calls of `identity` wait for a turn.
    fn waiting(layer: &WriteLimitLayer, identity: &str) -> usize {
        layer
            .identities
            .turnstiles
            .lock()
            .unwrap()
            .get(identity)
            .map_or(0, |t| t.waiting)
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_flooding_identity_waits_its_turn_while_others_still_write() {
        let release = Arc::new(tokio::sync::Notify::new());
        let layer = WriteLimitLayer::new(limits(100, Duration::from_secs(60)));
        let service = layer.layer(blocking_service(release.clone()));
        // Six calls of "runaway" on six connections: two run, four wait.
        let flood: Vec<_> = (0..6)
            .map(|_| {
                tokio::spawn(
                    service
                        .clone()
                        .oneshot(request(SET_EGRESS_PATH, &tls("runaway"))),
                )
            })
            .collect();
        until("four calls wait", || waiting(&layer, "runaway") == 4).await;
        // Reads of the same identity pass, and another identity still writes.
        let read = tokio::spawn(service.clone().oneshot(request(
            "/kilo.egress.v1.EgressService/GetRules",
            &tls("runaway"),
        )));
        let other = tokio::spawn(
            service
                .clone()
                .oneshot(request(SET_EGRESS_PATH, &tls("ops"))),
        );
        let mut calls = flood;
        calls.extend([read, other]);
        until("every call finished", || {
            release.notify_waiters();
            calls.iter().all(|c| c.is_finished())
        })
        .await;
        for call in calls {
            let response = call.await.unwrap().unwrap();
            assert_eq!(grpc_status(&response), None, "every call got its turn");
        }
        assert!(
            layer.identities.turnstiles.lock().unwrap().is_empty()
                && layer.connections.turnstiles.lock().unwrap().is_empty(),
            "no counters are kept for finished calls"
        );
    }

    #[tokio::test]
    async fn calls_beyond_the_queue_bound_or_the_wait_bound_are_refused_naming_it() {
        let release = Arc::new(tokio::sync::Notify::new());
        let layer = WriteLimitLayer::new(limits(1, Duration::from_secs(60)));
        let service = layer.layer(blocking_service(release.clone()));
        let running: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn(
                    service
                        .clone()
                        .oneshot(request(SET_EGRESS_PATH, &tls("runaway"))),
                )
            })
            .collect();
        until("one call waits", || waiting(&layer, "runaway") == 1).await;
        let refused = service
            .clone()
            .oneshot(request(SET_EGRESS_PATH, &tls("runaway")))
            .await
            .unwrap();
        assert_eq!(
            grpc_status(&refused).as_deref(),
            Some("8"),
            "RESOURCE_EXHAUSTED"
        );
        let message = refused.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            message.contains("runaway") && message.contains("max-queued-writes"),
            "{message}"
        );
        until("the rest finished", || {
            release.notify_waiters();
            running.iter().all(|c| c.is_finished())
        })
        .await;

        let layer = WriteLimitLayer::new(limits(100, Duration::from_millis(50)));
        let service = layer.layer(blocking_service(release.clone()));
        let holders: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(
                    service
                        .clone()
                        .oneshot(request(SET_EGRESS_PATH, &tls("slow"))),
                )
            })
            .collect();
        until("both slots held", || {
            layer
                .identities
                .turnstiles
                .lock()
                .unwrap()
                .get("slow")
                .is_some_and(|t| t.semaphore.available_permits() == 0)
        })
        .await;
        let timed_out = service
            .clone()
            .oneshot(request(SET_EGRESS_PATH, &tls("slow")))
            .await
            .unwrap();
        assert_eq!(grpc_status(&timed_out).as_deref(), Some("8"));
        let message = timed_out.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(message.contains("max-write-wait"), "{message}");
        until("the holders finished", || {
            release.notify_waiters();
            holders.iter().all(|c| c.is_finished())
        })
        .await;
    }
}
