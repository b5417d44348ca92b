//! Rotary position embeddings (Su et al., 2021) in HF's "rotate half" layout, with the
//! `default`, `linear` and `llama3` frequency schemes of `modeling_rope_utils.py`.
//! Frequencies are computed in f32 as HF does; cos/sin and each product are rounded to
//! the model dtype, as HF's bf16 path rounds them.

use iris_tensor::DType;

use crate::config::{LlamaConfig, RopeScaling};

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    dtype: DType,
}

use iris_tensor::round_scalar as round;

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

    /// Rotates `x` (`[tokens, n_heads·head_dim]`) in place; token `t` is at
    /// `positions[t]`.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, positions: &[usize]) {
        let half = self.inv_freq.len();
        let hd = 2 * half;
        let dt = self.dtype;
        for (t, &pos) in positions.iter().enumerate() {
            let cs: Vec<(f32, f32)> = self
                .inv_freq
                .iter()
                .map(|f| {
                    let a = pos as f32 * f;
                    (round(a.cos(), dt), round(a.sin(), dt))
                })
                .collect();
            let row = &mut x[t * n_heads * hd..(t + 1) * n_heads * hd];
            for head in row.chunks_exact_mut(hd) {
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (x1, x2) = (head[i], head[i + half]);
                    head[i] = round(round(x1 * c, dt) + round(-x2 * s, dt), dt);
                    head[i + half] = round(round(x2 * c, dt) + round(x1 * s, dt), dt);
                }
            }
        }
    }
}
