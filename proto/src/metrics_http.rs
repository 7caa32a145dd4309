//! `/metrics` for both binaries (`kilo-egressd --metrics-listen`, `kilo-egress watch
//! --metrics-listen`): a Prometheus registry served over plain HTTP/1.1 in the classic text
//! format (version 0.0.4), which every Prometheus server and `promtool check metrics` accept.
//! Metrics carry no secrets, so there is no TLS: bind to loopback or to the node's own address.

use prometheus::{Encoder, Gauge, Opts, Registry, TextEncoder};
use std::future::Future;
use std::net::SocketAddr;

/// The content type of the classic Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics listener could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("--metrics-listen {addr}: cannot listen: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Parses a metrics listen address: `ADDR:PORT`, `[IPV6]:PORT`, or an IPv6 address and port
/// without brackets (`2001:db8::1:9464`, what `$(HOST_IP):9464` gives on an IPv6 node).
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let unbracketed = text
        .rsplit_once(':')
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)));
    unbracketed.ok_or_else(|| {
        format!("{text:?} is not ADDR:PORT (e.g. 127.0.0.1:9464, 10.0.0.5:9464, [fd00::5]:9464)")
    })
}

/// Registers `metric` in `registry` and returns it, for the caller to keep.
pub fn registered<M>(registry: &Registry, metric: M) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

/// A registry with what every kilo-egress binary exports: `kilo_egress_build_info` (labelled
/// with `binary` and `version`) and the standard `process_*` metrics.
pub fn registry(binary: &str, version: &str) -> Registry {
    let registry = Registry::new();
    let info = Gauge::with_opts(
        Opts::new(
            "kilo_egress_build_info",
            "Always 1; the labels say which binary and version is running.",
        )
        .const_label("binary", binary)
        .const_label("version", version),
    )
    .expect("valid metric");
    info.set(1.0);
    registered(&registry, info);
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("registered once");
    registry
}

/// Everything in `registry`, in the classic text format.
pub fn render(registry: &Registry) -> String {
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .expect("the text encoder writes to memory");
    String::from_utf8(text).expect("the text format is UTF-8")
}

/// Opens the metrics listener, so that a bad address fails start-up before anything runs.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Serves `registry` at `/metrics` on `listener` until `shutdown` completes; every other path
/// answers 404.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let body = render(&registry);
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], body) }
            }),
        )
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: metrics are at /metrics\n",
            )
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_carries_build_info_and_process_metrics() {
        let text = render(&registry("kilo-egressd", "1.2.3"));
        assert!(
            text.contains(r#"kilo_egress_build_info{binary="kilo-egressd",version="1.2.3"} 1"#),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
    }

    #[test]
    fn listen_addresses_parse_with_or_without_brackets() {
        for (text, want) in [
            ("127.0.0.1:9464", "127.0.0.1:9464"),
            ("[fd00::5]:9464", "[fd00::5]:9464"),
            ("fd00::5:9464", "[fd00::5]:9464"),
            ("2001:db8::1:9465", "[2001:db8::1]:9465"),
        ] {
            assert_eq!(parse_listen_addr(text).unwrap().to_string(), want, "{text}");
        }
        for bad in [
            "9464",
            "localhost:9464",
            "10.0.0.5",
            ":9464",
            "10.0.0.5:http",
        ] {
            let error = parse_listen_addr(bad).unwrap_err();
            assert!(error.contains("is not ADDR:PORT"), "{bad}: {error}");
        }
    }

    #[tokio::test]
    async fn serves_metrics_and_nothing_else() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, registry("test", "0"), async {
            let _ = stopped.await;
        }));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains(CONTENT_TYPE), "{metrics}");
        assert!(metrics.contains("kilo_egress_build_info"), "{metrics}");
        let other = get("/").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_taken_address_names_the_flag_and_the_address() {
        let taken = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = bind(addr).await.unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("--metrics-listen {addr}: cannot listen: ")),
            "{error}"
        );
    }
}
