//! The reliability suite (docs/RELIABILITY.md): what happens to the rules, the state and the
//! callers when things go wrong around kilo-egressd. Sizes fit CI; `KILO_EGRESS_KILL_ROUNDS`
//! raises the kill -9 rounds for a full run (`tests/reliability.sh`).
//!
//! * kill -9 at random moments during SetEgress on a 2,000-rule chain: the chain always holds
//!   the old or the new decision, never none and never a broken chain; a call that was
//!   acknowledged survives the restart.
//! * the xtables lock held (legacy): a call waits for it, then succeeds; held past the 10 s
//!   bound, the call fails naming the lock, changes nothing, and the failure stays visible.
//! * a read-only state directory: SetEgress fails saying so; kernel and state unchanged.
//! * a malformed protobuf body: refused with a clear status; nothing changes; service stays up.

use kilo_egress_tests::{
    Backend, Daemon, DaemonConfig, Family, Lab, REPAIR_TIMEOUT, bin_path, cmd, for_each_backend,
    poll_until, require_python_grpc, require_root,
};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant, SystemTime};

const V4: Family = Family::V4;

/// `n` RETURN destinations in canonical form, far from the lab's addresses.
fn no_nat_cidrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("172.{}.{}.{}/32", 16 + i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

/// A tiny deterministic random source (the seed is printed, so a failure can be replayed).
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("KILO_EGRESS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos() as u64
            });
        println!("KILO_EGRESS_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// The decision traffic meets: the first rule of ours that SNATs or masquerades, after the
/// RETURN rules, which must be exactly `returns`.
fn decision(chain: &[String], returns: usize) -> Result<String, String> {
    let (head, rest) = chain.split_at(returns.min(chain.len()));
    if head.len() != returns || !head.iter().all(|r| r.ends_with("-j RETURN")) {
        return Err(format!(
            "the RETURN rules are broken ({} of {returns})",
            head.len()
        ));
    }
    rest.first()
        .filter(|r| r.contains("kilo-egress:"))
        .map(|r| {
            kilo_egress_tests::decision(r)
                .rsplit_once("--to-source ")
                .map_or("MASQUERADE".to_string(), |(_, a)| a.to_string())
        })
        .ok_or_else(|| format!("no decision after the RETURN rules: {:?}", rest.first()))
}

fn kill_9_during_set_egress_leaves_the_old_or_the_new_decision(backend: Backend) {
    let rounds: usize = std::env::var("KILO_EGRESS_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let returns = 2000;
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, V4);
    let mut config = DaemonConfig::own(backend);
    config.args = vec![
        "--source-cidr".into(),
        V4.pod_cidr().into(),
        "--ip-families".into(),
        "ipv4".into(),
    ];
    for chunk in no_nat_cidrs(returns).chunks(1000) {
        config.args.push("--no-nat-cidr".into());
        config.args.push(chunk.join(","));
    }
    let mut d = lab.start_daemon(config).unwrap();
    let pair = [V4.preferred(), V4.primary()];
    d.must(d.cli_ok(&["set", pair[0]]));
    // How long a switch takes from the client's start to its reply: kills land in twice that.
    let timed = Instant::now();
    d.must(d.cli_ok(&["set", pair[1]]));
    d.must(d.cli_ok(&["set", pair[0]]));
    let call_ms = (timed.elapsed().as_millis() as u64 / 2).max(1);
    let mut rng = Rng::seeded();
    let mut acknowledged = 0;
    for round in 0..rounds {
        let (old, new) = (pair[round % 2], pair[(round + 1) % 2]);
        let mut call = cmd::netns_command(
            &lab.node,
            bin_path("kilo-egress"),
            &["--server", &d.server_url(), "set", new],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        // Up to twice the time a call takes: some kills land before the reply, some after.
        let delay = Duration::from_millis(rng.below(2 * call_ms));
        let started = Instant::now();
        while started.elapsed() < delay {
            std::hint::spin_loop();
        }
        cmd::kill_pid(d.pid().unwrap(), "KILL");
        let ok = wait_exit(&mut call);
        let chain = d.must(ipt.rules("KILO-NAT"));
        let seen = decision(&chain, returns)
            .unwrap_or_else(|why| panic!("round {round} ({delay:?}): {why}{}", d.context()));
        assert!(
            seen == old || seen == new,
            "round {round} ({delay:?}): the chain decides {seen}, neither {old} nor {new}{}",
            d.context()
        );
        let restarted = d.start_again();
        d.must(restarted);
        let view = d.must(d.get_rules());
        if ok {
            acknowledged += 1;
            assert_eq!(
                view.egress(V4),
                new,
                "round {round}: an acknowledged call survives the restart{}",
                d.context()
            );
        }
        // Settle on whatever survived, for the next round's "old".
        let survived = view.egress(V4).to_string();
        if survived != new {
            d.must(d.cli_ok(&["set", new]));
        }
        d.must(lab.wait_for_source(V4, new, REPAIR_TIMEOUT));
    }
    println!(
        "{}: {rounds} kill -9 rounds on a {returns}-rule chain (a call takes ~{call_ms} ms), {acknowledged} acknowledged before the kill; the chain always held the old or the new decision",
        backend.name()
    );
}
for_each_backend!(kill_9_during_set_egress_leaves_the_old_or_the_new_decision);

/// Waits (bounded) for a client to exit; true when it exited 0.
fn wait_exit(child: &mut Child) -> bool {
    let exited = poll_until(Duration::from_secs(30), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    child.wait().is_ok_and(|s| s.success())
}

/// Holds an exclusive flock on `path` until the returned child is killed.
fn hold_lock(path: &std::path::Path) -> Child {
    // --no-fork: flock itself runs the command, so killing it frees the lock.
    let child = std::process::Command::new("flock")
        .args(["--exclusive", "--no-fork"])
        .arg(path)
        .args(["sleep", "600"])
        .spawn()
        .unwrap();
    // The lock is held once flock runs its command: poll for the sleeping child.
    let held = poll_until(Duration::from_secs(5), || {
        std::process::Command::new("flock")
            .args(["--exclusive", "--nonblock"])
            .arg(path)
            .arg("true")
            .status()
            .is_ok_and(|s| !s.success())
    });
    assert!(held, "flock never took {}", path.display());
    child
}

#[test]
fn a_held_xtables_lock_delays_a_call_and_a_stuck_one_fails_naming_it() {
    if !require_root("a_held_xtables_lock_delays_a_call_and_a_stuck_one_fails_naming_it") {
        return;
    }
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(Backend::Legacy, V4);
    let lock = lab.dir().join("xtables.lock");
    std::fs::write(&lock, "").unwrap();
    let config = DaemonConfig {
        env: vec![("XTABLES_LOCKFILE".into(), lock.display().to_string())],
        ..DaemonConfig::own(Backend::Legacy)
    };
    let d = lab.start_daemon(config).unwrap();
    d.must(d.cli_ok(&["set", V4.preferred()]));
    let before = d.must(ipt.nat_dump());

    // Held for a moment: the call waits, then succeeds.
    let mut holder = hold_lock(&lock);
    let started = Instant::now();
    let mut call = cmd::netns_command(
        &lab.node,
        bin_path("kilo-egress"),
        &["--server", &d.server_url(), "set", V4.primary()],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let still_waiting = !poll_until(Duration::from_millis(700), || {
        matches!(call.try_wait(), Ok(Some(_)))
    });
    assert!(still_waiting, "the call waits while the lock is held");
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        wait_exit(&mut call),
        "the call succeeds once the lock is free"
    );
    println!(
        "legacy: a call waited {:?} for a held xtables lock, then succeeded",
        started.elapsed()
    );
    d.must(lab.wait_for_source(V4, V4.primary(), REPAIR_TIMEOUT));

    // Held past the bound: the call fails naming the lock and nothing changes.
    d.must(d.cli_ok(&["set", V4.preferred()]));
    let programmed = d.must(ipt.nat_dump());
    assert_eq!(programmed, before);
    let mut holder = hold_lock(&lock);
    let out = d.must(d.cli(&["--timeout", "60s", "set", V4.primary()]));
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("xtables lock"), "names the lock: {out}");
    assert_eq!(d.must(ipt.nat_dump()), programmed, "nothing changed");
    // GetRules reads the chains, which waits for the lock too: read once it is free.
    let _ = holder.kill();
    let _ = holder.wait();
    let view = d.must(d.get_rules());
    assert!(view.last_error().contains("xtables lock"), "{:#}", view.raw);
    assert_eq!(view.egress(V4), V4.preferred(), "{:#}", view.raw);
    d.assert_upstream_sees(V4, V4.preferred(), "the previous pair stays");
}

#[test]
fn a_read_only_state_directory_refuses_writes_and_changes_nothing() {
    if !require_root("a_read_only_state_directory_refuses_writes_and_changes_nothing") {
        return;
    }
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(Backend::Nft, V4);
    // procfs takes no new directories or files: a state directory that cannot be written.
    let config = DaemonConfig {
        state_dir: Some("/proc/kilo-egress-read-only-state".into()),
        ..DaemonConfig::own(Backend::Nft)
    };
    let d = lab.start_daemon(config).unwrap();
    let view = d.must(d.get_rules());
    assert!(
        view.raw["lastWriteFailure"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("saving the state failed")),
        "the unwritable state directory is visible from the start: {:#}",
        view.raw
    );
    let before = d.must(ipt.nat_dump());
    let out = d.must(d.cli(&["set", V4.preferred()]));
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("saving the state failed, nothing was changed"),
        "{out}"
    );
    assert_eq!(d.must(ipt.nat_dump()), before, "the kernel is unchanged");
    d.assert_upstream_sees(V4, V4.primary(), "MASQUERADE as before");
}

#[test]
fn a_malformed_protobuf_body_is_refused_and_changes_nothing() {
    let test = "a_malformed_protobuf_body_is_refused_and_changes_nothing";
    if !require_root(test) || !require_python_grpc(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(Backend::Nft, V4);
    let d: Daemon<'_> = lab.start_daemon(DaemonConfig::own(Backend::Nft)).unwrap();
    d.must(d.cli_ok(&["set", V4.preferred()]));
    let before = d.must(ipt.nat_dump());
    let generation = d.must(d.get_rules()).generation();
    let script = r#"
import grpc, sys
channel = grpc.insecure_channel("unix://" + sys.argv[1])
call = channel.unary_unary("/kilo.egress.v1.EgressService/SetEgress")
for body in (b"\xff\xff\xff\xff", b"\x0a\xff\x01abc", b"\x0a" + b"\x80" * 11):
    try:
        call(body, timeout=10)
        print("OK")
    except grpc.RpcError as e:
        print(e.code().name, e.details())
"#;
    let socket = d.socket().display().to_string();
    let out = cmd::run_in(&lab.node, "python3", &["-c", script, &socket]).unwrap();
    assert!(out.success(), "{out}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    for line in lines {
        assert!(
            !line.starts_with("OK") && line.to_lowercase().contains("decod"),
            "refused with a status that says the body does not decode: {line}"
        );
    }
    assert_eq!(d.must(ipt.nat_dump()), before, "nothing changed");
    let view = d.must(d.get_rules());
    assert_eq!(view.generation(), generation, "{:#}", view.raw);
    d.must(d.cli_ok(&["set", V4.primary()]));
}
