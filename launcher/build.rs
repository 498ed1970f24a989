//! Generates the coordinator's gRPC code with the protoc binary vendored on crates.io, so
//! the build needs no system protoc and no network.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY of the environment: build scripts are single-threaded.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/coordinator.proto");
    tonic_prost_build::configure().compile_protos(&["proto/coordinator.proto"], &["proto"])?;
    Ok(())
}
