//! kilo-egressd: the per-node service that owns the egress decision of the nat chain `KILO-NAT`.
//!
//! One instance per network namespace ([`claim`]). The data flows one way: a request is parsed into a validated pair of addresses ([`service`]),
//! the engine decides the desired rules ([`rules`], pure) and applies them in one transaction per
//! family ([`netfilter`]); it keeps them in place against drift, told of changes by
//! [`nftwatch`] on nft, polling on legacy (where [`xtinfo`] says when a read is worth it), and
//! stores the accepted state ([`state`]). [`server`] puts the gRPC API, health and reflection on
//! a socket ([`listen`]; on a unix socket [`authority`] makes any client's `:authority`
//! acceptable), optionally TCP with mutual TLS ([`tls`]); [`peer`]
//! names each caller, [`authz`] decides who may write, [`write_limit`] bounds writes in flight,
//! and [`audit`] logs every SetEgress. Test doubles live in `testing`, built only for tests and
//! with the feature `test-util`.
// Unsafe code is denied everywhere but in `xtinfo`, which makes one documented `getsockopt`.
#![deny(unsafe_code)]

pub mod addrwatch;
pub mod audit;
pub mod authority;
pub mod authz;
pub mod claim;
pub mod conntrack;
pub mod ctflush;
pub mod engine;
pub mod listen;
pub mod metrics;
pub mod netfilter;
pub mod nftwatch;
pub mod peer;
pub mod rules;
pub mod server;
pub mod service;
pub mod state;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod tls;
pub mod write_limit;
pub mod xtinfo;
