//! The engine: a model's HF processor (tokenizer + image processor, `<image>` marker
//! expansion), the sampler, and generation. Continuous batching and the paged KV cache
//! build on these pieces.
#![forbid(unsafe_code)]

pub mod blocks;
mod capfilt;
mod engine;
mod pipeline;
mod processor;
mod retrieval;
mod sampler;

pub use capfilt::{Candidate, CapFilt, CapFiltOptions, CapFiltSummary};
pub use engine::{
    EncodedPrompt, Engine, EngineConfig, EngineRequest, EngineStats, RequestError, TokenEvent,
    TokenStream,
};
pub use pipeline::{
    FinishReason, GenerateOptions, Generation, ModelSpec, Pipeline, PipelineOptions, StopRules,
};
pub use processor::{PreparedPrompt, Processor, PromptStyle};
pub use retrieval::RetrievalPipeline;
pub use sampler::{argmax, top_logprobs, Sampler, SamplingParams};

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
    /// The engine cannot take the request now (its queue is full, or it stopped).
    #[error("{0}")]
    Busy(String),
    /// A request the engine ran failed.
    #[error("{0}")]
    Failed(RequestError),
}

impl Error {
    /// Whether the caller's input (not the server or the model files) is at fault.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::Input(_)
                | Error::Image(
                    iris_image::Error::TooManyBytes { .. }
                        | iris_image::Error::TooManyPixels { .. }
                        | iris_image::Error::Empty
                        | iris_image::Error::UnknownFormat
                        | iris_image::Error::Corrupt(_)
                )
                | Error::Model(iris_models::Error::Input(_))
                | Error::Failed(RequestError {
                    bad_input: true,
                    ..
                })
        )
    }
}

pub type Result<T> = std::result::Result<T, Error>;
