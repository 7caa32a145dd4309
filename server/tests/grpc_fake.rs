//! The gRPC API end to end over a temporary unix socket, against the in-memory netfilter fake:
//! what a client sees for valid, invalid, stale and dry-run requests, and the health service.

use kilo_egress::{ClientError, EgressClient, ServerAddr};
use kilo_egress_api::egress::Family;
use kilo_egress_api::pb;
use kilo_egressd::engine::{Engine, EngineConfig};
use kilo_egressd::listen::ListenAddr;
use kilo_egressd::netfilter::{Netfilter, NetfilterError};
use kilo_egressd::rules::{KILO_NAT, ModeConfig, ObservedRule};
use kilo_egressd::server::Limits;
use kilo_egressd::state::StateStore;
use kilo_egressd::testing::FakeNetfilter;
use kilo_egressd::testing::serve;
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

struct Running {
    client: EgressClient,
    fake: Arc<FakeNetfilter>,
    dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn own_mode() -> ModeConfig {
    ModeConfig::Own {
        source_cidrs: vec![
            "10.44.0.0/24".parse().unwrap(),
            "fd00:44::/64".parse().unwrap(),
        ],
        no_nat_cidrs: vec![],
    }
}

/// A started server: its client, its stop switch, and the temp dir that must outlive the test.
type Started = (
    EgressClient,
    tokio::sync::oneshot::Sender<()>,
    tempfile::TempDir,
);

/// Starts engine and server on a unix socket in a fresh temp dir.
async fn start_with(netfilter: Arc<dyn Netfilter>) -> Started {
    start_listening(netfilter, false).await
}

/// Like [`start_with`], on plaintext loopback TCP when `tcp` is set.
async fn start_listening(netfilter: Arc<dyn Netfilter>, tcp: bool) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig::quiet(own_mode());
    let (engine, _thread) =
        Engine::start(config, netfilter, StateStore::new(dir.path().join("state")));
    let socket = dir.path().join("api.sock");
    let (listen, addr) = if tcp {
        // A free port: bound, read and released; the server binds it again right away.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        (
            format!("tcp://127.0.0.1:{port}")
                .parse::<ListenAddr>()
                .unwrap(),
            format!("http://127.0.0.1:{port}")
                .parse::<ServerAddr>()
                .unwrap(),
        )
    } else {
        (
            ListenAddr::Unix(socket.clone()),
            ServerAddr::Unix(socket.clone()),
        )
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        serve(&listen, engine, Limits::default(), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if (tcp || socket.exists())
            && let Ok(client) = EgressClient::connect(&addr, Duration::from_secs(5)).await
        {
            return (client, stop, dir);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn start() -> Running {
    let fake = Arc::new(FakeNetfilter::new());
    let (client, stop, dir) = start_with(fake.clone()).await;
    Running {
        client,
        fake,
        dir,
        _stop: stop,
    }
}

fn kilo_nat(fake: &FakeNetfilter) -> (Option<Vec<String>>, Option<Vec<String>>) {
    (
        fake.chain(Family::Ipv4, KILO_NAT),
        fake.chain(Family::Ipv6, KILO_NAT),
    )
}

#[tokio::test]
async fn set_egress_programs_snat_for_both_families_and_get_rules_reads_it_back() {
    let mut run = start().await;
    let g0 = run.client.get_rules().await.unwrap().generation;
    let reply = run
        .client
        .set_egress(
            vec!["2001:db8::20".into(), "198.51.100.20".into()],
            false,
            None,
        )
        .await
        .unwrap();
    let pair = reply.egress.unwrap();
    assert_eq!(
        (pair.ipv4.as_str(), pair.ipv6.as_str()),
        ("198.51.100.20", "2001:db8::20")
    );
    assert_eq!(reply.generation, g0 + 1);
    settle(&run).await;
    let (v4, v6) = kilo_nat(&run.fake);
    assert!(
        v4.unwrap()
            .last()
            .unwrap()
            .ends_with("--to-source 198.51.100.20")
    );
    assert!(
        v6.unwrap()
            .last()
            .unwrap()
            .ends_with("--to-source 2001:db8::20")
    );

    let rules = run.client.get_rules().await.unwrap();
    assert!(rules.in_sync, "{rules:?}");
    assert_eq!(rules.mode, pb::Mode::Own as i32);
    assert_eq!(rules.backend, "fake");
    assert!(rules.last_apply_time.is_some());
    let specs: Vec<&str> = rules.families[0]
        .rules
        .iter()
        .map(|r| r.spec.as_str())
        .collect();
    assert!(
        specs
            .iter()
            .any(|s| s.contains("-j SNAT --to-source 198.51.100.20")),
        "{specs:?}"
    );

    // An empty list brings MASQUERADE back.
    run.client.set_egress(vec![], false, None).await.unwrap();
    settle(&run).await;
    let (v4, _) = kilo_nat(&run.fake);
    assert!(v4.unwrap().last().unwrap().ends_with("-j MASQUERADE"));
}

/// Waits until the last change has settled: GetRules is answered once the rules a switch
/// shadowed are removed.
async fn settle(run: &Running) {
    run.client.clone().get_rules().await.unwrap();
}

#[tokio::test]
async fn invalid_entries_get_invalid_argument_naming_the_entry_and_change_nothing() {
    let run = start().await;
    let mut raw = run.client.raw();
    let first = raw
        .set_egress(pb::SetEgressRequest {
            egress_ips: vec!["198.51.100.20".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    settle(&run).await;
    let before = kilo_nat(&run.fake);
    let transactions = run.fake.transactions();
    for bad in [
        "198.51.100.20/32",
        "node-a.example",
        "",
        " 198.51.100.20",
        "fe80::1%eth0",
        "::ffff:192.0.2.1",
    ] {
        let status = raw
            .set_egress(pb::SetEgressRequest {
                egress_ips: vec!["2001:db8::20".into(), bad.into()],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
        assert!(
            status.message().contains(&format!("{bad:?}")),
            "{bad:?}: {}",
            status.message()
        );
    }
    assert_eq!(kilo_nat(&run.fake), before);
    assert_eq!(run.fake.transactions(), transactions);
    assert_eq!(
        run.client.clone().get_rules().await.unwrap().generation,
        first.generation
    );
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let run = start().await;
    let mut raw = run.client.raw();
    let status = raw
        .set_egress(pb::SetEgressRequest {
            egress_ips: vec!["x".repeat(64 * 1024)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let status = raw
        .set_egress(pb::SetEgressRequest {
            egress_ips: vec!["198.51.100.20".into(); 17],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("too many"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn stale_expected_generation_fails_with_failed_precondition() {
    let mut run = start().await;
    let g0 = run.client.get_rules().await.unwrap().generation;
    run.client
        .set_egress(vec!["198.51.100.20".into()], false, Some(g0))
        .await
        .unwrap();
    settle(&run).await;
    let before = kilo_nat(&run.fake);
    let err = run
        .client
        .set_egress(vec!["198.51.100.30".into()], false, Some(g0))
        .await
        .unwrap_err();
    let ClientError::Status(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status
            .message()
            .contains(&format!("generation is {}", g0 + 1)),
        "{}",
        status.message()
    );
    assert_eq!(kilo_nat(&run.fake), before);
}

#[tokio::test]
async fn dry_run_shows_rules_and_changes_nothing() {
    let mut run = start().await;
    settle(&run).await;
    let g0 = run.client.get_rules().await.unwrap().generation;
    let before = kilo_nat(&run.fake);
    let state_before = std::fs::read(run.dir.path().join("state/state.json")).ok();
    let reply = run
        .client
        .set_egress(vec!["198.51.100.20".into()], true, None)
        .await
        .unwrap();
    assert!(reply.dry_run);
    assert!(
        reply.rules[0]
            .rules
            .iter()
            .any(|r| r.spec.contains("--to-source 198.51.100.20"))
    );
    assert_eq!(kilo_nat(&run.fake), before);
    assert_eq!(
        std::fs::read(run.dir.path().join("state/state.json")).ok(),
        state_before
    );
    assert_eq!(run.client.get_rules().await.unwrap().generation, g0);
}

#[tokio::test]
async fn extra_addresses_of_a_family_are_ignored_with_a_warning() {
    let mut run = start().await;
    let reply = run
        .client
        .set_egress(
            vec!["198.51.100.20".into(), "198.51.100.21".into()],
            false,
            None,
        )
        .await
        .unwrap();
    assert_eq!(reply.egress.unwrap().ipv4, "198.51.100.20");
    assert!(
        reply
            .warnings
            .iter()
            .any(|w| w.contains("ignored 198.51.100.21")),
        "{:?}",
        reply.warnings
    );
}

/// A kernel that refuses every transaction: the service must stay up, report NOT_SERVING and
/// say why in GetRules.
struct RefusingNetfilter;

impl Netfilter for RefusingNetfilter {
    fn read_chain(&self, _: Family, _: &str) -> Result<Option<Vec<ObservedRule>>, NetfilterError> {
        Ok(None)
    }
    fn restore(&self, _: Family, _: &dyn std::fmt::Display) -> Result<(), NetfilterError> {
        Err(NetfilterError::Restore {
            command: "refusing-restore".into(),
            stderr: "line 2 failed".into(),
            context: String::new(),
        })
    }
    fn backend_name(&self) -> &'static str {
        "refusing"
    }
}

#[tokio::test]
async fn health_is_not_serving_until_the_rules_are_programmed() {
    let (mut client, _stop, _dir) = start_with(Arc::new(RefusingNetfilter)).await;
    assert_eq!(client.health().await.unwrap(), ServingStatus::NotServing);
    let rules = client.get_rules().await.unwrap();
    assert!(!rules.in_sync);
    assert!(
        rules.last_error.contains("line 2 failed"),
        "{}",
        rules.last_error
    );
    let err = client
        .set_egress(vec!["198.51.100.20".into()], false, None)
        .await
        .unwrap_err();
    let ClientError::Status(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status.message().contains("previous egress state stays"),
        "{}",
        status.message()
    );

    let mut healthy = start().await;
    assert_eq!(
        healthy.client.health().await.unwrap(),
        ServingStatus::Serving
    );
}

#[tokio::test]
async fn serves_plaintext_grpc_on_loopback_tcp() {
    let fake = Arc::new(FakeNetfilter::new());
    let (mut client, _stop, _dir) = start_listening(fake.clone(), true).await;
    client
        .set_egress(vec!["198.51.100.20".into()], false, None)
        .await
        .unwrap();
    let v4 = kilo_nat(&fake).0.unwrap();
    assert!(v4[0].ends_with("--to-source 198.51.100.20"), "{v4:?}");
    assert_eq!(client.health().await.unwrap(), ServingStatus::Serving);
}

/// 20 local clients of one identity (uid 0) writing as fast as they can: with the default limits
/// every call waits its turn and succeeds; none is refused.
#[tokio::test]
async fn a_burst_from_one_identity_waits_its_turn_and_every_call_succeeds() {
    let run = start().await;
    let socket = run.dir.path().join("api.sock");
    let clients: Vec<_> = (0..20u32)
        .map(|c| {
            let addr = ServerAddr::Unix(socket.clone());
            tokio::spawn(async move {
                let mut client = EgressClient::connect(&addr, Duration::from_secs(5))
                    .await
                    .unwrap();
                for i in 0..25u32 {
                    let addr = format!("198.51.100.{}", (c * 25 + i) % 200 + 1);
                    client.set_egress(vec![addr], false, None).await.unwrap();
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
}
