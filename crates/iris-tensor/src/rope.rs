//! Rotary position embeddings (Su et al., 2021) in HF's "rotate half" layout: the cos
//! and sin of a step's positions, computed once for every layer, and the rotation as a
//! tensor operation.

use crate::round_scalar as round;
use crate::storage::BackendStorage;
use crate::{DType, Device, Result, Tensor};

/// cos and sin of a step's positions, `[rows, half]` each on the device of the
/// activations they rotate, rounded to the model's dtype (as HF's bf16 path rounds
/// them).
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
}

impl RopeTable {
    /// The table of `positions` for frequencies `inv_freq` (computed in f32, as HF).
    pub fn new(
        inv_freq: &[f32],
        positions: &[usize],
        dtype: DType,
        device: Device,
    ) -> Result<RopeTable> {
        let half = inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(positions.len() * half),
            Vec::with_capacity(positions.len() * half),
        );
        for &pos in positions {
            for f in inv_freq {
                let a = pos as f32 * f;
                cos.push(round(a.cos(), dtype));
                sin.push(round(a.sin(), dtype));
            }
        }
        let shape = [positions.len(), half];
        Ok(RopeTable {
            cos: Tensor::from_f32(cos, &shape)?.to_device(device)?,
            sin: Tensor::from_f32(sin, &shape)?.to_device(device)?,
            dtype,
        })
    }

    /// Positions in the table.
    pub fn rows(&self) -> usize {
        self.cos.rows()
    }
}

impl Tensor {
    /// Rotates `[rows, n_heads·head_dim]` (queries or keys), row `t` at the table's
    /// position `t`.
    pub fn rope(mut self, table: &RopeTable, n_heads: usize) -> Result<Tensor> {
        let d = self.last_dim();
        let half = table.cos.last_dim();
        if self.rows() != table.rows() || d != n_heads * 2 * half {
            return crate::error::shape_err(
                "rope",
                format!(
                    "{:?} with {n_heads} heads against a table of {} positions × {half}",
                    self.shape(),
                    table.rows()
                ),
            );
        }
        let (cos, sin) = (&*table.cos.storage, &*table.sin.storage);
        self.storage_mut()?
            .rope(d, cos, sin, n_heads, table.dtype)?;
        Ok(self)
    }
}
