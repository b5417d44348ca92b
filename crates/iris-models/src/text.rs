//! A language model alone (`LlamaForCausalLM`, or a LLaMA GGUF file): served through
//! the same engine as the vision-language models, as one that takes no images. Its
//! prompt is text only; an image given to it is a request error.

use std::sync::Arc;

use iris_comm::Communicator;
use iris_tensor::{DType, Tensor};

use crate::config::{ImageSize, ImageTokens, LlamaConfig};
use crate::llama::Llama;
use crate::registry::{load_if, part, Checkpoint, Family, Part, Parts};
use crate::vlm::{CausalLm, VisionLanguageModel};
use crate::{Error, Result};

pub const ARCHITECTURE: &str = "LlamaForCausalLM";

#[derive(Debug)]
pub struct TextModel {
    language_model: Option<Llama>,
    cfg: LlamaConfig,
    dtype: DType,
}

impl TextModel {
    pub fn from_checkpoint(
        ck: &Checkpoint,
        parts: Parts,
        comm: Arc<dyn Communicator>,
    ) -> Result<TextModel> {
        ck.expect(Family::Llama)?;
        let cfg = LlamaConfig::from_value(&ck.config, false)?;
        let w = &ck.weights;
        let language_model = load_if(parts, Part::Language, || {
            Llama::load(&w.lm("model"), &w.lm("lm_head"), &cfg, comm)
        })?;
        Ok(TextModel {
            language_model,
            cfg,
            dtype: ck.dtype,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn llama(&self) -> Result<&Llama> {
        part(&self.language_model, Part::Language)
    }
}

fn no_images() -> Error {
    Error::Input("this is a text-only model: it takes no images".into())
}

impl VisionLanguageModel for TextModel {
    fn image_features(&self, _: &Tensor) -> Result<Tensor> {
        Err(no_images())
    }
    fn connect(&self, _: &Tensor, _: ImageSize) -> Result<Tensor> {
        Err(no_images())
    }
    fn image_token_id(&self) -> u32 {
        u32::MAX
    }
    fn image_tokens(&self) -> ImageTokens {
        ImageTokens::None
    }
    fn feature_shape(&self, _: ImageSize) -> [usize; 2] {
        [0, 0]
    }
    fn visual_shape(&self, _: ImageSize) -> [usize; 2] {
        [0, self.cfg.hidden_size]
    }
    fn language_model(&self) -> Result<&dyn CausalLm> {
        Ok(self.llama()?)
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn input_embeds(&self, ids: &[u32], images: &[Tensor]) -> Result<Tensor> {
        if !images.is_empty() {
            return Err(no_images());
        }
        self.llama()?.embed(ids)
    }
}
