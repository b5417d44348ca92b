//! Linear layers' weights and `y = x·Wᵀ + b`. A weight is held the way its backend
//! multiplies fastest: on a CPU with AVX-512 BF16 a bf16 weight is packed once, at
//! load, for the `vdpbf16ps` GEMM (the row-major original is dropped, or left to its
//! memory map); a block-quantized weight (`quant::QuantMatrix`) multiplies in its
//! blocks on the CPU; everywhere else it is the tensor itself.

use std::sync::Arc;

use crate::error::shape_err;
use crate::packed::PackedBf16;
use crate::quant::QuantMatrix;
use crate::storage::{BackendStorage, CpuStorage, Storage};
use crate::{Device, Result, Tensor};

/// `x[.., k] · W[n, k]ᵀ (+ b)` in f32, the weight in its own dtype.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    check_shapes(x, n, k, bias)?;
    let out = x
        .storage
        .linear(x.rows(), k, &w.storage, n, bias.map(|b| &*b.storage))?;
    Ok(Tensor::new(out, out_shape(x, n)))
}

fn out_shape(x: &Tensor, n: usize) -> Vec<usize> {
    let mut shape = x.shape().to_vec();
    match shape.last_mut() {
        Some(last) => *last = n,
        None => shape.push(n),
    }
    shape
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

/// A `[n, k]` weight ready for its backend's products.
#[derive(Debug, Clone)]
pub struct Weight(Repr);

#[derive(Debug, Clone)]
enum Repr {
    Plain(Tensor),
    Packed(Arc<PackedBf16>),
    Quant(Arc<QuantMatrix>),
}

impl Weight {
    /// Errors unless `w` is `[n, k]`.
    pub fn new(w: Tensor) -> Result<Weight> {
        w.dims2()?;
        let packed = match &*w.storage {
            Storage::Cpu(CpuStorage::BF16(v)) if crate::kernels::has_avx512_bf16() => {
                let (n, k) = w.dims2()?;
                Some(PackedBf16::pack(v, n, k))
            }
            _ => None,
        };
        Ok(Weight(match packed {
            Some(p) => Repr::Packed(Arc::new(p)),
            None => Repr::Plain(w),
        }))
    }

    /// A block-quantized weight (the CPU backend multiplies it).
    pub fn quantized(w: QuantMatrix) -> Weight {
        Weight(Repr::Quant(Arc::new(w)))
    }

    /// The block format, for a quantized weight.
    pub fn quant_type(&self) -> Option<crate::quant::QuantType> {
        match &self.0 {
            Repr::Quant(w) => Some(w.ty()),
            _ => None,
        }
    }

    /// Rows `ids` of a block-quantized weight dequantized to f32 (`[ids, in]`): an
    /// embedding table kept in its blocks. `None` for a weight in another format.
    pub fn dequantize_rows(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let Repr::Quant(w) = &self.0 else {
            return None;
        };
        let mut out = Vec::with_capacity(ids.len() * w.k());
        for &id in ids {
            out.extend(w.dequantize_rows(id as usize..id as usize + 1));
        }
        Some(out)
    }

    /// Output features.
    pub fn out_dim(&self) -> usize {
        match &self.0 {
            Repr::Plain(w) => w.shape()[0],
            Repr::Packed(w) => w.n(),
            Repr::Quant(w) => w.n(),
        }
    }

    /// Input features.
    pub fn in_dim(&self) -> usize {
        match &self.0 {
            Repr::Plain(w) => w.shape()[1],
            Repr::Packed(w) => w.k(),
            Repr::Quant(w) => w.k(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.0 {
            Repr::Plain(w) => w.device(),
            Repr::Packed(_) | Repr::Quant(_) => Device::Cpu,
        }
    }

    /// `x·Wᵀ (+ bias)` in f32.
    pub fn linear(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match &self.0 {
            Repr::Plain(w) => linear(x, w, bias),
            Repr::Packed(w) => {
                let (n, k) = (w.n(), w.k());
                check_shapes(x, n, k, bias)?;
                let out = crate::packed::matmul_packed(x.as_f32()?, x.rows(), k, w);
                with_bias(out, x, n, bias)
            }
            Repr::Quant(w) => {
                check_shapes(x, w.n(), w.k(), bias)?;
                let out = w.matmul(x.as_f32()?, x.rows());
                with_bias(out, x, w.n(), bias)
            }
        }
    }

    /// [`Weight::linear`] of several weights on the same input: packed weights run in
    /// one pass that packs `x` once and runs every weight's panels in one parallel loop
    /// (a layer's q/k/v or gate/up projections); quantized weights likewise (`x`
    /// quantized once, one parallel loop); others one after another.
    pub fn linear_many(ws: &[(&Weight, Option<&Tensor>)], x: &Tensor) -> Result<Vec<Tensor>> {
        // Every weight packed, or every one quantized: one product for the lot.
        let packed: Option<Vec<&PackedBf16>> = ws
            .iter()
            .map(|(w, _)| match &w.0 {
                Repr::Packed(p) => Some(&**p),
                _ => None,
            })
            .collect();
        let quant: Option<Vec<&QuantMatrix>> = ws
            .iter()
            .map(|(w, _)| match &w.0 {
                Repr::Quant(q) => Some(&**q),
                _ => None,
            })
            .collect();
        let check = || {
            ws.iter()
                .try_for_each(|(w, bias)| check_shapes(x, w.out_dim(), w.in_dim(), *bias))
        };
        let outs = match (packed, quant) {
            (Some(weights), _) if ws.len() > 1 => {
                check()?;
                crate::packed::matmul_packed_many(x.as_f32()?, x.rows(), x.last_dim(), &weights)
            }
            (_, Some(weights)) if ws.len() > 1 => {
                check()?;
                QuantMatrix::matmul_many(&weights, x.as_f32()?, x.rows())
            }
            _ => return ws.iter().map(|(w, b)| w.linear(x, *b)).collect(),
        };
        outs.into_iter()
            .zip(ws)
            .map(|(out, (w, bias))| with_bias(out, x, w.out_dim(), *bias))
            .collect()
    }
}

fn with_bias(mut out: Vec<f32>, x: &Tensor, n: usize, bias: Option<&Tensor>) -> Result<Tensor> {
    if let Some(b) = bias {
        crate::cpu::matmul::add_bias(&mut out, n, &b.f32_host()?);
    }
    Tensor::from_f32(out, &out_shape(x, n))
}
