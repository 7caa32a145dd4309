//! Mutual TLS for the TCP listener: loads the server certificate, its key and the client CA into
//! a rustls configuration, swaps in new material when the files change (cert-manager replaces
//! them through a symlink swap) while a broken replacement leaves the old material serving, and
//! accepts connections whose client certificate the CA signed, naming each caller.

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use crate::peer::{PeerIo, PeerKind};

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The files of `--tls-cert`, `--tls-key` and `--client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates (PEM) that sign accepted client certificates.
    pub client_ca: PathBuf,
}

/// Why TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {flag} {path}: {error}")]
    Read {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        error: std::io::Error,
    },
    /// A file holds no usable PEM block of the expected kind.
    #[error("{flag} {path} holds no valid PEM {expected}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Pem {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What it should hold.
        expected: &'static str,
        /// The parser's reason, if any.
        detail: Option<String>,
    },
    /// The client CA cannot verify certificates.
    #[error("--client-ca {path}: {error}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        error: String,
    },
    /// The key does not fit the certificate, or rustls refuses the pair.
    #[error("--tls-cert {cert} with --tls-key {key}: {error}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        error: String,
    },
}

/// The bytes of the three files at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Vec<u8>,
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    // Follows symlinks, so a swapped `..data` link of a Kubernetes secret volume is seen.
    std::fs::read(path).map_err(|error| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        error,
    })
}

impl TlsFiles {
    fn snapshot(&self) -> Result<Snapshot, TlsError> {
        Ok(Snapshot {
            cert: read("--tls-cert", &self.cert)?,
            key: read("--tls-key", &self.key)?,
            client_ca: read("--client-ca", &self.client_ca)?,
        })
    }

    fn pem_error(
        &self,
        flag: &'static str,
        expected: &'static str,
        detail: Option<String>,
    ) -> TlsError {
        let path = match flag {
            "--tls-cert" => &self.cert,
            "--tls-key" => &self.key,
            _ => &self.client_ca,
        };
        TlsError::Pem {
            flag,
            path: path.clone(),
            expected,
            detail,
        }
    }

    fn certs(
        &self,
        flag: &'static str,
        pem: &[u8],
    ) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.pem_error(flag, "CERTIFICATE", Some(e.to_string())))?;
        if certs.is_empty() {
            return Err(self.pem_error(flag, "CERTIFICATE", None));
        }
        Ok(certs)
    }

    /// Builds a rustls server configuration from a snapshot of the files.
    fn build(&self, snapshot: &Snapshot) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = self.certs("--tls-cert", &snapshot.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&snapshot.key)
            .map_err(|e| self.pem_error("--tls-key", "PRIVATE KEY", Some(e.to_string())))?;
        let mut roots = RootCertStore::empty();
        for ca in self.certs("--client-ca", &snapshot.client_ca)? {
            roots.add(ca).map_err(|e| TlsError::ClientCa {
                path: self.client_ca.clone(),
                error: e.to_string(),
            })?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: self.client_ca.clone(),
                    error: e.to_string(),
                })?;
        let pair_error = |error: rustls::Error| TlsError::Pair {
            cert: self.cert.clone(),
            key: self.key.clone(),
            error: error.to_string(),
        };
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(pair_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(pair_error)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// What [`TlsReloader::reload_if_changed`] did.
#[derive(Debug)]
pub enum Reload {
    /// The files hold what was last seen.
    Unchanged,
    /// New material is in use for new handshakes.
    Reloaded,
    /// The files changed but cannot be used; the previous material stays in use.
    Failed(TlsError),
}

/// The TLS material in use, re-read from its files on demand.
pub struct TlsReloader {
    files: TlsFiles,
    current: ArcSwap<ServerConfig>,
    /// What the files held at the last look (loaded or not), so a broken file is reported once.
    last_seen: Mutex<Result<Snapshot, String>>,
}

impl TlsReloader {
    /// Loads the files; fails when they cannot be used (at start-up this is fatal).
    pub fn load(files: TlsFiles) -> Result<TlsReloader, TlsError> {
        let snapshot = files.snapshot()?;
        let config = files.build(&snapshot)?;
        Ok(TlsReloader {
            files,
            current: ArcSwap::new(config),
            last_seen: Mutex::new(Ok(snapshot)),
        })
    }

    /// The files it reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the files and, when they changed and are usable, uses them for new handshakes.
    pub fn reload_if_changed(&self) -> Reload {
        let read = self.files.snapshot();
        let seen = read.as_ref().map(Clone::clone).map_err(ToString::to_string);
        let mut last = self.last_seen.lock().expect("TLS reload lock");
        if *last == seen {
            return Reload::Unchanged;
        }
        *last = seen;
        drop(last);
        let result = read.and_then(|snapshot| self.files.build(&snapshot));
        match result {
            Ok(config) => {
                self.current.store(config);
                Reload::Reloaded
            }
            Err(error) => Reload::Failed(error),
        }
    }

    /// Checks the files every `interval` and logs each reload or failure, until the returned
    /// task is aborted.
    pub fn watch(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let this = self.clone();
                let outcome = tokio::task::spawn_blocking(move || this.reload_if_changed())
                    .await
                    .unwrap_or(Reload::Unchanged);
                match outcome {
                    Reload::Unchanged => {}
                    Reload::Reloaded => info!(
                        cert = %self.files.cert.display(),
                        key = %self.files.key.display(),
                        client_ca = %self.files.client_ca.display(),
                        "TLS material changed on disk: new handshakes use it"
                    ),
                    Reload::Failed(error) => warn!(
                        error = %error,
                        "TLS material changed on disk but cannot be used; still serving the previous certificate"
                    ),
                }
            }
        })
    }
}

/// The names a client certificate identifies its holder by: its DNS and URI subject
/// alternative names, or its subject common name when it has none of those.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push(dns.to_string()),
                GeneralName::URI(uri) => names.push(uri.to_string()),
                _ => {}
            }
        }
    }
    if names.is_empty()
        && let Some(cn) = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
    {
        names.push(cn.to_string());
    }
    names
}

/// A verified mutual-TLS connection.
pub type TlsConnection = PeerIo<TlsStream<TcpStream>>;

/// Accepts TCP connections on `listener` and completes each TLS handshake on its own task with
/// the material current at that moment; failed handshakes (no client certificate, another CA,
/// expired) are logged with the caller's address and dropped. Yields verified connections.
pub fn incoming(
    listener: TcpListener,
    reloader: Arc<TlsReloader>,
) -> (
    tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConnection>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accepting a TCP connection failed");
                    // Back off on e.g. EMFILE instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(reloader.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            info!(%remote, %error, "TLS handshake rejected");
                            return;
                        }
                        Err(_) => {
                            info!(%remote, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                            return;
                        }
                    };
                let names = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|leaf| certificate_names(leaf))
                    .unwrap_or_default();
                let _ = tx
                    .send(Ok(PeerIo::new(stream, PeerKind::Tls { remote, names })))
                    .await;
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}
