//! The gRPC server: the EgressService behind tower layers (request timeout, concurrency limits,
//! write limits per connection and identity, message size limit), plus `grpc.health.v1.Health`
//! and server reflection v1 and v1alpha, on one or more listeners (unix socket, loopback TCP,
//! mutual TLS). On a unix socket any client's `:authority` is accepted ([`crate::authority`]).

use kilo_egress_api::pb::egress_service_server::EgressServiceServer;
use kilo_egress_api::{FILE_DESCRIPTOR_SET, SERVICE_NAME};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::authority::AuthorityRewritingStream;
use crate::authz::Authorizer;
use crate::engine::EngineHandle;
use crate::listen::{ListenAddr, ListenError, bind_unix, set_socket_group};
use crate::metrics::grpc::SetEgressCounterLayer;
use crate::peer::{PeerIo, PeerKind};
use crate::service::EgressApi;
use crate::tls::TlsReloader;
use crate::write_limit::{WriteLimitLayer, WriteLimits};

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request that takes longer fails with `CANCELLED`/`DEADLINE_EXCEEDED`.
    pub request_timeout: Duration,
    /// Requests in flight per connection, as HTTP/2 streams: the server announces the bound
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`), so a client's further calls wait in the client and
    /// cost the server nothing. Each call in flight holds ~5 KB of request state and, once
    /// answered, its reply (~35 KB with a 100-rule chain) until it is written: unbounded, a
    /// burst of 1,000 calls on 16 connections held ~8 MB at once.
    pub per_connection: usize,
    /// Requests in flight across all connections.
    pub global: usize,
    /// The largest request message accepted, in bytes.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            request_timeout: Duration::from_secs(30),
            per_connection: 16,
            global: 2048,
            max_message_bytes: 16 * 1024,
        }
    }
}

/// How callers are authenticated and authorized.
#[derive(Clone)]
pub struct Security {
    /// Mutual TLS for every TCP listener; required for a non-loopback address.
    pub tls: Option<Arc<TlsReloader>>,
    /// How often the TLS files are checked for changes.
    pub tls_reload_interval: Duration,
    /// Who may call SetEgress over TLS.
    pub authorizer: Authorizer,
    /// SetEgress calls in flight per connection and per identity.
    pub write_limits: WriteLimits,
    /// The group that owns the unix socket (`--socket-group`), if not the process's own.
    pub socket_group: Option<u32>,
}

impl Default for Security {
    fn default() -> Security {
        Security {
            tls: None,
            tls_reload_interval: Duration::from_secs(10),
            authorizer: Authorizer::default(),
            write_limits: WriteLimits::default(),
            socket_group: None,
        }
    }
}

/// A failure to start or run the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listen address could not be prepared.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Reflection could not be built from the descriptor set.
    #[error("building server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// TLS files are given but no listener uses TCP.
    #[error(
        "--tls-cert, --tls-key and --client-ca apply to TCP listeners, but every --listen is a unix socket; add --listen tcp://ADDR:PORT"
    )]
    TlsWithoutTcp,
}

fn tcp_bind_error(addr: &std::net::SocketAddr) -> impl FnOnce(std::io::Error) -> ListenError {
    let addr = addr.to_string();
    move |error| ListenError::Io {
        action: "bind",
        path: addr.into(),
        error,
    }
}

/// Serves the API on every address of `listens` until `shutdown` completes; TCP listeners use
/// mutual TLS when `security.tls` is set (and must, beyond loopback). Health reports
/// NOT_SERVING until the engine's first successful apply.
pub async fn serve_all(
    listens: &[ListenAddr],
    engine: EngineHandle,
    limits: Limits,
    security: Security,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    for listen in listens {
        listen.check_tls(security.tls.is_some())?;
    }
    if security.tls.is_some() && !listens.iter().any(|l| matches!(l, ListenAddr::Tcp(_))) {
        return Err(ServeError::TlsWithoutTcp);
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in ["", SERVICE_NAME] {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    // SERVING while the accepted rules are in the kernel: from the first successful apply until
    // an apply or repair fails, and again once a retry succeeds.
    let mut ready = engine.ready();
    tokio::spawn(async move {
        loop {
            let status = if *ready.borrow_and_update() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in ["", SERVICE_NAME] {
                health.set_service_status(name, status).await;
            }
            if ready.changed().await.is_err() {
                return;
            }
        }
    });
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let set_egress_counter = SetEgressCounterLayer::new(engine.metrics());
    let router = Server::builder()
        .max_concurrent_streams(u32::try_from(limits.per_connection).unwrap_or(u32::MAX))
        .layer(set_egress_counter)
        .timeout(limits.request_timeout)
        .concurrency_limit_per_connection(limits.per_connection)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            limits.global,
        ))
        .layer(WriteLimitLayer::new(security.write_limits))
        .add_service(
            EgressServiceServer::new(EgressApi::with_authorizer(
                engine,
                security.authorizer.clone(),
            ))
            .max_decoding_message_size(limits.max_message_bytes),
        )
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);

    // Bind everything first, so a bad address fails start-up before anything serves.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let stop_signal = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let mut servers = tokio::task::JoinSet::new();
    let mut sockets: Vec<PathBuf> = Vec::new();
    let mut background = Vec::new();
    for listen in listens {
        let router = router.clone();
        match listen {
            ListenAddr::Unix(path) => {
                let listener = bind_unix(path).await?;
                if let Some(gid) = security.socket_group {
                    set_socket_group(path, gid)?;
                }
                sockets.push(path.clone());
                // Any client's `:authority` is accepted here: see crate::authority.
                let incoming = UnixListenerStream::new(listener).map(|r| {
                    r.map(|stream| {
                        let kind = PeerKind::of_unix(&stream);
                        PeerIo::new(AuthorityRewritingStream::new(stream), kind)
                    })
                });
                servers.spawn(router.serve_with_incoming_shutdown(incoming, stop_signal()));
            }
            ListenAddr::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(tcp_bind_error(addr))?;
                match &security.tls {
                    Some(tls) => {
                        let (incoming, accept) = crate::tls::incoming(listener, tls.clone());
                        background.push(accept);
                        servers.spawn(router.serve_with_incoming_shutdown(incoming, stop_signal()));
                    }
                    None => {
                        let incoming = TcpListenerStream::new(listener).map(|r| {
                            r.map(|stream| {
                                let remote = stream.peer_addr().unwrap_or_else(|_| {
                                    std::net::SocketAddr::from(([0, 0, 0, 0], 0))
                                });
                                PeerIo::new(stream, PeerKind::Tcp { remote })
                            })
                        });
                        servers.spawn(router.serve_with_incoming_shutdown(incoming, stop_signal()));
                    }
                }
            }
        }
        let tls = matches!(listen, ListenAddr::Tcp(_)) && security.tls.is_some();
        info!(listen = %listen, tls, "serving");
    }
    if let Some(tls) = &security.tls {
        let writers: Vec<&str> = security.authorizer.writers().collect();
        if writers.is_empty() {
            warn!("no --writer given: TLS clients can read but not change the egress address");
        }
        info!(writers = ?writers, client_ca = %tls.files().client_ca.display(), "mutual TLS on TCP listeners");
        background.push(tls.clone().watch(security.tls_reload_interval));
    }

    tokio::pin!(shutdown);
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            joined = servers.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(error))) => { result = Err(error.into()); break; }
                Some(Err(panic)) => std::panic::resume_unwind(panic.into_panic()),
            },
        }
    }
    let _ = stop.send(true);
    while let Some(joined) = servers.join_next().await {
        if let Ok(Err(error)) = joined
            && result.is_ok()
        {
            result = Err(error.into());
        }
    }
    for task in background {
        task.abort();
    }
    for path in sockets {
        let _ = std::fs::remove_file(path);
    }
    result
}
