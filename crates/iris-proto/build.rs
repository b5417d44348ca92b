//! Generates the gRPC code from `proto/iris/v1/*.proto` (needs `protoc`: Debian's
//! `protobuf-compiler`, or `PROTOC` pointing at one), and the descriptor set that
//! gRPC reflection serves.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = ["common", "vision", "connector", "decoder", "gateway"]
        .iter()
        .map(|f| root.join(format!("iris/v1/{f}.proto")))
        .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("iris_descriptor.bin"))
        .compile_protos(&files, &[root])?;
    Ok(())
}
