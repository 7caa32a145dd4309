//! The kilo-egress API: the gRPC wire types compiled from `proto/kilo/egress/v1/egress.proto`,
//! and the domain types that the server and every client share (the egress address pair and its
//! parser), so that a value means the same thing everywhere, and the one conversion between the
//! two ([`convert`]).
#![forbid(unsafe_code)]

pub mod convert;
pub mod egress;
#[cfg(feature = "metrics-http")]
pub mod metrics_http;

/// Generated protobuf and gRPC types of package `kilo.egress.v1`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("kilo.egress.v1");
    include!(concat!(env!("OUT_DIR"), "/kilo.egress.v1.serde.rs"));
}

/// The encoded file descriptor set of the API (with its imports), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kilo_egress_v1_descriptor.bin"));

/// The fully qualified gRPC service name, as health checks and reflection report it.
pub const SERVICE_NAME: &str = "kilo.egress.v1.EgressService";

/// The socket `kilo-egressd` listens on, and clients connect to, unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/kilo-egress/kilo-egressd.sock";
