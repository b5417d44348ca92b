//! The Iris wire format: messages and service stubs generated from `proto/iris/v1`, and
//! the descriptor set for gRPC reflection.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("iris.v1");
}

/// The encoded `FileDescriptorSet` of every Iris proto (for `tonic-reflection`).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("iris_descriptor");
