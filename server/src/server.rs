//! The gRPC server: the EgressService behind tower layers (request timeout, concurrency limits,
//! message size limit), plus `grpc.health.v1.Health` and server reflection v1 and v1alpha.

use kilo_egress_api::pb::egress_service_server::EgressServiceServer;
use kilo_egress_api::{FILE_DESCRIPTOR_SET, SERVICE_NAME};
use std::future::Future;
use std::time::Duration;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::info;

use crate::engine::EngineHandle;
use crate::listen::{ListenAddr, ListenError, bind_unix};
use crate::service::EgressApi;

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A request that takes longer fails with `CANCELLED`/`DEADLINE_EXCEEDED`.
    pub request_timeout: Duration,
    /// Requests in flight per connection.
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
            per_connection: 64,
            global: 2048,
            max_message_bytes: 16 * 1024,
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
}

/// Serves the API on `listen` until `shutdown` completes. Health reports NOT_SERVING until the
/// engine's first successful apply.
pub async fn serve(
    listen: &ListenAddr,
    engine: EngineHandle,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in ["", SERVICE_NAME] {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    let mut ready = engine.ready();
    tokio::spawn(async move {
        if ready.wait_for(|ready| *ready).await.is_ok() {
            for name in ["", SERVICE_NAME] {
                health
                    .set_service_status(name, ServingStatus::Serving)
                    .await;
            }
        }
    });
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let router = Server::builder()
        .timeout(limits.request_timeout)
        .concurrency_limit_per_connection(limits.per_connection)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            limits.global,
        ))
        .add_service(
            EgressServiceServer::new(EgressApi::new(engine))
                .max_decoding_message_size(limits.max_message_bytes),
        )
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    match listen {
        ListenAddr::Unix(path) => {
            let listener = bind_unix(path).await?;
            info!(listen = %listen, "serving");
            let result = router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await;
            let _ = std::fs::remove_file(path);
            result?;
        }
        ListenAddr::Tcp(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|error| ListenError::Io {
                        action: "bind",
                        path: addr.to_string().into(),
                        error,
                    })?;
            info!(listen = %listen, "serving");
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await?;
        }
    }
    Ok(())
}
