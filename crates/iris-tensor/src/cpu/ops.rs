//! The CPU backend's element-wise kernels, activations, norms and softmax over f32
//! activations.

use crate::Activation;

/// An activation over f32 values in place (16 lanes at a time for the sigmoid gates
/// where the CPU has AVX-512).
pub(crate) fn activation(v: &mut [f32], act: Activation) {
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
    in_chunks(v, ELEMENTWISE_CHUNK, f);
}

/// `a[i] = f(a[i], b[i])`, large operands split over the threads.
pub(crate) fn zip_in_place(a: &mut [f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    let zip = |a: &mut [f32], b: &[f32]| a.iter_mut().zip(b).for_each(|(a, &b)| *a = f(*a, b));
    if a.len() <= ELEMENTWISE_CHUNK {
        zip(a, b);
    } else {
        use rayon::prelude::*;
        a.par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(b.par_chunks(ELEMENTWISE_CHUNK))
            .for_each(|(a, b)| zip(a, b));
    }
}

/// LayerNorm of every `d`-wide row (biased variance, as torch), f64 statistics.
pub(crate) fn layer_norm(v: &mut [f32], d: usize, w: &[f32], b: Option<&[f32]>, eps: f64) {
    rows_in_parallel(v, d, |row| {
        let mean = lane_sum(row, |x| x as f64) / d as f64;
        let var = lane_sum(row, |x| (x as f64 - mean).powi(2)) / d as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for (i, x) in row.iter_mut().enumerate() {
            let y = ((*x as f64 - mean) * inv) as f32 * w[i];
            *x = y + b.map_or(0.0, |b| b[i]);
        }
    });
}

/// RMSNorm of every `d`-wide row, the normalised value rounded to `round_dtype` before
/// the weight multiplies it.
pub(crate) fn rms_norm(v: &mut [f32], d: usize, w: &[f32], eps: f64, round_dtype: crate::DType) {
    rows_in_parallel(v, d, |row| {
        let ms = lane_sum(row, |x| (x as f64) * (x as f64)) / d as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        if round_dtype == crate::DType::BF16 {
            row.iter_mut().for_each(|x| *x *= inv);
            crate::kernels::round_bf16_in_place(row);
            row.iter_mut().zip(w).for_each(|(x, w)| *x *= w);
        } else {
            for (x, w) in row.iter_mut().zip(w) {
                *x = round_scalar(*x * inv, round_dtype) * w;
            }
        }
    });
}

/// HF's "rotate half" RoPE of `[rows, n_heads·2·half]` in place, row `t` by row `t` of
/// `cos` and `sin` (`[rows, half]`), each product and sum rounded to `dtype` as HF's
/// bf16 path rounds them.
pub(crate) fn rope(
    x: &mut [f32],
    half: usize,
    cos: &[f32],
    sin: &[f32],
    n_heads: usize,
    dtype: crate::DType,
) {
    use crate::DType;
    // One loop per dtype, so that the rounding inlines and the loop vectorises.
    match dtype {
        DType::F32 => rotate(x, half, cos, sin, n_heads, |v| v),
        DType::BF16 => rotate(x, half, cos, sin, n_heads, |v| round_scalar(v, DType::BF16)),
        DType::F16 => rotate(x, half, cos, sin, n_heads, |v| round_scalar(v, DType::F16)),
    }
}

#[inline(always)]
fn rotate(
    x: &mut [f32],
    half: usize,
    cos: &[f32],
    sin: &[f32],
    n_heads: usize,
    r: impl Fn(f32) -> f32,
) {
    let hd = 2 * half;
    for (t, row) in x.chunks_exact_mut((n_heads * hd).max(1)).enumerate() {
        let at = t * half..(t + 1) * half;
        let (cos, sin) = (&cos[at.clone()], &sin[at]);
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
    use crate::activation::erf;
    use crate::Tensor;

    /// The 16-lane SiLU / quick GELU agree with the scalar formulas, and a value's result
    /// does not depend on its place (tail lanes take the same path).
    #[test]
    fn vector_activations_match_the_scalar_ones() {
        let xs: Vec<f32> = (0..1001).map(|i| (i as f32 - 500.0) / 17.0).collect();
        for act in [Activation::Silu, Activation::QuickGelu] {
            let got = Tensor::from_f32(xs.clone(), &[xs.len()])
                .unwrap()
                .activation(act)
                .unwrap();
            let got = got.as_f32().unwrap();
            for (x, g) in xs.iter().zip(got) {
                let want = act.apply(*x);
                assert!(
                    (g - want).abs() <= 4.0 * f32::EPSILON * want.abs().max(1e-30),
                    "{act:?}({x}): {g} vs {want}"
                );
            }
            for (i, x) in xs.iter().enumerate().step_by(97) {
                let one = Tensor::from_f32(vec![*x], &[1])
                    .unwrap()
                    .activation(act)
                    .unwrap();
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
            .softmax_last()
            .unwrap();
        let s: f32 = t.as_f32().unwrap().iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
    }
}
