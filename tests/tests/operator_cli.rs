//! What an operator sees trying the README: shell completions and manual pages for both
//! binaries; `set` and `--dry-run` saying what each family gets; readable errors; the README's
//! `--expected-generation` lines working on a new node; `health` and the logs in kilo mode while
//! Kilo's agent has not written its chain; `tests/demo.sh` showing its build's progress.

use kilo_egress_tests::cmd::{self, Captured};
use kilo_egress_tests::{
    Backend, DaemonConfig, Family, Lab, REPAIR_TIMEOUT, bin_path, poll_until, require_root,
    source_root,
};
use std::process::Command;

fn run(program: &str, args: &[&str]) -> Captured {
    cmd::capture(Command::new(program).args(args), None).unwrap()
}

/// `bash -c SCRIPT` with the workspace's binaries first on PATH.
fn bash(script: &str) -> Captured {
    let path = format!(
        "{}:{}",
        kilo_egress_tests::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd::capture(
        Command::new("bash")
            .args(["--norc", "--noprofile", "-c", script])
            .env("PATH", path),
        None,
    )
    .unwrap()
}

#[test]
fn bash_completion_loads_and_completes_commands_and_flags() {
    let script = r#"
        set -e
        source <(kilo-egress completions bash)
        complete -p kilo-egress
        # What bash asks when the user types `kilo-egress se<TAB>`, then `kilo-egress set --dr<TAB>`.
        COMP_WORDS=(kilo-egress se); COMP_CWORD=1; COMP_LINE="kilo-egress se"; COMP_POINT=${#COMP_LINE}
        "$(complete -p kilo-egress | sed -E 's/.*-F ([^ ]+).*/\1/')" kilo-egress se kilo-egress
        echo "commands: ${COMPREPLY[*]}"
        COMP_WORDS=(kilo-egress set --dr); COMP_CWORD=2; COMP_LINE="kilo-egress set --dr"; COMP_POINT=${#COMP_LINE}
        "$(complete -p kilo-egress | sed -E 's/.*-F ([^ ]+).*/\1/')" kilo-egress --dr set
        echo "flags: ${COMPREPLY[*]}"
    "#;
    let out = bash(script);
    assert!(out.success(), "{out}");
    assert!(out.stdout.contains("-F _kilo__egress kilo-egress"), "{out}");
    assert!(out.stdout.contains("commands: set"), "{out}");
    assert!(out.stdout.contains("flags: --dry-run"), "{out}");
    for shell in ["zsh", "fish"] {
        let out = run(
            bin_path("kilo-egress").to_str().unwrap(),
            &["completions", shell],
        );
        assert!(
            out.success() && out.stdout.contains("expected-generation"),
            "{out}"
        );
    }
}

/// Renders a roff page with groff (as `man` does) and fails on any warning.
fn render(page: &std::path::Path) -> String {
    let out = run(
        "groff",
        &["-man", "-Tutf8", "-ww", "-z", page.to_str().unwrap()],
    );
    assert!(out.success() && out.stderr.is_empty(), "groff warns: {out}");
    let out = cmd::capture(
        Command::new("man")
            .args(["-l", page.to_str().unwrap()])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
        None,
    )
    .unwrap();
    assert!(out.success(), "{out}");
    out.stdout
}

#[test]
fn manual_pages_of_both_binaries_render() {
    let dir = tempfile::tempdir().unwrap();
    for (binary, flag, subcommand, sub_flag) in [
        ("kilo-egress", "--server", "set", "--expected-generation"),
        ("kilo-egressd", "--absent-address", "cleanup", "--state-dir"),
    ] {
        let out = run(
            bin_path(binary).to_str().unwrap(),
            &["man", "--dir", dir.path().to_str().unwrap()],
        );
        assert!(out.success(), "{out}");
        let page = render(&dir.path().join(format!("{binary}.1")));
        assert!(page.contains("NAME") && page.contains(binary), "{page}");
        assert!(page.contains(flag), "{binary}.1 lists {flag}:\n{page}");
        let sub = render(&dir.path().join(format!("{binary}-{subcommand}.1")));
        assert!(sub.contains(&format!("{binary}-{subcommand}")), "{sub}");
        assert!(
            sub.contains(sub_flag),
            "{binary}-{subcommand}.1 lists {sub_flag}:\n{sub}"
        );
        // Without --dir: the main page on stdout.
        let stdout = run(bin_path(binary).to_str().unwrap(), &["man"]);
        assert!(
            stdout.success() && stdout.stdout.starts_with(".ie"),
            "{stdout}"
        );
    }
}

#[test]
fn set_and_dry_run_say_what_each_family_gets() {
    if !require_root("set_and_dry_run_say_what_each_family_gets") {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(Backend::Nft)).unwrap();
    d.must(d.cli_ok(&["set", "198.51.100.20", "2001:db8:2::20"]));

    let out = d.must(d.cli_ok(&["set", "198.51.100.20", "--dry-run"]));
    assert!(out.contains("dry run, nothing changed"), "{out}");
    assert!(out.contains("IPv4: SNAT to 198.51.100.20\n"), "{out}");
    assert!(
        out.contains("IPv6: MASQUERADE (no IPv6 address given)"),
        "{out}"
    );
    assert!(
        !out.contains("NOT in sync"),
        "a dry run says what would happen: {out}"
    );
    assert!(out.contains("IPv6 rules (it would program)"), "{out}");
    assert!(out.contains("IPv4 rules (nothing would change)"), "{out}");

    let out = d.must(d.cli_ok(&["set", "198.51.100.20"]));
    assert!(out.contains("IPv4: SNAT to 198.51.100.20\n"), "{out}");
    assert!(
        out.contains("IPv6: MASQUERADE (no IPv6 address given)"),
        "{out}"
    );
    d.assert_upstream_sees(Family::V6, Family::V6.primary(), "IPv6 was cleared");

    let out = d.must(d.cli_ok(&["clear"]));
    assert!(
        out.contains("IPv4: MASQUERADE (cleared)") && out.contains("IPv6: MASQUERADE (cleared)"),
        "{out}"
    );
}

#[test]
fn readme_generation_lines_work_on_a_new_node_and_errors_lead_with_our_message() {
    if !require_root("readme_generation_lines_work_on_a_new_node_and_errors_lead_with_our_message")
    {
        return;
    }
    let readme = std::fs::read_to_string(source_root().join("README.md")).unwrap();
    let lines: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("G=") || l.contains("--expected-generation \"$G\""))
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "the README reads G, then uses it: {lines:?}"
    );
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(Backend::Nft)).unwrap();
    let script = format!(
        "set -e\nexport KILO_EGRESS_SERVER={}\n{}\n",
        d.server_url(),
        lines.join("\n")
    );
    let path = format!(
        "{}:{}",
        kilo_egress_tests::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = cmd::capture(
        &mut cmd::netns_command(
            &lab.node,
            "env",
            &[format!("PATH={path}").as_str(), "bash", "-c", &script],
        ),
        None,
    )
    .unwrap();
    assert!(
        out.success(),
        "the README's lines on a new node: {out}{}",
        d.context()
    );
    // 198.51.100.21 is not on the lab's node, so MASQUERADE stands in for it; the pair is set.
    assert_eq!(d.must(d.get_rules()).egress(Family::V4), "198.51.100.21");

    // The same generation again is stale now: our message first, then the code's name.
    let stale = d.must(d.get_rules()).generation() - 1;
    let out = d.must(d.cli(&[
        "set",
        "198.51.100.20",
        "--expected-generation",
        &stale.to_string(),
    ]));
    assert_eq!(out.code, Some(1), "{out}");
    let first = out.stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("kilo-egress: ") && first.ends_with("(FAILED_PRECONDITION)"),
        "{out}"
    );
    assert!(!first.contains("The system is not in a state"), "{out}");
    assert!(out.stderr.contains("kilo-egress get --generation"), "{out}");
}

fn kilo_mode_waiting_for_kg_is_ready_said_once_and_kg_start_is_info(backend: Backend) {
    let lab = Lab::new().unwrap();
    let family = Family::V4;
    let kg = lab.kg(backend, family);
    let ipt = lab.iptables(backend, family);
    let d = lab.start_daemon(DaemonConfig::kilo(backend)).unwrap();

    let out = d.must(d.cli(&["set", family.preferred()]));
    assert!(out.success(), "{out}");
    let said = format!("{}{}", out.stdout, out.stderr);
    assert_eq!(
        said.matches("waiting for Kilo's agent").count(),
        1,
        "the note is printed once: {out}"
    );
    assert!(
        said.contains("IPv6: MASQUERADE (no IPv6 address given)"),
        "{out}"
    );

    let health = d.must(d.cli(&["health"]));
    assert_eq!(
        health.code,
        Some(0),
        "waiting for kg is not a failure of ours: {health}"
    );
    assert!(
        health.stderr.contains("waiting for Kilo's agent") && health.stderr.contains("is ready"),
        "health says what it waits for: {health}"
    );

    // kg starts: it creates KILO-NAT with its MASQUERADE; the SNAT goes in before it.
    kg.sync().unwrap();
    assert!(
        poll_until(REPAIR_TIMEOUT, || ipt
            .rules("KILO-NAT")
            .is_ok_and(|r| r.iter().any(|r| r.contains(family.preferred())))),
        "the SNAT follows kg's chain{}",
        d.context()
    );
    let health = d.must(d.cli(&["health"]));
    assert!(health.success() && health.stderr.is_empty(), "{health}");
    assert!(
        poll_until(REPAIR_TIMEOUT, || d
            .log()
            .contains("Kilo's agent wrote its MASQUERADE rule")),
        "kg's start is logged as such{}",
        d.context()
    );
    assert!(
        !d.log().contains("repaired rules"),
        "kg's normal start is no drift{}",
        d.context()
    );

    // kg restarts and flushes the chain: our rule was removed, which is drift.
    kg.sync().unwrap();
    assert!(
        poll_until(REPAIR_TIMEOUT * 4, || d.log().contains("repaired rules")),
        "a flushed SNAT is still drift (WARN){}",
        d.context()
    );
}

kilo_egress_tests::for_each_backend!(
    kilo_mode_waiting_for_kg_is_ready_said_once_and_kg_start_is_info
);

#[test]
fn demo_shows_the_progress_of_its_build() {
    if !require_root("demo_shows_the_progress_of_its_build") {
        return;
    }
    // A cargo stand-in that, like cargo, reports each crate unless told --quiet, then fails so
    // the demo stops right after its build step (a real build here would wait for this test's
    // own cargo lock).
    let dir = tempfile::tempdir().unwrap();
    let cargo = dir.path().join("cargo");
    std::fs::write(
        &cargo,
        "#!/bin/sh\ncase \" $* \" in *' --quiet '*) ;; *) echo '   Compiling kilo-egressd v0.1.0' >&2 ;; esac\nexit 3\n",
    )
    .unwrap();
    run("chmod", &["+x", cargo.to_str().unwrap()]);
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = cmd::capture(
        Command::new("bash")
            .arg(source_root().join("tests/demo.sh"))
            .env("PATH", path)
            .env("DEMO_KILO", "0"),
        None,
    )
    .unwrap();
    assert!(!out.success(), "the demo stops at the failed build: {out}");
    assert!(
        out.stdout.contains("Building the workspace"),
        "the demo says what it builds and how long a first build takes: {out}"
    );
    assert!(
        out.stderr.contains("Compiling kilo-egressd"),
        "cargo's progress is shown: {out}"
    );
}
