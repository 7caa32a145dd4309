//! `kilo-egress watch`: keeps kilo-egressd's egress pair equal to the node annotation
//! `kilo.squat.ai/egress-ip`. Watches only its own Node (field selector `metadata.name=<node>`),
//! resumes after watch disconnects and `410 Gone`, retries kilo-egressd with backoff and
//! re-asserts the annotation every `--resync-interval` (level-triggered), and stops on SIGTERM.
//! With `--heartbeat-file` it records its progress for the liveness probe `watch-alive`
//! ([`heartbeat`]).

pub mod controller;
pub mod decide;
pub mod egress;
pub mod heartbeat;
pub mod metrics;

use crate::ServerAddr;
use crate::tls::TlsFiles;
use controller::{Controller, Outcome};
use egress::{EgressServer, GrpcEgress};
use futures::StreamExt;
use heartbeat::Heartbeat;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use metrics::WatchMetrics;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// The annotation read unless `--annotation` says otherwise (kilo #361).
pub const DEFAULT_ANNOTATION: &str = "kilo.squat.ai/egress-ip";

/// The first pause after a failed call to kilo-egressd; it doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_millis(200);
/// The longest pause between two attempts to reach kilo-egressd.
pub const MAX_RETRY: Duration = Duration::from_secs(5);

/// Every Kubernetes API access of the watcher, as RBAC spells it: (API group, resource, verbs).
/// `deploy/kubernetes` grants exactly this (checked by tests/tests/manifests.rs).
pub const API_ACCESS: &[(&str, &str, &[&str])] = &[
    // get: `--once`; list and watch: the watcher, on its own Node only.
    ("", "nodes", &["get", "list", "watch"]),
    // create: a new Event; patch: the same Event again (kube's recorder counts a series).
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// Arguments of `kilo-egress watch`.
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// This node's name (from the downward API: spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// The node annotation holding the egress addresses.
    #[arg(long, default_value = DEFAULT_ANNOTATION)]
    pub annotation: String,
    /// How often to compare kilo-egressd's pair with the annotation even without a Node change.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,
    /// Apply the current annotation once and exit: 0 applied or already in place, 2 invalid
    /// annotation, 1 any other failure.
    #[arg(long)]
    pub once: bool,
    /// Rewrite this file whenever the loop made progress (a Node event handled, or a resync's
    /// round-trip with kilo-egressd), for the liveness probe `kilo-egress watch-alive`.
    #[arg(long, env = heartbeat::HEARTBEAT_FILE_ENV, value_name = "PATH")]
    pub heartbeat_file: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (plain HTTP: bind to loopback or the
    /// node's own address). Off unless given.
    #[arg(
        long,
        env = "KILO_EGRESS_WATCH_METRICS_LISTEN",
        value_name = "ADDR:PORT",
        value_parser = kilo_egress_api::metrics_http::parse_listen_addr
    )]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Runs `kilo-egress watch` against kilo-egressd at `server` (each call bounded by `timeout`,
/// `tls` for an `https://` server) and the Kubernetes API from the environment (in-cluster,
/// `KUBECONFIG` or `~/.kube/config`).
pub async fn run(
    server: ServerAddr,
    timeout: Duration,
    tls: TlsFiles,
    args: WatchArgs,
) -> ExitCode {
    init_logging();
    let metrics = Arc::new(WatchMetrics::new());
    if let Some(addr) = args.metrics_listen {
        let listener = match kilo_egress_api::metrics_http::bind(addr).await {
            Ok(listener) => listener,
            Err(err) => {
                error!("{err}");
                return ExitCode::from(1);
            }
        };
        info!(%addr, "serving Prometheus metrics at /metrics");
        let registry = metrics.registry().clone();
        tokio::spawn(async move {
            let served =
                kilo_egress_api::metrics_http::serve(listener, registry, std::future::pending());
            if let Err(err) = served.await {
                error!(error = %err, "serving metrics failed");
            }
        });
    }
    let client = match Client::try_default().await {
        Ok(client) => client,
        Err(err) => {
            error!(error = %err, "cannot configure the Kubernetes client: run in a pod with a service account, or set KUBECONFIG");
            return ExitCode::from(1);
        }
    };
    let egress = GrpcEgress::new(server.clone(), timeout, tls).with_metrics(metrics.clone());
    let controller = Controller::new(egress, client.clone(), &args.annotation, &args.node)
        .with_metrics(metrics.clone());
    info!(node = %args.node, annotation = %args.annotation, server = %server, once = args.once, "kilo-egress watch starting");
    if args.once {
        once(client, controller, &args).await
    } else {
        watch(client, controller, &args, &metrics).await
    }
}

/// The `outcome` label of a reconcile's result.
fn outcome_label(result: &Result<Outcome, crate::ClientError>) -> &'static str {
    match result {
        Ok(Outcome::Unchanged) => "unchanged",
        Ok(Outcome::InSync) => "in_sync",
        Ok(Outcome::Applied(_)) => "applied",
        Ok(Outcome::Invalid(_)) => "invalid",
        Err(_) => "error",
    }
}

/// `--once`: read the Node, reconcile, exit.
pub async fn once<E: EgressServer>(
    client: Client,
    mut controller: Controller<E>,
    args: &WatchArgs,
) -> ExitCode {
    let nodes: Api<Node> = Api::all(client);
    let node = match nodes.get(&args.node).await {
        Ok(node) => node,
        Err(err) => {
            error!(node = %args.node, error = %err, "cannot read the Node");
            return ExitCode::from(1);
        }
    };
    match controller.reconcile(&node).await {
        Ok(Outcome::Invalid(_)) => ExitCode::from(2),
        Ok(outcome) => {
            info!(?outcome, "done");
            ExitCode::SUCCESS
        }
        Err(err) => {
            error!(error = %err, "cannot program kilo-egressd");
            ExitCode::from(1)
        }
    }
}

async fn terminate() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: stopping"),
    }
}

/// Watches the Node until SIGTERM/SIGINT, reconciling on each change, on every
/// `--resync-interval`, and with backoff after kilo-egressd failed.
pub async fn watch<E: EgressServer>(
    client: Client,
    mut controller: Controller<E>,
    args: &WatchArgs,
    metrics: &WatchMetrics,
) -> ExitCode {
    let nodes: Api<Node> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", args.node));
    // `default_backoff` resumes after disconnects and errors; `410 Gone` makes the watcher list
    // again. Every (re)list replays the Node, which `observe` turns into a no-op when unchanged.
    let mut events = watcher::watcher(nodes, config).default_backoff().boxed();
    let stop = terminate();
    tokio::pin!(stop);
    let mut node: Option<Node> = None;
    // Whether the current (re)list returned the Node.
    let mut listed = false;
    let mut retry = FIRST_RETRY;
    let mut failing = false;
    let mut next_check = Instant::now() + args.resync_interval;
    let mut heartbeat = Heartbeat::new(args.heartbeat_file.clone());
    loop {
        let result = tokio::select! {
            _ = &mut stop => return ExitCode::SUCCESS,
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(seen) | watcher::Event::InitApply(seen))) => {
                    metrics.event("apply");
                    listed = true;
                    let result = controller.observe(&seen).await;
                    node = Some(seen);
                    result
                }
                Some(Ok(watcher::Event::Delete(_))) => {
                    metrics.event("delete");
                    warn!(node = %args.node, "the Node was deleted; keeping what is programmed");
                    node = None;
                    continue;
                }
                Some(Ok(watcher::Event::Init)) => {
                    metrics.event("init");
                    listed = false;
                    continue;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    metrics.event("init_done");
                    if !listed {
                        warn!(node = %args.node, "no Node of this name: check --node (NODE_NAME); waiting for it to appear");
                        node = None;
                    }
                    continue;
                }
                Some(Err(err)) => {
                    warn!(error = %err, "watching the Node failed; resuming with backoff");
                    metrics.event("error");
                    metrics.reconnect("kubernetes");
                    continue;
                }
                None => {
                    error!("the Node watch ended");
                    return ExitCode::from(1);
                }
            },
            _ = tokio::time::sleep_until(next_check) => match &node {
                Some(seen) => controller.reconcile(seen).await,
                None => {
                    // No Node to reconcile: still prove the link to kilo-egressd, so a watcher
                    // waiting for its Node stays alive (a restart would not register it).
                    if controller.ping().await.is_ok() {
                        heartbeat.beat(SystemTime::now());
                    }
                    next_check = Instant::now() + args.resync_interval;
                    continue;
                }
            },
        };
        metrics.reconciled(outcome_label(&result), result.is_ok());
        match result {
            Ok(outcome) => {
                debug!(?outcome, "reconciled");
                if failing {
                    info!("kilo-egressd reachable again; the annotation is in place");
                }
                failing = false;
                retry = FIRST_RETRY;
                next_check = Instant::now() + args.resync_interval;
                heartbeat.beat(SystemTime::now());
            }
            Err(err) => {
                warn!(error = %err, retry_in = ?retry, "cannot program kilo-egressd; retrying");
                failing = true;
                next_check = Instant::now() + retry;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The watch loop and `--once` against kube-rs's mocked client (tower-test): which requests
    //! they make, and that each is covered by [`API_ACCESS`].
    use super::*;
    use crate::ClientError;
    use crate::watch::controller::REASON_APPLIED;
    use crate::watch::egress::EgressServer;
    use http::{Method, Request, Response};
    use kilo_egress_api::egress::EgressAddrs;
    use kube::client::Body;
    use serde_json::{Value, json};
    use std::sync::{Arc, Mutex};
    use tower_test::mock;

    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<Vec<Vec<String>>>>);

    impl EgressServer for Recorded {
        async fn current(&mut self) -> Result<EgressAddrs, ClientError> {
            Ok(EgressAddrs::NONE)
        }
        async fn apply(&mut self, entries: Vec<String>) -> Result<(), ClientError> {
            self.0.lock().unwrap().push(entries);
            Ok(())
        }
    }

    fn node_json() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "uid": "u", "resourceVersion": "5",
                         "annotations": {"kilo.squat.ai/egress-ip": "198.51.100.20"}},
        })
    }

    fn args(once: bool) -> WatchArgs {
        WatchArgs {
            node: "node-a".into(),
            annotation: DEFAULT_ANNOTATION.into(),
            resync_interval: Duration::from_secs(60),
            once,
            heartbeat_file: None,
            metrics_listen: None,
        }
    }

    /// The RBAC (group, resource, verb) of a request, as the API server authorizes it.
    fn access_of(method: &Method, uri: &http::Uri) -> (String, String, String) {
        let parts: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
        let (group, rest) = match parts.as_slice() {
            ["api", _version, rest @ ..] => (String::new(), rest.to_vec()),
            ["apis", group, _version, rest @ ..] => (group.to_string(), rest.to_vec()),
            _ => panic!("not a resource path: {uri}"),
        };
        let rest = match rest.as_slice() {
            ["namespaces", _ns, rest @ ..] => rest.to_vec(),
            _ => rest,
        };
        let named = rest.len() > 1;
        let query = uri.query().unwrap_or_default();
        let verb = match *method {
            Method::GET if query.contains("watch=true") => "watch",
            Method::GET if named => "get",
            Method::GET => "list",
            Method::POST => "create",
            Method::PATCH => "patch",
            _ => panic!("unexpected method {method} {uri}"),
        };
        (group, rest[0].to_string(), verb.to_string())
    }

    fn assert_granted(access: &(String, String, String)) {
        let (group, resource, verb) = access;
        assert!(
            API_ACCESS
                .iter()
                .any(|(g, r, verbs)| g == group && r == resource && verbs.contains(&verb.as_str())),
            "{access:?} is not in API_ACCESS"
        );
    }

    #[test]
    fn access_of_reads_rbac_from_requests() {
        let cases = [
            (Method::GET, "/api/v1/nodes/node-a", ("", "nodes", "get")),
            (
                Method::GET,
                "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-a",
                ("", "nodes", "list"),
            ),
            (
                Method::GET,
                "/api/v1/nodes?watch=true",
                ("", "nodes", "watch"),
            ),
            (
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/default/events",
                ("events.k8s.io", "events", "create"),
            ),
            (
                Method::PATCH,
                "/apis/events.k8s.io/v1/namespaces/default/events/e.1",
                ("events.k8s.io", "events", "patch"),
            ),
        ];
        for (method, uri, (g, r, v)) in cases {
            let got = access_of(&method, &uri.parse().unwrap());
            assert_eq!(
                got,
                (g.to_string(), r.to_string(), v.to_string()),
                "{method} {uri}"
            );
        }
    }

    #[tokio::test]
    async fn once_gets_its_node_applies_and_posts_an_event() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((request, send)) = handle.next_request().await {
                let access = access_of(request.method(), request.uri());
                let body = match access.2.as_str() {
                    "get" => {
                        assert_eq!(request.uri().path(), "/api/v1/nodes/node-a");
                        serde_json::to_vec(&node_json()).unwrap()
                    }
                    _ => request.into_body().collect_bytes().await.unwrap().to_vec(),
                };
                send.send_response(Response::builder().body(Body::from(body)).unwrap());
                seen.push(access);
            }
            seen
        });
        let egress = Recorded::default();
        let client = Client::new(service, "default");
        let controller =
            Controller::new(egress.clone(), client.clone(), DEFAULT_ANNOTATION, "node-a");
        let code = once(client, controller, &args(true)).await;
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(
            *egress.0.lock().unwrap(),
            [vec!["198.51.100.20".to_string()]]
        );
        let seen = server.await.unwrap();
        let verbs: Vec<&str> = seen.iter().map(|a| a.2.as_str()).collect();
        assert_eq!(verbs, ["get", "create"]);
        seen.iter().for_each(assert_granted);
    }

    #[tokio::test]
    async fn watch_lists_and_watches_only_its_own_node() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let egress = Recorded::default();
        let client = Client::new(service, "default");
        let controller =
            Controller::new(egress.clone(), client.clone(), DEFAULT_ANNOTATION, "node-a");
        let watching = tokio::spawn(async move {
            watch(client, controller, &args(false), &WatchMetrics::new()).await
        });
        let mut seen = Vec::new();
        let mut events = Vec::new();
        let served = tokio::time::timeout(Duration::from_secs(10), async {
            let watched = |seen: &[(String, String, String)]| seen.iter().any(|a| a.2 == "watch");
            while !watched(&seen) || events.is_empty() {
                let (request, send) = handle
                    .next_request()
                    .await
                    .expect("the watcher keeps asking");
                let access = access_of(request.method(), request.uri());
                let query = request.uri().query().unwrap_or_default().to_string();
                let body = match access.2.as_str() {
                    "list" | "watch" => {
                        assert!(
                            query.contains("fieldSelector=metadata.name%3Dnode-a"),
                            "every list and watch selects its own Node: {}",
                            request.uri()
                        );
                        if access.2 == "list" {
                            json!({"apiVersion": "v1", "kind": "NodeList",
                                   "metadata": {"resourceVersion": "5"}, "items": [node_json()]})
                            .to_string()
                            .into_bytes()
                        } else {
                            Vec::new()
                        }
                    }
                    _ => {
                        let body = request.into_body().collect_bytes().await.unwrap().to_vec();
                        events.push(serde_json::from_slice::<Value>(&body).unwrap());
                        body
                    }
                };
                send.send_response(Response::builder().body(Body::from(body)).unwrap());
                seen.push(access);
            }
        })
        .await;
        watching.abort();
        assert!(
            served.is_ok(),
            "no list, watch and Event within 10 s: {seen:?}"
        );
        seen.iter().for_each(assert_granted);
        assert_eq!(
            *egress.0.lock().unwrap(),
            [vec!["198.51.100.20".to_string()]]
        );
        assert_eq!(events[0]["reason"], REASON_APPLIED);
    }
}
