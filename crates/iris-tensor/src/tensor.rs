//! The `Tensor` type: shape plus shared, contiguous, row-major storage.

use std::sync::Arc;

use half::{bf16, f16};

use crate::error::shape_err;
use crate::{DType, Error, Result};

#[derive(Debug, Clone)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A contiguous row-major tensor on the CPU. Cloning is cheap (the storage is shared).
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
    pub fn from_f32(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            storage: Arc::new(Storage::F32(data)),
            shape: shape.to_vec(),
        })
    }

    pub fn from_bf16(data: Vec<bf16>, shape: &[usize]) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            storage: Arc::new(Storage::BF16(data)),
            shape: shape.to_vec(),
        })
    }

    pub fn from_f16(data: Vec<f16>, shape: &[usize]) -> Result<Tensor> {
        check_len(shape, data.len())?;
        Ok(Tensor {
            storage: Arc::new(Storage::F16(data)),
            shape: shape.to_vec(),
        })
    }

    /// Builds a tensor of `dtype` from little-endian bytes (a safetensors payload).
    pub fn from_le_bytes(bytes: &[u8], src: DType, shape: &[usize]) -> Result<Tensor> {
        let n = bytes.len() / src.size_in_bytes();
        if !bytes.len().is_multiple_of(src.size_in_bytes()) {
            return shape_err(
                "from_le_bytes",
                "byte length is not a multiple of dtype size",
            );
        }
        check_len(shape, n)?;
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

    pub fn zeros(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            storage: Arc::new(Storage::F32(vec![0.0; n])),
            shape: shape.to_vec(),
        }
    }

    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::F32(_) => DType::F32,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
        }
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

    /// The f32 data; errors for other dtypes (activations are always f32).
    pub fn as_f32(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(Error::DType {
                op: "as_f32",
                dtype: self.dtype(),
            }),
        }
    }

    pub fn as_bf16(&self) -> Option<&[bf16]> {
        match &*self.storage {
            Storage::BF16(v) => Some(v),
            _ => None,
        }
    }

    /// The data as f32: borrowed when stored as f32, widened into a copy otherwise.
    pub fn f32_values(&self) -> std::borrow::Cow<'_, [f32]> {
        match &*self.storage {
            Storage::F32(v) => std::borrow::Cow::Borrowed(v),
            _ => std::borrow::Cow::Owned(self.to_f32_vec()),
        }
    }

    /// The data widened to f32 (a copy unless it already is f32 and unshared).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &*self.storage {
            Storage::F32(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Mutable f32 data, copying the storage if it is shared or of another dtype.
    pub fn f32_mut(&mut self) -> &mut [f32] {
        if !matches!(&*self.storage, Storage::F32(_)) {
            self.storage = Arc::new(Storage::F32(self.to_f32_vec()));
        }
        match Arc::make_mut(&mut self.storage) {
            Storage::F32(v) => v,
            _ => unreachable!("converted to f32 just above"),
        }
    }

    /// Converts the storage to `dtype` (round to nearest even for narrowing).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let storage = match dtype {
            DType::F32 => Storage::F32(self.to_f32_vec()),
            DType::BF16 => Storage::BF16(match &*self.storage {
                Storage::F16(v) => v.iter().map(|x| bf16::from_f32(x.to_f32())).collect(),
                _ => self.to_f32_vec().into_iter().map(bf16::from_f32).collect(),
            }),
            DType::F16 => Storage::F16(self.to_f32_vec().into_iter().map(f16::from_f32).collect()),
        };
        Tensor {
            storage: Arc::new(storage),
            shape: self.shape.clone(),
        }
    }

    /// Rounds f32 activations to the precision of `dtype`, keeping f32 storage: what
    /// PyTorch's cast to `dtype` does to values. A no-op for f32.
    pub fn round_to(mut self, dtype: DType) -> Tensor {
        match dtype {
            DType::F32 => {}
            DType::BF16 => {
                crate::ops::in_chunks(self.f32_mut(), 1 << 16, crate::kernels::round_bf16_in_place)
            }
            DType::F16 => self
                .f32_mut()
                .iter_mut()
                .for_each(|x| *x = f16::from_f32(*x).to_f32()),
        }
        self
    }

    /// Rows `start..start+len` of the tensor seen as `[rows, last_dim]`.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let d = self.last_dim();
        if start + len > self.rows() {
            return shape_err(
                "narrow_rows",
                format!("rows {start}..{} of {}", start + len, self.rows()),
            );
        }
        let data = self.to_f32_slice_range(start * d, (start + len) * d);
        Tensor::from_f32(data, &[len, d])
    }

    fn to_f32_slice_range(&self, a: usize, b: usize) -> Vec<f32> {
        match &*self.storage {
            Storage::F32(v) => v[a..b].to_vec(),
            Storage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
            Storage::F16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Gathers rows by index (an embedding lookup); the result is f32.
    pub fn index_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let d = self.last_dim();
        let rows = self.rows();
        let mut out = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            let id = id as usize;
            if id >= rows {
                return shape_err("index_rows", format!("index {id} out of range {rows}"));
            }
            out.extend(self.to_f32_slice_range(id * d, (id + 1) * d));
        }
        Tensor::from_f32(out, &[ids.len(), d])
    }

    /// Concatenates f32 tensors along the first dimension (as `[rows, last_dim]`).
    pub fn cat_rows(parts: &[&Tensor]) -> Result<Tensor> {
        let d = parts.first().map(|t| t.last_dim()).unwrap_or(0);
        let mut out = Vec::new();
        let mut rows = 0;
        for p in parts {
            if p.last_dim() != d {
                return shape_err("cat_rows", format!("last dims {} and {d}", p.last_dim()));
            }
            out.extend_from_slice(p.as_f32()?);
            rows += p.rows();
        }
        Tensor::from_f32(out, &[rows, d])
    }
}
