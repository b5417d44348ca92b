//! Image-text retrieval with a BLIP or BLIP-2 retrieval checkpoint: normalised
//! embeddings (ITC) and image-text matching (ITM), from image files and raw text.

use std::path::Path;

use iris_models::config::{read_json, Blip2Config, ImageTokens};
use iris_models::registry::{Checkpoint, Family};
use iris_models::vlm::{ImageTextRetrieval, MatchScores};
use iris_tensor::Tensor;

use crate::pipeline::PipelineOptions;
use crate::processor::{Processor, PromptStyle};
use crate::{Error, Result};

#[derive(Debug)]
pub struct RetrievalPipeline {
    pub processor: Processor,
    pub model: Box<dyn ImageTextRetrieval>,
}

impl RetrievalPipeline {
    pub fn load(dir: &Path, opts: &PipelineOptions) -> Result<RetrievalPipeline> {
        let ck = Checkpoint::open(dir, opts.dtype)?;
        let (style, placeholder, per_image) = match ck.family {
            Family::Blip2Retrieval => {
                let c = Blip2Config::from_value(&read_json(&dir.join("config.json"))?)?;
                (
                    PromptStyle::Prefix,
                    Some(c.image_token_id),
                    ImageTokens::Fixed(c.num_query_tokens),
                )
            }
            _ => (PromptStyle::Plain, None, ImageTokens::None),
        };
        let model = ck.load_retrieval()?;
        let processor = Processor::load(dir, style, placeholder, per_image, opts.limits)?;
        Ok(RetrievalPipeline { processor, model })
    }

    fn pixel_values(&self, image: &[u8]) -> Result<Tensor> {
        match self.processor.pixel_values(image) {
            Ok((pixels, _)) => Ok(pixels),
            Err(Error::Image(e)) => Err(Error::Input(format!("image: {e}"))),
            Err(other) => Err(other),
        }
    }

    /// Text ids as the processor makes them, without image placeholders.
    fn text_ids(&self, text: &str) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(Error::Input("empty text".into()));
        }
        Ok(self.processor.prepare(text, &[])?.input_ids)
    }

    /// Normalised ITC embeddings of an image, one row per query.
    pub fn embed_image(&self, image: &[u8]) -> Result<Tensor> {
        let feats = self.model.image_features(&self.pixel_values(image)?)?;
        Ok(self.model.image_embeds(&feats)?)
    }

    /// Tokens a text is embedded from (the usage an API reports).
    pub fn text_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.text_ids(text)?.len())
    }

    /// The normalised ITC embedding of a text.
    pub fn embed_text(&self, text: &str) -> Result<Tensor> {
        Ok(self.model.text_embeds(&self.text_ids(text)?)?)
    }

    /// The vision tower's features of an image, to score several texts against.
    pub fn image_features(&self, image: &[u8]) -> Result<Tensor> {
        Ok(self.model.image_features(&self.pixel_values(image)?)?)
    }

    /// ITM probability of a text for an image's features.
    pub fn itm_probability(&self, image_features: &Tensor, text: &str) -> Result<f32> {
        let [a, b] = self
            .model
            .itm_logits(image_features, &self.text_ids(text)?)?;
        let m = a.max(b);
        let (ea, eb) = ((a - m).exp(), (b - m).exp());
        Ok(eb / (ea + eb))
    }

    pub fn match_pair(&self, image: &[u8], text: &str) -> Result<MatchScores> {
        Ok(self
            .model
            .match_scores(&self.pixel_values(image)?, &self.text_ids(text)?)?)
    }
}
