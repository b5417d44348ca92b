//! The layers every model composes, each written once.

mod attention;
mod kv_cache;
mod linear;
mod mlp;
mod norm;
mod rope;

pub use attention::{sdpa, AttnShape};
pub use kv_cache::KvCache;
pub use linear::{ColumnParallelLinear, Linear, RowParallelLinear};
pub use mlp::{GatedMlp, Mlp};
pub use norm::{LayerNorm, RmsNorm};
pub use rope::RotaryEmbedding;
