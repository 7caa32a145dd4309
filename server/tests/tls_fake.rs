//! Mutual TLS, write authorization and certificate rotation in process, against the netfilter
//! fake: the server listens on loopback TCP with TLS (as it would on a node address) and on a
//! unix socket; certificates are generated for each test.

use kilo_egress::tls::TlsFiles as ClientTls;
use kilo_egress::{ClientError, EgressClient, ServerAddr};
use kilo_egress_api::egress::Family;
use kilo_egress_tests::pki::{CertFiles, Pki};
use kilo_egressd::authz::Authorizer;
use kilo_egressd::engine::{Engine, EngineConfig};
use kilo_egressd::listen::ListenAddr;
use kilo_egressd::netfilter::{Netfilter, NetfilterError};
use kilo_egressd::rules::ObservedRule;
use kilo_egressd::rules::{KILO_NAT, ModeConfig};
use kilo_egressd::server::{Limits, Security, serve_all};
use kilo_egressd::state::StateStore;
use kilo_egressd::testing::FakeNetfilter;
use kilo_egressd::tls::{Reload, TlsFiles, TlsReloader};
use kilo_egressd::write_limit::WriteLimits;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const WRITER: &str = "ops.example";
const READER: &str = "viewer.example";
const OTHER_WRITER: &str = "failover.example";

struct Tls {
    dir: tempfile::TempDir,
    pki: Pki,
    addr: SocketAddr,
    fake: Arc<FakeNetfilter>,
    reloader: Arc<TlsReloader>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The server's certificate files are reached through `live/`, a symlink to a versioned
/// directory, the way a Kubernetes secret volume swaps its `..data` link.
fn install_server_cert(dir: &Path, version: &str, files: &CertFiles) {
    let target = dir.join(version);
    std::fs::create_dir_all(&target).unwrap();
    std::fs::copy(&files.cert, target.join("tls.crt")).unwrap();
    std::fs::copy(&files.key, target.join("tls.key")).unwrap();
    let tmp = dir.join("live.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("live")).unwrap();
}

async fn start() -> Tls {
    let fake = Arc::new(FakeNetfilter::new());
    start_with(fake.clone(), fake, WriteLimits::default()).await
}

/// Starts the server with `netfilter` (which writes through to `fake`) and `write_limits`.
async fn start_with(
    netfilter: Arc<dyn Netfilter>,
    fake: Arc<FakeNetfilter>,
    write_limits: WriteLimits,
) -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"), "cluster");
    let server = pki.server("server-v1", &["127.0.0.1", "node-a"]);
    install_server_cert(dir.path(), "v1", &server);
    let files = TlsFiles {
        cert: dir.path().join("live/tls.crt"),
        key: dir.path().join("live/tls.key"),
        client_ca: pki.ca(),
    };
    let reloader = Arc::new(TlsReloader::load(files).unwrap());
    let config = EngineConfig {
        families: vec![Family::Ipv4],
        ..EngineConfig::quiet(ModeConfig::Own {
            source_cidrs: vec!["10.44.0.0/24".parse().unwrap()],
            no_nat_cidrs: vec![],
        })
    };
    let (engine, _thread) =
        Engine::start(config, netfilter, StateStore::new(dir.path().join("state")));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listens = vec![
        ListenAddr::Tcp(addr),
        ListenAddr::Unix(dir.path().join("api.sock")),
    ];
    let security = Security {
        tls: Some(reloader.clone()),
        // The tests reload by hand, so they know when it happened.
        tls_reload_interval: Duration::from_secs(3600),
        authorizer: Authorizer::new([WRITER.to_string(), OTHER_WRITER.to_string()]),
        write_limits,
        ..Security::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        serve_all(&listens, engine, Limits::default(), security, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Tls {
        dir,
        pki,
        addr,
        fake,
        reloader,
        _stop: stop,
    }
}

impl Tls {
    async fn client(&self, cert: &CertFiles) -> Result<EgressClient, ClientError> {
        let addr: ServerAddr = format!("https://{}", self.addr).parse().unwrap();
        let tls = ClientTls {
            ca: Some(self.pki.ca()),
            cert: Some(cert.cert.clone()),
            key: Some(cert.key.clone()),
        };
        EgressClient::connect_tls(&addr, Duration::from_secs(5), &tls).await
    }

    fn kilo_nat(&self) -> Option<Vec<String>> {
        self.fake.chain(Family::Ipv4, KILO_NAT)
    }
}

fn read_pem<T>(
    path: &Path,
    parse: impl FnOnce(&[u8]) -> Result<T, rustls::pki_types::pem::Error>,
) -> T {
    parse(&std::fs::read(path).unwrap()).unwrap()
}

/// Opens a TLS connection trusting `ca`, presenting `client` if given, and speaks the start of
/// HTTP/2 so the server must answer. Returns the server's leaf certificate when the server
/// accepted the connection, or the error (e.g. the TLS alert) when it did not.
async fn handshake(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&CertFiles>,
) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(read_pem(ca, CertificateDer::from_pem_slice))
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(files) => builder
            .with_client_auth_cert(
                vec![read_pem(&files.cert, CertificateDer::from_pem_slice)],
                read_pem(&files.key, PrivateKeyDer::from_pem_slice),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    // The HTTP/2 preface and an empty SETTINGS frame; a server that accepted us answers with
    // its own SETTINGS. With TLS 1.3 a refused client certificate shows up here, as an alert.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // A refusal may break this write; the alert is then still waiting to be read.
    let written = tls.write_all(&hello).await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Ok(server_cert),
        Ok(Ok(_)) => Err("connection closed without an answer".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within 5 s (write: {written:?})")),
    }
}

#[tokio::test]
async fn handshake_refuses_no_certificate_another_ca_and_an_expired_one() {
    let tls = start().await;
    let ca = tls.pki.ca();
    let reader = tls.pki.client("reader", READER);
    handshake(tls.addr, &ca, Some(&reader))
        .await
        .expect("a certificate from the client CA is accepted");

    let err = handshake(tls.addr, &ca, None).await.unwrap_err();
    assert!(err.contains("CertificateRequired"), "no certificate: {err}");

    let other = Pki::new(&tls.dir.path().join("other"), "other");
    let stranger = other.client("stranger", WRITER);
    let err = handshake(tls.addr, &ca, Some(&stranger)).await.unwrap_err();
    assert!(err.contains("UnknownCA"), "another CA: {err}");

    let expired = tls.pki.expired_client("expired", WRITER);
    let err = handshake(tls.addr, &ca, Some(&expired)).await.unwrap_err();
    assert!(err.contains("CertificateExpired"), "expired: {err}");

    // The client library gets no answer either: connecting or the first call fails.
    if let Ok(mut client) = tls.client(&stranger).await {
        let result = client.get_rules().await;
        assert!(result.is_err(), "a stranger read the rules: {result:?}");
    }
}

#[tokio::test]
async fn reader_gets_rules_but_set_egress_is_permission_denied_and_changes_nothing() {
    let tls = start().await;
    let mut reader = tls.client(&tls.pki.client("reader", READER)).await.unwrap();
    let before = reader.get_rules().await.unwrap();
    let chain_before = tls.kilo_nat();
    assert!(chain_before.is_some(), "the engine programmed the chain");

    let err = reader
        .set_egress(vec!["198.51.100.20".into()], false, None)
        .await
        .unwrap_err();
    let ClientError::Status(status) = err else {
        panic!("expected a status, got {err}");
    };
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains(READER),
        "names the identity: {status:?}"
    );

    let after = reader.get_rules().await.unwrap();
    assert_eq!(after.generation, before.generation);
    assert_eq!(after.egress, before.egress);
    assert_eq!(tls.kilo_nat(), chain_before, "the rules did not change");
}

#[tokio::test]
async fn writer_by_san_and_by_common_name_sets_the_pair() {
    let tls = start().await;
    let mut writer = tls.client(&tls.pki.client("writer", WRITER)).await.unwrap();
    let reply = writer
        .set_egress(vec!["198.51.100.20".into()], false, None)
        .await
        .unwrap();
    let first_generation = reply.generation;
    assert_eq!(reply.egress.unwrap().ipv4, "198.51.100.20");
    assert!(
        tls.kilo_nat()
            .unwrap()
            .iter()
            .any(|r| r.ends_with("--to-source 198.51.100.20")),
        "{:?}",
        tls.kilo_nat()
    );

    // A certificate without SANs is named by its CN.
    let mut by_cn = tls
        .client(&tls.pki.client_cn_only("writer-cn", WRITER))
        .await
        .unwrap();
    let reply = by_cn.set_egress(Vec::new(), false, None).await.unwrap();
    assert_eq!(reply.generation, first_generation + 1);
    // A certificate whose CN is a writer but whose SAN is not, is not a writer: SANs win.
    let mut san_wins = tls
        .client(&tls.pki.client("cn-is-not-used", READER))
        .await
        .unwrap();
    let err = san_wins
        .set_egress(Vec::new(), false, None)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Status(s) if s.code() == Code::PermissionDenied));
}

#[tokio::test]
async fn rotated_server_certificate_is_used_for_new_handshakes_and_a_broken_one_is_not() {
    let tls = start().await;
    let ca = tls.pki.ca();
    let reader = tls.pki.client("reader", READER);
    let v1 = std::fs::read(tls.dir.path().join("v1/tls.crt")).unwrap();
    let v1_der = handshake(tls.addr, &ca, Some(&reader)).await.unwrap();
    let mut client = tls.client(&reader).await.unwrap();
    client.get_rules().await.unwrap();

    let v2 = tls.pki.server("server-v2", &["127.0.0.1", "node-a"]);
    install_server_cert(tls.dir.path(), "v2", &v2);
    assert!(matches!(tls.reloader.reload_if_changed(), Reload::Reloaded));
    let presented = handshake(tls.addr, &ca, Some(&reader)).await.unwrap();
    assert_eq!(
        presented, v2.der,
        "new handshakes present the new certificate"
    );
    assert_ne!(presented, v1_der);
    // The connection made before the rotation keeps working.
    client.get_rules().await.unwrap();

    // A broken replacement: a truncated certificate and a key that does not match.
    let v3 = tls.dir.path().join("v3");
    std::fs::create_dir_all(&v3).unwrap();
    std::fs::write(v3.join("tls.crt"), &v1[..v1.len() / 2]).unwrap();
    std::fs::copy(tls.dir.path().join("v1/tls.key"), v3.join("tls.key")).unwrap();
    swap_live(tls.dir.path(), "v3");
    match tls.reloader.reload_if_changed() {
        Reload::Failed(error) => assert!(
            error.to_string().contains("--tls-cert"),
            "names the file: {error}"
        ),
        other => panic!("a broken certificate must not load: {other:?}"),
    }
    let presented = handshake(tls.addr, &ca, Some(&reader)).await.unwrap();
    assert_eq!(presented, v2.der, "the previous certificate keeps serving");
    // Unchanged broken files are not retried (and not reported again).
    assert!(matches!(
        tls.reloader.reload_if_changed(),
        Reload::Unchanged
    ));

    // A key that does not match the certificate is refused too.
    let v4 = tls.dir.path().join("v4");
    std::fs::create_dir_all(&v4).unwrap();
    std::fs::copy(&v2.cert, v4.join("tls.crt")).unwrap();
    std::fs::copy(tls.dir.path().join("v1/tls.key"), v4.join("tls.key")).unwrap();
    swap_live(tls.dir.path(), "v4");
    assert!(matches!(
        tls.reloader.reload_if_changed(),
        Reload::Failed(_)
    ));
    let presented = handshake(tls.addr, &ca, Some(&reader)).await.unwrap();
    assert_eq!(presented, v2.der);
}

fn swap_live(dir: &Path, version: &str) {
    let tmp: PathBuf = dir.join("live.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(version, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("live")).unwrap();
}

#[tokio::test]
async fn the_unix_socket_still_writes_next_to_tls() {
    let tls = start().await;
    let addr = ServerAddr::Unix(tls.dir.path().join("api.sock"));
    let mut local = EgressClient::connect(&addr, Duration::from_secs(5))
        .await
        .unwrap();
    let g0 = local.get_rules().await.unwrap().generation;
    let reply = local
        .set_egress(vec!["198.51.100.20".into()], false, None)
        .await
        .unwrap();
    assert_eq!(reply.generation, g0 + 1);
}

/// The fake behind a gate: while the gate is closed, `restore` waits in the engine's thread,
/// so SetEgress calls stay in flight as long as a test needs.
struct Gated {
    fake: Arc<FakeNetfilter>,
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    waiting: std::sync::atomic::AtomicUsize,
}

impl Gated {
    fn set_closed(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.opened.notify_all();
    }
}

impl Netfilter for Gated {
    fn read_chain(
        &self,
        family: Family,
        chain: &str,
    ) -> Result<Option<Vec<ObservedRule>>, NetfilterError> {
        self.fake.read_chain(family, chain)
    }

    fn restore(&self, family: Family, input: &dyn std::fmt::Display) -> Result<(), NetfilterError> {
        let mut closed = self.closed.lock().unwrap();
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        while *closed {
            closed = self.opened.wait(closed).unwrap();
        }
        self.waiting
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        drop(closed);
        self.fake.restore(family, input)
    }

    fn backend_name(&self) -> &'static str {
        "gated"
    }
}

#[tokio::test]
async fn a_writer_over_its_limit_without_a_queue_is_refused_at_once_while_another_writer_goes_through()
 {
    let fake = Arc::new(FakeNetfilter::new());
    let gated = Arc::new(Gated {
        fake: fake.clone(),
        closed: std::sync::Mutex::new(false),
        opened: std::sync::Condvar::new(),
        waiting: std::sync::atomic::AtomicUsize::new(0),
    });
    let limits = WriteLimits {
        per_connection: 1,
        per_identity: 1,
        max_queued: 0,
        ..WriteLimits::default()
    };
    let tls = start_with(gated.clone(), fake, limits).await;
    let writer = tls.pki.client("writer", WRITER);
    let mut first = tls.client(&writer).await.unwrap();
    let mut second = tls.client(&writer).await.unwrap();
    let mut other = tls
        .client(&tls.pki.client("failover", OTHER_WRITER))
        .await
        .unwrap();

    gated.set_closed(true);
    let held = tokio::spawn(async move {
        first
            .set_egress(vec!["198.51.100.20".into()], false, None)
            .await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gated.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first write never reached the engine"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The same identity on another connection: over its limit, refused without waiting.
    let err = second
        .set_egress(vec!["198.51.100.21".into()], false, None)
        .await
        .unwrap_err();
    let ClientError::Status(status) = err else {
        panic!("expected a status, got {err}");
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(WRITER),
        "names the identity: {status:?}"
    );

    // Another writer is not held up by the first one's limit: its call is accepted and waits
    // for the engine like any other.
    let queued = tokio::spawn(async move { other.set_egress(Vec::new(), false, None).await });
    gated.set_closed(false);
    let first = held.await.unwrap().unwrap();
    let other = queued.await.unwrap().unwrap();
    assert_eq!(first.egress.unwrap().ipv4, "198.51.100.20");
    assert!(other.generation >= first.generation, "{other:?}");

    // Once the first call finished, the identity may write again.
    let again = second
        .set_egress(vec!["198.51.100.21".into()], false, None)
        .await
        .unwrap();
    assert_eq!(again.egress.unwrap().ipv4, "198.51.100.21");
}

#[tokio::test]
async fn a_rotated_client_ca_admits_its_clients_and_no_longer_the_old_ones() {
    let tls = start().await;
    // The clients' trust in the server, kept apart from the client CA file that is replaced.
    let ca = tls.dir.path().join("server-trust.pem");
    std::fs::copy(tls.pki.ca(), &ca).unwrap();
    let old_client = tls.pki.client("old-reader", READER);
    handshake(tls.addr, &ca, Some(&old_client)).await.unwrap();

    let next = Pki::new(&tls.dir.path().join("next"), "next");
    let new_client = next.client("new-reader", READER);
    let err = handshake(tls.addr, &ca, Some(&new_client))
        .await
        .unwrap_err();
    assert!(err.contains("UnknownCA"), "not trusted yet: {err}");

    // Replace the client CA file in place (the server's --client-ca is the CA file itself).
    let client_ca = tls.reloader.files().client_ca.clone();
    let tmp = client_ca.with_extension("tmp");
    std::fs::copy(next.ca(), &tmp).unwrap();
    std::fs::rename(&tmp, &client_ca).unwrap();
    assert!(matches!(tls.reloader.reload_if_changed(), Reload::Reloaded));

    handshake(tls.addr, &ca, Some(&new_client))
        .await
        .expect("a client of the new CA is accepted");
    let err = handshake(tls.addr, &ca, Some(&old_client))
        .await
        .unwrap_err();
    assert!(
        err.contains("UnknownCA"),
        "the old CA is no longer trusted: {err}"
    );
}
