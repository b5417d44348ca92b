//! BLIP-2 (Li et al., 2023) with an OPT decoder, as HF's `modeling_blip_2.py`
//! `Blip2ForConditionalGeneration`: BLIP ViT → Q-Former (learned queries
//! cross-attending to the image) → `language_projection` → visual tokens that fill the
//! image placeholders the processor puts before the text.

use std::path::Path;
use std::sync::Arc;

use iris_tensor::{DType, Tensor};

use crate::bert::{BertDims, QFormer};
use crate::config::{read_model_config, Blip2Config};
use crate::layers::Linear;
use crate::llava::find_prefix;
use crate::opt::Opt;
use crate::vit::VisionTransformer;
use crate::vlm::{CausalLm, VisionLanguageModel};
use crate::weights::Weights;
use crate::{Error, Result};

pub const ARCHITECTURE: &str = "Blip2ForConditionalGeneration";

#[derive(Debug)]
pub struct Blip2 {
    parts: Blip2Parts,
    language_projection: Linear,
    language_model: Opt,
}

/// The parts every BLIP-2 head shares: the checkpoint, its config, the ViT, the learned
/// queries and the Q-Former (kept in f32, as HF's `_keep_in_fp32_modules`).
#[derive(Debug)]
pub(crate) struct Blip2Parts {
    pub w: Arc<Weights>,
    pub cfg: Blip2Config,
    pub dtype: DType,
    pub vision_model: VisionTransformer,
    pub query_tokens: Tensor,
    pub qformer: QFormer,
}

impl Blip2Parts {
    pub fn load(
        dir: &Path,
        dtype: Option<DType>,
        arch: &str,
        text_input: bool,
    ) -> Result<Blip2Parts> {
        let raw = read_model_config(dir, &[arch])?;
        let cfg = Blip2Config::from_value(&raw)?;
        let dtype = dtype.or(cfg.dtype).unwrap_or(DType::F32);
        let w = Arc::new(Weights::open(dir, dtype)?);
        let qformer = find_prefix(&w, &["qformer", "model.qformer"], "layernorm.weight")?;
        let queries = ["query_tokens", "model.query_tokens"]
            .into_iter()
            .find(|n| w.contains(n))
            .unwrap_or("query_tokens");
        let q = &cfg.qformer;
        if q.encoder_hidden_size != cfg.vision.hidden_size {
            return Err(Error::Config(format!(
                "qformer encoder_hidden_size {} differs from the vision hidden size {}",
                q.encoder_hidden_size, cfg.vision.hidden_size
            )));
        }
        let dims = BertDims {
            hidden: q.hidden_size,
            intermediate: q.intermediate_size,
            heads: q.num_attention_heads,
            encoder_hidden: q.encoder_hidden_size,
            eps: q.layer_norm_eps,
            act: q.hidden_act,
        };
        Ok(Blip2Parts {
            vision_model: VisionTransformer::load_vision_model(&w, &cfg.vision)?,
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
            w,
            cfg,
            dtype,
        })
    }

    /// The Q-Former's query outputs `[num_query_tokens, hidden]` for an image's features.
    pub fn query_output(&self, image_features: &Tensor) -> Result<Tensor> {
        self.qformer.forward(
            &self.query_tokens,
            self.cfg.num_query_tokens,
            Some(image_features),
        )
    }
}

impl Blip2 {
    pub fn load(dir: &Path, dtype: Option<DType>) -> Result<Blip2> {
        let p = Blip2Parts::load(dir, dtype, ARCHITECTURE, false)?;
        let proj = find_prefix(
            &p.w,
            &["language_projection", "model.language_projection"],
            "weight",
        )?;
        let lm = find_prefix(
            &p.w,
            &[
                "language_model.model.decoder",
                "model.language_model.decoder",
                "language_model.decoder",
                "model.language_model.model.decoder",
            ],
            "embed_tokens.weight",
        )?;
        let (qh, th) = (p.cfg.qformer.hidden_size, p.cfg.text.hidden_size);
        Ok(Blip2 {
            language_projection: Linear::load(&p.w.pp(proj), qh, th, true)?,
            language_model: Opt::load(&p.w.pp(lm), &p.cfg.text)?,
            parts: p,
        })
    }

    pub fn config(&self) -> &Blip2Config {
        &self.parts.cfg
    }

    /// The vision tower's `last_hidden_state` (after `post_layernorm`) for one image.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.parts.vision_model.forward(pixel_values)
    }

    /// The Q-Former's query outputs `[num_query_tokens, qformer_hidden]`.
    pub fn query_output(&self, image_features: &Tensor) -> Result<Tensor> {
        self.parts.query_output(image_features)
    }

    pub fn project(&self, query_output: &Tensor) -> Result<Tensor> {
        // HF casts the (f32) Q-Former output to the model dtype before projecting.
        self.language_projection
            .forward(&query_output.clone().round_to(self.parts.dtype))
    }

    pub fn opt(&self) -> &Opt {
        &self.language_model
    }
}

impl VisionLanguageModel for Blip2 {
    fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Blip2::image_features(self, pixel_values)
    }
    fn connect(&self, features: &Tensor) -> Result<Tensor> {
        self.project(&self.query_output(features)?)
    }
    fn image_token_id(&self) -> u32 {
        self.parts.cfg.image_token_id
    }
    fn tokens_per_image(&self) -> usize {
        self.parts.cfg.num_query_tokens
    }
    fn language_model(&self) -> &dyn CausalLm {
        &self.language_model
    }
    fn dtype(&self) -> DType {
        self.parts.dtype
    }
}
