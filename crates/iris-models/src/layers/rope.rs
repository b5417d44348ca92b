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

    /// The rounded cos and sin of every frequency at each of `positions`: computed
    /// once a step for all layers (and for queries and keys alike).
    pub fn table(&self, positions: &[usize]) -> RopeTable {
        let dt = self.dtype;
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (
            Vec::with_capacity(positions.len() * half),
            Vec::with_capacity(positions.len() * half),
        );
        for &pos in positions {
            for f in &self.inv_freq {
                let a = pos as f32 * f;
                cos.push(round(a.cos(), dt));
                sin.push(round(a.sin(), dt));
            }
        }
        RopeTable {
            cos,
            sin,
            half,
            dtype: dt,
        }
    }
}

/// cos and sin of a step's positions (see [`RotaryEmbedding::table`]).
#[derive(Debug, Clone)]
pub struct RopeTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    dtype: DType,
}

impl RopeTable {
    /// Rotates `x` (`[tokens, n_heads·head_dim]`) in place, its token `t` at the
    /// table's position `first + t`.
    pub fn apply(&self, x: &mut [f32], n_heads: usize, first: usize) {
        // One loop per dtype, so that the rounding inlines and the loop vectorises.
        match self.dtype {
            DType::F32 => self.rotate(x, n_heads, first, |v| v),
            DType::BF16 => self.rotate(x, n_heads, first, |v| round(v, DType::BF16)),
            DType::F16 => self.rotate(x, n_heads, first, |v| round(v, DType::F16)),
        }
    }

    #[inline(always)]
    fn rotate(&self, x: &mut [f32], n_heads: usize, first: usize, r: impl Fn(f32) -> f32) {
        let half = self.half;
        let hd = 2 * half;
        for (t, row) in x.chunks_exact_mut(n_heads * hd).enumerate() {
            let at = (first + t) * half..(first + t + 1) * half;
            let (cos, sin) = (&self.cos[at.clone()], &self.sin[at]);
            for head in row.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2, c, s) = (a[i], b[i], cos[i], sin[i]);
                    a[i] = r(r(x1 * c) + r(-x2 * s));
                    b[i] = r(r(x2 * c) + r(x1 * s));
                }
            }
        }
    }
}
