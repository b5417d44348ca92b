//! Iris services: the tier traits and their local and gRPC implementations, the
//! gateway, the gRPC service handlers, the OpenAI-compatible HTTP API, metrics, and the
//! runners of each role (`iris serve`, `iris-gateway`, `iris-encoder`, ...).

pub mod cache;
pub mod cluster_cli;
pub mod error;
pub mod gateway;
pub mod metrics;
pub mod openai;
pub mod roles;
pub mod services;
pub mod tiers;
pub mod wire;
