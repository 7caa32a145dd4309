//! Where the API listens: parsing `--listen` and preparing a unix socket (parent directory
//! created, a stale socket replaced, a live one refused, mode 0660).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A listen address accepted by `--listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `unix:///absolute/path.sock`
    Unix(PathBuf),
    /// `tcp://127.0.0.1:PORT` or `tcp://[::1]:PORT` (loopback only, plaintext).
    Tcp(SocketAddr),
}

/// Why a listen address is refused.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The text is not `unix://PATH` or `tcp://ADDR:PORT`.
    #[error(
        "invalid --listen {0:?}: use unix:///run/kilo-egress/kilo-egressd.sock or tcp://127.0.0.1:PORT"
    )]
    Syntax(String),
    /// A unix socket path must be absolute.
    #[error(
        "invalid --listen {0:?}: the socket path must be absolute, e.g. unix:///run/kilo-egress/kilo-egressd.sock"
    )]
    RelativePath(String),
    /// Plaintext TCP beyond loopback would expose an unauthenticated write API.
    #[error(
        "refusing to listen on {0}: plaintext TCP is allowed on loopback only (tcp://127.0.0.1:PORT or tcp://[::1]:PORT), \
         because anyone who reaches the port could change the node's egress address; use the unix socket instead"
    )]
    NotLoopback(SocketAddr),
    /// Something that is not a socket is at the path; it is never removed.
    #[error("{0} exists and is not a socket; refusing to replace it (check --listen)")]
    NotASocket(PathBuf),
    /// Another server answers on the socket.
    #[error(
        "another server is already listening on {0}; stop it first or choose another --listen path"
    )]
    InUse(PathBuf),
    /// Preparing the socket failed.
    #[error("cannot {action} {path}: {error}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The operating system's reason.
        error: std::io::Error,
    },
}

impl std::str::FromStr for ListenAddr {
    type Err = ListenError;

    fn from_str(text: &str) -> Result<ListenAddr, ListenError> {
        if let Some(path) = text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(ListenError::RelativePath(text.to_string()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = text.strip_prefix("tcp://") {
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| ListenError::Syntax(text.to_string()))?;
            if !addr.ip().is_loopback() {
                return Err(ListenError::NotLoopback(addr));
            }
            return Ok(ListenAddr::Tcp(addr));
        }
        Err(ListenError::Syntax(text.to_string()))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix://{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ListenError {
    let path = path.to_path_buf();
    move |error| ListenError::Io {
        action,
        path,
        error,
    }
}

/// Binds a unix socket at `path`: creates the parent directory, replaces a stale socket, refuses
/// a live one, and sets mode 0660 so only root and the socket's group may connect.
pub async fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ListenError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
    }
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()) {
            return Err(ListenError::NotASocket(path.to_path_buf()));
        }
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ListenError::InUse(path.to_path_buf()));
        }
        tracing::info!(path = %path.display(), "replacing stale socket");
        std::fs::remove_file(path).map_err(io("remove stale socket", path))?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io("set permissions of", path))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accepted_forms() {
        assert_eq!(
            "unix:///run/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert!(matches!(
            "tcp://127.0.0.1:7443".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp(_)
        ));
        assert!(matches!(
            "tcp://[::1]:7443".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp(_)
        ));
    }

    #[test]
    fn refuses_non_loopback_tcp_with_reason() {
        let err = "tcp://0.0.0.0:7443".parse::<ListenAddr>().unwrap_err();
        assert!(err.to_string().contains("loopback only"), "{err}");
        assert!(matches!(
            "tcp://192.0.2.10:7443".parse::<ListenAddr>(),
            Err(ListenError::NotLoopback(_))
        ));
        assert!(matches!(
            "unix://relative.sock".parse::<ListenAddr>(),
            Err(ListenError::RelativePath(_))
        ));
        assert!(matches!(
            "http://127.0.0.1:1".parse::<ListenAddr>(),
            Err(ListenError::Syntax(_))
        ));
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/sub/test.sock");
        let first = bind_unix(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(bind_unix(&path).await, Err(ListenError::InUse(_))));
        drop(first);
        // The file stays behind after the listener is gone: a stale socket.
        assert!(path.exists());
        bind_unix(&path).await.unwrap();
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_socket_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.conf");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(
            bind_unix(&path).await,
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}
