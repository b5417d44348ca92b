//! IDEFICS (Laurençon et al., 2023), the open reproduction of Flamingo (Alayrac et al.,
//! 2022), as HF's `modeling_idefics.py` `IdeficsForVisionText2Text`: a CLIP-style ViT
//! (`vit.rs`) → Perceiver Resampler → a LLaMA (`llama.rs` layers) with a gated
//! cross-attention layer before every `cross_layer_interval`-th layer. Each text token
//! reads only the latest image before it (none before the first); the gates are
//! `tanh(alpha)`. The image K/V of every gated layer are computed once per sequence and
//! kept in the `KvCache` beside the self-attention K/V, so a decode step attends to one
//! image's latents whatever the number of images.

use std::path::Path;
use std::sync::Arc;

use iris_tensor::{DType, Tensor};

use crate::config::{read_json, IdeficsConfig, ImageSize, ImageTokens};
use crate::layers::{
    attention_cross, AttnShape, ColumnParallelLinear, GatedMlp, KvCache, Linear, RmsNorm,
    RotaryEmbedding, RowParallelLinear, VocabParallelEmbedding,
};
use crate::llama::LlamaLayer;
use crate::perceiver::{PerceiverDims, PerceiverResampler};
use crate::registry::{load_if, part, Checkpoint, Family, Part, Parts};
use crate::vit::VisionTransformer;
use crate::vlm::{CausalLm, VisionLanguageModel};
use crate::weights::Vb;
use crate::{Error, Result};

pub const ARCHITECTURE: &str = "IdeficsForVisionText2Text";

/// `tanh(alpha)`, one value or one per channel, as f32.
fn gate(vb: &Vb, name: &str, hidden: usize, vector: bool) -> Result<Tensor> {
    let shape: &[usize] = if vector { &[1, 1, hidden] } else { &[1] };
    let g = vb.get(name, shape)?.to_dtype(DType::F32)?;
    Ok(g.reshape(&[g.elem_count()])?.tanh()?)
}

#[derive(Debug, Clone)]
struct GatedCrossAttention {
    input_layernorm: RmsNorm,
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
    alpha_cross_attn: Tensor,
    alpha_dense: Tensor,
    /// RMSNorms over each head of q and k (`qk_layer_norms`, IDEFICS-80B).
    qk_norms: Option<(RmsNorm, RmsNorm)>,
    shape: AttnShape,
}

/// A per-head norm over `x` (`[t, heads·head_dim]`).
fn per_head(norm: &RmsNorm, x: Tensor, head_dim: usize) -> Result<Tensor> {
    let shape = x.shape().to_vec();
    let rows = x.elem_count() / head_dim;
    Ok(norm
        .forward(&x.reshape(&[rows, head_dim])?)?
        .reshape(&shape)?)
}

impl GatedCrossAttention {
    fn load(vb: &Vb, cfg: &IdeficsConfig, comm: &Arc<dyn iris_comm::Communicator>) -> Result<Self> {
        let t = &cfg.text;
        let (d, vd, ws) = (t.hidden_size, cfg.vision.hidden_size, comm.world_size());
        let a = vb.pp("cross_attn");
        let nh = t.num_attention_heads;
        if !nh.is_multiple_of(ws) {
            return Err(Error::Config(format!(
                "{}: {nh} attention heads do not split over {ws} ranks",
                a.pp("q_proj").path_of("weight")
            )));
        }
        let c = comm.as_ref();
        Ok(GatedCrossAttention {
            input_layernorm: RmsNorm::load(&vb.pp("input_layernorm"), d, t.rms_norm_eps)?,
            q_proj: ColumnParallelLinear::load(&a.pp("q_proj"), d, d, false, c)?,
            k_proj: ColumnParallelLinear::load(&a.pp("k_proj"), vd, d, false, c)?,
            v_proj: ColumnParallelLinear::load(&a.pp("v_proj"), vd, d, false, c)?,
            o_proj: RowParallelLinear::load(&a.pp("o_proj"), d, d, false, comm.clone())?,
            post_attention_layernorm: RmsNorm::load(
                &vb.pp("post_attention_layernorm"),
                d,
                t.rms_norm_eps,
            )?,
            mlp: GatedMlp::load(
                &vb.pp("mlp"),
                d,
                t.intermediate_size,
                t.hidden_act,
                false,
                comm,
            )?,
            qk_norms: if cfg.qk_layer_norms {
                let hd = d / t.num_attention_heads;
                Some((
                    RmsNorm::load(&a.pp("q_layer_norm"), hd, t.rms_norm_eps)?,
                    RmsNorm::load(&a.pp("k_layer_norm"), hd, t.rms_norm_eps)?,
                ))
            } else {
                None
            },
            alpha_cross_attn: gate(vb, "alpha_cross_attn", d, cfg.alpha_vector)?,
            alpha_dense: gate(vb, "alpha_dense", d, cfg.alpha_vector)?,
            shape: AttnShape {
                n_heads: nh / ws,
                n_kv_heads: nh / ws,
                head_dim: d / t.num_attention_heads,
                bf16_products_from: None,
            },
        })
    }

    /// `x` (`[t, hidden]`, positions from `start`) with the gated image read and the
    /// gated MLP; `slot` is this layer's cross K/V in the cache.
    fn forward(
        &self,
        x: Tensor,
        slot: usize,
        cache: &KvCache,
        start: usize,
        n_latents: usize,
    ) -> Result<Tensor> {
        let t = x.rows();
        // This rank's heads.
        let width = self.shape.n_heads * self.shape.head_dim;
        let mixed = if cache.has_cross(slot) {
            let mut q = self.q_proj.forward(&self.input_layernorm.forward(&x)?)?;
            if let Some((qn, _)) = &self.qk_norms {
                q = per_head(qn, q, self.shape.head_dim)?;
            }
            // Runs of tokens reading the same image attend together; tokens that see
            // no image get nothing (HF zeroes them after attention).
            let mut parts = Vec::new();
            let mut i = 0;
            while i < t {
                let img = cache.image_at(start + i);
                let run = (i..t)
                    .take_while(|&j| cache.image_at(start + j) == img)
                    .count();
                let q_run = q.narrow_rows(i, run)?;
                parts.push(match img {
                    Some(img) => {
                        let keys = img * n_latents..(img + 1) * n_latents;
                        attention_cross(&q_run, cache, slot, Some(keys), self.shape)?
                            .ok_or_else(|| Error::Input("no image keys in the cache".into()))?
                    }
                    None => Tensor::zeros_on(&[run, width], x.device())?,
                });
                i += run;
            }
            Tensor::cat_rows(&parts.iter().collect::<Vec<_>>())?
        } else {
            Tensor::zeros_on(&[t, width], x.device())?
        };
        let attn = self
            .o_proj
            .forward(&mixed)?
            .mul_row(&self.alpha_cross_attn)?;
        let x = x.add_elem(&attn)?;
        // The dense half is gated by alpha only: it runs for every token.
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?
            .mul_row(&self.alpha_dense)?;
        Ok(x.add_elem(&h)?)
    }
}

/// The text model: decoupled embeddings and head, LLaMA layers, gated cross-attention.
#[derive(Debug)]
pub struct IdeficsText {
    /// This rank's rows of the vocabulary; the head's rows match.
    embed_tokens: VocabParallelEmbedding,
    additional_embedding: Option<Tensor>,
    layers: Vec<LlamaLayer>,
    gated: Vec<GatedCrossAttention>,
    norm: RmsNorm,
    lm_head: Linear,
    additional_fc: Option<Linear>,
    rope: RotaryEmbedding,
    interval: usize,
    n_latents: usize,
    vocab_size: usize,
    /// Width of one token's self-attention K (or V) in the cache.
    kv_width: usize,
}

impl CausalLm for IdeficsText {
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    fn kv_width(&self) -> usize {
        self.kv_width
    }

    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        // Ids past the vocabulary read the additional embedding (IDEFICS' decoupled
        // `<image>` and `<fake_token_around_image>`).
        let extra_rows = self.additional_embedding.as_ref().map_or(0, |e| e.rows());
        if let Some(&bad) = ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size + extra_rows)
        {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let main: Vec<u32> = ids
            .iter()
            .map(|&id| {
                if (id as usize) < self.vocab_size {
                    id
                } else {
                    0
                }
            })
            .collect();
        let x = self.embed_tokens.embed(&main)?;
        let (at, extra_ids): (Vec<usize>, Vec<u32>) = ids
            .iter()
            .enumerate()
            .filter_map(|(i, &id)| Some((i, (id as usize).checked_sub(self.vocab_size)? as u32)))
            .unzip();
        match &self.additional_embedding {
            Some(extra) if !at.is_empty() => {
                Ok(x.scatter_rows(&at, &extra.index_rows(&extra_ids)?)?)
            }
            _ => Ok(x),
        }
    }

    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let start = cache.len();
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let step = (|| -> Result<Tensor> {
                let mut y = x.clone();
                if i % self.interval == 0 {
                    y = self.gated[i / self.interval].forward(
                        y,
                        i / self.interval,
                        cache,
                        start,
                        self.n_latents,
                    )?;
                }
                layer.forward(y, &self.rope, i, cache)
            })();
            match step {
                Ok(y) => x = y,
                Err(e) => {
                    cache.rollback(self.kv_width);
                    return Err(e);
                }
            }
        }
        cache.advance(embeds.rows());
        self.norm.forward(&x)
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let main = self
            .embed_tokens
            .gather_logits(self.lm_head.forward(hidden)?)?;
        let Some(fc) = &self.additional_fc else {
            return Ok(main);
        };
        let extra = fc.forward(hidden)?;
        Ok(Tensor::cat_cols(&[&main, &extra])?)
    }
}

#[derive(Debug)]
pub struct Idefics {
    cfg: IdeficsConfig,
    vision_model: Option<VisionTransformer>,
    /// The connector: the resampler, or `None` inside when the model uses none (the
    /// features pass through).
    perceiver: Option<Option<PerceiverResampler>>,
    text: Option<IdeficsText>,
    image_token_id: u32,
    eos_token_ids: Vec<u32>,
    dtype: DType,
}

/// The id of `token` among a `tokenizer.json`'s added tokens.
fn added_token_id(dir: &Path, token: &str) -> Result<u32> {
    let t = read_json(&dir.join("tokenizer.json"))?;
    t["added_tokens"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["content"] == token))
        .and_then(|x| x["id"].as_u64())
        .map(|id| id as u32)
        .ok_or_else(|| Error::Config(format!("tokenizer.json has no `{token}` token")))
}

impl Idefics {
    /// Every part of `dir`; `dtype` overrides the checkpoint's.
    pub fn load(dir: &Path, dtype: Option<DType>) -> Result<Idefics> {
        Idefics::from_checkpoint(&Checkpoint::open(dir, dtype)?, dir, Parts::ALL)
    }

    /// The `parts` of an opened checkpoint (`dir` for the tokenizer's `<image>` id).
    pub fn from_checkpoint(ck: &Checkpoint, dir: &Path, parts: Parts) -> Result<Idefics> {
        Idefics::from_checkpoint_tp(ck, dir, parts, iris_comm::single())
    }

    /// [`Idefics::from_checkpoint`] with the text model's shard of rank `comm` (its
    /// LLaMA layers and gated cross-attention split; the few added tokens' embedding
    /// and head replicated).
    pub fn from_checkpoint_tp(
        ck: &Checkpoint,
        dir: &Path,
        parts: Parts,
        comm: Arc<dyn iris_comm::Communicator>,
    ) -> Result<Idefics> {
        ck.expect(Family::Idefics)?;
        let cfg = IdeficsConfig::from_value(&ck.config)?;
        let (w, dtype) = (&ck.weights, ck.dtype);
        let m = w.pp("model");
        let n_latents = if cfg.use_resampler {
            cfg.resampler_n_latents
        } else {
            cfg.vision.num_patches() + 1
        };
        let text = load_if(parts, Part::Language, || {
            let t = &cfg.text;
            let (d, a) = (t.hidden_size, cfg.additional_vocab_size);
            let extra = |vb: Vb, name: &str| -> Result<Option<Tensor>> {
                if a == 0 {
                    return Ok(None);
                }
                Ok(Some(vb.get(name, &[a, d])?))
            };
            let layers = (0..t.num_hidden_layers)
                .map(|i| LlamaLayer::load(&w.lm("model.layers").pp(i), t, &comm))
                .collect::<Result<Vec<_>>>()?;
            let gated = (0..t.num_hidden_layers.div_ceil(cfg.cross_layer_interval))
                .map(|i| {
                    GatedCrossAttention::load(
                        &w.lm("model.gated_cross_attn_layers").pp(i),
                        &cfg,
                        &comm,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let embed_tokens = VocabParallelEmbedding::load(
                &m,
                "embed_tokens.weight",
                t.vocab_size,
                d,
                comm.clone(),
            )?;
            let lm_head = Linear::new(
                w.pp("lm_head")
                    .get_rows("weight", &[t.vocab_size, d], embed_tokens.rows())?,
                None,
                dtype,
            )?;
            let kv_width = layers.first().map_or(0, |l| l.kv_width());
            Ok(IdeficsText {
                embed_tokens,
                additional_embedding: extra(m.pp("embed_tokens"), "additional_embedding.weight")?,
                layers,
                gated,
                norm: RmsNorm::load(&m.pp("norm"), d, t.rms_norm_eps)?,
                lm_head,
                additional_fc: extra(w.pp("lm_head"), "additional_fc.weight")?
                    .map(|w| Linear::new(w, None, dtype))
                    .transpose()?,
                rope: RotaryEmbedding::new(t, dtype),
                interval: cfg.cross_layer_interval,
                n_latents,
                vocab_size: t.vocab_size,
                kv_width,
            })
        })?;
        let perceiver = load_if(parts, Part::Connector, || {
            if !cfg.use_resampler {
                return Ok(None);
            }
            Ok(Some(PerceiverResampler::load(
                &m.pp("perceiver_resampler"),
                PerceiverDims {
                    embed_dim: cfg.vision.hidden_size,
                    depth: cfg.resampler_depth,
                    n_heads: cfg.resampler_n_heads,
                    head_dim: cfg.resampler_head_dim,
                    n_latents,
                    qk_layer_norms: cfg.qk_layer_norms_perceiver,
                },
            )?))
        })?;
        let vision_model = load_if(parts, Part::Vision, || {
            VisionTransformer::load(
                &m.pp("vision_model"),
                &cfg.vision,
                cfg.vision.num_hidden_layers,
            )
        })?;
        Ok(Idefics {
            vision_model,
            perceiver,
            text,
            image_token_id: added_token_id(dir, "<image>")?,
            eos_token_ids: cfg.text.eos_token_ids.clone(),
            dtype,
            cfg,
        })
    }

    pub fn config(&self) -> &IdeficsConfig {
        &self.cfg
    }

    /// The vision tower's last hidden state (IDEFICS uses it before `post_layernorm`).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let n = self.cfg.vision.num_hidden_layers;
        Ok(part(&self.vision_model, Part::Vision)?
            .hidden_states(pixel_values, &[n])?
            .remove(0))
    }

    pub fn resample(&self, features: &Tensor) -> Result<Tensor> {
        match part(&self.perceiver, Part::Connector)? {
            Some(p) => p.forward(features),
            None => Ok(features.clone()),
        }
    }

    /// For each prompt token, the image its cross-attention reads, as HF's
    /// `image_attention_mask_for_packed_input_ids`: the latest image token at or before
    /// it, none before the first image or after an end-of-sequence token.
    pub fn image_of(&self, ids: &[u32]) -> Vec<Option<usize>> {
        let mut count: Option<usize> = None;
        let mut seen_eod = false;
        ids.iter()
            .map(|&id| {
                if id == self.image_token_id {
                    count = Some(count.map_or(0, |c| c + 1));
                    seen_eod = false;
                }
                let out = if seen_eod { None } else { count };
                if self.eos_token_ids.contains(&id) {
                    seen_eod = true;
                }
                out
            })
            .collect()
    }
}

impl VisionLanguageModel for Idefics {
    /// The resampled latents `[n_latents, vision_hidden]` of one image.
    fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Idefics::image_features(self, pixel_values)
    }
    fn image_features_batch(&self, pixel_values: &[&Tensor]) -> Result<Vec<Tensor>> {
        let n = self.cfg.vision.num_hidden_layers;
        part(&self.vision_model, Part::Vision)?
            .hidden_states_batch(pixel_values, &[n])?
            .into_iter()
            .map(|mut s| Ok(s.remove(0)))
            .collect()
    }
    fn connect(&self, features: &Tensor, _size: ImageSize) -> Result<Tensor> {
        self.resample(features)
    }
    fn image_token_id(&self) -> u32 {
        self.image_token_id
    }
    /// No placeholders to fill: images enter through gated cross-attention.
    fn image_tokens(&self) -> ImageTokens {
        ImageTokens::None
    }
    fn feature_shape(&self, _size: ImageSize) -> [usize; 2] {
        [
            self.cfg.vision.num_patches() + 1,
            self.cfg.vision.hidden_size,
        ]
    }
    /// The resampler's latents (or the features themselves without one).
    fn visual_shape(&self, _size: ImageSize) -> [usize; 2] {
        let rows = match self.cfg.use_resampler {
            true => self.cfg.resampler_n_latents,
            false => self.cfg.vision.num_patches() + 1,
        };
        [rows, self.cfg.vision.hidden_size]
    }
    fn language_model(&self) -> Result<&dyn CausalLm> {
        Ok(part(&self.text, Part::Language)?)
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn condition(&self, cache: &mut KvCache, input_ids: &[u32], images: &[Tensor]) -> Result<()> {
        let markers = input_ids
            .iter()
            .filter(|&&i| i == self.image_token_id)
            .count();
        if markers != images.len() {
            return Err(Error::Input(format!(
                "the prompt has {markers} image tokens but {} image(s) were given",
                images.len()
            )));
        }
        cache.set_image_of(self.image_of(input_ids));
        if images.is_empty() {
            return Ok(());
        }
        let all = Tensor::cat_rows(&images.iter().collect::<Vec<_>>())?;
        let text = part(&self.text, Part::Language)?;
        for (slot, g) in text.gated.iter().enumerate() {
            let mut k = g.k_proj.forward(&all)?;
            if let Some((_, kn)) = &g.qk_norms {
                k = per_head(kn, k, g.shape.head_dim)?;
            }
            let v = g.v_proj.forward(&all)?;
            cache.set_cross(slot, k, v)?;
        }
        Ok(())
    }
}
