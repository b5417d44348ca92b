//! The interfaces the engine drives: a causal language model over a KV cache, and a
//! vision-language model that turns images into visual tokens and merges them into the
//! prompt's embeddings. LLaVA and BLIP-2 implement them; the merge is written once.

use std::fmt::Debug;

use iris_tensor::{DType, Tensor};

use crate::layers::KvCache;
use crate::{Error, Result};

pub trait CausalLm: Send + Sync + Debug {
    fn new_cache(&self) -> KvCache;
    /// Token embeddings `[ids, hidden]`; errors on ids outside the vocabulary.
    fn embed(&self, ids: &[u32]) -> Result<Tensor>;
    /// Runs `embeds` after the cached tokens; returns the final hidden states.
    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// Logits `[t, vocab]` of final hidden states.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;
}

pub trait VisionLanguageModel: Send + Sync + Debug {
    /// Visual tokens of one image `[C, H, W]`: `[tokens_per_image, hidden]`.
    fn encode_image(&self, pixel_values: &Tensor) -> Result<Tensor>;
    fn image_token_id(&self) -> u32;
    fn tokens_per_image(&self) -> usize;
    fn language_model(&self) -> &dyn CausalLm;
    fn dtype(&self) -> DType;

    /// Input embeddings of a prompt whose image placeholders are filled, in order, by
    /// `images` (each `[tokens_per_image, hidden]`).
    fn input_embeds(&self, ids: &[u32], images: &[Tensor]) -> Result<Tensor> {
        let image_token = self.image_token_id();
        let placeholders = ids.iter().filter(|&&i| i == image_token).count();
        let per = self.tokens_per_image();
        if placeholders != images.len() * per {
            return Err(Error::Input(format!(
                "the prompt has {placeholders} image tokens but {} image(s) give {} visual tokens",
                images.len(),
                images.len() * per
            )));
        }
        // Placeholder ids may lie outside the text vocabulary; embed a valid id there.
        let text_ids: Vec<u32> = ids
            .iter()
            .map(|&i| if i == image_token { 0 } else { i })
            .collect();
        let mut x = self.language_model().embed(&text_ids)?;
        let d = x.last_dim();
        if let Some(bad) = images.iter().find(|t| t.last_dim() != d || t.rows() != per) {
            return Err(Error::Input(format!(
                "visual tokens of shape {:?}, the language model takes [{per}, {d}]",
                bad.shape()
            )));
        }
        let visual: Vec<&[f32]> = images
            .iter()
            .map(|t| t.as_f32())
            .collect::<std::result::Result<_, _>>()?;
        let mut next = visual.iter().flat_map(|v| v.chunks_exact(d));
        let xs = x.f32_mut();
        for (pos, &id) in ids.iter().enumerate() {
            if id == image_token {
                let row = next.next().expect("counts checked above");
                xs[pos * d..(pos + 1) * d].copy_from_slice(row);
            }
        }
        Ok(x)
    }
}
