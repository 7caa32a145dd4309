//! The unix socket's access control: with `--socket-group` the socket is mode 0660 and owned by
//! that group, so a non-root member may call the API and a non-member cannot connect at all; the
//! caller's uid and gid are in the audit line.

use kilo_egress_tests::remote::audit_lines;
use kilo_egress_tests::{
    Backend, DaemonConfig, Family, Lab, bin_path, cmd, poll_until, require_root,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

const GROUP: &str = "4242";

#[test]
fn socket_group_members_may_call_the_api_others_cannot_connect_and_uids_are_audited() {
    let test = "socket_group_members_may_call_the_api_others_cannot_connect_and_uids_are_audited";
    if !require_root(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    // A directory every user may enter, holding the socket and a copy of the CLI.
    let dir = tempfile::Builder::new()
        .prefix("kilo-egress-socket-group-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cli = dir.path().join("kilo-egress");
    std::fs::copy(bin_path("kilo-egress"), &cli).unwrap();
    let socket = dir.path().join("api.sock");
    let server = format!("unix://{}", socket.display());
    let config = DaemonConfig::own(Backend::Nft)
        .arg("--log-format")
        .arg("json")
        .arg("--listen")
        .arg(server.clone())
        .arg("--socket-group")
        .arg(GROUP);
    let d = lab.start_daemon(config).unwrap();

    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.gid(), 4242, "the socket belongs to --socket-group");
    assert_eq!(
        meta.mode() & 0o777,
        0o660,
        "only owner and group may connect"
    );

    let as_user = |gid: &str, args: &[&str]| {
        let (reuid, regid) = ("--reuid=1000".to_string(), format!("--regid={gid}"));
        let cli = cli.display().to_string();
        let mut full = vec![
            reuid.as_str(),
            &regid,
            "--clear-groups",
            &cli,
            "--server",
            &server,
        ];
        full.extend_from_slice(args);
        cmd::run_in(&lab.node, "setpriv", &full).unwrap()
    };

    let member = as_user(GROUP, &["set", "198.51.100.20"]);
    assert!(
        member.success(),
        "a member of the group may write: {member}{}",
        d.context()
    );
    d.assert_upstream_sees(Family::V4, "198.51.100.20", "after the group member's set");

    let stranger = as_user("1000", &["get"]);
    assert!(
        !stranger.success(),
        "a non-member must not connect: {stranger}"
    );
    assert!(
        stranger.stderr.to_lowercase().contains("permission denied"),
        "the refusal says why: {stranger}"
    );

    let mut audit = serde_json::Value::Null;
    let found = poll_until(Duration::from_secs(5), || {
        audit = audit_lines(&d.log()).pop().unwrap_or_default();
        !audit.is_null()
    });
    assert!(found, "no audit line{}", d.context());
    assert_eq!(audit["identity"], "uid=1000", "{audit:#}");
    assert!(
        audit["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("unix uid=1000 gid=4242 pid=")),
        "{audit:#}"
    );
    assert_eq!(audit["outcome"], "accepted", "{audit:#}");
    assert_eq!(audit["egress_ipv4"], "198.51.100.20", "{audit:#}");
}
