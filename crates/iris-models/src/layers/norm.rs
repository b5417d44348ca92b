//! LayerNorm (CLIP) and RMSNorm (LLaMA, Zhang & Sennrich 2019).

use iris_tensor::{DType, Tensor};

use crate::weights::Vb;
use crate::Result;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    dtype: DType,
}

impl LayerNorm {
    pub fn load(vb: &Vb, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: vb.get("weight", &[dim])?,
            bias: vb.get("bias", &[dim])?,
            eps,
            dtype: vb.dtype(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // (A host input is uploaded where it meets the weights, as in `Linear`.)
        Ok(x.to_device(self.weight.device())?
            .layer_norm(&self.weight, Some(&self.bias), self.eps)?
            .round_to(self.dtype)?)
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    dtype: DType,
}

impl RmsNorm {
    pub fn load(vb: &Vb, dim: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: vb.get("weight", &[dim])?,
            eps,
            dtype: vb.dtype(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.to_device(self.weight.device())?
            .rms_norm(&self.weight, self.eps, self.dtype)?
            .round_to(self.dtype)?)
    }
}
