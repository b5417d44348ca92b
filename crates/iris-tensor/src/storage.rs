//! What a tensor's elements are held in: [`Storage`] is one backend's storage, and
//! every operation model code composes is a method of [`BackendStorage`], the one
//! trait each backend implements (the CPU's in `cpu/`, CUDA's in `cuda/`). `Storage`
//! dispatches to the backend its operands live on; operands on two devices are an
//! error, never an implicit copy.

use half::{bf16, f16};

use crate::attention::AttnShape;
use crate::{Activation, DType, Device, Error, Result};

/// Host memory in the element type the data came in (weights keep theirs; activations
/// are f32).
#[derive(Debug, Clone)]
pub(crate) enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A backend's storage.
#[derive(Debug)]
pub(crate) enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage),
}

/// Element-wise operations of one operand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Unary {
    Activation(Activation),
    Scale(f32),
    Tanh,
}

/// Element-wise operations of two operands (same shape, or a row broadcast over rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binary {
    Add,
    Mul,
}

/// The operations a backend provides. Shapes are checked by `Tensor` before a backend
/// sees them: here every operand is contiguous and row-major, and `d` is the width of
/// the rows an operation works on.
pub(crate) trait BackendStorage: Sized {
    fn device(&self) -> Device;
    fn dtype(&self) -> DType;
    /// A copy on the same device (device memory can run out: fallible).
    fn try_clone(&self) -> Result<Self>;
    /// A host copy in the same dtype.
    fn to_cpu(&self) -> Result<CpuStorage>;
    /// Round to nearest even when narrowing.
    fn to_dtype(&self, dtype: DType) -> Result<Self>;
    /// f32 values rounded to the precision of `dtype`, kept in f32 (PyTorch's cast).
    fn round_to(&mut self, dtype: DType) -> Result<()>;
    fn unary(&mut self, op: Unary) -> Result<()>;
    fn binary(&mut self, rhs: &Self, op: Binary) -> Result<()>;
    /// `op` of every `d`-wide row with `row` (`d` values, or one broadcast to all).
    fn binary_row(&mut self, d: usize, row: &Self, op: Binary) -> Result<()>;
    fn layer_norm(&mut self, d: usize, w: &Self, b: Option<&Self>, eps: f64) -> Result<()>;
    fn rms_norm(&mut self, d: usize, w: &Self, eps: f64, round: DType) -> Result<()>;
    fn softmax(&mut self, d: usize) -> Result<()>;
    fn l2_normalize(&mut self, d: usize) -> Result<()>;
    /// `[m, k] · [k, n]`.
    fn matmul(&self, m: usize, k: usize, rhs: &Self, n: usize) -> Result<Self>;
    /// `x[m, k] · W[n, k]ᵀ (+ b)` in f32, the weight in its own dtype.
    fn linear(&self, m: usize, k: usize, w: &Self, n: usize, b: Option<&Self>) -> Result<Self>;
    /// Rows `ids` of a `[rows, d]` table as f32 (an embedding lookup).
    fn gather_rows(&self, d: usize, ids: &[u32]) -> Result<Self>;
    /// Rows `start..start + len`, in the storage's dtype.
    fn narrow_rows(&self, d: usize, start: usize, len: usize) -> Result<Self>;
    /// Columns `start..start + len` of `[rows, d]`, in the storage's dtype.
    fn narrow_cols(&self, d: usize, start: usize, len: usize) -> Result<Self>;
    /// Parts one after another (f32).
    fn cat_rows(parts: &[&Self]) -> Result<Self>;
    /// `[rows, dᵢ]` parts side by side (f32).
    fn cat_cols(parts: &[(&Self, usize)], rows: usize) -> Result<Self>;
    /// Row `at[i]` of `self` (`d` wide) becomes row `i` of `src`.
    fn scatter_rows(&mut self, d: usize, at: &[usize], src: &Self) -> Result<()>;
    /// A `[c, s, s]` image as its `p`×`p` patches, `[(s/p)², c·p·p]` (a ViT's
    /// convolution as a matrix product).
    fn patches(&self, c: usize, s: usize, p: usize) -> Result<Self>;
    /// Rotates `[rows, n_heads·2·half]` in place by HF's "rotate half" RoPE; row `t`
    /// at the table's row `t` (`cos`, `sin`: `[rows, half]`), each product rounded to
    /// `round`.
    fn rope(
        &mut self,
        d: usize,
        cos: &Self,
        sin: &Self,
        n_heads: usize,
        round: DType,
    ) -> Result<()>;
    /// Scaled dot-product attention of `q` `[tq, n_heads·hd]` over `k`, `v`
    /// `[tk, n_kv_heads·hd]` (see [`crate::attention`]), in `blocks` independent
    /// blocks of rows.
    fn attention(
        q: &Self,
        k: &Self,
        v: &Self,
        s: AttnShape,
        causal: Option<usize>,
        blocks: usize,
    ) -> Result<Self>;
    /// The first value that is not finite, with its index.
    fn first_non_finite(&self) -> Result<Option<(usize, f32)>>;
}

impl CpuStorage {
    pub(crate) fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
        }
    }

    pub(crate) fn as_f32(&self) -> Result<&[f32]> {
        match self {
            CpuStorage::F32(v) => Ok(v),
            _ => Err(Error::DType {
                op: "as_f32",
                dtype: self.dtype(),
            }),
        }
    }

    /// The data as f32: borrowed when stored as f32, widened into a copy otherwise.
    pub(crate) fn f32_values(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            CpuStorage::F32(v) => std::borrow::Cow::Borrowed(v),
            _ => std::borrow::Cow::Owned(self.to_f32_vec()),
        }
    }

    pub(crate) fn to_f32_vec(&self) -> Vec<f32> {
        self.range_f32(0, self.len())
    }

    /// Elements `a..b` widened to f32.
    pub(crate) fn range_f32(&self, a: usize, b: usize) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => v[a..b].to_vec(),
            CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
            CpuStorage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Mutable f32 data, widening in place when stored narrower.
    pub(crate) fn f32_mut(&mut self) -> &mut Vec<f32> {
        if !matches!(self, CpuStorage::F32(_)) {
            *self = CpuStorage::F32(self.to_f32_vec());
        }
        match self {
            CpuStorage::F32(v) => v,
            _ => unreachable!("converted to f32 just above"),
        }
    }
}

/// The device of an operand that is not on `dev`, as an error.
fn mixed(op: &'static str, a: Device, b: Device) -> Error {
    Error::Device(format!("{op}: operands on {a} and {b}"))
}

macro_rules! unary_dispatch {
    ($self:ident, $s:ident => $body:expr) => {
        match $self {
            Storage::Cpu($s) => $body,
            #[cfg(feature = "cuda")]
            Storage::Cuda($s) => $body,
        }
    };
}

/// The two operands' storages of one backend, or the mixed-device error.
macro_rules! pair_dispatch {
    ($op:literal, $a:expr, $b:expr, |$x:ident, $y:ident| $body:expr) => {
        match ($a, $b) {
            (Storage::Cpu($x), Storage::Cpu($y)) => $body,
            #[cfg(feature = "cuda")]
            (Storage::Cuda($x), Storage::Cuda($y)) => $body,
            #[allow(unreachable_patterns)]
            (a, b) => Err(mixed($op, a.device(), b.device())),
        }
    };
}

/// An optional third operand alongside two (a bias, a LayerNorm's shift).
macro_rules! opt_of {
    ($variant:ident, $o:expr, $op:literal, $dev:expr) => {
        match $o {
            None => Ok(None),
            Some(Storage::$variant(b)) => Ok(Some(b)),
            #[allow(unreachable_patterns)]
            Some(b) => Err(mixed($op, $dev, b.device())),
        }
    };
}

impl BackendStorage for Storage {
    fn device(&self) -> Device {
        unary_dispatch!(self, s => s.device())
    }

    fn dtype(&self) -> DType {
        unary_dispatch!(self, s => s.dtype())
    }

    fn try_clone(&self) -> Result<Self> {
        match self {
            Storage::Cpu(s) => Ok(Storage::Cpu(s.clone())),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.try_clone().map(Storage::Cuda),
        }
    }

    fn to_cpu(&self) -> Result<CpuStorage> {
        unary_dispatch!(self, s => s.to_cpu())
    }

    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        match self {
            Storage::Cpu(s) => s.to_dtype(dtype).map(Storage::Cpu),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.to_dtype(dtype).map(Storage::Cuda),
        }
    }

    fn round_to(&mut self, dtype: DType) -> Result<()> {
        unary_dispatch!(self, s => s.round_to(dtype))
    }

    fn unary(&mut self, op: Unary) -> Result<()> {
        unary_dispatch!(self, s => s.unary(op))
    }

    fn binary(&mut self, rhs: &Self, op: Binary) -> Result<()> {
        pair_dispatch!("binary", self, rhs, |a, b| a.binary(b, op))
    }

    fn binary_row(&mut self, d: usize, row: &Self, op: Binary) -> Result<()> {
        pair_dispatch!("binary_row", self, row, |a, b| a.binary_row(d, b, op))
    }

    fn layer_norm(&mut self, d: usize, w: &Self, b: Option<&Self>, eps: f64) -> Result<()> {
        let dev = self.device();
        match (self, w) {
            (Storage::Cpu(x), Storage::Cpu(w)) => {
                x.layer_norm(d, w, opt_of!(Cpu, b, "layer_norm", dev)?, eps)
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(w)) => {
                x.layer_norm(d, w, opt_of!(Cuda, b, "layer_norm", dev)?, eps)
            }
            #[allow(unreachable_patterns)]
            (_, w) => Err(mixed("layer_norm", dev, w.device())),
        }
    }

    fn rms_norm(&mut self, d: usize, w: &Self, eps: f64, round: DType) -> Result<()> {
        pair_dispatch!("rms_norm", self, w, |x, w| x.rms_norm(d, w, eps, round))
    }

    fn softmax(&mut self, d: usize) -> Result<()> {
        unary_dispatch!(self, s => s.softmax(d))
    }

    fn l2_normalize(&mut self, d: usize) -> Result<()> {
        unary_dispatch!(self, s => s.l2_normalize(d))
    }

    fn matmul(&self, m: usize, k: usize, rhs: &Self, n: usize) -> Result<Self> {
        match (self, rhs) {
            (Storage::Cpu(a), Storage::Cpu(b)) => a.matmul(m, k, b, n).map(Storage::Cpu),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => a.matmul(m, k, b, n).map(Storage::Cuda),
            #[allow(unreachable_patterns)]
            (a, b) => Err(mixed("matmul", a.device(), b.device())),
        }
    }

    fn linear(&self, m: usize, k: usize, w: &Self, n: usize, b: Option<&Self>) -> Result<Self> {
        let dev = self.device();
        match (self, w) {
            (Storage::Cpu(x), Storage::Cpu(w)) => x
                .linear(m, k, w, n, opt_of!(Cpu, b, "linear", dev)?)
                .map(Storage::Cpu),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(w)) => x
                .linear(m, k, w, n, opt_of!(Cuda, b, "linear", dev)?)
                .map(Storage::Cuda),
            #[allow(unreachable_patterns)]
            (_, w) => Err(mixed("linear", dev, w.device())),
        }
    }

    fn gather_rows(&self, d: usize, ids: &[u32]) -> Result<Self> {
        match self {
            Storage::Cpu(s) => s.gather_rows(d, ids).map(Storage::Cpu),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.gather_rows(d, ids).map(Storage::Cuda),
        }
    }

    fn narrow_rows(&self, d: usize, start: usize, len: usize) -> Result<Self> {
        match self {
            Storage::Cpu(s) => s.narrow_rows(d, start, len).map(Storage::Cpu),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.narrow_rows(d, start, len).map(Storage::Cuda),
        }
    }

    fn narrow_cols(&self, d: usize, start: usize, len: usize) -> Result<Self> {
        match self {
            Storage::Cpu(s) => s.narrow_cols(d, start, len).map(Storage::Cpu),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.narrow_cols(d, start, len).map(Storage::Cuda),
        }
    }

    fn cat_rows(parts: &[&Self]) -> Result<Self> {
        let dev = parts.first().map_or(Device::Cpu, |p| p.device());
        match dev {
            Device::Cpu => {
                let cpu: Vec<&CpuStorage> = parts
                    .iter()
                    .map(|p| match p {
                        Storage::Cpu(s) => Ok(s),
                        #[allow(unreachable_patterns)]
                        other => Err(mixed("cat_rows", dev, other.device())),
                    })
                    .collect::<Result<_>>()?;
                CpuStorage::cat_rows(&cpu).map(Storage::Cpu)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let gpu: Vec<&crate::cuda::CudaStorage> = parts
                    .iter()
                    .map(|p| match p {
                        Storage::Cuda(s) => Ok(s),
                        other => Err(mixed("cat_rows", dev, other.device())),
                    })
                    .collect::<Result<_>>()?;
                crate::cuda::CudaStorage::cat_rows(&gpu).map(Storage::Cuda)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::NotCompiledWithCuda),
        }
    }

    fn cat_cols(parts: &[(&Self, usize)], rows: usize) -> Result<Self> {
        let dev = parts.first().map_or(Device::Cpu, |p| p.0.device());
        match dev {
            Device::Cpu => {
                let cpu: Vec<(&CpuStorage, usize)> = parts
                    .iter()
                    .map(|(p, w)| match p {
                        Storage::Cpu(s) => Ok((s, *w)),
                        #[allow(unreachable_patterns)]
                        other => Err(mixed("cat_cols", dev, other.device())),
                    })
                    .collect::<Result<_>>()?;
                CpuStorage::cat_cols(&cpu, rows).map(Storage::Cpu)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let gpu: Vec<(&crate::cuda::CudaStorage, usize)> = parts
                    .iter()
                    .map(|(p, w)| match p {
                        Storage::Cuda(s) => Ok((s, *w)),
                        other => Err(mixed("cat_cols", dev, other.device())),
                    })
                    .collect::<Result<_>>()?;
                crate::cuda::CudaStorage::cat_cols(&gpu, rows).map(Storage::Cuda)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::NotCompiledWithCuda),
        }
    }

    fn scatter_rows(&mut self, d: usize, at: &[usize], src: &Self) -> Result<()> {
        pair_dispatch!("scatter_rows", self, src, |a, b| a.scatter_rows(d, at, b))
    }

    fn patches(&self, c: usize, s: usize, p: usize) -> Result<Self> {
        match self {
            Storage::Cpu(x) => x.patches(c, s, p).map(Storage::Cpu),
            #[cfg(feature = "cuda")]
            Storage::Cuda(x) => x.patches(c, s, p).map(Storage::Cuda),
        }
    }

    fn rope(
        &mut self,
        d: usize,
        cos: &Self,
        sin: &Self,
        n_heads: usize,
        round: DType,
    ) -> Result<()> {
        let dev = self.device();
        match (self, cos, sin) {
            (Storage::Cpu(x), Storage::Cpu(c), Storage::Cpu(s)) => x.rope(d, c, s, n_heads, round),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(x), Storage::Cuda(c), Storage::Cuda(s)) => {
                x.rope(d, c, s, n_heads, round)
            }
            #[allow(unreachable_patterns)]
            (_, c, _) => Err(mixed("rope", dev, c.device())),
        }
    }

    fn attention(
        q: &Self,
        k: &Self,
        v: &Self,
        s: AttnShape,
        causal: Option<usize>,
        blocks: usize,
    ) -> Result<Self> {
        match (q, k, v) {
            (Storage::Cpu(q), Storage::Cpu(k), Storage::Cpu(v)) => {
                CpuStorage::attention(q, k, v, s, causal, blocks).map(Storage::Cpu)
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda(q), Storage::Cuda(k), Storage::Cuda(v)) => {
                crate::cuda::CudaStorage::attention(q, k, v, s, causal, blocks).map(Storage::Cuda)
            }
            #[allow(unreachable_patterns)]
            (q, k, _) => Err(mixed("attention", q.device(), k.device())),
        }
    }

    fn first_non_finite(&self) -> Result<Option<(usize, f32)>> {
        unary_dispatch!(self, s => s.first_non_finite())
    }
}
