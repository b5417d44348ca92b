//! `linear`: `y = x·Wᵀ + b` with `x` f32 `[.., k]` and `W` `[n, k]` in any dtype.
//!
//! Few rows (decode): each weight row is read once, in its storage dtype, and dotted
//! with every activation row while it sits in L1; output rows are split across the
//! rayon pool so both cores stream weights. Many rows (prefill, ViT): the weight is
//! widened to f32 once and the `gemm` crate does a blocked, multi-threaded product.

use rayon::prelude::*;

use crate::error::shape_err;
use half::bf16;

use crate::kernels::{
    dot_bf16_dp, dot_tile_4x4, dot_tile_4x4_bf16, has_avx512_bf16, TileLanes, WeightElem,
};
use crate::packed::PackedBf16;
use crate::tensor::Storage;
use crate::{Result, Tensor};

/// Up to this many activation rows (a decode batch), weights are read once in their
/// dtype and multiplied by 4×4 register tiles; above it (prefill), `gemm`.
const SMALL_M: usize = 64;

pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    check_shapes(x, n, k, bias)?;
    let m = x.rows();
    let xs = x.as_f32()?;
    let bf16_tiles = w.dtype() == crate::DType::BF16 && has_avx512_bf16();
    let out = if m <= SMALL_M {
        small_m(xs, m, w, n, k)
    } else if bf16_tiles {
        // Prefill with bf16 weights: a packed `vdpbf16ps` GEMM.
        let Storage::BF16(wv) = &*w.storage else {
            unreachable!("bf16 weight")
        };
        crate::packed::matmul_packed(xs, m, k, &PackedBf16::pack(wv, n, k))
    } else {
        large_m(xs, m, w, n, k)
    };
    with_bias(out, x, n, bias)
}

/// `linear` with a weight packed once for the `vdpbf16ps` GEMM (every row count).
pub fn linear_packed(x: &Tensor, w: &PackedBf16, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = (w.n(), w.k());
    check_shapes(x, n, k, bias)?;
    let out = crate::packed::matmul_packed(x.as_f32()?, x.rows(), k, w);
    with_bias(out, x, n, bias)
}

/// `linear_packed` for several weights of the same input width at once (see
/// `packed::matmul_packed_many`).
pub fn linear_packed_many(
    x: &Tensor,
    ws: &[(&PackedBf16, Option<&Tensor>)],
) -> Result<Vec<Tensor>> {
    let k = x.last_dim();
    for (w, bias) in ws {
        check_shapes(x, w.n(), w.k(), *bias)?;
    }
    let weights: Vec<&PackedBf16> = ws.iter().map(|(w, _)| *w).collect();
    crate::packed::matmul_packed_many(x.as_f32()?, x.rows(), k, &weights)
        .into_iter()
        .zip(ws)
        .map(|(out, (w, bias))| with_bias(out, x, w.n(), *bias))
        .collect()
}

fn check_shapes(x: &Tensor, n: usize, k: usize, bias: Option<&Tensor>) -> Result<()> {
    if x.last_dim() != k {
        return shape_err(
            "linear",
            format!("input {:?} against weight [{n}, {k}]", x.shape()),
        );
    }
    if let Some(b) = bias {
        if b.elem_count() != n {
            return shape_err(
                "linear",
                format!("bias of {} for {n} outputs", b.elem_count()),
            );
        }
    }
    Ok(())
}

fn with_bias(mut out: Vec<f32>, x: &Tensor, n: usize, bias: Option<&Tensor>) -> Result<Tensor> {
    if let Some(b) = bias {
        let b = b.to_f32_vec();
        for row in out.chunks_exact_mut(n) {
            row.iter_mut().zip(&b).for_each(|(y, b)| *y += b);
        }
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("x has last dim k") = n;
    Tensor::from_f32(out, &shape)
}

fn small_m(xs: &[f32], m: usize, w: &Tensor, n: usize, k: usize) -> Vec<f32> {
    match &*w.storage {
        Storage::F32(v) => small_m_typed(xs, m, v, n, k),
        // bf16 × bf16 with `vdpbf16ps`: activations rounded to bf16 first, as PyTorch's
        // bf16 matmul takes them (in bf16 mode they already are).
        Storage::BF16(v) if has_avx512_bf16() => {
            let xb: Vec<bf16> = xs.iter().map(|&x| bf16::from_f32(x)).collect();
            small_m_tiled(&xb, m, v, n, k, dot_tile_4x4_bf16, dot_bf16_dp)
        }
        Storage::BF16(v) => small_m_typed(xs, m, v, n, k),
        Storage::F16(v) => small_m_typed(xs, m, v, n, k),
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

fn large_m(xs: &[f32], m: usize, w: &Tensor, n: usize, k: usize) -> Vec<f32> {
    let widened;
    let wf: &[f32] = match &*w.storage {
        Storage::F32(v) => v,
        _ => {
            widened = w.to_f32_vec();
            &widened
        }
    };
    let mut out = vec![0f32; m * n];
    matmul_f32(xs, wf, &mut out, m, n, k, true);
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

impl Tensor {
    /// `[m,k] · [k,n]` for f32 tensors (attention scores and mixing).
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (m, k) = self.dims2()?;
        let (k2, n) = rhs.dims2()?;
        if k != k2 {
            return shape_err("matmul", format!("[{m},{k}] · [{k2},{n}]"));
        }
        let mut out = vec![0f32; m * n];
        matmul_f32(self.as_f32()?, rhs.as_f32()?, &mut out, m, n, k, false);
        Tensor::from_f32(out, &[m, n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

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
                let wt = Tensor::from_f32(w.clone(), &[n, k]).unwrap().to_dtype(dt);
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
            let wt = Tensor::from_f32(w.clone(), &[n, k]).unwrap().to_dtype(dt);
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
