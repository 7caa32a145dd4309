//! Who is on the other end of a connection: unix peer credentials, a plaintext loopback TCP
//! address, or a TLS client certificate's names. Every accepted connection is wrapped in
//! [`PeerIo`], whose [`PeerInfo`] tonic puts into each request's extensions.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(1);

/// The transport a request came in on and what it says about the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerKind {
    /// The unix socket; credentials as the kernel reports them (`SO_PEERCRED`).
    Unix {
        /// The caller's user id, when known.
        uid: Option<u32>,
        /// The caller's group id, when known.
        gid: Option<u32>,
        /// The caller's process id, when known.
        pid: Option<i32>,
    },
    /// Plaintext TCP, which is allowed on loopback only.
    Tcp {
        /// The caller's address.
        remote: SocketAddr,
    },
    /// Mutual TLS: the client certificate passed verification against `--client-ca`.
    Tls {
        /// The caller's address.
        remote: SocketAddr,
        /// The certificate's DNS and URI subject alternative names, or its common name when it
        /// has no such name.
        names: Vec<String>,
    },
}

/// The connection a request arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Unique per accepted connection in this process.
    pub connection: u64,
    /// The transport and the caller's credentials.
    pub kind: PeerKind,
}

impl PeerInfo {
    /// A new connection with the next connection number.
    pub fn new(kind: PeerKind) -> PeerInfo {
        PeerInfo {
            connection: NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed),
            kind,
        }
    }

    /// The connection info of a request, when it came through a [`PeerIo`].
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&PeerInfo> {
        request.extensions().get::<PeerInfo>()
    }

    /// The key that groups a caller's requests for limits and names it in messages: the first
    /// certificate name, `uid=N` on the unix socket, or `tcp-loopback`.
    pub fn identity(&self) -> String {
        match &self.kind {
            PeerKind::Tls { names, .. } => names
                .first()
                .cloned()
                .unwrap_or_else(|| "certificate without a name".to_string()),
            PeerKind::Unix { uid: Some(uid), .. } => format!("uid={uid}"),
            PeerKind::Unix { uid: None, .. } => "unix".to_string(),
            PeerKind::Tcp { .. } => "tcp-loopback".to_string(),
        }
    }

    /// The caller's network address, when it came over TCP.
    pub fn remote(&self) -> Option<SocketAddr> {
        match &self.kind {
            PeerKind::Tcp { remote } | PeerKind::Tls { remote, .. } => Some(*remote),
            PeerKind::Unix { .. } => None,
        }
    }
}

fn opt<T: std::fmt::Display>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map_or_else(|| "?".to_string(), ToString::to_string)
}

impl std::fmt::Display for PeerInfo {
    /// `unix uid=0 gid=0 pid=42`, `tcp 127.0.0.1:5000` or `tls ops.example from 192.0.2.1:5000`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            PeerKind::Unix { uid, gid, pid } => {
                write!(f, "unix uid={} gid={} pid={}", opt(uid), opt(gid), opt(pid))
            }
            PeerKind::Tcp { remote } => write!(f, "tcp {remote}"),
            PeerKind::Tls { remote, names } => {
                write!(f, "tls {} from {remote}", names.join(","))
            }
        }
    }
}

/// An accepted connection with its [`PeerInfo`].
pub struct PeerIo<T> {
    io: T,
    info: PeerInfo,
}

impl<T> PeerIo<T> {
    /// Wraps `io`, accepted from a caller described by `kind`.
    pub fn new(io: T, kind: PeerKind) -> PeerIo<T> {
        PeerIo {
            io,
            info: PeerInfo::new(kind),
        }
    }
}

impl PeerKind {
    /// A unix connection's caller, with the credentials the kernel reports for it.
    pub fn of_unix(stream: &tokio::net::UnixStream) -> PeerKind {
        let cred = stream.peer_cred().ok();
        PeerKind::Unix {
            uid: cred.map(|c| c.uid()),
            gid: cred.map(|c| c.gid()),
            pid: cred.and_then(|c| c.pid()),
        }
    }
}

impl<T> Connected for PeerIo<T> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PeerIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PeerIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_display_name_the_caller() {
        let remote: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let tls = PeerInfo::new(PeerKind::Tls {
            remote,
            names: vec!["ops.example".into(), "spiffe://x/ops".into()],
        });
        assert_eq!(tls.identity(), "ops.example");
        assert_eq!(
            tls.to_string(),
            "tls ops.example,spiffe://x/ops from 192.0.2.1:5000"
        );
        assert_eq!(tls.remote(), Some(remote));
        let unix = PeerInfo::new(PeerKind::Unix {
            uid: Some(1000),
            gid: Some(100),
            pid: None,
        });
        assert_eq!(unix.identity(), "uid=1000");
        assert_eq!(unix.to_string(), "unix uid=1000 gid=100 pid=?");
        assert_ne!(tls.connection, unix.connection);
    }
}
