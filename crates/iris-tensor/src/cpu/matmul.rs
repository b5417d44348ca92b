//! The CPU backend's `linear`: `y = x·Wᵀ` with `x` f32 `[m, k]` and `W` `[n, k]` in any
//! dtype.
//!
//! Few rows (decode): each weight row is read once, in its storage dtype, and dotted
//! with every activation row while it sits in L1; output rows are split across the
//! rayon pool so both cores stream weights. Many rows (prefill, ViT): the weight is
//! widened to f32 once and the `gemm` crate does a blocked, multi-threaded product.

use rayon::prelude::*;

use half::bf16;

use crate::kernels::{
    dot_bf16_dp, dot_tile_4x4, dot_tile_4x4_bf16, has_avx512_bf16, TileLanes, WeightElem,
};
use crate::packed::PackedBf16;
use crate::storage::CpuStorage;

/// Up to this many activation rows (a decode batch), weights are read once in their
/// dtype and multiplied by 4×4 register tiles; above it (prefill), `gemm`.
const SMALL_M: usize = 64;

/// `x[m, k] · W[n, k]ᵀ` in f32 for a weight in any dtype.
pub(crate) fn linear(xs: &[f32], m: usize, k: usize, w: &CpuStorage, n: usize) -> Vec<f32> {
    if m <= SMALL_M {
        small_m(xs, m, w, n, k)
    } else if let (CpuStorage::BF16(wv), true) = (w, has_avx512_bf16()) {
        // Prefill with bf16 weights: a packed `vdpbf16ps` GEMM.
        crate::packed::matmul_packed(xs, m, k, &PackedBf16::pack(wv, n, k))
    } else {
        large_m(xs, m, w, n, k)
    }
}

/// `out[i, j] += b[j]` for every `n`-wide row.
pub(crate) fn add_bias(out: &mut [f32], n: usize, b: &[f32]) {
    for row in out.chunks_exact_mut(n) {
        row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
    }
}

fn small_m(xs: &[f32], m: usize, w: &CpuStorage, n: usize, k: usize) -> Vec<f32> {
    match w {
        CpuStorage::F32(v) => small_m_typed(xs, m, v, n, k),
        // bf16 × bf16 with `vdpbf16ps`: activations rounded to bf16 first, as PyTorch's
        // bf16 matmul takes them (in bf16 mode they already are).
        CpuStorage::BF16(v) if has_avx512_bf16() => {
            let xb: Vec<bf16> = xs.iter().map(|&x| bf16::from_f32(x)).collect();
            small_m_tiled(&xb, m, v, n, k, dot_tile_4x4_bf16, dot_bf16_dp)
        }
        CpuStorage::BF16(v) => small_m_typed(xs, m, v, n, k),
        CpuStorage::F16(v) => small_m_typed(xs, m, v, n, k),
    }
}

fn small_m_typed<W: WeightElem + TileLanes>(
    xs: &[f32],
    m: usize,
    w: &[W],
    n: usize,
    k: usize,
) -> Vec<f32> {
    small_m_tiled(xs, m, w, n, k, dot_tile_4x4::<W>, W::dot)
}

/// A 4×4 tile of dot products: 4 weight rows by 4 activation rows.
type TileFn<W, X> = fn([&[W]; 4], [&[X]; 4]) -> [[f32; 4]; 4];

/// Weight rows split over the rayon pool; each task multiplies 4×4 tiles of (weight
/// rows × activation rows), the leftovers one dot at a time in the tile's order.
fn small_m_tiled<W: Sync, X: Sync>(
    xs: &[X],
    m: usize,
    w: &[W],
    n: usize,
    k: usize,
    tile: TileFn<W, X>,
    dot: fn(&[W], &[X]) -> f32,
) -> Vec<f32> {
    // Output is computed transposed ([n, m]) so each task owns a contiguous chunk.
    let mut t = vec![0f32; n * m];
    let threads = rayon::current_num_threads().max(1);
    let rows_per_task = (n.div_ceil(threads * 4).max(16)).next_multiple_of(4);
    let x = |i: usize| &xs[i * k..(i + 1) * k];
    t.par_chunks_mut(rows_per_task * m)
        .enumerate()
        .for_each(|(c, chunk)| {
            let j0 = c * rows_per_task;
            let rows = chunk.len() / m;
            let wr = |j: usize| &w[(j0 + j) * k..(j0 + j + 1) * k];
            let mut j = 0;
            while j + 4 <= rows {
                let ws = [wr(j), wr(j + 1), wr(j + 2), wr(j + 3)];
                let mut i = 0;
                while i + 4 <= m {
                    let tile = tile(ws, [x(i), x(i + 1), x(i + 2), x(i + 3)]);
                    for (jj, row) in tile.iter().enumerate() {
                        chunk[(j + jj) * m + i..(j + jj) * m + i + 4].copy_from_slice(row);
                    }
                    i += 4;
                }
                for i in i..m {
                    for jj in 0..4 {
                        chunk[(j + jj) * m + i] = dot(ws[jj], x(i));
                    }
                }
                j += 4;
            }
            for j in j..rows {
                for i in 0..m {
                    chunk[j * m + i] = dot(wr(j), x(i));
                }
            }
        });
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = t[j * m + i];
        }
    }
    out
}

fn large_m(xs: &[f32], m: usize, w: &CpuStorage, n: usize, k: usize) -> Vec<f32> {
    let wf = w.f32_values();
    let mut out = vec![0f32; m * n];
    matmul_f32(xs, &wf, &mut out, m, n, k, true);
    out
}

/// `a[m,k] · b` for f32 slices, `b` being `[n,k]` (`b_transposed`) or `[k,n]`:
/// attention's score and mixing products.
pub fn gemm_f32(
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    b_transposed: bool,
) -> Vec<f32> {
    assert_eq!(a.len(), m * k, "gemm_f32: a is not [m, k]");
    assert_eq!(b.len(), n * k, "gemm_f32: b is not [n, k] / [k, n]");
    let mut out = vec![0f32; m * n];
    matmul_f32(a, b, &mut out, m, n, k, b_transposed);
    out
}

/// `out[m,n] = a[m,k] · b`, where `b` is `[n,k]` (transposed) or `[k,n]`.
pub(crate) fn matmul_f32(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    b_transposed: bool,
) {
    let (b_rs, b_cs) = if b_transposed {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    let par = match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    // SAFETY: the pointers cover m·k, k·n and m·n elements with the strides given, and
    // `out` does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::{linear, DType, Tensor};

    fn naive(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut o = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            }
        }
        o
    }

    #[test]
    fn linear_matches_naive_in_every_dtype_and_path() {
        let (n, k) = (37, 70);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
            .collect();
        for m in [1, 3, 8, 9, 40] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 13 % 7) as f32 - 3.0) / 4.0)
                .collect();
            let xt = Tensor::from_f32(x.clone(), &[m, k]).unwrap();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let wt = Tensor::from_f32(w.clone(), &[n, k])
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let want = naive(&x, &wt.to_f32_vec(), m, n, k);
                let got = linear(&xt, &wt, None).unwrap();
                assert_eq!(got.shape(), &[m, n]);
                for (a, b) in got.as_f32().unwrap().iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "m={m} {dt}: {a} vs {b}");
                }
            }
        }
    }

    /// A row inside a decode batch gets exactly the bits it gets alone, so batched
    /// greedy decoding equals unbatched.
    #[test]
    fn batched_rows_equal_rows_alone_bitwise() {
        let (n, k) = (23, 100);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) / 9.0)
            .collect();
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let wt = Tensor::from_f32(w.clone(), &[n, k])
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            for m in [4, 7, 13, 64] {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 13 % 11) as f32 - 5.0) / 7.0)
                    .collect();
                let all =
                    linear(&Tensor::from_f32(x.clone(), &[m, k]).unwrap(), &wt, None).unwrap();
                for i in 0..m {
                    let one = linear(
                        &Tensor::from_f32(x[i * k..(i + 1) * k].to_vec(), &[1, k]).unwrap(),
                        &wt,
                        None,
                    )
                    .unwrap();
                    assert_eq!(
                        one.as_f32().unwrap(),
                        &all.as_f32().unwrap()[i * n..(i + 1) * n],
                        "{dt} m={m} row {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn linear_rejects_bad_shapes() {
        let x = Tensor::zeros(&[2, 3]);
        let w = Tensor::zeros(&[4, 5]);
        assert!(linear(&x, &w, None).is_err());
        let w = Tensor::zeros(&[4, 3]);
        let b = Tensor::zeros(&[5]);
        assert!(linear(&x, &w, Some(&b)).is_err());
    }
}
