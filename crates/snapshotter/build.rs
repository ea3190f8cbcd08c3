//! Generates the containerd snapshots gRPC service from the vendored protos in `proto/`, with
//! protox (a protobuf compiler in Rust: no `protoc` needed to build lazylayer).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["snapshots.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
