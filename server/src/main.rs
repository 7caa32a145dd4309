//! `kilo-egressd`: command line, logging and start-up order (load state → program it → serve).

use anyhow::{Context, bail};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use kilo_egress_api::DEFAULT_SOCKET;
use kilo_egress_api::egress::Family;
use kilo_egress_api::metrics_http;
use kilo_egressd::engine::presence::AbsentPolicy;
use kilo_egressd::engine::{self, Engine, EngineConfig};
use kilo_egressd::listen::ListenAddr;
use kilo_egressd::metrics::Metrics;
use kilo_egressd::netfilter::{self, Backend, BackendChoice, IptablesCli, choose_backend};
use kilo_egressd::rules::{ModeConfig, family_of_net};
use kilo_egressd::server::{self, Limits};
use kilo_egressd::state::StateStore;
use kilo_egressd::{claim, ctflush};
use security_args::SecurityArgs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

mod security_args;

/// Owns the egress decision of the nat chain KILO-NAT: SNAT pod traffic leaving the node to a
/// chosen IPv4/IPv6 address, MASQUERADE when none is chosen.
#[derive(Parser)]
#[command(name = "kilo-egressd", version, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Remove every rule kilo-egressd wrote (and its stored state), then exit.
    Cleanup(CommonArgs),
    /// Print this manual page (roff; `kilo-egressd man | man -l -`), or write one page per
    /// command into a directory.
    Man {
        /// Write kilo-egressd.1 and kilo-egressd-COMMAND.1 into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// kilo-egressd writes the whole KILO-NAT chain and the POSTROUTING jumps into it.
    Own,
    /// Kilo's agent writes KILO-NAT; kilo-egressd keeps one SNAT rule before its MASQUERADE.
    Kilo,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct CommonArgs {
    /// Who writes KILO-NAT: `own` (this service) or `kilo` (Kilo's agent, kg).
    #[arg(long, env = "KILO_EGRESS_MODE", value_enum, required = true)]
    mode: Option<ModeArg>,
    /// Which iptables implementation the host uses; `auto` picks the one holding the host's
    /// rules (kubelet's marker chain, then KILO-NAT, then the larger rule count).
    #[arg(
        long,
        env = "KILO_EGRESS_IPTABLES_BACKEND",
        value_enum,
        default_value = "auto"
    )]
    iptables_backend: BackendChoice,
    /// Directory of the stored desired state (state.json).
    #[arg(
        long,
        env = "KILO_EGRESS_STATE_DIR",
        default_value = "/var/lib/kilo-egress"
    )]
    state_dir: PathBuf,
    /// Log format on stderr; the level comes from RUST_LOG (default info).
    #[arg(
        long,
        env = "KILO_EGRESS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Where the API listens (repeatable): unix:///PATH, tcp://127.0.0.1:PORT (loopback,
    /// plaintext) or tcp://ADDR:PORT with --tls-cert, --tls-key and --client-ca (mutual TLS).
    #[arg(long, env = "KILO_EGRESS_LISTEN", value_delimiter = ',', default_values_t = [format!("unix://{DEFAULT_SOCKET}")])]
    listen: Vec<String>,
    #[command(flatten)]
    security: SecurityArgs,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (plain HTTP: bind to loopback or the
    /// node's own address; the metrics carry no secrets). Off unless given.
    #[arg(long, env = "KILO_EGRESS_METRICS_LISTEN", value_name = "ADDR:PORT", value_parser = metrics_http::parse_listen_addr)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Own mode: pod CIDR whose traffic is NATed (repeatable or comma-separated; IPv4 and/or IPv6).
    #[arg(long, env = "KILO_EGRESS_SOURCE_CIDRS", value_delimiter = ',')]
    source_cidr: Vec<IpNet>,
    /// Own mode: destination CIDR never NATed, e.g. the cluster's pod and service ranges (repeatable).
    #[arg(long, env = "KILO_EGRESS_NO_NAT_CIDRS", value_delimiter = ',')]
    no_nat_cidr: Vec<IpNet>,
    /// The IP families this node uses; rules of the others are never written (use `ipv4` on a
    /// host without IPv6 netfilter support).
    #[arg(long, env = "KILO_EGRESS_IP_FAMILIES", value_delimiter = ',', default_value = "ipv4,ipv6", value_parser = parse_family)]
    ip_families: Vec<Family>,
    /// What to program while a chosen egress address is not on any interface of the node (or,
    /// IPv6, still in or failed duplicate address detection): `masquerade` falls back to the
    /// node's own address until it appears; `keep` keeps the SNAT (fail closed: no traffic leaves
    /// with another address, and none gets replies meanwhile).
    #[arg(long, env = "KILO_EGRESS_ABSENT_ADDRESS", value_enum, default_value_t = AbsentPolicy::Masquerade)]
    absent_address: AbsentPolicy,
    /// Our SNAT and MASQUERADE rules carry `--random-fully` (source ports picked fully at random,
    /// as kube-proxy and Calico do against port collisions). Default: on when iptables accepts it
    /// (detected once at start); `=false` turns it off; `=true` fails at start when unsupported.
    #[arg(long, env = "KILO_EGRESS_RANDOM_FULLY", num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    random_fully: Option<bool>,
    /// After a family's egress decision changes (SetEgress, or the chosen address appearing or
    /// going), delete the conntrack entries of the flows the old decision NATed, so they move to
    /// the new one: UDP flows move, TCP connections NATed to the old address break. Needs the
    /// `conntrack` tool (package `conntrack`).
    #[arg(long, env = "KILO_EGRESS_CONNTRACK_FLUSH", num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    conntrack_flush: bool,
    /// How often the rules are checked and repaired when the kernel sends no change
    /// notifications (legacy backend, or --kernel-notifications=false); on legacy each check
    /// looks at the table's shape and reads the chains only when needed.
    #[arg(long, env = "KILO_EGRESS_RESYNC_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    resync_interval: Duration,
    /// nft: repair drift the moment nftables reports a change of KILO-NAT or POSTROUTING.
    #[arg(long, env = "KILO_EGRESS_KERNEL_NOTIFICATIONS", default_value_t = true, action = clap::ArgAction::Set)]
    kernel_notifications: bool,
    /// With change notifications, the rules are still re-read this often, as a safety net.
    #[arg(long, env = "KILO_EGRESS_SAFETY_CHECK_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    safety_check_interval: Duration,
}

/// Whether our rules carry `--random-fully`, and why: as asked, or as detected.
fn random_fully_setting(
    asked: Option<bool>,
    backend: Backend,
    families: &[Family],
) -> anyhow::Result<(bool, String)> {
    let detected = || netfilter::detect_random_fully(backend, families);
    Ok(match asked {
        Some(false) => (false, "off (--random-fully=false)".to_string()),
        Some(true) => match detected() {
            Ok(()) => (true, "on (--random-fully=true)".to_string()),
            Err(why) => anyhow::bail!(
                "--random-fully=true, but this iptables does not support it: {why}; \
                 omit the flag to use it only where supported, or set --random-fully=false"
            ),
        },
        None => match detected() {
            Ok(()) => (
                true,
                "on (detected: iptables-restore accepts --random-fully)".to_string(),
            ),
            Err(why) => (false, format!("off (not supported here: {why})")),
        },
    })
}

fn parse_family(text: &str) -> Result<Family, String> {
    match text.to_ascii_lowercase().as_str() {
        "ipv4" => Ok(Family::Ipv4),
        "ipv6" => Ok(Family::Ipv6),
        _ => Err(format!("{text:?} is not an IP family: use ipv4 or ipv6")),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn mode_config(args: &RunArgs) -> anyhow::Result<ModeConfig> {
    match args.common.mode.expect("clap requires --mode") {
        ModeArg::Kilo => {
            if !args.source_cidr.is_empty() || !args.no_nat_cidr.is_empty() {
                bail!(
                    "--source-cidr and --no-nat-cidr apply to --mode own only; in kilo mode Kilo's agent decides what is NATed"
                );
            }
            Ok(ModeConfig::Kilo)
        }
        ModeArg::Own => {
            if let Some(net) = args
                .source_cidr
                .iter()
                .chain(&args.no_nat_cidr)
                .find(|net| !args.ip_families.contains(&family_of_net(net)))
            {
                bail!(
                    "{net} is {} but --ip-families does not include it",
                    family_of_net(net)
                );
            }
            if args.source_cidr.is_empty() {
                bail!(
                    "--mode own needs at least one --source-cidr: the pod CIDR(s) whose traffic leaving the node is NATed, e.g. --source-cidr 10.4.0.0/16"
                );
            }
            Ok(ModeConfig::Own {
                source_cidrs: args.source_cidr.iter().map(IpNet::trunc).collect(),
                no_nat_cidrs: args.no_nat_cidr.iter().map(IpNet::trunc).collect(),
            })
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!(signal = name, "stopping; the egress rules stay in place");
}

async fn cleanup(args: &CommonArgs) -> anyhow::Result<()> {
    let _claim = claim::claim().await?;
    let mode = match args.mode.expect("clap requires --mode") {
        ModeArg::Kilo => ModeConfig::Kilo,
        ModeArg::Own => ModeConfig::Own {
            source_cidrs: Vec::new(),
            no_nat_cidrs: Vec::new(),
        },
    };
    let (backend, reason) = choose_backend(args.iptables_backend);
    info!(backend = backend.name(), %reason, "iptables backend");
    let netfilter = IptablesCli::new(backend)?;
    let removed = engine::cleanup(&mode, &netfilter).context("removing the rules")?;
    StateStore::new(&args.state_dir).remove()?;
    info!(rules_removed = removed, state_dir = %args.state_dir.display(), "cleanup done");
    Ok(())
}

/// glibc's malloc gives each thread that allocates its own arena (up to 8 per CPU) and keeps what
/// is freed there for that arena, so the transient peaks of the engine thread, the start-up
/// thread and the gRPC workers add up instead of reusing the same memory: with one arena a
/// 10,000-rule start peaks at ~15 MiB instead of ~24 MiB, and a burst of 1,000 SetEgress calls
/// at ~17 MiB instead of ~25 MiB (docs/BENCHMARKS.md), at no measured cost in speed (the work is
/// serialized by the engine anyway). A fixed `MALLOC_MMAP_THRESHOLD_` of 128 KiB (glibc's
/// default starting value) turns off the threshold's growth: every buffer of 128 KiB or more (a
/// large chain's rule list, a GetRules reply) gets a mapping of its own, returned when it is
/// freed, instead of staying resident in the heap after the first such buffer was freed (the
/// 10,000-rule start and GetRules peak ~0.6 MB lower). glibc reads both (see mallopt(3)) when the
/// process starts; setting them from inside would take unsafe `mallopt` calls, so the daemon
/// executes itself again with the variables once (same pid, same arguments); an operator's own
/// `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES` is left as it is.
fn limit_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return;
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut args = std::env::args_os();
        let error = std::process::Command::new(exe)
            .arg0(args.next().unwrap_or_default())
            .args(args)
            .env("MALLOC_ARENA_MAX", "1")
            .env("MALLOC_MMAP_THRESHOLD_", "131072")
            .exec();
        // Only returns when the exec failed: run on with the default arenas.
        eprintln!(
            "kilo-egressd: cannot limit malloc arenas ({error}); running with glibc's default"
        );
    }
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("start the tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the cause chain on one line, without a backtrace.
            eprintln!("kilo-egressd: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Some(Command::Cleanup(args)) => {
            init_logging(args.log_format);
            return cleanup(args).await;
        }
        Some(Command::Man { dir: Some(dir) }) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            return clap_mangen::generate_to(Cli::command(), dir)
                .with_context(|| format!("writing the manual pages into {}", dir.display()));
        }
        Some(Command::Man { dir: None }) => {
            return Ok(clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?);
        }
        None => {}
    }
    let args = cli.run;
    init_logging(args.common.log_format);
    let listens = args
        .listen
        .iter()
        .map(|l| l.parse::<ListenAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    let security = args.security.security()?;
    for listen in &listens {
        listen.check_tls(security.tls.is_some())?;
    }
    let mode = mode_config(&args)?;
    if args.conntrack_flush {
        // Before anything is read or written: the option cannot work without the tool.
        ctflush::check(&args.ip_families)?;
    }
    // Before any rule is read: one instance per network namespace.
    let _claim = claim::claim().await?;
    // Before any rule is read, so a bad address changes nothing.
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(metrics_http::bind(addr).await?),
        None => None,
    };
    let (backend, backend_reason) = choose_backend(args.common.iptables_backend);
    let netfilter = Arc::new(IptablesCli::new(backend)?);
    info!(
        mode = %mode.mode(),
        backend = backend.name(),
        backend_reason = %backend_reason,
        "starting kilo-egressd"
    );
    let (random_fully, random_fully_reason) =
        random_fully_setting(args.random_fully, backend, &args.ip_families)?;
    info!(random_fully, reason = %random_fully_reason, "--random-fully");
    let config = EngineConfig {
        mode,
        resync_interval: args.resync_interval,
        safety_check_interval: args.safety_check_interval,
        kernel_notifications: args.kernel_notifications,
        backend_reason,
        notification_debounce: engine::NOTIFICATION_DEBOUNCE,
        families: args.ip_families.clone(),
        follow_addresses: true,
        absent_address: args.absent_address,
        random_fully,
        random_fully_reason,
        conntrack_flush: args.conntrack_flush,
        metrics: Arc::new(Metrics::new()),
    };
    let metrics = config.metrics.clone();
    let (handle, _engine) = tokio::task::spawn_blocking(move || {
        Engine::start(config, netfilter, StateStore::new(&args.common.state_dir))
    })
    .await?;
    if let Some(listener) = metrics_listener {
        info!(addr = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
        let registry = metrics.registry().clone();
        tokio::spawn(async move {
            if let Err(e) = metrics_http::serve(listener, registry, std::future::pending()).await {
                tracing::error!(error = %e, "serving metrics failed");
            }
        });
    }
    server::serve_all(
        &listens,
        handle,
        Limits::default(),
        security,
        shutdown_signal(),
    )
    .await?;
    Ok(())
}
