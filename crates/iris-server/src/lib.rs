//! Iris services: the tier traits and their local and gRPC implementations, the
//! gateway, the gRPC service handlers, the OpenAI-compatible HTTP API, metrics, and the
//! one error they return (the processes that run them are in `services/iris`).

pub mod auth;
pub mod cache;
pub mod error;
pub mod gateway;
pub mod listen;
pub mod metrics;
pub mod openai;
pub mod services;
pub mod tiers;
pub mod trace;
pub mod wire;
