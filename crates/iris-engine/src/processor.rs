//! HF's `LlavaProcessor` (`processing_llava.py`): each `<image>` marker in the raw
//! prompt becomes as many image tokens as the vision tower yields visual tokens, then
//! the model's `tokenizer.json` encodes the text with its special tokens (BOS).

use std::path::Path;

use iris_image::{ImageLimits, ImageProcessor};
use iris_tensor::Tensor;
use tokenizers::Tokenizer;

use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct LlavaProcessor {
    tokenizer: Tokenizer,
    image_processor: ImageProcessor,
    image_token: String,
    tokens_per_image: usize,
    limits: ImageLimits,
}

/// A prompt turned into model inputs.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub input_ids: Vec<u32>,
    /// `[3, H, W]` per image, in prompt order.
    pub pixel_values: Vec<Tensor>,
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

impl LlavaProcessor {
    pub fn load(
        dir: &Path,
        tokens_per_image: usize,
        limits: ImageLimits,
    ) -> Result<LlavaProcessor> {
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        let image_token = ["processor_config.json", "tokenizer_config.json"]
            .iter()
            .filter_map(|f| read_json(&dir.join(f)))
            .find_map(|v| {
                v.get("image_token")
                    .and_then(|t| t.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "<image>".to_string());
        if tokenizer.token_to_id(&image_token).is_none() {
            return Err(Error::Tokenizer(format!(
                "the tokenizer has no `{image_token}` token"
            )));
        }
        Ok(LlavaProcessor {
            tokenizer,
            image_processor: ImageProcessor::from_model_dir(dir)?,
            image_token,
            tokens_per_image,
            limits,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn image_token(&self) -> &str {
        &self.image_token
    }

    /// Decodes and preprocesses one image file's bytes into `[3, H, W]`.
    pub fn pixel_values(&self, bytes: &[u8]) -> Result<Tensor> {
        let img = iris_image::decode(bytes, self.limits)?;
        let (h, w) = self.image_processor.output_size(img.width, img.height);
        Ok(Tensor::from_f32(
            self.image_processor.preprocess(&img)?,
            &[3, h, w],
        )?)
    }

    /// Expands the prompt's `<image>` markers and tokenizes; `images` are the encoded
    /// image files, one per marker, in order.
    pub fn prepare(&self, prompt: &str, images: &[Vec<u8>]) -> Result<PreparedPrompt> {
        let markers = prompt.matches(self.image_token.as_str()).count();
        if markers != images.len() {
            return Err(Error::Input(format!(
                "the prompt has {markers} `{}` marker(s) but {} image(s) were given",
                self.image_token,
                images.len()
            )));
        }
        let expanded = prompt.replace(
            &self.image_token,
            &self.image_token.repeat(self.tokens_per_image),
        );
        let enc = self
            .tokenizer
            .encode(expanded, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let pixel_values = images
            .iter()
            .enumerate()
            .map(|(i, b)| {
                self.pixel_values(b).map_err(|e| match e {
                    Error::Image(e) => Error::Input(format!("image {}: {e}", i + 1)),
                    other => other,
                })
            })
            .collect::<Result<_>>()?;
        Ok(PreparedPrompt {
            input_ids: enc.get_ids().to_vec(),
            pixel_values,
        })
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}
