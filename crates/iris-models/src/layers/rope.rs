//! Rotary position embeddings (Su et al., 2021) in HF's "rotate half" layout, with the
//! `default`, `linear` and `llama3` frequency schemes of `modeling_rope_utils.py`.
//! Frequencies are computed in f32 as HF does; cos/sin and each product are rounded to
//! the model dtype (by `iris_tensor::RopeTable`), as HF's bf16 path rounds them.

use iris_tensor::{DType, RopeTable};

use crate::config::{LlamaConfig, RopeScaling};
use crate::Result;

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    dtype: DType,
}

impl RotaryEmbedding {
    pub fn new(cfg: &LlamaConfig, dtype: DType) -> RotaryEmbedding {
        let d = cfg.head_dim;
        let base = cfg.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        match cfg.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor as f32),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f32;
                let (factor, lo, hi) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let (low_wl, high_wl) = (old / lo, old / hi);
                for f in inv_freq.iter_mut() {
                    let wl = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wl > low_wl { *f / factor } else { *f };
                    if (high_wl..=low_wl).contains(&wl) {
                        let s = (old / wl - lo) / (hi - lo);
                        *f = (1.0 - s) * scaled / factor + s * scaled;
                    } else {
                        *f = scaled;
                    }
                }
            }
        }
        RotaryEmbedding { inv_freq, dtype }
    }

    /// The rounded cos and sin of every frequency at each of `positions`, on `device`:
    /// computed once a step for all layers (and for queries and keys alike).
    pub fn table(&self, positions: &[usize], device: iris_tensor::Device) -> Result<RopeTable> {
        Ok(RopeTable::new(
            &self.inv_freq,
            positions,
            self.dtype,
            device,
        )?)
    }
}
