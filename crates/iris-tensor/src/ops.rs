//! Element-wise ops, activations, norms and softmax on f32 activations.

use crate::error::shape_err;
use crate::{Result, Tensor};

/// Activation functions by their HF names (`hidden_act`, `projector_hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `0.5·x·(1 + erf(x/√2))` (HF "gelu").
    Gelu,
    /// Tanh approximation (HF "gelu_new", "gelu_pytorch_tanh", "gelu_fast").
    GeluTanh,
    /// `x·σ(1.702·x)` (HF "quick_gelu", CLIP).
    QuickGelu,
    /// `x·σ(x)` (HF "silu", "swish").
    Silu,
    Relu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Activation> {
        Some(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }

    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Gelu => {
                0.5 * x * (1.0 + erf(x as f64 * std::f64::consts::FRAC_1_SQRT_2) as f32)
            }
            Activation::GeluTanh => {
                let c = (2.0f32 / std::f32::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Relu => x.max(0.0),
        }
    }
}

/// erf to ~1e-15 in f64: torch's exact GELU uses a full-precision erf, and the common
/// single-formula approximations (e.g. Abramowitz–Stegun 7.1.26, 1e-7) add error that
/// compounds over layers. Series below 3, erfc continued fraction above.
fn erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 3.0 {
        // Maclaurin series: erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let mut sum = ax;
        let mut term = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() <= 1e-17 * sum.abs() || n > 200.0 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc continued fraction (Lentz), converges fast for x ≥ 3.
        let mut f = ax;
        for k in (1..60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    r.copysign(x)
}

impl Tensor {
    pub fn activation(mut self, act: Activation) -> Tensor {
        let gate = match act {
            Activation::Silu => Some(1.0),
            Activation::QuickGelu => Some(1.702),
            _ => None,
        };
        let f = |v: &mut [f32]| match gate {
            Some(a) if crate::kernels::simd() == crate::kernels::Simd::Avx512 => {
                crate::kernels::sigmoid_gate_avx512(v, a)
            }
            _ => v.iter_mut().for_each(|x| *x = act.apply(*x)),
        };
        in_chunks(self.f32_mut(), ELEMENTWISE_CHUNK, f);
        self
    }

    fn zip_same(
        mut self,
        other: &Tensor,
        op: &'static str,
        f: impl Fn(f32, f32) -> f32 + Sync,
    ) -> Result<Tensor> {
        if self.shape() != other.shape() {
            return shape_err(op, format!("{:?} vs {:?}", self.shape(), other.shape()));
        }
        // f32 operands are read in place (no copy); large ones split over the threads.
        let owned;
        let b: &[f32] = match other.as_f32() {
            Ok(b) => b,
            Err(_) => {
                owned = other.to_f32_vec();
                &owned
            }
        };
        let zip = |a: &mut [f32], b: &[f32]| a.iter_mut().zip(b).for_each(|(a, &b)| *a = f(*a, b));
        let a = self.f32_mut();
        if a.len() <= ELEMENTWISE_CHUNK {
            zip(a, b);
        } else {
            use rayon::prelude::*;
            a.par_chunks_mut(ELEMENTWISE_CHUNK)
                .zip(b.par_chunks(ELEMENTWISE_CHUNK))
                .for_each(|(a, b)| zip(a, b));
        }
        Ok(self)
    }

    pub fn add_elem(self, other: &Tensor) -> Result<Tensor> {
        self.zip_same(other, "add", |a, b| a + b)
    }

    pub fn mul_elem(self, other: &Tensor) -> Result<Tensor> {
        self.zip_same(other, "mul", |a, b| a * b)
    }

    /// Adds a `[last_dim]` vector to every row.
    pub fn add_row(mut self, row: &Tensor) -> Result<Tensor> {
        let d = self.last_dim();
        if row.elem_count() != d {
            return shape_err(
                "add_row",
                format!("row of {} for last dim {d}", row.elem_count()),
            );
        }
        let r = row.to_f32_vec();
        for chunk in self.f32_mut().chunks_exact_mut(d) {
            chunk.iter_mut().zip(&r).for_each(|(a, b)| *a += b);
        }
        Ok(self)
    }

    pub fn scale(mut self, s: f32) -> Tensor {
        self.f32_mut().iter_mut().for_each(|x| *x *= s);
        self
    }

    /// LayerNorm over the last dimension (biased variance, as torch).
    pub fn layer_norm(
        mut self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        let d = self.last_dim();
        if weight.elem_count() != d || bias.is_some_and(|b| b.elem_count() != d) {
            return shape_err(
                "layer_norm",
                format!("weight of {} for dim {d}", weight.elem_count()),
            );
        }
        let w = weight.to_f32_vec();
        let b = bias.map(|b| b.to_f32_vec());
        rows_in_parallel(self.f32_mut(), d, |row| {
            let mean = lane_sum(row, |x| x as f64) / d as f64;
            let var = lane_sum(row, |x| (x as f64 - mean).powi(2)) / d as f64;
            let inv = 1.0 / (var + eps).sqrt();
            for (i, x) in row.iter_mut().enumerate() {
                let y = ((*x as f64 - mean) * inv) as f32 * w[i];
                *x = y + b.as_ref().map_or(0.0, |b| b[i]);
            }
        });
        Ok(self)
    }

    /// RMSNorm over the last dimension: `w · x / sqrt(mean(x²) + eps)` (LLaMA). The
    /// normalised value is rounded to `round_dtype` before the weight multiplies it, as
    /// HF's `LlamaRMSNorm` casts back to the input dtype first.
    pub fn rms_norm(
        mut self,
        weight: &Tensor,
        eps: f64,
        round_dtype: crate::DType,
    ) -> Result<Tensor> {
        let d = self.last_dim();
        if weight.elem_count() != d {
            return shape_err(
                "rms_norm",
                format!("weight of {} for dim {d}", weight.elem_count()),
            );
        }
        let w = weight.to_f32_vec();
        rows_in_parallel(self.f32_mut(), d, |row| {
            let ms = lane_sum(row, |x| (x as f64) * (x as f64)) / d as f64;
            let inv = (1.0 / (ms + eps).sqrt()) as f32;
            if round_dtype == crate::DType::BF16 {
                row.iter_mut().for_each(|x| *x *= inv);
                crate::kernels::round_bf16_in_place(row);
                row.iter_mut().zip(&w).for_each(|(x, w)| *x *= w);
            } else {
                for (x, w) in row.iter_mut().zip(&w) {
                    *x = round_scalar(*x * inv, round_dtype) * w;
                }
            }
        });
        Ok(self)
    }

    /// Softmax over the last dimension, in place.
    pub fn softmax_last(mut self) -> Tensor {
        let d = self.last_dim();
        for row in self.f32_mut().chunks_exact_mut(d) {
            softmax_in_place(row);
        }
        self
    }

    /// Log-softmax of a single row (f64 accumulation), for reporting logprobs.
    pub fn log_softmax_row(row: &[f32]) -> Vec<f32> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = row
            .iter()
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32
            + max;
        row.iter().map(|&x| x - lse).collect()
    }
}

/// Values per task of an elementwise pass (smaller passes run inline).
const ELEMENTWISE_CHUNK: usize = 1 << 15;

/// `f` over `v` in chunks of `chunk` values spread over the threads, or inline when `v`
/// is one chunk or less (a fork-join from outside the pool costs more than a small op).
pub(crate) fn in_chunks(v: &mut [f32], chunk: usize, f: impl Fn(&mut [f32]) + Sync) {
    use rayon::prelude::*;
    if v.len() <= chunk {
        f(v)
    } else {
        v.par_chunks_mut(chunk).for_each(&f)
    }
}

/// `f` applied to each `d`-wide row, rows spread over the threads when there are many.
/// A row's result never depends on the others, so batching changes no bit.
fn rows_in_parallel(v: &mut [f32], d: usize, f: impl Fn(&mut [f32]) + Sync) {
    use rayon::prelude::*;
    if v.len() < 1 << 15 || d == 0 {
        v.chunks_exact_mut(d.max(1)).for_each(f);
    } else {
        v.par_chunks_exact_mut(d).with_min_len(8).for_each(&f);
    }
}

/// `Σ f(x)` in f64 over eight interleaved partial sums (independent add chains that
/// vectorise, rather than one chain a value long), then the tail.
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| f(x)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// One value rounded to the precision of `dtype` (bf16: as `bf16::from_f32`, inlined
/// bit arithmetic so that loops over it vectorise).
#[inline(always)]
pub fn round_scalar(x: f32, dtype: crate::DType) -> f32 {
    match dtype {
        crate::DType::F32 => x,
        crate::DType::BF16 => {
            let b = x.to_bits();
            let r = if b & 0x7fff_ffff > 0x7f80_0000 {
                b | 0x0040_0000 // NaN: made quiet
            } else {
                b.wrapping_add(0x7fff + ((b >> 16) & 1)) // to nearest, ties to even
            };
            f32::from_bits(r & 0xffff_0000)
        }
        crate::DType::F16 => half::f16::from_f32(x).to_f32(),
    }
}

/// Numerically stable softmax of one row, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    softmax_scaled_in_place(row, 1.0)
}

/// `softmax(scale · row)` in place, `scale` > 0 (attention's 1/√d applied to f32 scores,
/// as PyTorch's CPU flash attention does).
pub fn softmax_scaled_in_place(row: &mut [f32], scale: f32) {
    if crate::kernels::simd() == crate::kernels::Simd::Avx512 {
        return crate::kernels::softmax_avx512(row, scale);
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for x in row.iter_mut() {
        *x = ((*x - max) * scale).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 16-lane SiLU / quick GELU agree with the scalar formulas, and a value's result
    /// does not depend on its place (tail lanes take the same path).
    #[test]
    fn vector_activations_match_the_scalar_ones() {
        let xs: Vec<f32> = (0..1001).map(|i| (i as f32 - 500.0) / 17.0).collect();
        for act in [Activation::Silu, Activation::QuickGelu] {
            let got = Tensor::from_f32(xs.clone(), &[xs.len()])
                .unwrap()
                .activation(act);
            let got = got.as_f32().unwrap();
            for (x, g) in xs.iter().zip(got) {
                let want = act.apply(*x);
                assert!(
                    (g - want).abs() <= 4.0 * f32::EPSILON * want.abs().max(1e-30),
                    "{act:?}({x}): {g} vs {want}"
                );
            }
            for (i, x) in xs.iter().enumerate().step_by(97) {
                let one = Tensor::from_f32(vec![*x], &[1]).unwrap().activation(act);
                assert_eq!(one.as_f32().unwrap()[0].to_bits(), got[i].to_bits());
            }
        }
    }

    #[test]
    fn vector_softmax_matches_the_scalar_one() {
        let simd = crate::kernels::simd() == crate::kernels::Simd::Avx512;
        if !simd {
            eprintln!("note: no AVX-512 on this CPU: only the portable softmax is checked");
        }
        for n in [1, 7, 16, 33, 577] {
            let row: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 211) as f32 - 105.0) / 9.0)
                .collect();
            let mut fast = row.clone();
            if simd {
                crate::kernels::softmax_avx512(&mut fast, 1.0);
            } else {
                softmax_scaled_in_place(&mut fast, 1.0);
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f64> = row.iter().map(|&x| ((x - max) as f64).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (f, e) in fast.iter().zip(&e) {
                let want = e / sum;
                assert!(
                    ((*f as f64) - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12,
                    "n {n}: {f} vs {want}"
                );
            }
        }
    }

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.5, 0.999_593_047_982_555),
            (3.5, 0.999_999_256_901_627_7),
            (-1.0, -0.842_700_792_949_714_9),
        ] {
            assert!(
                (erf(x) - want).abs() < 1e-12,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }

    #[test]
    fn layer_norm_normalises() {
        let t = Tensor::from_f32(vec![1.0, 2.0, 3.0, 4.0], &[1, 4]).unwrap();
        let w = Tensor::from_f32(vec![1.0; 4], &[4]).unwrap();
        let y = t.layer_norm(&w, None, 0.0).unwrap();
        let y = y.as_f32().unwrap();
        let mean: f32 = y.iter().sum::<f32>() / 4.0;
        let var: f32 = y.iter().map(|x| x * x).sum::<f32>() / 4.0;
        assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);
    }

    #[test]
    fn softmax_sums_to_one() {
        let t = Tensor::from_f32(vec![1000.0, 1001.0, -5.0], &[1, 3])
            .unwrap()
            .softmax_last();
        let s: f32 = t.as_f32().unwrap().iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
    }
}
