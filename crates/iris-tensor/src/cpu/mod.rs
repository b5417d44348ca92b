//! The CPU backend: host memory, the kernels in this folder (AVX-512 / AVX-512 BF16
//! where the CPU has them, portable code otherwise), work split over the rayon pool.

pub(crate) mod attention;
pub mod kernels;
pub(crate) mod matmul;
pub(crate) mod ops;
pub mod packed;
pub mod quant;

use half::{bf16, f16};

use crate::attention::AttnShape;
use crate::error::shape_err;
use crate::storage::{BackendStorage, Binary, CpuStorage, Unary};
use crate::{DType, Device, Result};

impl BackendStorage for CpuStorage {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn dtype(&self) -> DType {
        CpuStorage::dtype(self)
    }

    fn try_clone(&self) -> Result<Self> {
        Ok(self.clone())
    }

    fn to_cpu(&self) -> Result<CpuStorage> {
        Ok(self.clone())
    }

    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(match dtype {
            _ if dtype == self.dtype() => self.clone(),
            DType::F32 => CpuStorage::F32(self.to_f32_vec()),
            DType::BF16 => CpuStorage::BF16(match self {
                CpuStorage::F16(v) => v.iter().map(|x| bf16::from_f32(x.to_f32())).collect(),
                _ => self.to_f32_vec().into_iter().map(bf16::from_f32).collect(),
            }),
            DType::F16 => {
                CpuStorage::F16(self.to_f32_vec().into_iter().map(f16::from_f32).collect())
            }
        })
    }

    fn round_to(&mut self, dtype: DType) -> Result<()> {
        let v = self.f32_mut();
        match dtype {
            DType::F32 => {}
            DType::BF16 => ops::in_chunks(v, 1 << 16, kernels::round_bf16_in_place),
            DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        }
        Ok(())
    }

    fn unary(&mut self, op: Unary) -> Result<()> {
        let v = self.f32_mut();
        match op {
            Unary::Activation(act) => ops::activation(v, act),
            Unary::Scale(s) => v.iter_mut().for_each(|x| *x *= s),
            Unary::Tanh => v.iter_mut().for_each(|x| *x = x.tanh()),
        }
        Ok(())
    }

    fn binary(&mut self, rhs: &Self, op: Binary) -> Result<()> {
        // An f32 operand is read in place (no copy).
        let b = rhs.f32_values();
        let a = self.f32_mut();
        match op {
            Binary::Add => ops::zip_in_place(a, &b, |a, b| a + b),
            Binary::Mul => ops::zip_in_place(a, &b, |a, b| a * b),
        }
        Ok(())
    }

    fn binary_row(&mut self, d: usize, row: &Self, op: Binary) -> Result<()> {
        let r = row.to_f32_vec();
        let f = |a: &mut f32, b: f32| match op {
            Binary::Add => *a += b,
            Binary::Mul => *a *= b,
        };
        for chunk in self.f32_mut().chunks_exact_mut(d.max(1)) {
            if r.len() == 1 {
                chunk.iter_mut().for_each(|a| f(a, r[0]));
            } else {
                chunk.iter_mut().zip(&r).for_each(|(a, &b)| f(a, b));
            }
        }
        Ok(())
    }

    fn layer_norm(&mut self, d: usize, w: &Self, b: Option<&Self>, eps: f64) -> Result<()> {
        let w = w.to_f32_vec();
        let b = b.map(|b| b.to_f32_vec());
        ops::layer_norm(self.f32_mut(), d, &w, b.as_deref(), eps);
        Ok(())
    }

    fn rms_norm(&mut self, d: usize, w: &Self, eps: f64, round: DType) -> Result<()> {
        let w = w.to_f32_vec();
        ops::rms_norm(self.f32_mut(), d, &w, eps, round);
        Ok(())
    }

    fn softmax(&mut self, d: usize) -> Result<()> {
        for row in self.f32_mut().chunks_exact_mut(d.max(1)) {
            ops::softmax_in_place(row);
        }
        Ok(())
    }

    fn l2_normalize(&mut self, d: usize) -> Result<()> {
        for row in self.f32_mut().chunks_exact_mut(d.max(1)) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|x| *x /= n);
        }
        Ok(())
    }

    fn matmul(&self, m: usize, k: usize, rhs: &Self, n: usize) -> Result<Self> {
        let (a, b) = (self.f32_values(), rhs.f32_values());
        let mut out = vec![0f32; m * n];
        matmul::matmul_f32(&a, &b, &mut out, m, n, k, false);
        Ok(CpuStorage::F32(out))
    }

    fn linear(&self, m: usize, k: usize, w: &Self, n: usize, b: Option<&Self>) -> Result<Self> {
        let x = self.f32_values();
        let mut out = matmul::linear(&x, m, k, w, n);
        if let Some(b) = b {
            matmul::add_bias(&mut out, n, &b.to_f32_vec());
        }
        Ok(CpuStorage::F32(out))
    }

    fn gather_rows(&self, d: usize, ids: &[u32]) -> Result<Self> {
        let mut out = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            let id = id as usize;
            out.extend(self.range_f32(id * d, (id + 1) * d));
        }
        Ok(CpuStorage::F32(out))
    }

    fn narrow_rows(&self, d: usize, start: usize, len: usize) -> Result<Self> {
        let r = start * d..(start + len) * d;
        Ok(match self {
            CpuStorage::F32(v) => CpuStorage::F32(v[r].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[r].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[r].to_vec()),
        })
    }

    fn narrow_cols(&self, d: usize, start: usize, len: usize) -> Result<Self> {
        let rows = self.len() / d.max(1);
        let cols = |r: usize| r * d + start..r * d + start + len;
        Ok(match self {
            CpuStorage::F32(v) => {
                CpuStorage::F32((0..rows).flat_map(|r| v[cols(r)].to_vec()).collect())
            }
            CpuStorage::BF16(v) => {
                CpuStorage::BF16((0..rows).flat_map(|r| v[cols(r)].to_vec()).collect())
            }
            CpuStorage::F16(v) => {
                CpuStorage::F16((0..rows).flat_map(|r| v[cols(r)].to_vec()).collect())
            }
        })
    }

    fn cat_rows(parts: &[&Self]) -> Result<Self> {
        let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
        for p in parts {
            out.extend_from_slice(&p.f32_values());
        }
        Ok(CpuStorage::F32(out))
    }

    fn cat_cols(parts: &[(&Self, usize)], rows: usize) -> Result<Self> {
        let values: Vec<_> = parts.iter().map(|(p, d)| (p.f32_values(), *d)).collect();
        let width: usize = parts.iter().map(|p| p.1).sum();
        let mut out = Vec::with_capacity(rows * width);
        for r in 0..rows {
            for (v, d) in &values {
                out.extend_from_slice(&v[r * d..(r + 1) * d]);
            }
        }
        Ok(CpuStorage::F32(out))
    }

    fn scatter_rows(&mut self, d: usize, at: &[usize], src: &Self) -> Result<()> {
        let s = src.f32_values();
        let x = self.f32_mut();
        for (i, &r) in at.iter().enumerate() {
            x[r * d..(r + 1) * d].copy_from_slice(&s[i * d..(i + 1) * d]);
        }
        Ok(())
    }

    fn patches(&self, c: usize, s: usize, p: usize) -> Result<Self> {
        let px = self.f32_values();
        let g = s / p;
        let mut cols = Vec::with_capacity(g * g * c * p * p);
        for gy in 0..g {
            for gx in 0..g {
                for ch in 0..c {
                    for ky in 0..p {
                        let row = ch * s * s + (gy * p + ky) * s + gx * p;
                        cols.extend_from_slice(&px[row..row + p]);
                    }
                }
            }
        }
        Ok(CpuStorage::F32(cols))
    }

    fn rope(
        &mut self,
        d: usize,
        cos: &Self,
        sin: &Self,
        n_heads: usize,
        round: DType,
    ) -> Result<()> {
        let (cos, sin) = (cos.as_f32()?, sin.as_f32()?);
        ops::rope(
            self.f32_mut(),
            d / (2 * n_heads.max(1)),
            cos,
            sin,
            n_heads,
            round,
        );
        Ok(())
    }

    fn attention(
        q: &Self,
        k: &Self,
        v: &Self,
        s: AttnShape,
        causal: Option<usize>,
        blocks: usize,
    ) -> Result<Self> {
        let (q, k, v) = (q.f32_values(), k.f32_values(), v.f32_values());
        if k.len() != v.len() {
            return shape_err("attention", format!("keys {} values {}", k.len(), v.len()));
        }
        let (qb, kb) = (q.len() / blocks.max(1), k.len() / blocks.max(1));
        let mut out = Vec::with_capacity(q.len());
        for b in 0..blocks {
            let kr = b * kb..(b + 1) * kb;
            out.extend(attention::sdpa(
                &q[b * qb..(b + 1) * qb],
                &k[kr.clone()],
                &v[kr],
                s,
                causal,
            ));
        }
        Ok(CpuStorage::F32(out))
    }

    fn first_non_finite(&self) -> Result<Option<(usize, f32)>> {
        let v = self.f32_values();
        Ok(v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i])))
    }
}
