//! The legacy backend's cheap change signal. x_tables (the kernel side of `iptables-legacy`)
//! sends no change notifications, and every `iptables-legacy` run copies and parses the whole
//! table: ~20 ms of CPU for a 20,000-rule nat table. `IPT_SO_GET_INFO` reports the table's
//! shape (its hooks' offsets, rule count and size) in a few microseconds without copying a rule.
//! A rule added or removed anywhere changes the shape; a rule replaced by one of the same size
//! (or rules reordered) does not, so the shape only says when a full read is needed early, never
//! that one is not needed at all (see `engine::poll`).
//!
//! The one place the crate calls the C library directly: no maintained crate offers this socket
//! option, and the call is a plain `getsockopt` into a fixed-size struct.
#![allow(unsafe_code)]

use kilo_egress_api::egress::Family;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `IPT_SO_GET_INFO` and `IP6T_SO_GET_INFO` (both `IPT_BASE_CTL`, 64, in
/// `linux/netfilter_ipv{4,6}/ip{,6}_tables.h`).
const SO_GET_INFO: libc::c_int = 64;
/// `NF_INET_NUMHOOKS`.
const HOOKS: usize = 5;

/// `struct ipt_getinfo` / `struct ip6t_getinfo` (identical layouts).
#[repr(C)]
struct GetInfo {
    name: [u8; 32],
    valid_hooks: u32,
    hook_entry: [u32; HOOKS],
    underflow: [u32; HOOKS],
    num_entries: u32,
    size: u32,
}

/// What `IPT_SO_GET_INFO` says about a table: equal shapes mean no rule was added or removed
/// between the two looks (a same-size replacement is not seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableShape {
    valid_hooks: u32,
    hook_entry: [u32; HOOKS],
    underflow: [u32; HOOKS],
    num_entries: u32,
    size: u32,
}

/// The shape of the legacy nat table of `family` in this network namespace. Fails when the
/// caller lacks CAP_NET_ADMIN/CAP_NET_RAW or the kernel has no legacy nat table.
pub fn nat_table_shape(family: Family) -> std::io::Result<TableShape> {
    let (domain, level) = match family {
        Family::Ipv4 => (libc::AF_INET, libc::SOL_IP),
        Family::Ipv6 => (libc::AF_INET6, libc::SOL_IPV6),
    };
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new descriptor that
    // nothing else owns, so OwnedFd may close it.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above; `fd` is valid and owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = GetInfo {
        name: [0; 32],
        valid_hooks: 0,
        hook_entry: [0; HOOKS],
        underflow: [0; HOOKS],
        num_entries: 0,
        size: 0,
    };
    info.name[..3].copy_from_slice(b"nat");
    let mut len = std::mem::size_of::<GetInfo>() as libc::socklen_t;
    // SAFETY: `info` is a live, writable `repr(C)` struct of `len` bytes, the layout the kernel
    // expects for this option; the kernel writes at most `len` bytes and checks `len` itself.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            SO_GET_INFO,
            (&mut info as *mut GetInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TableShape {
        valid_hooks: info.valid_hooks,
        hook_entry: info.hook_entry,
        underflow: info.underflow,
        num_entries: info.num_entries,
        size: info.size,
    })
}

#[cfg(any(test, feature = "test-util"))]
impl TableShape {
    /// A shape of `entries` entries taking `size` bytes, for test doubles.
    pub fn for_test(entries: u32, size: u32) -> TableShape {
        TableShape {
            valid_hooks: 0,
            hook_entry: [0; HOOKS],
            underflow: [0; HOOKS],
            num_entries: entries,
            size,
        }
    }
}
