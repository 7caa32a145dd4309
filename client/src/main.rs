//! `kilo-egress`: the command-line client of kilo-egressd. Exit status: 0 success, 2 invalid
//! input (nothing changed), 1 any other failure.

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use decision::Request;
use kilo_egress::api;
use kilo_egress::{ClientError, EgressClient, ServerAddr};
use kilo_egress_api::egress::{Family, Mode};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod decision;

/// Set, clear and inspect the egress address of pod traffic leaving this node.
#[derive(Parser)]
#[command(name = "kilo-egress", version)]
struct Cli {
    /// kilo-egressd's address: unix:///PATH, http://127.0.0.1:PORT or https://HOST:PORT (with
    /// --ca, --cert and --key).
    #[arg(
        long,
        global = true,
        env = "KILO_EGRESS_SERVER",
        default_value_t = ServerAddr::default().to_string()
    )]
    server: String,
    /// Give up on the server after this long.
    #[arg(long, global = true, default_value = "10s", value_parser = humantime_secs)]
    timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Command,
}

/// Mutual TLS for https:// servers.
#[derive(clap::Args)]
struct TlsArgs {
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, global = true, env = "KILO_EGRESS_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), signed by the server's --client-ca.
    #[arg(long, global = true, env = "KILO_EGRESS_CERT", value_name = "FILE")]
    cert: Option<std::path::PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, global = true, env = "KILO_EGRESS_KEY", value_name = "FILE")]
    key: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Use these addresses as the source of pod traffic: one IPv4 and/or one IPv6, either order.
    /// The request is the whole desired pair: a family given no address goes back to MASQUERADE
    /// (the reply says so for both families).
    Set {
        /// Plain addresses, e.g. 198.51.100.20 2001:db8::20.
        #[arg(required = true, value_name = "ADDR")]
        addrs: Vec<String>,
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Forget the chosen addresses: MASQUERADE picks the source again.
    Clear {
        #[command(flatten)]
        write: WriteArgs,
    },
    /// Show the chosen addresses and the rules in the kernel.
    Get {
        /// Print only the current generation, for --expected-generation.
        #[arg(long, conflicts_with = "output")]
        generation: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Exit 0 when kilo-egressd is serving, 1 otherwise. Serving: the accepted rules are in the
    /// kernel, or in kilo mode as far as kilo-egressd can put them (while Kilo's agent has not
    /// written KILO-NAT yet, a note on stderr says so); a degraded write path (the last write
    /// failed) is printed on stderr.
    Health {
        /// The liveness check: exit 0 whenever kilo-egressd's engine answers (a GetRules round
        /// trip), whatever the state of the rules. A failing write is retried by kilo-egressd
        /// itself and a restart would not repair it; a hung or stopped engine does not answer
        /// within --timeout: exit 1.
        #[arg(long)]
        alive: bool,
    },
    /// Keep the egress pair equal to this Node's annotation (runs beside kilo-egressd).
    Watch(kilo_egress::watch::WatchArgs),
    /// Exit 0 when `kilo-egress watch --heartbeat-file` made progress within --max-age, 1
    /// otherwise (the watcher's liveness probe; reads only the file).
    WatchAlive(kilo_egress::watch::heartbeat::AliveArgs),
    /// Print a shell completion script, e.g. `source <(kilo-egress completions bash)`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print this manual page (roff; `kilo-egress man | man -l -`), or write one page per
    /// command into a directory.
    Man {
        /// Write kilo-egress.1 and kilo-egress-COMMAND.1 into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct WriteArgs {
    /// Show the rules that would be programmed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Fail unless the current generation is this one (safe with several writers).
    #[arg(long, value_name = "N")]
    expected_generation: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(clap::Args)]
struct OutputArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    /// Readable text.
    Table,
    /// proto3 JSON, as grpcurl prints it.
    Json,
}

fn humantime_secs(text: &str) -> Result<Duration, String> {
    let (number, scale) = match text.strip_suffix("ms") {
        Some(ms) => (ms, 0.001),
        None => (text.strip_suffix('s').unwrap_or(text), 1.0),
    };
    number
        .parse::<f64>()
        .ok()
        .filter(|n| *n > 0.0)
        .map(|n| Duration::from_secs_f64(n * scale))
        .ok_or_else(|| format!("{text:?} is not a duration such as 10s or 500ms"))
}

fn or_masquerade(addr: &str) -> &str {
    if addr.is_empty() { "MASQUERADE" } else { addr }
}

fn family_name(family: i32) -> String {
    Family::try_from(family).map_or_else(|_| "?".to_string(), |f| f.to_string())
}

/// Which reply the rules come from: GetRules (read back) or SetEgress (programmed, or for a dry
/// run, as they would be).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listing {
    Read,
    Programmed,
    DryRun,
}

fn print_families(families: &[api::FamilyRules], listing: Listing) {
    for family in families {
        let name = family_name(family.family);
        match listing {
            Listing::Read => {
                let sync = if family.in_sync {
                    "in sync"
                } else {
                    "NOT in sync"
                };
                println!("\n{name}: {} ({sync})", family.status);
            }
            // The decision lines above said what each family holds; here are the rules.
            Listing::Programmed if !family.rules.is_empty() => println!("\n{name} rules:"),
            Listing::DryRun if !family.rules.is_empty() => {
                let would = if family.in_sync {
                    "nothing would change"
                } else {
                    "it would program"
                };
                println!("\n{name} rules ({would}):");
            }
            Listing::Programmed | Listing::DryRun => {}
        }
        if family.rules.is_empty() {
            continue;
        }
        println!("  {:<5} {:>10} {:>12}  RULE", "OWNED", "PACKETS", "BYTES");
        for rule in &family.rules {
            let owned = if rule.owned { "yes" } else { "-" };
            println!(
                "  {owned:<5} {:>10} {:>12}  {}",
                rule.packets, rule.bytes, rule.spec
            );
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("API types serialize")
    );
}

fn print_set(response: &api::SetEgressResponse, request: Request, output: Output) {
    if let Output::Json = output {
        return print_json(response);
    }
    if response.dry_run {
        println!(
            "dry run, nothing changed; this request would program (generation {}):",
            response.generation
        );
    } else {
        println!("programmed (generation {}):", response.generation);
    }
    let lines = decision::decision_lines(response, request);
    for line in &lines {
        println!("  {line}");
    }
    for warning in decision::extra_warnings(response, &lines) {
        println!("warning: {warning}");
    }
    let listing = if response.dry_run {
        Listing::DryRun
    } else {
        Listing::Programmed
    };
    print_families(&response.rules, listing);
}

fn print_rules(response: &api::GetRulesResponse, output: Output) {
    if let Output::Json = output {
        return print_json(response);
    }
    let pair = response.egress.clone().unwrap_or_default();
    let mode = Mode::try_from(response.mode).map_or_else(|_| "?".to_string(), |m| m.to_string());
    let applied = rfc3339(response.last_apply_time.as_ref()).unwrap_or_else(|| "never".to_string());
    let absent = |family: Family| {
        let absent = response
            .families
            .iter()
            .any(|f| f.address_absent && Family::try_from(f.family).is_ok_and(|x| x == family));
        if absent {
            " (NOT on the node: see below)"
        } else {
            ""
        }
    };
    println!(
        "IPv4 egress:  {}{}",
        or_masquerade(&pair.ipv4),
        absent(Family::Ipv4)
    );
    println!(
        "IPv6 egress:  {}{}",
        or_masquerade(&pair.ipv6),
        absent(Family::Ipv6)
    );
    println!("generation:   {}", response.generation);
    println!("mode:         {mode}");
    println!(
        "backend:      {} ({})",
        response.backend, response.backend_reason
    );
    println!("drift:        {}", response.drift_detection);
    println!("addresses:    {}", response.address_presence);
    println!("random-fully: {}", response.random_fully);
    println!("conntrack:    {}", response.conntrack_flush);
    println!(
        "writes:       {} transactions since start",
        response.kernel_transactions
    );
    println!(
        "in sync:      {}",
        if response.in_sync { "yes" } else { "NO" }
    );
    println!("last apply:   {applied}");
    match &response.last_write_failure {
        Some(failure) => println!("write path:   {}", degraded(failure)),
        None if !response.last_error.is_empty() => {
            println!("last error:   {}", response.last_error)
        }
        None => {}
    }
    print_families(&response.families, Listing::Read);
}

/// proto3 JSON renders a Timestamp as RFC 3339 (UTC), the form operators read in logs.
fn rfc3339<T: serde::Serialize>(time: Option<&T>) -> Option<String> {
    time.and_then(|t| serde_json::to_value(t).ok())
        .and_then(|v| v.as_str().map(str::to_string))
}

/// One line saying that writes fail, since when, doing what, and why.
fn degraded(failure: &api::WriteFailure) -> String {
    format!(
        "DEGRADED since {}: {} failed: {}",
        rfc3339(failure.time.as_ref()).unwrap_or_else(|| "?".to_string()),
        failure.what,
        failure.error
    )
}

/// Kilo mode: families whose chosen address is not programmed because Kilo's agent has not
/// written KILO-NAT (or its MASQUERADE rule) yet. Not a failure of kilo-egressd, so health stays
/// SERVING; the SNAT rule follows as soon as the chain is there.
fn health_notes(rules: &api::GetRulesResponse) -> Vec<String> {
    rules
        .families
        .iter()
        .filter(|f| !f.in_sync && f.status.starts_with("waiting for Kilo's agent"))
        .map(|f| {
            format!(
                "note: {}: {}; kilo-egressd is ready and places the SNAT rule as soon as Kilo's agent writes it",
                family_name(f.family),
                f.status
            )
        })
        .collect()
}

/// Maps an error to its exit status and prints what to do next.
fn report(error: &ClientError, https: bool) -> ExitCode {
    eprintln!("kilo-egress: {error}");
    match error {
        ClientError::Address(_) | ClientError::Tls(_) => ExitCode::from(2),
        ClientError::Status(status) if https && error.to_string().contains("transport error") => {
            eprintln!(
                "  the TLS connection broke: if the server refused this client's certificate (its log says `TLS handshake rejected` and why), \
                 --cert and --key must come from the CA the server trusts (its --client-ca) and must not have expired"
            );
            if status.code() != tonic::Code::Unknown {
                eprintln!(
                    "  a change may still have been applied; run `kilo-egress get` to see the current state"
                );
            }
            ExitCode::from(1)
        }
        ClientError::Connect { reason, .. } if reason.contains("invalid peer certificate") => {
            eprintln!(
                "  the server's certificate was not accepted: --ca must be the CA that signed it, and it must name the host in --server"
            );
            ExitCode::from(1)
        }
        ClientError::Status(status) if status.code() == tonic::Code::PermissionDenied => {
            eprintln!(
                "  nothing was changed; the server lists the identities that may write with --writer"
            );
            ExitCode::from(1)
        }
        ClientError::Invalid(_) => {
            eprintln!(
                "  nothing was changed; give one IPv4 and/or one IPv6 address, e.g. kilo-egress set 198.51.100.20 2001:db8::20"
            );
            ExitCode::from(2)
        }
        ClientError::Status(status) if status.code() == tonic::Code::InvalidArgument => {
            eprintln!("  nothing was changed");
            ExitCode::from(2)
        }
        ClientError::Status(status) if status.code() == tonic::Code::FailedPrecondition => {
            eprintln!(
                "  nothing was changed; `kilo-egress get --generation` prints the current generation"
            );
            ExitCode::from(1)
        }
        ClientError::Status(status)
            if matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unavailable
            ) =>
        {
            eprintln!(
                "  the change may still have been applied; run `kilo-egress get` to see the current state"
            );
            ExitCode::from(1)
        }
        _ => ExitCode::from(1),
    }
}

/// The completion script for `shell`.
fn completion_script(shell: clap_complete::Shell) -> String {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "kilo-egress", &mut script);
    let script = String::from_utf8(script).expect("clap_complete writes UTF-8");
    match shell {
        // clap_complete's bash script (clap-rs/clap#6421, open) tracks the command line in the
        // state `kilo__egress__subcmd__set` but spells its case arms `kilo__subcmd__egress__subcmd__set`
        // for a binary name with a hyphen, so nothing after a subcommand completed. Spell the arms
        // as the state (a no-op once clap_complete is fixed; tests/tests/operator_cli.rs checks it).
        clap_complete::Shell::Bash => script.replace("kilo__subcmd__egress", "kilo__egress"),
        _ => script,
    }
}

/// Writes the manual pages of `command` and its subcommands into `dir`, or its own page to stdout.
fn write_man(command: clap::Command, dir: Option<&std::path::Path>) -> std::io::Result<()> {
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(command, dir)
        }
        None => clap_mangen::Man::new(command).render(&mut std::io::stdout()),
    }
}

async fn run(cli: Cli) -> Result<ExitCode, ClientError> {
    match &cli.command {
        Command::WatchAlive(args) => return Ok(kilo_egress::watch::heartbeat::alive(args)),
        Command::Completions { shell } => {
            use std::io::Write;
            let script = completion_script(*shell);
            return Ok(match std::io::stdout().write_all(script.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(1),
            });
        }
        Command::Man { dir } => {
            return Ok(match write_man(Cli::command(), dir.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("kilo-egress: writing the manual pages failed: {e}");
                    ExitCode::from(1)
                }
            });
        }
        _ => {}
    }
    let addr: ServerAddr = cli.server.parse()?;
    // Check addresses before connecting, so a typo is reported even when the server is down.
    if let Command::Set { addrs, .. } = &cli.command {
        kilo_egress_api::egress::parse_egress_list(addrs)?;
    }
    let tls = kilo_egress::tls::TlsFiles {
        ca: cli.tls.ca,
        cert: cli.tls.cert,
        key: cli.tls.key,
    };
    if let Command::Watch(args) = cli.command {
        return Ok(kilo_egress::watch::run(addr, cli.timeout, tls, args).await);
    }
    let mut client = EgressClient::connect_tls(&addr, cli.timeout, &tls).await?;
    match cli.command {
        Command::Set { addrs, write } => {
            let response = client
                .set_egress(addrs, write.dry_run, write.expected_generation)
                .await?;
            print_set(&response, Request::Set, write.output.output);
        }
        Command::Clear { write } => {
            let response = client
                .set_egress(Vec::new(), write.dry_run, write.expected_generation)
                .await?;
            print_set(&response, Request::Clear, write.output.output);
        }
        Command::Get {
            generation: true, ..
        } => {
            println!("{}", client.get_rules().await?.generation);
        }
        Command::Get { output, .. } => print_rules(&client.get_rules().await?, output.output),
        Command::Watch(_)
        | Command::WatchAlive(_)
        | Command::Completions { .. }
        | Command::Man { .. } => unreachable!("handled before connecting"),
        Command::Health { alive: true } => {
            let rules = client.get_rules().await?;
            println!(
                "alive: kilo-egressd answers (generation {}, in sync: {})",
                rules.generation,
                if rules.in_sync { "yes" } else { "NO" }
            );
        }
        Command::Health { alive: false } => {
            let status = client.health().await?;
            println!("{}", status.as_str_name());
            if status != tonic_health::pb::health_check_response::ServingStatus::Serving {
                return Ok(ExitCode::from(1));
            }
            // SERVING: the accepted rules are in the kernel, as far as kilo-egressd can put them.
            // Say so when writes fail all the same, or when Kilo's agent has yet to write its chain.
            if let Ok(rules) = client.get_rules().await {
                if let Some(failure) = &rules.last_write_failure {
                    eprintln!("write path {}", degraded(failure));
                }
                for note in health_notes(&rules) {
                    eprintln!("{note}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let https = cli.server.starts_with("https://");
    match run(cli).await {
        Ok(code) => code,
        Err(error) => report(&error, https),
    }
}
