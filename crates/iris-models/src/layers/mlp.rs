//! Feed-forward blocks: CLIP's `fc1 → act → fc2` and LLaMA's SwiGLU
//! `down(act(gate(x)) · up(x))` (Shazeer 2020), tensor-parallel in the Megatron split.

use std::sync::Arc;

use iris_comm::Communicator;
use iris_tensor::{Activation, DType, Tensor};

use super::{ColumnParallelLinear, Linear, RowParallelLinear};
use crate::weights::Vb;
use crate::Result;

#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    dtype: DType,
}

impl Mlp {
    /// `names` are the two layers' names (`fc1`/`fc2` in CLIP, `linear_1`/`linear_2` in
    /// the LLaVA projector).
    pub fn load(
        vb: &Vb,
        names: (&str, &str),
        dims: (usize, usize, usize),
        act: Activation,
        bias: bool,
    ) -> Result<Mlp> {
        let (input, hidden, output) = dims;
        Ok(Mlp {
            fc1: Linear::load(&vb.pp(names.0), input, hidden, bias)?,
            fc2: Linear::load(&vb.pp(names.1), hidden, output, bias)?,
            act,
            dtype: vb.dtype(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .fc1
            .forward(x)?
            .activation(self.act)?
            .round_to(self.dtype)?;
        self.fc2.forward(&h)
    }
}

#[derive(Debug, Clone)]
pub struct GatedMlp {
    gate_proj: ColumnParallelLinear,
    up_proj: ColumnParallelLinear,
    down_proj: RowParallelLinear,
    act: Activation,
    dtype: DType,
}

impl GatedMlp {
    pub fn load(
        vb: &Vb,
        hidden: usize,
        intermediate: usize,
        act: Activation,
        bias: bool,
        comm: &Arc<dyn Communicator>,
    ) -> Result<GatedMlp> {
        Ok(GatedMlp {
            gate_proj: ColumnParallelLinear::load(
                &vb.pp("gate_proj"),
                hidden,
                intermediate,
                bias,
                comm.as_ref(),
            )?,
            up_proj: ColumnParallelLinear::load(
                &vb.pp("up_proj"),
                hidden,
                intermediate,
                bias,
                comm.as_ref(),
            )?,
            down_proj: RowParallelLinear::load(
                &vb.pp("down_proj"),
                intermediate,
                hidden,
                bias,
                comm.clone(),
            )?,
            act,
            dtype: vb.dtype(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [g, u]: [Tensor; 2] =
            ColumnParallelLinear::forward_many(&[&self.gate_proj, &self.up_proj], x)?
                .try_into()
                .expect("two projections");
        let g = g.activation(self.act)?.round_to(self.dtype)?;
        let h = g.mul_elem(&u)?.round_to(self.dtype)?;
        self.down_proj.forward(&h)
    }
}
