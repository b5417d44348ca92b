//! The layers every model composes, each written once.

mod attention;
mod linear;
mod mlp;
mod norm;
mod rope;

pub use attention::{sdpa, AttnShape};
pub use linear::{ColumnParallelLinear, Linear, RowParallelLinear};
pub use mlp::{GatedMlp, Mlp};
pub use norm::{LayerNorm, RmsNorm};
pub use rope::RotaryEmbedding;
