//! Errors of model loading and execution.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid config: {0}")]
    Config(String),
    #[error(
        "unsupported architecture `{0}` (Iris serves LlavaForConditionalGeneration, BlipForConditionalGeneration, \
         Blip2ForConditionalGeneration and IdeficsForVisionText2Text with `generate`, BlipForImageTextRetrieval and \
         Blip2ForImageTextRetrieval with \
         `embed` and `match`)"
    )]
    UnknownArchitecture(String),
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("not a valid GGUF file: {0}")]
    Gguf(String),
    #[error("tensor `{0}` is missing from the checkpoint")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {got:?}, expected {want:?}")]
    TensorShape {
        name: String,
        want: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    TensorDType { name: String, dtype: String },
    #[error("bad input: {0}")]
    Input(String),
    #[error("the {0} of this model is not loaded in this process")]
    PartNotLoaded(crate::registry::Part),
    #[error(transparent)]
    Tensor(#[from] iris_tensor::Error),
    #[error(transparent)]
    Comm(#[from] iris_comm::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}
