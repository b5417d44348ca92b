//! The `Tensor` type: a shape plus shared, contiguous, row-major storage on a device.
//! Model code composes its methods; host memory is reached only through the explicit
//! copies at the bottom (`to_f32_vec`, `host_f32`, `to_le_bytes`), which is what the
//! loaders, the wire and the tests use.

use std::sync::Arc;

use half::{bf16, f16};

use crate::error::shape_err;
use crate::storage::{BackendStorage, Binary, CpuStorage, Storage, Unary};
use crate::{Activation, DType, Device, Error, Result};

/// A contiguous row-major tensor. Cloning is cheap (the storage is shared); an
/// operation that changes values copies shared storage first.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub(crate) storage: Arc<Storage>,
    shape: Vec<usize>,
}

fn check_len(shape: &[usize], got: usize) -> Result<()> {
    let want: usize = shape.iter().product();
    if want != got {
        return Err(Error::ElementCount {
            shape: shape.to_vec(),
            want,
            got,
        });
    }
    Ok(())
}

impl Tensor {
    pub(crate) fn new(storage: Storage, shape: Vec<usize>) -> Tensor {
        Tensor {
            storage: Arc::new(storage),
            shape,
        }
    }

    fn cpu_new(storage: CpuStorage, shape: &[usize]) -> Result<Tensor> {
        check_len(shape, storage.len())?;
        Ok(Tensor::new(Storage::Cpu(storage), shape.to_vec()))
    }

    /// The same shape over new storage.
    fn with(&self, storage: Storage) -> Tensor {
        Tensor::new(storage, self.shape.clone())
    }

    pub fn from_f32(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        Tensor::cpu_new(CpuStorage::F32(data), shape)
    }

    pub fn from_bf16(data: Vec<bf16>, shape: &[usize]) -> Result<Tensor> {
        Tensor::cpu_new(CpuStorage::BF16(data), shape)
    }

    pub fn from_f16(data: Vec<f16>, shape: &[usize]) -> Result<Tensor> {
        Tensor::cpu_new(CpuStorage::F16(data), shape)
    }

    /// Builds a host tensor of `src` from little-endian bytes (a safetensors payload).
    pub fn from_le_bytes(bytes: &[u8], src: DType, shape: &[usize]) -> Result<Tensor> {
        if !bytes.len().is_multiple_of(src.size_in_bytes()) {
            return shape_err(
                "from_le_bytes",
                "byte length is not a multiple of dtype size",
            );
        }
        check_len(shape, bytes.len() / src.size_in_bytes())?;
        let u16s = || {
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
        };
        match src {
            DType::F32 => Tensor::from_f32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                shape,
            ),
            DType::BF16 => Tensor::from_bf16(u16s().map(bf16::from_bits).collect(), shape),
            DType::F16 => Tensor::from_f16(u16s().map(f16::from_bits).collect(), shape),
        }
    }

    /// f32 zeros on the host.
    pub fn zeros(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(Storage::Cpu(CpuStorage::F32(vec![0.0; n])), shape.to_vec())
    }

    /// f32 zeros on `device`.
    pub fn zeros_on(shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::zeros(shape).to_device(device)
    }

    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// This tensor on `device` (itself when it is there already).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let host = self.storage.to_cpu()?;
        Ok(self.with(match device {
            Device::Cpu => Storage::Cpu(host),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Storage::Cuda(crate::cuda::CudaStorage::upload(&host, n)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(Error::NotCompiledWithCuda),
        }))
    }

    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// The last dimension.
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows when the tensor is seen as `[rows, last_dim]`.
    pub fn rows(&self) -> usize {
        self.elem_count() / self.last_dim().max(1)
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.shape[..] {
            [a, b] => Ok((a, b)),
            _ => shape_err("dims2", format!("expected rank 2, got {:?}", self.shape)),
        }
    }

    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        check_len(shape, self.elem_count())?;
        Ok(Tensor {
            storage: self.storage.clone(),
            shape: shape.to_vec(),
        })
    }

    /// Host storage (the CPU backend's kernels and tests of this crate).
    pub(crate) fn cpu(&self) -> Result<&CpuStorage> {
        match &*self.storage {
            Storage::Cpu(s) => Ok(s),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(Error::Device(format!(
                "a host operation on a tensor on {}",
                self.device()
            ))),
        }
    }

    /// The f32 host data; errors for other dtypes and devices.
    pub(crate) fn as_f32(&self) -> Result<&[f32]> {
        self.cpu()?.as_f32()
    }

    /// The values as host f32: borrowed when they are, copied otherwise.
    pub(crate) fn f32_host(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        match &*self.storage {
            Storage::Cpu(s) => Ok(s.f32_values()),
            #[allow(unreachable_patterns)]
            other => Ok(std::borrow::Cow::Owned(other.to_cpu()?.to_f32_vec())),
        }
    }

    /// Mutable storage, copied first when shared.
    pub(crate) fn storage_mut(&mut self) -> Result<&mut Storage> {
        if Arc::get_mut(&mut self.storage).is_none() {
            self.storage = Arc::new(self.storage.try_clone()?);
        }
        Ok(Arc::get_mut(&mut self.storage).expect("unshared: copied just above"))
    }

    /// Converts the storage to `dtype` (round to nearest even for narrowing).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        Ok(self.with(self.storage.to_dtype(dtype)?))
    }

    /// Rounds f32 activations to the precision of `dtype`, keeping f32 storage: what
    /// PyTorch's cast to `dtype` does to values. A no-op for f32.
    pub fn round_to(mut self, dtype: DType) -> Result<Tensor> {
        if dtype != DType::F32 {
            self.storage_mut()?.round_to(dtype)?;
        }
        Ok(self)
    }

    fn unary(mut self, op: Unary) -> Result<Tensor> {
        self.storage_mut()?.unary(op)?;
        Ok(self)
    }

    pub fn activation(self, act: Activation) -> Result<Tensor> {
        self.unary(Unary::Activation(act))
    }

    pub fn scale(self, s: f32) -> Result<Tensor> {
        self.unary(Unary::Scale(s))
    }

    pub fn tanh(self) -> Result<Tensor> {
        self.unary(Unary::Tanh)
    }

    fn binary(mut self, other: &Tensor, op: Binary) -> Result<Tensor> {
        if self.shape() != other.shape() {
            return shape_err(
                "binary",
                format!("{op:?} of {:?} and {:?}", self.shape(), other.shape()),
            );
        }
        self.storage_mut()?.binary(&other.storage, op)?;
        Ok(self)
    }

    pub fn add_elem(self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, Binary::Add)
    }

    pub fn mul_elem(self, other: &Tensor) -> Result<Tensor> {
        self.binary(other, Binary::Mul)
    }

    fn binary_row(mut self, row: &Tensor, op: Binary) -> Result<Tensor> {
        let d = self.last_dim();
        if row.elem_count() != d && row.elem_count() != 1 {
            return shape_err(
                "binary_row",
                format!("{op:?} of a row of {} for last dim {d}", row.elem_count()),
            );
        }
        self.storage_mut()?.binary_row(d, &row.storage, op)?;
        Ok(self)
    }

    /// Adds a `[last_dim]` vector (or one value) to every row.
    pub fn add_row(self, row: &Tensor) -> Result<Tensor> {
        self.binary_row(row, Binary::Add)
    }

    /// Multiplies every row by a `[last_dim]` vector (or one value): a gate.
    pub fn mul_row(self, row: &Tensor) -> Result<Tensor> {
        self.binary_row(row, Binary::Mul)
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
        let b = bias.map(|b| &*b.storage);
        self.storage_mut()?.layer_norm(d, &weight.storage, b, eps)?;
        Ok(self)
    }

    /// RMSNorm over the last dimension: `w · x / sqrt(mean(x²) + eps)` (LLaMA). The
    /// normalised value is rounded to `round_dtype` before the weight multiplies it, as
    /// HF's `LlamaRMSNorm` casts back to the input dtype first.
    pub fn rms_norm(mut self, weight: &Tensor, eps: f64, round_dtype: DType) -> Result<Tensor> {
        let d = self.last_dim();
        if weight.elem_count() != d {
            return shape_err(
                "rms_norm",
                format!("weight of {} for dim {d}", weight.elem_count()),
            );
        }
        self.storage_mut()?
            .rms_norm(d, &weight.storage, eps, round_dtype)?;
        Ok(self)
    }

    /// Softmax over the last dimension.
    pub fn softmax_last(mut self) -> Result<Tensor> {
        let d = self.last_dim();
        self.storage_mut()?.softmax(d)?;
        Ok(self)
    }

    /// Rows scaled to unit L2 norm (a norm below 1e-12 counts as 1e-12).
    pub fn l2_normalize(mut self) -> Result<Tensor> {
        let d = self.last_dim();
        self.storage_mut()?.l2_normalize(d)?;
        Ok(self)
    }

    /// `[m,k] · [k,n]` of f32 tensors.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (m, k) = self.dims2()?;
        let (k2, n) = rhs.dims2()?;
        if k != k2 {
            return shape_err("matmul", format!("[{m},{k}] · [{k2},{n}]"));
        }
        let s = self.storage.matmul(m, k, &rhs.storage, n)?;
        Ok(Tensor::new(s, vec![m, n]))
    }

    /// Rows `start..start+len` of the tensor seen as `[rows, last_dim]`, in its dtype.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let d = self.last_dim();
        if start + len > self.rows() {
            return shape_err(
                "narrow_rows",
                format!("rows {start}..{} of {}", start + len, self.rows()),
            );
        }
        let s = self.storage.narrow_rows(d, start, len)?;
        Ok(Tensor::new(s, vec![len, d]))
    }

    /// Columns `start..start+len` of the tensor seen as `[rows, last_dim]`.
    pub fn narrow_cols(&self, start: usize, len: usize) -> Result<Tensor> {
        let d = self.last_dim();
        if start + len > d {
            return shape_err(
                "narrow_cols",
                format!("cols {start}..{} of {d}", start + len),
            );
        }
        let s = self.storage.narrow_cols(d, start, len)?;
        Ok(Tensor::new(s, vec![self.rows(), len]))
    }

    /// Gathers rows by index (an embedding lookup); the result is f32.
    pub fn index_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let (d, rows) = (self.last_dim(), self.rows());
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
            return shape_err("index_rows", format!("index {bad} out of range {rows}"));
        }
        let s = self.storage.gather_rows(d, ids)?;
        Ok(Tensor::new(s, vec![ids.len(), d]))
    }

    /// Concatenates tensors along the first dimension (as `[rows, last_dim]`), in f32.
    pub fn cat_rows(parts: &[&Tensor]) -> Result<Tensor> {
        let d = parts.first().map(|t| t.last_dim()).unwrap_or(0);
        if let Some(p) = parts.iter().find(|p| p.last_dim() != d) {
            return shape_err("cat_rows", format!("last dims {} and {d}", p.last_dim()));
        }
        let rows = parts.iter().map(|p| p.rows()).sum();
        if parts.is_empty() {
            return Ok(Tensor::zeros(&[0, 0]));
        }
        let storages: Vec<&Storage> = parts.iter().map(|p| &*p.storage).collect();
        Ok(Tensor::new(Storage::cat_rows(&storages)?, vec![rows, d]))
    }

    /// Concatenates `[rows, dᵢ]` tensors along the last dimension, in f32.
    pub fn cat_cols(parts: &[&Tensor]) -> Result<Tensor> {
        let rows = parts.first().map(|t| t.rows()).unwrap_or(0);
        if let Some(p) = parts.iter().find(|p| p.rows() != rows) {
            return shape_err("cat_cols", format!("rows {} and {rows}", p.rows()));
        }
        let width = parts.iter().map(|p| p.last_dim()).sum();
        if parts.is_empty() {
            return Ok(Tensor::zeros(&[0, 0]));
        }
        let storages: Vec<(&Storage, usize)> =
            parts.iter().map(|p| (&*p.storage, p.last_dim())).collect();
        Ok(Tensor::new(
            Storage::cat_cols(&storages, rows)?,
            vec![rows, width],
        ))
    }

    /// Row `at[i]` becomes row `i` of `src` (visual tokens into a prompt's embeddings).
    pub fn scatter_rows(mut self, at: &[usize], src: &Tensor) -> Result<Tensor> {
        if at.is_empty() && src.elem_count() == 0 {
            return Ok(self);
        }
        let d = self.last_dim();
        if src.last_dim() != d || src.rows() != at.len() {
            return shape_err(
                "scatter_rows",
                format!("{} rows of {:?} into width {d}", at.len(), src.shape()),
            );
        }
        if let Some(&bad) = at.iter().find(|&&r| r >= self.rows()) {
            return shape_err("scatter_rows", format!("row {bad} of {}", self.rows()));
        }
        self.storage_mut()?.scatter_rows(d, at, &src.storage)?;
        Ok(self)
    }

    /// A `[c, s, s]` image as its `p`×`p` patches, `[(s/p)², c·p·p]`, each patch's
    /// channels then rows then columns (a ViT's patch convolution as one product).
    pub fn patches(&self, p: usize) -> Result<Tensor> {
        let [c, s, s2] = self.shape[..] else {
            return shape_err("patches", format!("an image of shape {:?}", self.shape));
        };
        if s != s2 || p == 0 || !s.is_multiple_of(p) {
            return shape_err("patches", format!("{s}×{s2} in patches of {p}"));
        }
        let g = s / p;
        let st = self.storage.patches(c, s, p)?;
        Ok(Tensor::new(st, vec![g * g, c * p * p]))
    }

    /// The first value that is not finite, with its index (checking untrusted input).
    pub fn first_non_finite(&self) -> Result<Option<(usize, f32)>> {
        self.storage.first_non_finite()
    }

    /// A host copy widened to f32 (the answer of a model, a test's comparison).
    pub fn host_f32(&self) -> Result<Vec<f32>> {
        Ok(self.storage.to_cpu()?.to_f32_vec())
    }

    /// [`Tensor::host_f32`] that panics when the device fails (tests and tools).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.host_f32().expect("copy to the host")
    }

    /// The values as little-endian bytes of their own dtype (the wire, a file).
    pub fn to_le_bytes(&self) -> Result<Vec<u8>> {
        Ok(match self.storage.to_cpu()? {
            CpuStorage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            CpuStorage::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            CpuStorage::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        })
    }

    /// Calls `f` on the f32 values a chunk at a time, without copying a host f32 tensor
    /// whole (hashing visual tokens).
    pub fn visit_f32(&self, chunk: usize, mut f: impl FnMut(&[f32])) -> Result<()> {
        let host;
        let cpu = match &*self.storage {
            Storage::Cpu(s) => s,
            #[allow(unreachable_patterns)]
            other => {
                host = other.to_cpu()?;
                &host
            }
        };
        cpu.f32_values().chunks(chunk.max(1)).for_each(&mut f);
        Ok(())
    }
}
