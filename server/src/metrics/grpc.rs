//! A tower layer that counts SetEgress calls by gRPC code and caller kind
//! (`kilo_egress_set_egress_requests_total`). It sits outside every other layer, so calls the
//! write limits refuse count too; a call whose answer never came (the client went away, the
//! request timed out) counts as `Cancelled`.

use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

use super::Metrics;
use crate::peer::{PeerInfo, PeerKind};
use crate::write_limit::SET_EGRESS_PATH;
use crate::write_limit::futures_util_lite::BoxFuture;

/// The gRPC code's name as grpc-go spells it (`OK`, `InvalidArgument`, ...).
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".to_string(),
        other => format!("{other:?}"),
    }
}

/// The caller kind of a request: `unix`, `tcp`, `tls`, or `unknown`.
fn caller(peer: Option<&PeerInfo>) -> &'static str {
    match peer.map(|p| &p.kind) {
        Some(PeerKind::Unix { .. }) => "unix",
        Some(PeerKind::Tcp { .. }) => "tcp",
        Some(PeerKind::Tls { .. }) => "tls",
        None => "unknown",
    }
}

/// The gRPC code of a response: its `grpc-status` header when the answer is trailers-only (every
/// error tonic sends), else OK (a unary answer with a body).
fn response_code<B>(response: &http::Response<B>) -> tonic::Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

/// Counts SetEgress calls into [`Metrics`].
#[derive(Clone)]
pub struct SetEgressCounterLayer {
    metrics: Arc<Metrics>,
}

impl SetEgressCounterLayer {
    /// A layer counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> SetEgressCounterLayer {
        SetEgressCounterLayer { metrics }
    }
}

impl<S> Layer<S> for SetEgressCounterLayer {
    type Service = SetEgressCounter<S>;

    fn layer(&self, inner: S) -> SetEgressCounter<S> {
        SetEgressCounter {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`SetEgressCounterLayer`].
#[derive(Clone)]
pub struct SetEgressCounter<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Counts its call as `Cancelled` unless [`Pending::done`] counted it first.
struct Pending {
    metrics: Arc<Metrics>,
    caller: &'static str,
    counted: bool,
}

impl Pending {
    fn done(mut self, code: tonic::Code) {
        self.metrics.set_egress(&code_name(code), self.caller);
        self.counted = true;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.counted {
            self.metrics
                .set_egress(&code_name(tonic::Code::Cancelled), self.caller);
        }
    }
}

impl<S, B, R> Service<http::Request<B>> for SetEgressCounter<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != SET_EGRESS_PATH {
            return Box::pin(self.inner.call(request));
        }
        let pending = Pending {
            metrics: self.metrics.clone(),
            caller: caller(request.extensions().get::<PeerInfo>()),
            counted: false,
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await;
            match &response {
                Ok(response) => pending.done(response_code(response)),
                Err(_) => pending.done(tonic::Code::Unknown),
            }
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn call(status: Option<tonic::Status>, path: &str, peer: Option<PeerKind>) -> String {
        let metrics = Arc::new(Metrics::new());
        let service = tower::service_fn(move |_: http::Request<()>| {
            let status = status.clone();
            async move {
                Ok::<_, std::convert::Infallible>(match status {
                    Some(status) => status.into_http::<()>().map(|_| ()),
                    None => http::Response::new(()),
                })
            }
        });
        let mut request = http::Request::builder().uri(path).body(()).unwrap();
        if let Some(kind) = peer {
            request.extensions_mut().insert(PeerInfo::new(kind));
        }
        SetEgressCounterLayer::new(metrics.clone())
            .layer(service)
            .oneshot(request)
            .await
            .unwrap();
        kilo_egress_api::metrics_http::render(metrics.registry())
    }

    #[tokio::test]
    async fn counts_set_egress_by_code_and_caller() {
        let unix = PeerKind::Unix {
            uid: Some(0),
            gid: Some(0),
            pid: None,
        };
        let ok = call(None, SET_EGRESS_PATH, Some(unix)).await;
        assert!(
            ok.contains(r#"kilo_egress_set_egress_requests_total{caller="unix",grpc_code="OK"} 1"#),
            "{ok}"
        );
        let refused = call(
            Some(tonic::Status::resource_exhausted("full")),
            SET_EGRESS_PATH,
            None,
        )
        .await;
        assert!(
            refused.contains(
                r#"kilo_egress_set_egress_requests_total{caller="unknown",grpc_code="ResourceExhausted"} 1"#
            ),
            "{refused}"
        );
        let read = call(None, "/kilo.egress.v1.EgressService/GetRules", None).await;
        assert!(
            !read.contains("kilo_egress_set_egress_requests_total{"),
            "{read}"
        );
    }

    #[test]
    fn an_abandoned_call_counts_as_cancelled() {
        let metrics = Arc::new(Metrics::new());
        drop(Pending {
            metrics: metrics.clone(),
            caller: "tls",
            counted: false,
        });
        let text = kilo_egress_api::metrics_http::render(metrics.registry());
        assert!(
            text.contains(
                r#"kilo_egress_set_egress_requests_total{caller="tls",grpc_code="Cancelled"} 1"#
            ),
            "{text}"
        );
    }
}
