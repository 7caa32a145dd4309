//! Typed client for `kilo.egress.v1.EgressService`: connects over a unix socket, plaintext
//! loopback HTTP/2 or mutual TLS ([`tls`]), and offers SetEgress, GetRules and the standard
//! health check.
#![forbid(unsafe_code)]

pub mod tls;

use hyper_util::rt::TokioIo;
use kilo_egress_api::egress::{InvalidEgress, parse_egress_list};
use kilo_egress_api::pb::{self, egress_service_client::EgressServiceClient};
use kilo_egress_api::{DEFAULT_SOCKET, SERVICE_NAME};
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

pub use kilo_egress_api::pb as api;

pub mod watch;

/// Where the server listens, as `--server` spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// `unix:///absolute/path.sock`
    Unix(PathBuf),
    /// `http://HOST:PORT`
    Http(String),
    /// `https://HOST:PORT` (mutual TLS)
    Https(String),
}

impl Default for ServerAddr {
    fn default() -> ServerAddr {
        ServerAddr::Unix(PathBuf::from(DEFAULT_SOCKET))
    }
}

impl std::str::FromStr for ServerAddr {
    type Err = ClientError;

    fn from_str(text: &str) -> Result<ServerAddr, ClientError> {
        if let Some(path) = text.strip_prefix("unix://") {
            if path.starts_with('/') {
                return Ok(ServerAddr::Unix(PathBuf::from(path)));
            }
        } else if text.starts_with("http://") && text.parse::<Uri>().is_ok() {
            return Ok(ServerAddr::Http(text.to_string()));
        } else if text.starts_with("https://") && text.parse::<Uri>().is_ok() {
            return Ok(ServerAddr::Https(text.to_string()));
        } else if text.starts_with('/') {
            return Ok(ServerAddr::Unix(PathBuf::from(text)));
        }
        Err(ClientError::Address(text.to_string()))
    }
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Unix(path) => write!(f, "unix://{}", path.display()),
            ServerAddr::Http(uri) | ServerAddr::Https(uri) => f.write_str(uri),
        }
    }
}

/// A client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--server` is not a supported address.
    #[error(
        "invalid server address {0:?}: use unix:///run/kilo-egress/kilo-egressd.sock, http://127.0.0.1:PORT or https://HOST:PORT"
    )]
    Address(String),
    /// The TLS files are missing or unreadable.
    #[error(transparent)]
    Tls(#[from] tls::TlsFilesError),
    /// The addresses to set are invalid; nothing was sent.
    #[error(transparent)]
    Invalid(#[from] InvalidEgress),
    /// The server could not be reached.
    #[error(
        "cannot reach kilo-egressd at {addr}: {reason}\n  is kilo-egressd running, and is --server (or KILO_EGRESS_SERVER) right?"
    )]
    Connect {
        /// The address tried.
        addr: ServerAddr,
        /// Why it failed.
        reason: String,
    },
    /// The server answered with an error status (or the connection failed during the call,
    /// e.g. the server refused this client's certificate): its message first, then the code's
    /// name, e.g. `generation is 1 ... (FAILED_PRECONDITION)`.
    #[error("{}", status_text(.0))]
    Status(#[from] tonic::Status),
}

/// A connected client.
#[derive(Clone)]
pub struct EgressClient {
    egress: EgressServiceClient<Channel>,
    health: HealthClient<Channel>,
}

/// A status as one line: the server's message and the causes behind it, then the code's name
/// as gRPC spells it (tonic's description of the code only when there is no message).
fn status_text(status: &tonic::Status) -> String {
    let message = format!("{}{}", status.message(), causes(status));
    let name = code_name(status.code());
    if message.is_empty() {
        format!("{} ({name})", status.code().description())
    } else {
        format!("{message} ({name})")
    }
}

/// The canonical name of a gRPC status code, e.g. `FAILED_PRECONDITION`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The causes behind a status that are not already in its message, as `: cause: cause`.
fn causes(status: &tonic::Status) -> String {
    let mut text = String::new();
    let mut source = std::error::Error::source(status);
    while let Some(inner) = source {
        let cause = inner.to_string();
        if !status.message().contains(&cause) && !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        source = inner.source();
    }
    text
}

fn connect_error(addr: &ServerAddr, error: impl std::error::Error) -> ClientError {
    let mut reason = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !reason.contains(&text) {
            reason = format!("{reason}: {text}");
        }
        source = inner.source();
    }
    ClientError::Connect {
        addr: addr.clone(),
        reason,
    }
}

impl EgressClient {
    /// Connects to `addr` (not `https://`); fails fast with a message that says what to check.
    pub async fn connect(
        addr: &ServerAddr,
        timeout: Duration,
    ) -> Result<EgressClient, ClientError> {
        EgressClient::connect_tls(addr, timeout, &tls::TlsFiles::default()).await
    }

    /// Connects to `addr`, using `tls` for an `https://` address.
    pub async fn connect_tls(
        addr: &ServerAddr,
        timeout: Duration,
        tls: &tls::TlsFiles,
    ) -> Result<EgressClient, ClientError> {
        let user_agent = concat!("kilo-egress/", env!("CARGO_PKG_VERSION"));
        let channel = match addr {
            ServerAddr::Unix(path) => {
                let path = path.clone();
                // The URI is required by the API but unused: the connector opens the socket.
                Endpoint::from_static("http://localhost")
                    .user_agent(user_agent)
                    .map_err(|e| connect_error(addr, e))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            }
            ServerAddr::Http(uri) => {
                Endpoint::from_shared(uri.clone())
                    .map_err(|e| connect_error(addr, e))?
                    .user_agent(user_agent)
                    .map_err(|e| connect_error(addr, e))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect()
                    .await
            }
            ServerAddr::Https(uri) => {
                Endpoint::from_shared(uri.clone())
                    .map_err(|e| connect_error(addr, e))?
                    .user_agent(user_agent)
                    .map_err(|e| connect_error(addr, e))?
                    .tls_config(tls.config()?)
                    .map_err(|e| connect_error(addr, e))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect()
                    .await
            }
        }
        .map_err(|e| connect_error(addr, e))?;
        Ok(EgressClient {
            egress: EgressServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        })
    }

    /// The generated gRPC client on the same connection, for calls that bypass local checks.
    pub fn raw(&self) -> EgressServiceClient<Channel> {
        self.egress.clone()
    }

    /// Sets the egress addresses (empty clears). The addresses are checked locally first with
    /// the same parser the server uses, so invalid input never reaches the server.
    pub async fn set_egress(
        &mut self,
        egress_ips: Vec<String>,
        dry_run: bool,
        expected_generation: Option<u64>,
    ) -> Result<pb::SetEgressResponse, ClientError> {
        parse_egress_list(&egress_ips)?;
        let request = pb::SetEgressRequest {
            egress_ips,
            dry_run,
            expected_generation,
        };
        Ok(self.egress.set_egress(request).await?.into_inner())
    }

    /// Reads the chosen pair and the rules in the kernel.
    pub async fn get_rules(&mut self) -> Result<pb::GetRulesResponse, ClientError> {
        Ok(self
            .egress
            .get_rules(pb::GetRulesRequest {})
            .await?
            .into_inner())
    }

    /// The health of the egress service (SERVING once the rules are programmed).
    pub async fn health(&mut self) -> Result<ServingStatus, ClientError> {
        let response = self
            .health
            .check(HealthCheckRequest {
                service: SERVICE_NAME.to_string(),
            })
            .await?
            .into_inner();
        Ok(response.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_addresses() {
        assert_eq!(
            "unix:///run/x.sock".parse::<ServerAddr>().unwrap(),
            ServerAddr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "/run/x.sock".parse::<ServerAddr>().unwrap(),
            ServerAddr::Unix("/run/x.sock".into())
        );
        assert!(matches!(
            "http://127.0.0.1:7443".parse::<ServerAddr>().unwrap(),
            ServerAddr::Http(_)
        ));
        assert!(matches!(
            "https://node-a:7443".parse::<ServerAddr>().unwrap(),
            ServerAddr::Https(_)
        ));
        for bad in ["unix://relative", "tcp://1.2.3.4:1", "node-a:7443", ""] {
            assert!(bad.parse::<ServerAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_status_reads_as_our_message_then_the_code_name() {
        let error = ClientError::from(tonic::Status::failed_precondition(
            "generation is 1, not 4: the egress changed meanwhile",
        ));
        assert_eq!(
            error.to_string(),
            "generation is 1, not 4: the egress changed meanwhile (FAILED_PRECONDITION)"
        );
        assert_eq!(
            ClientError::from(tonic::Status::unavailable("")).to_string(),
            format!("{} (UNAVAILABLE)", tonic::Code::Unavailable.description())
        );
    }
}
