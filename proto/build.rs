//! Compiles `kilo/egress/v1/egress.proto` with protox (pure Rust, no system protoc) and writes the
//! encoded file descriptor set that the server registers for gRPC reflection. pbjson adds the
//! proto3 JSON mapping, so clients print exactly what grpcurl prints.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTO: &str = "kilo/egress/v1/egress.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let encoded = descriptors.encode_to_vec();
    fs::write(out_dir.join("kilo_egress_v1_descriptor.bin"), &encoded)?;
    // Well-known types come from pbjson-types, so every message has proto3 JSON (serde) support.
    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors)?;
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .emit_fields()
        .build(&[".kilo.egress.v1"])?;
    Ok(())
}
