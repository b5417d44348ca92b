//! Linear layers and their Megatron-LM tensor-parallel forms (Shoeybi et al., 2019).
//! A column-parallel layer holds a slice of the output rows; a row-parallel layer holds
//! a slice of the input columns and all-reduces its partial sums. At world size 1 both
//! are the plain layer and the all-reduce is a no-op.

use std::sync::Arc;

use iris_comm::{shard_range, Communicator};
use iris_tensor::{DType, Tensor, Weight};

use crate::weights::Vb;
use crate::Result;

/// `y = x·Wᵀ + b`, the output rounded to the model's dtype as PyTorch would; the weight
/// held as its backend multiplies fastest (`iris_tensor::Weight`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    dtype: DType,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>, dtype: DType) -> Result<Linear> {
        Ok(Linear {
            weight: Weight::new(weight)?,
            bias,
            dtype,
        })
    }

    /// A layer over a weight already made (a quantized one, say).
    pub fn from_weight(weight: Weight, bias: Option<Tensor>, dtype: DType) -> Linear {
        Linear {
            weight,
            bias,
            dtype,
        }
    }

    /// Whether the weight is held in quantized blocks (on the CPU).
    pub fn quantized(&self) -> bool {
        self.weight.quant_type().is_some()
    }

    pub fn load(vb: &Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        let weight = vb.weight("weight", &[out_dim, in_dim])?;
        let bias = if bias {
            Some(vb.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(Linear::from_weight(weight, bias, vb.dtype()))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.product(x, self.bias.as_ref())?.round_to(self.dtype)?)
    }

    /// `forward` of several layers on the same input (a layer's q/k/v or gate/up
    /// projections: one pass where the backend can).
    pub fn forward_many(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let x = &match layers.first() {
            Some(l) => x.to_device(l.weight.device())?,
            None => x.clone(),
        };
        let ws: Vec<(&Weight, Option<&Tensor>)> = layers
            .iter()
            .map(|l| (&l.weight, l.bias.as_ref()))
            .collect();
        Weight::linear_many(&ws, x)?
            .into_iter()
            .zip(layers)
            .map(|(y, l)| Ok(y.round_to(l.dtype)?))
            .collect()
    }

    /// `x·Wᵀ (+ bias)` in f32, not rounded. An input from the host (visual tokens or
    /// features off the wire) is uploaded to the weight's device here, where it first
    /// meets the model; on the same device this is a no-op.
    fn product(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let x = x.to_device(self.weight.device())?;
        Ok(self.weight.linear(&x, bias)?)
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        self.weight.out_dim()
    }
}

/// Output rows split over the ranks; each rank returns its slice of `y`.
#[derive(Debug, Clone)]
pub struct ColumnParallelLinear(Linear);

impl ColumnParallelLinear {
    pub fn load(
        vb: &Vb,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        comm: &dyn Communicator,
    ) -> Result<Self> {
        let rows = shard_range(out_dim, comm.rank(), comm.world_size())?;
        ColumnParallelLinear::load_rows(vb, in_dim, out_dim, bias, rows)
    }

    /// The output rows `rows` of the full layer, whatever the rank (KV heads replicated
    /// over more ranks than there are heads).
    pub fn load_rows(
        vb: &Vb,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        rows: std::ops::Range<usize>,
    ) -> Result<Self> {
        let weight = vb.weight_rows("weight", &[out_dim, in_dim], rows.clone())?;
        let bias = if bias {
            Some(vb.get_rows("bias", &[out_dim], rows)?)
        } else {
            None
        };
        Ok(ColumnParallelLinear(Linear::from_weight(
            weight,
            bias,
            vb.dtype(),
        )))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }

    /// Whether the weight is held in quantized blocks (on the CPU).
    pub fn quantized(&self) -> bool {
        self.0.quantized()
    }

    /// `forward` of several layers on the same input (see `Linear::forward_many`).
    pub fn forward_many(layers: &[&ColumnParallelLinear], x: &Tensor) -> Result<Vec<Tensor>> {
        let inner: Vec<&Linear> = layers.iter().map(|l| &l.0).collect();
        Linear::forward_many(&inner, x)
    }
}

/// Input columns split over the ranks; partial products are summed by an all-reduce,
/// then the (unsplit) bias is added once.
#[derive(Debug, Clone)]
pub struct RowParallelLinear {
    inner: Linear,
    bias: Option<Tensor>,
    comm: Arc<dyn Communicator>,
}

impl RowParallelLinear {
    pub fn load(
        vb: &Vb,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let cols = shard_range(in_dim, comm.rank(), comm.world_size())?;
        let weight = vb.weight_cols("weight", &[out_dim, in_dim], cols)?;
        let bias = if bias {
            Some(vb.get("bias", &[out_dim])?)
        } else {
            None
        };
        Ok(RowParallelLinear {
            inner: Linear::from_weight(weight, None, vb.dtype()),
            bias,
            comm,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.comm.all_reduce_sum(self.inner.product(x, None)?)?;
        if let Some(b) = &self.bias {
            y = y.add_row(b)?;
        }
        Ok(y.round_to(self.inner.dtype)?)
    }
}
