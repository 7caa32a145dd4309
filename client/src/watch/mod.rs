//! `kilo-egress watch`: keeps kilo-egressd's egress pair equal to the node annotation
//! `kilo.squat.ai/egress-ip`. Watches only its own Node (field selector `metadata.name=<node>`),
//! resumes after watch disconnects and `410 Gone`, retries kilo-egressd with backoff and
//! re-asserts the annotation every `--resync-interval` (level-triggered), and stops on SIGTERM.

pub mod controller;
pub mod decide;
pub mod egress;

use crate::ServerAddr;
use controller::{Controller, Outcome};
use egress::{EgressServer, GrpcEgress};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// The annotation read unless `--annotation` says otherwise (kilo #361).
pub const DEFAULT_ANNOTATION: &str = "kilo.squat.ai/egress-ip";

/// The first pause after a failed call to kilo-egressd; it doubles up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_millis(200);
/// The longest pause between two attempts to reach kilo-egressd.
pub const MAX_RETRY: Duration = Duration::from_secs(5);

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

/// Runs `kilo-egress watch` against kilo-egressd at `server` (each call bounded by `timeout`)
/// and the Kubernetes API from the environment (in-cluster, `KUBECONFIG` or `~/.kube/config`).
pub async fn run(server: ServerAddr, timeout: Duration, args: WatchArgs) -> ExitCode {
    init_logging();
    let client = match Client::try_default().await {
        Ok(client) => client,
        Err(err) => {
            error!(error = %err, "cannot configure the Kubernetes client: run in a pod with a service account, or set KUBECONFIG");
            return ExitCode::from(1);
        }
    };
    let egress = GrpcEgress::new(server.clone(), timeout);
    let controller = Controller::new(egress, client.clone(), &args.annotation, &args.node);
    info!(node = %args.node, annotation = %args.annotation, server = %server, once = args.once, "kilo-egress watch starting");
    if args.once {
        once(client, controller, &args).await
    } else {
        watch(client, controller, &args).await
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
) -> ExitCode {
    let nodes: Api<Node> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", args.node));
    // `default_backoff` resumes after disconnects and errors; `410 Gone` makes the watcher list
    // again. Every (re)list replays the Node, which `observe` turns into a no-op when unchanged.
    let mut events = watcher::watcher(nodes, config).default_backoff().boxed();
    let stop = terminate();
    tokio::pin!(stop);
    let mut node: Option<Node> = None;
    let mut retry = FIRST_RETRY;
    let mut failing = false;
    let mut next_check = Instant::now() + args.resync_interval;
    loop {
        let result = tokio::select! {
            _ = &mut stop => return ExitCode::SUCCESS,
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(seen) | watcher::Event::InitApply(seen))) => {
                    let result = controller.observe(&seen).await;
                    node = Some(seen);
                    result
                }
                Some(Ok(watcher::Event::Delete(_))) => {
                    warn!(node = %args.node, "the Node was deleted; keeping what is programmed");
                    node = None;
                    continue;
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => continue,
                Some(Err(err)) => {
                    warn!(error = %err, "watching the Node failed; resuming with backoff");
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
                    next_check = Instant::now() + args.resync_interval;
                    continue;
                }
            },
        };
        match result {
            Ok(outcome) => {
                debug!(?outcome, "reconciled");
                if failing {
                    info!("kilo-egressd reachable again; the annotation is in place");
                }
                failing = false;
                retry = FIRST_RETRY;
                next_check = Instant::now() + args.resync_interval;
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
