//! BLIP-2 (Li et al., 2023) with an OPT decoder, as HF's `modeling_blip_2.py`
//! `Blip2ForConditionalGeneration`: BLIP ViT → Q-Former (learned queries
//! cross-attending to the image) → `language_projection` → visual tokens that fill the
//! image placeholders the processor puts before the text. Parts: the ViT (vision), the
//! queries + Q-Former + `language_projection` (connector), OPT (language).

use std::path::Path;
use std::sync::Arc;

use iris_tensor::{DType, Tensor};

use crate::bert::{BertDims, QFormer};
use crate::config::{Blip2Config, Blip2Text, ImageSize, ImageTokens};
use crate::layers::{KvCache, Linear};
use crate::opt::Opt;
use crate::registry::{load_if, part, Checkpoint, Family, Part, Parts};
use crate::t5::T5;
use crate::vit::VisionTransformer;
use crate::vlm::{placeholder_embeds, CausalLm, VisionLanguageModel};
use crate::weights::Weights;
use crate::{Error, Result};

pub const ARCHITECTURE: &str = "Blip2ForConditionalGeneration";

/// The learned queries and the Q-Former (kept in f32, as HF's `_keep_in_fp32_modules`).
#[derive(Debug)]
pub(crate) struct QueryTransformer {
    pub query_tokens: Tensor,
    pub qformer: QFormer,
    pub num_query_tokens: usize,
}

impl QueryTransformer {
    pub fn load(w: &Arc<Weights>, cfg: &Blip2Config, text_input: bool) -> Result<QueryTransformer> {
        let q = &cfg.qformer;
        if q.encoder_hidden_size != cfg.vision.hidden_size {
            return Err(Error::Config(format!(
                "qformer encoder_hidden_size {} differs from the vision hidden size {}",
                q.encoder_hidden_size, cfg.vision.hidden_size
            )));
        }
        let qformer = w.find_prefix(&["qformer", "model.qformer"], "layernorm.weight")?;
        let queries = ["query_tokens", "model.query_tokens"]
            .into_iter()
            .find(|n| w.contains(n))
            .unwrap_or("query_tokens");
        let dims = BertDims {
            hidden: q.hidden_size,
            intermediate: q.intermediate_size,
            heads: q.num_attention_heads,
            encoder_hidden: q.encoder_hidden_size,
            eps: q.layer_norm_eps,
            act: q.hidden_act,
        };
        Ok(QueryTransformer {
            query_tokens: w
                .get_as(
                    queries,
                    &[1, cfg.num_query_tokens, q.hidden_size],
                    DType::F32,
                )?
                .reshape(&[cfg.num_query_tokens, q.hidden_size])?,
            qformer: QFormer::load(
                &w.pp(qformer).with_dtype(DType::F32),
                &dims,
                q.num_hidden_layers,
                q.cross_attention_frequency,
                text_input,
            )?,
            num_query_tokens: cfg.num_query_tokens,
        })
    }

    /// The Q-Former's query outputs `[num_query_tokens, hidden]` for an image's features.
    pub fn query_output(&self, image_features: &Tensor) -> Result<Tensor> {
        self.qformer.forward(
            &self.query_tokens,
            self.num_query_tokens,
            Some(image_features),
        )
    }
}

/// What every BLIP-2 retrieval head holds whole: config, ViT, queries and Q-Former.
#[derive(Debug)]
pub(crate) struct Blip2Parts {
    pub w: Arc<Weights>,
    pub cfg: Blip2Config,
    pub vision_model: VisionTransformer,
    pub queries: QueryTransformer,
}

impl Blip2Parts {
    pub fn load(ck: &Checkpoint, text_input: bool) -> Result<Blip2Parts> {
        let cfg = Blip2Config::from_value(&ck.config)?;
        Ok(Blip2Parts {
            vision_model: VisionTransformer::load_vision_model(&ck.weights, &cfg.vision)?,
            queries: QueryTransformer::load(&ck.weights, &cfg, text_input)?,
            w: ck.weights.clone(),
            cfg,
        })
    }
}

#[derive(Debug)]
pub struct Blip2 {
    cfg: Blip2Config,
    dtype: DType,
    vision_model: Option<VisionTransformer>,
    /// Queries + Q-Former, then `language_projection`.
    connector: Option<(QueryTransformer, Linear)>,
    language_model: Option<LanguageModel>,
}

/// OPT (a decoder), or T5 (an encoder-decoder: the visual tokens and the prompt go
/// through its encoder once, its decoder starts from `decoder_start_token_id`).
#[derive(Debug)]
enum LanguageModel {
    Opt(Opt),
    T5(T5),
}

impl Blip2 {
    /// Every part of `dir`; `dtype` overrides the checkpoint's.
    pub fn load(dir: &Path, dtype: Option<DType>) -> Result<Blip2> {
        Blip2::from_checkpoint(&Checkpoint::open(dir, dtype)?, Parts::ALL)
    }

    /// The `parts` of an opened checkpoint; each reads only its own tensors.
    pub fn from_checkpoint(ck: &Checkpoint, parts: Parts) -> Result<Blip2> {
        Blip2::from_checkpoint_tp(ck, parts, iris_comm::single())
    }

    /// [`Blip2::from_checkpoint`] with the language model's shard of rank `comm`.
    pub fn from_checkpoint_tp(
        ck: &Checkpoint,
        parts: Parts,
        comm: std::sync::Arc<dyn iris_comm::Communicator>,
    ) -> Result<Blip2> {
        ck.expect(Family::Blip2)?;
        let cfg = Blip2Config::from_value(&ck.config)?;
        let w = &ck.weights;
        let vision_model = load_if(parts, Part::Vision, || {
            VisionTransformer::load_vision_model(w, &cfg.vision)
        })?;
        let connector = load_if(parts, Part::Connector, || {
            let proj = w.find_prefix(
                &["language_projection", "model.language_projection"],
                "weight",
            )?;
            let (qh, th) = (cfg.qformer.hidden_size, cfg.text.hidden_size());
            Ok((
                QueryTransformer::load(w, &cfg, false)?,
                Linear::load(&w.pp(proj), qh, th, true)?,
            ))
        })?;
        let language_model = load_if(parts, Part::Language, || match &cfg.text {
            Blip2Text::Opt(text) => {
                let lm = w.find_prefix(
                    &[
                        "language_model.model.decoder",
                        "model.language_model.decoder",
                        "language_model.decoder",
                        "model.language_model.model.decoder",
                    ],
                    "embed_tokens.weight",
                )?;
                Ok(LanguageModel::Opt(Opt::load(
                    &w.lm(lm),
                    text,
                    comm.clone(),
                )?))
            }
            Blip2Text::T5(text) => {
                if comm.world_size() > 1 {
                    return Err(Error::Config(
                        "T5 runs on one rank (tensor parallelism covers LLaMA, OPT and IDEFICS)"
                            .into(),
                    ));
                }
                // Its biased attention reads the KV blocks on the host.
                if w.device() != iris_tensor::Device::Cpu {
                    return Err(Error::Config(format!(
                        "T5 runs on the CPU backend for now, not {}",
                        w.device()
                    )));
                }
                let lm =
                    w.find_prefix(&["language_model", "model.language_model"], "shared.weight")?;
                Ok(LanguageModel::T5(T5::load(&w.lm(lm), text)?))
            }
        })?;
        Ok(Blip2 {
            cfg,
            dtype: ck.dtype,
            vision_model,
            connector,
            language_model,
        })
    }

    pub fn config(&self) -> &Blip2Config {
        &self.cfg
    }

    /// The vision tower's `last_hidden_state` (after `post_layernorm`) for one image.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        part(&self.vision_model, Part::Vision)?.forward(pixel_values)
    }

    /// The Q-Former's query outputs `[num_query_tokens, qformer_hidden]`.
    pub fn query_output(&self, image_features: &Tensor) -> Result<Tensor> {
        part(&self.connector, Part::Connector)?
            .0
            .query_output(image_features)
    }

    pub fn project(&self, query_output: &Tensor) -> Result<Tensor> {
        // HF casts the (f32) Q-Former output to the model dtype before projecting.
        part(&self.connector, Part::Connector)?
            .1
            .forward(&query_output.clone().round_to(self.dtype)?)
    }

    pub fn opt(&self) -> Result<&Opt> {
        match part(&self.language_model, Part::Language)? {
            LanguageModel::Opt(m) => Ok(m),
            LanguageModel::T5(_) => Err(Error::Config("this BLIP-2's language model is T5".into())),
        }
    }

    /// The T5 language model, where it is one.
    pub fn t5(&self) -> Result<&T5> {
        match part(&self.language_model, Part::Language)? {
            LanguageModel::T5(m) => Ok(m),
            LanguageModel::Opt(_) => {
                Err(Error::Config("this BLIP-2's language model is OPT".into()))
            }
        }
    }
}

impl VisionLanguageModel for Blip2 {
    fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Blip2::image_features(self, pixel_values)
    }
    fn image_features_batch(&self, pixel_values: &[&Tensor]) -> Result<Vec<Tensor>> {
        part(&self.vision_model, Part::Vision)?.forward_batch(pixel_values)
    }
    fn connect(&self, features: &Tensor, _size: ImageSize) -> Result<Tensor> {
        self.project(&self.query_output(features)?)
    }
    fn image_token_id(&self) -> u32 {
        self.cfg.image_token_id
    }
    fn image_tokens(&self) -> ImageTokens {
        ImageTokens::Fixed(self.cfg.num_query_tokens)
    }
    fn feature_shape(&self, _size: ImageSize) -> [usize; 2] {
        [
            self.cfg.vision.num_patches() + 1,
            self.cfg.vision.hidden_size,
        ]
    }
    fn visual_shape(&self, _size: ImageSize) -> [usize; 2] {
        [self.cfg.num_query_tokens, self.cfg.text.hidden_size()]
    }
    fn language_model(&self) -> Result<&dyn CausalLm> {
        Ok(match part(&self.language_model, Part::Language)? {
            LanguageModel::Opt(m) => m,
            LanguageModel::T5(m) => m,
        })
    }
    /// T5: the prompt (its image's query tokens in place) through the encoder; every
    /// decoder layer's cross-attention keys and values from its output.
    fn condition(&self, cache: &mut KvCache, input_ids: &[u32], images: &[Tensor]) -> Result<()> {
        let Some(LanguageModel::T5(t5)) = &self.language_model else {
            return Ok(());
        };
        let encoded = t5.encode(&placeholder_embeds(self, input_ids, images)?)?;
        for (i, (k, v)) in t5.cross_kv(&encoded)?.into_iter().enumerate() {
            cache.set_cross(i, k, v)?;
        }
        Ok(())
    }
    fn decoder_prompt(&self, input_ids: &[u32]) -> Vec<u32> {
        match &self.cfg.text {
            Blip2Text::T5(c) => vec![c.decoder_start_token_id],
            Blip2Text::Opt(_) => input_ids.to_vec(),
        }
    }
    fn input_embeds(&self, ids: &[u32], images: &[Tensor]) -> Result<Tensor> {
        match &self.cfg.text {
            Blip2Text::T5(_) => self.language_model()?.embed(&self.decoder_prompt(ids)),
            Blip2Text::Opt(_) => placeholder_embeds(self, ids, images),
        }
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}
