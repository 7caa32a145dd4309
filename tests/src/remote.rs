//! kilo-egressd reached from another machine: mutual TLS on the node's addresses, with the
//! clients (`kilo-egress`, grpcurl, the Python example) run in the lab's upstream namespace, and
//! the daemon's audit lines read back from its JSON log.

use crate::bin_path;
use crate::cmd::{self, Captured};
use crate::daemon::DaemonConfig;
use crate::lab::Lab;
use crate::pki::{CertFiles, Pki};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The node's TLS listener on IPv4 (the lab's node address).
pub const NODE_V4: &str = "192.0.2.10:7443";
/// The node's TLS listener on IPv6.
pub const NODE_V6: &str = "[2001:db8:1::10]:7443";
/// The writer identity (DNS SAN of its client certificate).
pub const WRITER: &str = "ops.example";
/// A read-only identity.
pub const READER: &str = "viewer.example";

/// The certificates of one test, with the server's files behind a `live` symlink that is
/// swapped to rotate them, as Kubernetes does for a secret volume.
pub struct RemoteTls {
    /// The CA that signs the server certificates and the client certificates.
    pub pki: Pki,
    /// The writer's client certificate.
    pub writer: CertFiles,
    /// The reader's client certificate.
    pub reader: CertFiles,
    dir: PathBuf,
}

impl RemoteTls {
    /// Issues the CA, a server certificate for both node addresses and the two client
    /// certificates under the lab's directory.
    pub fn new(lab: &Lab) -> RemoteTls {
        let dir = lab.dir().join("tls");
        let pki = Pki::new(&dir.join("pki"), "cluster");
        let tls = RemoteTls {
            writer: pki.client("ops", WRITER),
            reader: pki.client("viewer", READER),
            pki,
            dir,
        };
        let server = tls
            .pki
            .server("server-v1", &["192.0.2.10", "2001:db8:1::10", "node-a"]);
        tls.install_server_files("v1", &server.cert, &server.key);
        tls
    }

    /// The directory holding the server's `live/tls.crt` and `live/tls.key`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Puts `cert` and `key` into the version directory `version` and points `live` at it in
    /// one atomic rename.
    pub fn install_server_files(&self, version: &str, cert: &Path, key: &Path) {
        let target = self.dir.join(version);
        std::fs::create_dir_all(&target).expect("create version directory");
        std::fs::copy(cert, target.join("tls.crt")).expect("copy certificate");
        std::fs::copy(key, target.join("tls.key")).expect("copy key");
        let tmp = self.dir.join("live.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(version, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.dir.join("live")).expect("swap live symlink");
    }

    /// `config` plus JSON logs, TLS listeners on both node addresses and `--writer ops.example`.
    pub fn daemon_config(&self, config: DaemonConfig) -> DaemonConfig {
        let live = self.dir.join("live");
        let mut config = config;
        for arg in [
            "--log-format".to_string(),
            "json".to_string(),
            "--listen".to_string(),
            format!("tcp://{NODE_V4}"),
            "--listen".to_string(),
            format!("tcp://{NODE_V6}"),
            "--tls-cert".to_string(),
            live.join("tls.crt").display().to_string(),
            "--tls-key".to_string(),
            live.join("tls.key").display().to_string(),
            "--client-ca".to_string(),
            self.pki.ca().display().to_string(),
            "--writer".to_string(),
            WRITER.to_string(),
        ] {
            config = config.arg(arg);
        }
        config
    }

    /// Runs `kilo-egress --server https://NODE_V4 --ca --cert --key ARGS` in the upstream
    /// namespace as the holder of `client`, trusting `ca` for the server.
    pub fn cli(&self, lab: &Lab, ca: &Path, client: &CertFiles, args: &[&str]) -> Captured {
        let server = format!("https://{NODE_V4}");
        let (ca, cert, key) = (path(ca), path(&client.cert), path(&client.key));
        let mut full = vec![
            "--server",
            &server,
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "--timeout",
            "5s",
        ];
        full.extend_from_slice(args);
        cmd::run_in(&lab.upstream, bin_path("kilo-egress"), &full).expect("run kilo-egress")
    }

    /// Runs `grpcurl -cacert CA [-cert -key] FLAGS NODE_V4 VERB..` in the upstream namespace.
    pub fn grpcurl(
        &self,
        lab: &Lab,
        client: Option<&CertFiles>,
        flags: &[&str],
        verb: &[&str],
    ) -> Captured {
        let (ca, cert, key) = (
            path(&self.pki.ca()),
            client.map(|c| path(&c.cert)),
            client.map(|c| path(&c.key)),
        );
        let mut full = vec!["-cacert", ca.as_str()];
        if let (Some(cert), Some(key)) = (&cert, &key) {
            full.extend_from_slice(&["-cert", cert, "-key", key]);
        }
        full.extend_from_slice(flags);
        full.push(NODE_V4);
        full.extend_from_slice(verb);
        cmd::run_in(&lab.upstream, "grpcurl", &full).expect("run grpcurl")
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The audit lines of a JSON log (`--log-format json`): objects whose target is
/// `kilo_egressd::audit`.
pub fn audit_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|v| v["target"] == "kilo_egressd::audit")
        .collect()
}
