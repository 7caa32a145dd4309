//! Client side of mutual TLS: the CA that signed the server's certificate (`--ca`) and the
//! client's own certificate and key (`--cert`, `--key`), read from PEM files.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The TLS files a client uses for `https://` servers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate(s) that sign the server's certificate.
    pub ca: Option<PathBuf>,
    /// The client's certificate chain.
    pub cert: Option<PathBuf>,
    /// The client's private key.
    pub key: Option<PathBuf>,
}

/// Why the client's TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFilesError {
    /// A file cannot be read.
    #[error("cannot read {flag} {path}: {error}")]
    Read {
        /// The flag that names it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        error: std::io::Error,
    },
    /// A flag is missing.
    #[error("{0}")]
    Missing(&'static str),
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsFilesError> {
    std::fs::read(path).map_err(|error| TlsFilesError::Read {
        flag,
        path: path.to_path_buf(),
        error,
    })
}

impl TlsFiles {
    /// True when any file is given.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The tonic TLS configuration: trust `--ca` (or the system roots when absent) and present
    /// `--cert`/`--key`, which must come together.
    pub fn config(&self) -> Result<ClientTlsConfig, TlsFilesError> {
        let mut config = ClientTlsConfig::new();
        match &self.ca {
            Some(ca) => config = config.ca_certificate(Certificate::from_pem(read("--ca", ca)?)),
            None => {
                return Err(TlsFilesError::Missing(
                    "an https:// server needs --ca FILE: the CA certificate that signed the server's certificate",
                ));
            }
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("--cert", cert)?,
                    read("--key", key)?,
                ));
            }
            (None, None) => {
                return Err(TlsFilesError::Missing(
                    "an https:// server needs --cert FILE and --key FILE: kilo-egressd accepts only clients with a certificate from its --client-ca",
                ));
            }
            (Some(_), None) => return Err(TlsFilesError::Missing("--cert needs --key FILE")),
            (None, Some(_)) => return Err(TlsFilesError::Missing("--key needs --cert FILE")),
        }
        Ok(config)
    }
}
