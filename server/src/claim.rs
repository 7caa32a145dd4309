//! One kilo-egressd per network namespace. Before any rule is read or written, the service binds
//! an abstract unix socket: abstract names belong to the network namespace, so a second instance
//! in the same namespace (whatever its flags, socket or state directory) cannot bind it, and
//! exits naming the holder's pid before it touches anything. The kernel releases the name when
//! the holder exits, even on SIGKILL, so a crash never leaves a stale claim behind.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

/// The abstract socket name (without the leading NUL) that marks the claim.
pub const CLAIM_NAME: &str = "kilo-egressd/rules";

/// Held while the service owns the namespace's egress rules; dropping it releases the claim.
#[derive(Debug)]
pub struct NodeClaim {
    _listener: UnixListener,
}

/// Why the claim could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another process holds it.
    #[error(
        "another kilo-egressd ({}) already manages the egress rules of this network namespace; nothing was changed; stop it first",
        holder.map_or_else(|| "pid unknown".to_string(), |pid| format!("pid {pid}"))
    )]
    Held {
        /// The holder's process id, when the kernel tells it.
        holder: Option<i32>,
    },
    /// The socket could not be created.
    #[error(
        "cannot claim the network namespace's egress rules (abstract unix socket @{CLAIM_NAME}): {0}"
    )]
    Io(#[from] io::Error),
}

/// Claims the egress rules of the current network namespace for this process.
pub async fn claim() -> Result<NodeClaim, ClaimError> {
    let addr = SocketAddr::from_abstract_name(CLAIM_NAME)?;
    match UnixListener::bind_addr(&addr) {
        Ok(listener) => Ok(NodeClaim {
            _listener: listener,
        }),
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => Err(ClaimError::Held {
            holder: holder_pid(&addr).await,
        }),
        Err(error) => Err(error.into()),
    }
}

/// The pid of the process listening on `addr`: a connection's peer credentials are the
/// listener's, even before (or without) an accept.
async fn holder_pid(addr: &SocketAddr) -> Option<i32> {
    let stream = UnixStream::connect_addr(addr).ok()?;
    stream.set_nonblocking(true).ok()?;
    let stream = tokio::net::UnixStream::from_std(stream).ok()?;
    stream.peer_cred().ok()?.pid()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Abstract names are per network namespace; the test process shares one with every other
    /// test, so it only checks that a second claim in the same process is refused and names us.
    #[tokio::test]
    async fn a_second_claim_is_refused_and_names_the_holder() {
        let Ok(first) = claim().await else {
            eprintln!("SKIPPED: the claim is held by a kilo-egressd in this namespace");
            return;
        };
        let error = claim().await.unwrap_err();
        assert!(
            matches!(error, ClaimError::Held { holder: Some(pid) } if pid == std::process::id() as i32),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains(&format!("pid {}", std::process::id()))
        );
        drop(first);
        claim().await.expect("released when dropped");
    }
}
