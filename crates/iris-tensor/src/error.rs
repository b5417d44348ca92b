//! Errors of the tensor runtime.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op} does not support dtype {dtype:?}")]
    DType {
        op: &'static str,
        dtype: crate::DType,
    },
    #[error("data has {got} elements but shape {shape:?} needs {want}")]
    ElementCount {
        shape: Vec<usize>,
        want: usize,
        got: usize,
    },
    #[error("Iris was built without CUDA support: rebuild with `--features cuda`")]
    NotCompiledWithCuda,
    #[error("CUDA backend: {0}")]
    Cuda(String),
    #[error("device: {0}")]
    Device(String),
    #[error("KV cache: {0}")]
    Kv(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn shape_err<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(Error::Shape {
        op,
        detail: detail.into(),
    })
}
