//! The layers every model composes, each written once.

mod attention;
mod kv_cache;
mod linear;
mod mlp;
mod norm;
mod rope;

pub use attention::{sdpa, sdpa_batch, sdpa_view, AttnShape};
pub use kv_cache::{KvArena, KvCache, KvDtype, KvRow, KvView};
pub use linear::{ColumnParallelLinear, Linear, RowParallelLinear};
pub use mlp::{GatedMlp, Mlp};
pub use norm::{LayerNorm, RmsNorm};
pub use rope::{RopeTable, RotaryEmbedding};
