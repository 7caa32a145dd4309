//! Compiles `kilo/egress/v1/egress.proto` with protox (pure Rust, no system protoc) and writes the
//! encoded file descriptor set that the server registers for gRPC reflection.

use prost::Message;
use std::{env, fs, path::PathBuf};

const PROTO: &str = "kilo/egress/v1/egress.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("kilo_egress_v1_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
