//! Iris' model code: layers written once (linear and its tensor-parallel forms, norms,
//! rotary embeddings, attention, MLPs), the CLIP vision transformer, the LLaVA
//! projector, the LLaMA decoder, and the HF loading that feeds them (`config.json` in
//! every key style, safetensors single-file and sharded, memory-mapped).
//!
//! Model code follows HF weight names so a file reads beside its `modeling_*.py`.

pub mod bert;
pub mod blip;
pub mod blip2;
pub mod blip2_retrieval;
pub mod config;
mod error;
pub mod gguf;
pub mod idefics;
pub mod int4;
pub mod layers;
pub mod llama;
pub mod llava;
pub mod opt;
pub mod perceiver;
pub mod registry;
pub mod t5;
pub mod text;
pub mod vit;
pub mod vlm;
pub mod weights;

pub use error::{Error, Result};
