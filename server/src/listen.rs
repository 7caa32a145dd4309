//! Where the API listens: parsing `--listen`, refusing plaintext TCP beyond loopback, and
//! preparing a unix socket (parent directory created, a stale socket replaced, a live one
//! refused, mode 0660, optionally owned by `--socket-group`).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A listen address accepted by `--listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `unix:///absolute/path.sock`
    Unix(PathBuf),
    /// `tcp://ADDR:PORT`: plaintext on loopback, mutual TLS required on any other address.
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
        "refusing to listen on {0} without TLS: plaintext TCP is allowed on loopback only (tcp://127.0.0.1:PORT or tcp://[::1]:PORT), \
         because anyone who reaches the port could change the node's egress address; \
         to serve other machines add --tls-cert FILE --tls-key FILE --client-ca FILE (mutual TLS, see docs/security.md), or use the unix socket"
    )]
    NotLoopback(SocketAddr),
    /// `--socket-group` names no group.
    #[error(
        "--socket-group {0:?}: no such group (give a group name from /etc/group or a numeric gid)"
    )]
    UnknownGroup(String),
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
            return Ok(ListenAddr::Tcp(addr));
        }
        Err(ListenError::Syntax(text.to_string()))
    }
}

impl ListenAddr {
    /// Refuses a non-loopback TCP address unless mutual TLS is configured.
    pub fn check_tls(&self, tls: bool) -> Result<(), ListenError> {
        match self {
            ListenAddr::Tcp(addr) if !tls && !addr.ip().is_loopback() => {
                Err(ListenError::NotLoopback(*addr))
            }
            _ => Ok(()),
        }
    }
}

/// Resolves `--socket-group`: a numeric gid, or a group name looked up in `/etc/group`.
pub fn resolve_group(name: &str) -> Result<u32, ListenError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let groups =
        std::fs::read_to_string("/etc/group").map_err(io("read", Path::new("/etc/group")))?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let group = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (group == name).then_some(gid)
        })
        .next()
        .ok_or_else(|| ListenError::UnknownGroup(name.to_string()))
}

/// Gives the socket at `path` to group `gid` (owner unchanged); with mode 0660 the group's
/// members may connect and nobody else but the owner.
pub fn set_socket_group(path: &Path, gid: u32) -> Result<(), ListenError> {
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(io("change the group of", path))
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
    fn refuses_non_loopback_tcp_without_tls_saying_what_to_add() {
        let any: ListenAddr = "tcp://0.0.0.0:7443".parse().unwrap();
        let err = any.check_tls(false).unwrap_err();
        assert!(err.to_string().contains("loopback only"), "{err}");
        assert!(
            err.to_string()
                .contains("add --tls-cert FILE --tls-key FILE --client-ca FILE"),
            "{err}"
        );
        let node: ListenAddr = "tcp://192.0.2.10:7443".parse().unwrap();
        assert!(matches!(
            node.check_tls(false),
            Err(ListenError::NotLoopback(_))
        ));
        node.check_tls(true).unwrap();
        let loopback: ListenAddr = "tcp://[::1]:7443".parse().unwrap();
        loopback.check_tls(false).unwrap();
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

    #[test]
    fn socket_group_by_number_or_name() {
        assert_eq!(resolve_group("1234").unwrap(), 1234);
        assert_eq!(resolve_group("root").unwrap(), 0);
        let err = resolve_group("no-such-group-kilo").unwrap_err();
        assert!(err.to_string().contains("no such group"), "{err}");
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
