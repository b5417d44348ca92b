//! The interfaces the engine drives: a causal language model over a KV cache, and a
//! vision-language model that turns images into visual tokens and merges them into the
//! prompt's embeddings. LLaVA and BLIP-2 implement them; the merge is written once.

use std::fmt::Debug;

use iris_tensor::{DType, Tensor};

use crate::config::{ImageSize, ImageTokens};
use crate::layers::{KvCache, KvDtype};
use crate::{Error, Result};

pub trait CausalLm: Send + Sync + Debug {
    fn new_cache(&self) -> KvCache;
    /// Floats of one token's keys (as many again for values) in one layer's cache.
    fn kv_width(&self) -> usize;
    /// Token embeddings `[ids, hidden]`; errors on ids outside the vocabulary.
    fn embed(&self, ids: &[u32]) -> Result<Tensor>;
    /// Runs `embeds` after the cached tokens; returns the final hidden states.
    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// Logits `[t, vocab]` of final hidden states.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor>;
    /// One step of several sequences (`embeds[i]` continues `caches[i]`). Models that
    /// batch their linear layers override this; the default runs them one by one.
    fn forward_batch(
        &self,
        embeds: &[&Tensor],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Tensor>> {
        embeds
            .iter()
            .zip(caches.iter_mut())
            .map(|(e, c)| self.forward(e, c))
            .collect()
    }
}

pub trait VisionLanguageModel: Send + Sync + Debug {
    /// The vision tower's output for one image `[C, H, W]` (or its tiles,
    /// `[tiles, C, H, W]`): what the connector reads (the vision tier's half of
    /// `encode_image`).
    fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor>;
    /// `image_features` of several images; models override it with one stacked pass
    /// through the vision tower. Each image's features equal what it gives alone.
    fn image_features_batch(&self, pixel_values: &[&Tensor]) -> Result<Vec<Tensor>> {
        pixel_values
            .iter()
            .map(|pv| self.image_features(pv))
            .collect()
    }
    /// Visual tokens from the vision features of an image of `size` (as decoded): the
    /// projector, Q-Former or resampler (the connector tier's half).
    fn connect(&self, features: &Tensor, size: ImageSize) -> Result<Tensor>;
    /// Visual tokens of one image: `[tokens, hidden]`.
    fn encode_image(&self, pixel_values: &Tensor, size: ImageSize) -> Result<Tensor> {
        self.connect(&self.image_features(pixel_values)?, size)
    }
    fn image_token_id(&self) -> u32;
    /// How many placeholders an image fills.
    fn image_tokens(&self) -> ImageTokens;
    /// `[rows, width]` of the vision features of an image of `size`: what `connect`
    /// takes.
    fn feature_shape(&self, size: ImageSize) -> [usize; 2];
    /// `[rows, width]` of the visual tokens of an image of `size`: what `connect`
    /// returns and the language model reads (placeholder rows or cross-attention
    /// latents).
    fn visual_shape(&self, size: ImageSize) -> [usize; 2];
    /// The language model; an error in a process that did not load it.
    fn language_model(&self) -> Result<&dyn CausalLm>;
    fn dtype(&self) -> DType;

    /// The engine's KV arena is `blocks` of `block_size` tokens in `dtype` (a
    /// tensor-parallel leader tells its other ranks, which reserve theirs alike).
    fn prepare_kv(&self, _blocks: usize, _block_size: usize, _dtype: KvDtype) -> Result<()> {
        Ok(())
    }

    /// Prepares a sequence's cache for its images before the prompt runs (models that
    /// read images through cross-attention store their keys and values there).
    fn condition(
        &self,
        _cache: &mut KvCache,
        _input_ids: &[u32],
        _images: &[Tensor],
    ) -> Result<()> {
        Ok(())
    }

    /// The ids the language model decodes from (and its positions count): the prompt's,
    /// or for an encoder-decoder model, whose encoder reads the prompt in `condition`,
    /// its decoder's start.
    fn decoder_prompt(&self, input_ids: &[u32]) -> Vec<u32> {
        input_ids.to_vec()
    }

    /// Input embeddings of the language model's prompt: the prompt's ids with its image
    /// placeholders filled, in order, by `images` (each `[its tokens, hidden]`).
    fn input_embeds(&self, ids: &[u32], images: &[Tensor]) -> Result<Tensor> {
        placeholder_embeds(self, ids, images)
    }
}

/// A prompt's embeddings with its image placeholders filled, in order, by `images`
/// (each `[its tokens, hidden]`): what the language model reads (an encoder-decoder's
/// encoder included); cross-attention models' are the ids' embeddings alone.
pub fn placeholder_embeds<M: VisionLanguageModel + ?Sized>(
    model: &M,
    ids: &[u32],
    images: &[Tensor],
) -> Result<Tensor> {
    let fixed = model.image_tokens().fixed();
    if fixed == Some(0) {
        // The images enter through cross-attention (`condition`), not the embeddings.
        return model.language_model()?.embed(ids);
    }
    let image_token = model.image_token_id();
    let placeholders = ids.iter().filter(|&&i| i == image_token).count();
    let given: usize = images.iter().map(Tensor::rows).sum();
    if placeholders != given {
        return Err(Error::Input(format!(
            "the prompt has {placeholders} image tokens but {} image(s) give {given} visual tokens",
            images.len(),
        )));
    }
    // Placeholder ids may lie outside the text vocabulary; embed a valid id there.
    let text_ids: Vec<u32> = ids
        .iter()
        .map(|&i| if i == image_token { 0 } else { i })
        .collect();
    let mut x = model.language_model()?.embed(&text_ids)?;
    let d = x.last_dim();
    if let Some(bad) = images
        .iter()
        .find(|t| t.last_dim() != d || fixed.is_some_and(|per| t.rows() != per))
    {
        return Err(Error::Input(format!(
            "visual tokens of shape {:?}, the language model takes rows of {d}",
            bad.shape()
        )));
    }
    let at: Vec<usize> = (0..ids.len()).filter(|&p| ids[p] == image_token).collect();
    if at.is_empty() {
        return Ok(x); // a text-only prompt
    }
    // Each image's rows straight into its placeholders (no concatenated copy).
    let device = x.device();
    let mut start = 0;
    for image in images {
        let rows = &at[start..start + image.rows()];
        x = x.scatter_rows(rows, &image.to_device(device)?)?;
        start += image.rows();
    }
    Ok(x)
}

/// Checks a tensor a caller sent (features, visual tokens) before any kernel sees it:
/// the exact `[rows, width]` the model takes and finite values.
pub fn check_untrusted(t: &Tensor, want: [usize; 2], what: &str) -> Result<()> {
    if t.shape() != want {
        return Err(Error::Input(format!(
            "{what} of shape {:?}, the model takes [{}, {}]",
            t.shape(),
            want[0],
            want[1]
        )));
    }
    if let Some((i, x)) = t.first_non_finite()? {
        return Err(Error::Input(format!(
            "{what}: value {i} is {x} (every value must be finite)"
        )));
    }
    Ok(())
}

/// ITM and ITC scores of one image-text pair.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MatchScores {
    pub itm_logits: [f32; 2],
    pub itm_probability: f32,
    pub itc_similarity: f32,
}

/// Image-text retrieval heads (BLIP, BLIP-2): contrastive embeddings and matching.
pub trait ImageTextRetrieval: Send + Sync + Debug {
    /// The vision tower's output for one image.
    fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor>;
    /// Normalised ITC embeddings of an image, `[n, dim]` (BLIP-2: one per query).
    fn image_embeds(&self, image_features: &Tensor) -> Result<Tensor>;
    /// The normalised ITC embedding of a text, `[dim]`.
    fn text_embeds(&self, ids: &[u32]) -> Result<Tensor>;
    /// ITM logits (no match, match) of an image with a text.
    fn itm_logits(&self, image_features: &Tensor, ids: &[u32]) -> Result<[f32; 2]>;

    /// ITM and ITC of one image and one text; ITC is the best image row's cosine.
    fn match_scores(&self, pixel_values: &Tensor, ids: &[u32]) -> Result<MatchScores> {
        let feats = self.image_features(pixel_values)?;
        let itm_logits = self.itm_logits(&feats, ids)?;
        let m = itm_logits[0].max(itm_logits[1]);
        let (e0, e1) = ((itm_logits[0] - m).exp(), (itm_logits[1] - m).exp());
        let img = self.image_embeds(&feats)?;
        let txt = self.text_embeds(ids)?;
        // Each image row's cosine with the text: `img · txtᵀ`.
        let txt = txt.reshape(&[1, txt.elem_count()])?;
        let itc_similarity = iris_tensor::linear(&img, &txt, None)?
            .host_f32()?
            .into_iter()
            .fold(f32::NEG_INFINITY, f32::max);
        Ok(MatchScores {
            itm_logits,
            itm_probability: e1 / (e0 + e1),
            itc_similarity,
        })
    }
}
