//! The layers every model composes, each written once.

mod embedding;
mod linear;
mod mlp;
mod norm;
mod rope;

pub use embedding::{tied_head, vocab_range, VocabParallelEmbedding};
pub use iris_tensor::attention::{
    attention, attention_blocks, attention_cached, attention_cross, AttnShape,
};
pub use iris_tensor::kv::{KvArena, KvCache, KvDtype};
pub use iris_tensor::RopeTable;
pub use linear::{ColumnParallelLinear, Linear, RowParallelLinear};
pub use mlp::{GatedMlp, Mlp};
pub use norm::{LayerNorm, RmsNorm};
pub use rope::RotaryEmbedding;
