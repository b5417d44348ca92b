//! The engine: a model's HF processor (tokenizer + image processor, `<image>` marker
//! expansion), the sampler, and generation. Continuous batching and the paged KV cache
//! build on these pieces.
#![forbid(unsafe_code)]

pub mod blocks;
mod capfilt;
pub mod constrain;
mod engine;
pub mod gguf_tokenizer;
mod pipeline;
mod processor;
mod retrieval;
pub mod tp;

pub use capfilt::{Candidate, CapFilt, CapFiltOptions, CapFiltSummary};
pub use constrain::Constraint;
pub use engine::{
    kv_block_bytes, kv_blocks_for_budget, kv_dtype, visual_hash, EncodedPrompt, Engine,
    EngineConfig, EngineRequest, EngineStats, RequestError, TokenEvent, TokenStream,
};
pub use iris_models::registry::{Family, Part, Parts, Task};
pub use iris_tensor::kv::KvDtype;
pub use iris_tensor::sample::{argmax, seed_stream, top_logprobs, Sampler, SamplingParams};
pub use pipeline::{
    FinishReason, GenerateOptions, Generation, ModelSpec, Pipeline, PipelineOptions, StopRules,
};
pub use processor::{Escapes, PreparedPrompt, Processor, PromptStyle};
pub use retrieval::RetrievalPipeline;

/// What kind of failure an error is, for the caller: the one classification every
/// edge (gRPC status, HTTP status) maps from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is at fault (a bad image, a prompt too long).
    BadInput,
    /// A model or resource that is not served here.
    NotFound,
    /// Full right now: retry later or elsewhere.
    Overloaded,
    /// Cannot serve at all (stopped, a part not loaded here): go elsewhere.
    Unavailable,
    /// The request's deadline passed.
    Deadline,
    /// The server failed (a bug, a panic, bad model files).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad input: {0}")]
    Input(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Image(#[from] iris_image::Error),
    #[error(transparent)]
    Model(#[from] iris_models::Error),
    #[error(transparent)]
    Tensor(#[from] iris_tensor::Error),
    /// The engine cannot take the request now: its queue is full.
    #[error("{0}")]
    Busy(String),
    /// The engine cannot serve at all: it stopped, or cannot go on.
    #[error("{0}")]
    Unavailable(String),
    /// A request the engine ran failed.
    #[error("{0}")]
    Failed(RequestError),
}

impl Error {
    /// Whether the caller's input (not the server or the model files) is at fault.
    pub fn is_bad_input(&self) -> bool {
        self.kind() == ErrorKind::BadInput
    }

    pub fn kind(&self) -> ErrorKind {
        use iris_image::Error as Img;
        match self {
            Error::Input(_)
            | Error::Model(iris_models::Error::Input(_))
            | Error::Image(
                Img::TooManyBytes { .. }
                | Img::TooManyPixels { .. }
                | Img::Empty
                | Img::UnknownFormat
                | Img::Corrupt(_),
            ) => ErrorKind::BadInput,
            // A tensor-parallel rank that is gone: this group cannot serve; another can.
            Error::Model(iris_models::Error::PartNotLoaded(_) | iris_models::Error::Comm(_))
            | Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Busy(_) => ErrorKind::Overloaded,
            Error::Failed(r) => r.kind,
            _ => ErrorKind::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
