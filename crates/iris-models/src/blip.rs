//! BLIP (Li et al., 2022) as HF's `modeling_blip.py`: the ViT shared with CLIP and
//! BLIP-2 (`vit.rs`), and a BERT text model (`bert.rs`, the Q-Former's layers) that
//! reads the image through cross-attention in every layer.
//! - `BlipCaptioner` (`BlipForConditionalGeneration`): the text model as a causal
//!   decoder with an LM head tied to the word embeddings; a caption starts at `[DEC]`.
//! - `BlipRetrieval` (`BlipForImageTextRetrieval`): the text model as a bidirectional
//!   encoder; ITM from `[CLS]` with the image, ITC as the cosine of the projected image
//!   `[CLS]` and text `[CLS]`.

use std::path::Path;

use iris_tensor::{Activation, DType, Tensor};

use crate::bert::{BertDims, BertEmbeddings, BertLayer};
use crate::config::{BlipConfig, ImageSize, ImageTokens};
use crate::layers::{KvCache, LayerNorm, Linear};
use crate::registry::{load_if, part, Checkpoint, Family, Part, Parts};
use crate::vit::VisionTransformer;
use crate::vlm::{CausalLm, ImageTextRetrieval, VisionLanguageModel};
use crate::weights::Vb;
use crate::{Error, Result};

pub const CAPTION_ARCHITECTURE: &str = "BlipForConditionalGeneration";
pub const RETRIEVAL_ARCHITECTURE: &str = "BlipForImageTextRetrieval";

/// The config (checked against the vision tower's width) and the ViT of a BLIP
/// checkpoint, when `vision` is wanted.
fn open(
    ck: &Checkpoint,
    family: Family,
    vision: bool,
) -> Result<(BlipConfig, Option<VisionTransformer>)> {
    ck.expect(family)?;
    let cfg = BlipConfig::from_value(&ck.config)?;
    if cfg.encoder_hidden_size != cfg.vision.hidden_size {
        return Err(Error::Config(format!(
            "text encoder_hidden_size {} differs from the vision hidden size {}",
            cfg.encoder_hidden_size, cfg.vision.hidden_size
        )));
    }
    let vit = vision
        .then(|| VisionTransformer::load_vision_model(&ck.weights, &cfg.vision))
        .transpose()?;
    Ok((cfg, vit))
}

fn dims(cfg: &BlipConfig) -> BertDims {
    BertDims {
        hidden: cfg.hidden_size,
        intermediate: cfg.intermediate_size,
        heads: cfg.num_attention_heads,
        encoder_hidden: cfg.encoder_hidden_size,
        eps: cfg.layer_norm_eps,
        act: cfg.hidden_act,
    }
}

/// Embeddings + layers of a BLIP text model under `vb` (`bert.` or `text_encoder.`).
fn load_text(vb: &Vb, cfg: &BlipConfig) -> Result<(BertEmbeddings, Vec<BertLayer>)> {
    let d = dims(cfg);
    let embeddings = BertEmbeddings::load(
        &vb.pp("embeddings"),
        cfg.vocab_size,
        cfg.max_position_embeddings,
        &d,
    )?;
    let layers = (0..cfg.num_hidden_layers)
        .map(|i| BertLayer::load(&vb.pp("encoder.layer").pp(i), &d, true))
        .collect::<Result<_>>()?;
    Ok((embeddings, layers))
}

/// The causal text decoder with its LM head (`cls.predictions`).
#[derive(Debug)]
pub struct BlipTextDecoder {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    transform: Linear,
    transform_act: Activation,
    transform_norm: LayerNorm,
    decoder: Linear,
}

impl CausalLm for BlipTextDecoder {
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    fn kv_width(&self) -> usize {
        // The layers' width: `transform` maps it to itself.
        self.transform.out_dim()
    }

    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        self.embeddings.words(ids)
    }

    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let mut x = self.embeddings.forward(embeds, cache.len())?;
        for (i, layer) in self.layers.iter().enumerate() {
            match layer.forward_cached(&x, cache, i) {
                Ok(y) => x = y,
                Err(e) => {
                    cache.rollback(x.last_dim());
                    return Err(e);
                }
            }
        }
        cache.advance(embeds.rows());
        Ok(x)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = self
            .transform
            .forward(hidden)?
            .activation(self.transform_act)?;
        self.decoder.forward(&self.transform_norm.forward(&h)?)
    }
}

#[derive(Debug)]
pub struct BlipCaptioner {
    cfg: BlipConfig,
    vision_model: Option<VisionTransformer>,
    text_decoder: Option<BlipTextDecoder>,
    dtype: DType,
}

impl BlipCaptioner {
    /// Every part of `dir`; `dtype` overrides the checkpoint's.
    pub fn load(dir: &Path, dtype: Option<DType>) -> Result<BlipCaptioner> {
        BlipCaptioner::from_checkpoint(&Checkpoint::open(dir, dtype)?, Parts::ALL)
    }

    /// The `parts` of an opened checkpoint (BLIP has no connector: its decoder reads
    /// the vision features through cross-attention).
    pub fn from_checkpoint(ck: &Checkpoint, parts: Parts) -> Result<BlipCaptioner> {
        let (cfg, vision_model) = open(ck, Family::BlipCaption, parts.vision)?;
        let (w, dtype) = (&ck.weights, ck.dtype);
        let text_decoder = load_if(parts, Part::Language, || {
            let td = w.find_prefix(
                &["text_decoder", "model.text_decoder"],
                "bert.embeddings.word_embeddings.weight",
            )?;
            let td = w.pp(td);
            let (embeddings, layers) = load_text(&td.pp("bert"), &cfg)?;
            let h = cfg.hidden_size;
            let p = td.pp("cls.predictions");
            // Tied to the word embeddings unless the checkpoint has its own decoder.
            let decoder_weight = if p.contains("decoder.weight") {
                p.get("decoder.weight", &[cfg.vocab_size, h])?
            } else {
                embeddings.word_embeddings().clone()
            };
            let bias = p.get("bias", &[cfg.vocab_size])?;
            Ok(BlipTextDecoder {
                transform: Linear::load(&p.pp("transform.dense"), h, h, true)?,
                transform_act: cfg.hidden_act,
                transform_norm: LayerNorm::load(
                    &p.pp("transform.LayerNorm"),
                    h,
                    cfg.layer_norm_eps,
                )?,
                decoder: Linear::new(decoder_weight, Some(bias), dtype)?,
                embeddings,
                layers,
            })
        })?;
        Ok(BlipCaptioner {
            cfg,
            vision_model,
            text_decoder,
            dtype,
        })
    }

    pub fn config(&self) -> &BlipConfig {
        &self.cfg
    }
}

impl VisionLanguageModel for BlipCaptioner {
    /// The image's features; the decoder reads them through cross-attention.
    fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        part(&self.vision_model, Part::Vision)?.forward(pixel_values)
    }
    fn image_features_batch(&self, pixel_values: &[&Tensor]) -> Result<Vec<Tensor>> {
        part(&self.vision_model, Part::Vision)?.forward_batch(pixel_values)
    }
    /// BLIP's decoder reads the vision features themselves.
    fn connect(&self, features: &Tensor, _size: ImageSize) -> Result<Tensor> {
        Ok(features.clone())
    }
    fn image_token_id(&self) -> u32 {
        u32::MAX
    }
    /// No placeholders: the image enters through cross-attention.
    fn image_tokens(&self) -> ImageTokens {
        ImageTokens::None
    }
    fn feature_shape(&self, _size: ImageSize) -> [usize; 2] {
        [
            self.cfg.vision.num_patches() + 1,
            self.cfg.vision.hidden_size,
        ]
    }
    fn visual_shape(&self, size: ImageSize) -> [usize; 2] {
        self.feature_shape(size)
    }
    fn language_model(&self) -> Result<&dyn CausalLm> {
        Ok(part(&self.text_decoder, Part::Language)?)
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn condition(&self, cache: &mut KvCache, _input_ids: &[u32], images: &[Tensor]) -> Result<()> {
        let [image] = images else {
            return Err(Error::Input(format!(
                "BLIP captions one image, {} given",
                images.len()
            )));
        };
        let decoder = part(&self.text_decoder, Part::Language)?;
        for (i, layer) in decoder.layers.iter().enumerate() {
            if let Some((k, v)) = layer.cross_kv(image)? {
                cache.set_cross(i, k, v)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct BlipRetrieval {
    cfg: BlipConfig,
    vision_model: VisionTransformer,
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    vision_proj: Linear,
    text_proj: Linear,
    itm_head: Linear,
}

impl BlipRetrieval {
    pub fn load(dir: &Path, dtype: Option<DType>) -> Result<BlipRetrieval> {
        BlipRetrieval::from_checkpoint(&Checkpoint::open(dir, dtype)?)
    }

    /// The whole model (the gateway serves retrieval itself, all parts in one place).
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<BlipRetrieval> {
        let (cfg, vision_model) = open(ck, Family::BlipRetrieval, true)?;
        let vision_model = vision_model.expect("the vision tower was asked for");
        let w = &ck.weights;
        let te = w.find_prefix(
            &["text_encoder", "model.text_encoder"],
            "embeddings.word_embeddings.weight",
        )?;
        let (embeddings, layers) = load_text(&w.pp(te), &cfg)?;
        let (h, vh, e) = (
            cfg.hidden_size,
            cfg.vision.hidden_size,
            cfg.image_text_hidden_size,
        );
        Ok(BlipRetrieval {
            vision_proj: Linear::load(&w.pp("vision_proj"), vh, e, true)?,
            text_proj: Linear::load(&w.pp("text_proj"), h, e, true)?,
            itm_head: Linear::load(&w.pp("itm_head"), h, 2, true)?,
            cfg,
            vision_model,
            embeddings,
            layers,
        })
    }

    /// `[CLS]` output of the text encoder, with or without the image.
    fn text_cls(&self, ids: &[u32], image: Option<&Tensor>) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::Input("empty text".into()));
        }
        let mut x = self.embeddings.forward(&self.embeddings.words(ids)?, 0)?;
        for layer in &self.layers {
            x = layer.forward(&x, image)?;
        }
        Ok(x.narrow_rows(0, 1)?)
    }

    pub fn config(&self) -> &BlipConfig {
        &self.cfg
    }
}

impl ImageTextRetrieval for BlipRetrieval {
    fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_model.forward(pixel_values)
    }

    fn image_embeds(&self, image_features: &Tensor) -> Result<Tensor> {
        Ok(self
            .vision_proj
            .forward(&image_features.narrow_rows(0, 1)?)?
            .l2_normalize()?)
    }

    fn text_embeds(&self, ids: &[u32]) -> Result<Tensor> {
        let e = self
            .text_proj
            .forward(&self.text_cls(ids, None)?)?
            .l2_normalize()?;
        Ok(e.reshape(&[e.elem_count()])?)
    }

    fn itm_logits(&self, image_features: &Tensor, ids: &[u32]) -> Result<[f32; 2]> {
        let l = self
            .itm_head
            .forward(&self.text_cls(ids, Some(image_features))?)?;
        let l = l.host_f32()?;
        Ok([l[0], l[1]])
    }
}
