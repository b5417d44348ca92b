//! HF `config.json` into Iris' model configs, with HF's defaults for absent keys (hub
//! configs often list only what differs from them) and both key styles: `rope_theta` /
//! `rope_scaling` beside `rope_parameters`, `torch_dtype` beside `dtype`,
//! `image_token_index` beside `image_token_id`.

use std::path::Path;

use iris_tensor::{Activation, DType};
use serde_json::Value;

use crate::error::io_err;
use crate::{Error, Result};

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Typed access to a JSON object with defaults and errors that name the key.
struct Obj<'a>(&'a Value, &'static str);

impl Obj<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::Config(format!("{}.{key} must be a non-negative integer", self.1))
            }),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::Config(format!("{}.{key} must be a number", self.1))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::Config(format!("{}.{key} must be a boolean", self.1))),
        }
    }
    fn str_or<'b>(&'b self, key: &str, default: &'b str) -> Result<&'b str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::Config(format!("{}.{key} must be a string", self.1))),
        }
    }
    fn act_or(&self, key: &str, default: &str) -> Result<Activation> {
        let name = self.str_or(key, default)?;
        Activation::from_hf(name).ok_or_else(|| {
            Error::Config(format!("{}.{key}: unsupported activation `{name}`", self.1))
        })
    }
    fn ids(&self, key: &str) -> Vec<u32> {
        token_ids(self.get(key))
    }
}

/// A token-id field that HF writes as one id or a list of ids (`eos_token_id`).
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

/// Attention heads must split the hidden size evenly.
fn check_heads(what: &str, hidden: usize, heads: usize) -> Result<()> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(Error::Config(format!(
            "{what} hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )));
    }
    Ok(())
}

/// The checkpoint's dtype (`torch_dtype` in transformers 4, `dtype` in 5).
pub fn checkpoint_dtype(cfg: &Value) -> Option<DType> {
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| cfg.get(*k).and_then(|v| v.as_str()))
        .and_then(DType::parse)
}

/// How RoPE frequencies are scaled (`rope_type` of HF's `ROPE_INIT_FUNCTIONS`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Bias on q, k, v (LLaMA's `attention_bias`, always on in Qwen2).
    pub qkv_bias: bool,
    /// Bias on o_proj (LLaMA's `attention_bias`; never in Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Parses a LLaMA-family text config (`llama`, `mistral`, `qwen2`).
    /// `tie_default` is the enclosing config's `tie_word_embeddings`, which some
    /// composite checkpoints set only at the top level.
    pub fn from_value(v: &Value, tie_default: bool) -> Result<LlamaConfig> {
        let o = Obj(v, "text_config");
        let model_type = o.str_or("model_type", "llama")?;
        let qwen2 = match model_type {
            "llama" | "mistral" => false,
            "qwen2" => true,
            other => {
                return Err(Error::UnknownArchitecture(format!(
                    "text model_type `{other}` (supported: llama, mistral, qwen2)"
                )))
            }
        };
        let hidden_size = o.usize_or("hidden_size", 4096)?;
        let num_attention_heads = o.usize_or("num_attention_heads", 32)?;
        let num_key_value_heads = o.usize_or("num_key_value_heads", num_attention_heads)?;
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(Error::Config(format!(
                "num_attention_heads ({num_attention_heads}) must be a positive multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = o.usize_or("head_dim", hidden_size / num_attention_heads)?;
        let attention_bias = o.bool_or("attention_bias", false)?;
        let rope = v
            .get("rope_parameters")
            .or_else(|| v.get("rope_scaling"))
            .filter(|r| r.is_object());
        let rope_theta = match rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(|t| t.as_f64())
        {
            Some(t) => t,
            None => o.f64_or("rope_theta", 10000.0)?,
        };
        let rope_scaling = match rope {
            None => RopeScaling::Default,
            Some(r) => {
                let r = Obj(r, "rope_parameters");
                let kind = r.str_or("rope_type", r.str_or("type", "default")?)?;
                match kind {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear {
                        factor: r.f64_or("factor", 1.0)?,
                    },
                    "llama3" => RopeScaling::Llama3 {
                        factor: r.f64_or("factor", 8.0)?,
                        low_freq_factor: r.f64_or("low_freq_factor", 1.0)?,
                        high_freq_factor: r.f64_or("high_freq_factor", 4.0)?,
                        original_max_position_embeddings: r
                            .usize_or("original_max_position_embeddings", 8192)?,
                    },
                    other => return Err(Error::Config(format!("unsupported rope_type `{other}`"))),
                }
            }
        };
        let cfg = LlamaConfig {
            vocab_size: o.usize_or("vocab_size", 32000)?,
            hidden_size,
            intermediate_size: o.usize_or("intermediate_size", 11008)?,
            num_hidden_layers: o.usize_or("num_hidden_layers", 32)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act: o.act_or("hidden_act", "silu")?,
            max_position_embeddings: o.usize_or("max_position_embeddings", 2048)?,
            rms_norm_eps: o.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            mlp_bias: o.bool_or("mlp_bias", false)?,
            tie_word_embeddings: o.bool_or("tie_word_embeddings", tie_default)?,
            bos_token_id: o.ids("bos_token_id").first().copied(),
            eos_token_ids: o.ids("eos_token_id"),
        };
        if cfg.head_dim == 0 || !cfg.head_dim.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "head_dim {} must be even and positive",
                cfg.head_dim
            )));
        }
        Ok(cfg)
    }
}

#[derive(Debug, Clone)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// A class token before the patches (CLIP, BLIP); SigLIP has none.
    pub class_token: bool,
}

impl VisionConfig {
    /// HF `CLIPVisionConfig` or `Blip2VisionConfig` (by `model_type`), with each one's
    /// defaults; with no vision config at all, LLaVA's default tower (CLIP ViT-L/14-336).
    pub fn from_value(v: Option<&Value>) -> Result<VisionConfig> {
        let empty = Value::Object(Default::default());
        let llava_default = v.is_none();
        let o = Obj(v.unwrap_or(&empty), "vision_config");
        let mt = o.str_or("model_type", "clip_vision_model")?;
        // (hidden, intermediate, layers, heads, image, patch, act, eps)
        let d = match mt {
            "clip_vision_model" if llava_default => {
                (1024, 4096, 24, 16, 336, 14, "quick_gelu", 1e-5)
            }
            "clip_vision_model" => (768, 3072, 12, 12, 224, 32, "quick_gelu", 1e-5),
            "blip_2_vision_model" => (1408, 6144, 39, 16, 224, 14, "gelu", 1e-6),
            "blip_vision_model" => (768, 3072, 12, 12, 384, 16, "gelu", 1e-5),
            "idefics_vision" => (768, 5120, 32, 16, 224, 14, "gelu", 1e-5),
            "siglip_vision_model" => (768, 3072, 12, 12, 224, 16, "gelu_pytorch_tanh", 1e-6),
            other => {
                return Err(Error::UnknownArchitecture(format!(
                "vision model_type `{other}` (supported: clip_vision_model, siglip_vision_model, blip_vision_model, blip_2_vision_model, idefics_vision)"
            )))
            }
        };
        let cfg = VisionConfig {
            // IDEFICS names the width `embed_dim`.
            hidden_size: o.usize_or("hidden_size", o.usize_or("embed_dim", d.0)?)?,
            intermediate_size: o.usize_or("intermediate_size", d.1)?,
            num_hidden_layers: o.usize_or("num_hidden_layers", d.2)?,
            num_attention_heads: o.usize_or("num_attention_heads", d.3)?,
            num_channels: o.usize_or("num_channels", 3)?,
            image_size: o.usize_or("image_size", d.4)?,
            patch_size: o.usize_or("patch_size", d.5)?,
            hidden_act: o.act_or("hidden_act", d.6)?,
            layer_norm_eps: o.f64_or("layer_norm_eps", d.7)?,
            class_token: mt != "siglip_vision_model",
        };
        if cfg.patch_size == 0 || !cfg.image_size.is_multiple_of(cfg.patch_size) {
            return Err(Error::Config(format!(
                "image_size {} is not a multiple of patch_size {}",
                cfg.image_size, cfg.patch_size
            )));
        }
        check_heads("vision", cfg.hidden_size, cfg.num_attention_heads)?;
        Ok(cfg)
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Rows of the tower's hidden states: the patches, and the class token if any.
    pub fn num_tokens(&self) -> usize {
        self.num_patches() + usize::from(self.class_token)
    }
}

/// Which hidden states LLaVA takes from the vision tower and whether it keeps CLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectStrategy {
    /// Drop the CLS token (`"default"`).
    Default,
    /// Keep every token (`"full"`).
    Full,
}

#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub vision: VisionConfig,
    pub text: LlamaConfig,
    /// Indices into the vision tower's hidden states (negative from the end); several
    /// are concatenated along the feature dimension.
    pub vision_feature_layers: Vec<i64>,
    pub select_strategy: SelectStrategy,
    pub projector_hidden_act: Activation,
    pub projector_bias: bool,
    pub image_token_id: u32,
    pub dtype: Option<DType>,
    /// LLaVA-NeXT (`LlavaNextForConditionalGeneration`): images tiled to the best of
    /// these `(height, width)` resolutions, the visual-token count set by the size.
    pub grid_pinpoints: Option<Vec<[usize; 2]>>,
}

/// The size of an image as decoded, before any preprocessing (zero where it is not
/// needed: models whose token count is fixed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ImageSize {
    pub height: usize,
    pub width: usize,
}

/// How an image's visual tokens lie in the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageTokens {
    /// None: the images enter through cross-attention.
    None,
    /// The same number for every image.
    Fixed(usize),
    /// LLaVA-NeXT's: set by the image's size.
    AnyRes(AnyResGrid),
}

impl ImageTokens {
    /// The visual tokens of an image of `size`.
    pub fn count(&self, size: ImageSize) -> usize {
        match self {
            ImageTokens::None => 0,
            ImageTokens::Fixed(n) => *n,
            ImageTokens::AnyRes(g) => g.layout(size).tokens(),
        }
    }

    /// The count where it is the same for every image.
    pub fn fixed(&self) -> Option<usize> {
        match self {
            ImageTokens::None => Some(0),
            ImageTokens::Fixed(n) => Some(*n),
            ImageTokens::AnyRes(_) => None,
        }
    }
}

/// LLaVA-NeXT's geometry: which tiles an image becomes and which of their feature rows
/// survive the unpadding (`get_anyres_image_grid_shape`, `unpad_image`,
/// `pack_image_features` in HF's `modeling_llava_next.py`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyResGrid {
    pub pinpoints: Vec<[usize; 2]>,
    /// A tile's side in pixels (the tower's image size).
    pub tile: usize,
    /// A tile's side in patches.
    pub side: usize,
    /// Visual tokens of the base tile (the whole image, downscaled).
    pub base: usize,
}

/// Where an image's tiles and surviving feature rows lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnyResLayout {
    /// Tiles of the grid, down and across (the base tile not counted).
    pub grid: (usize, usize),
    /// Feature rows kept, `start..start + len`, of the grid's `grid.0 · side`.
    pub rows: (usize, usize),
    /// Feature columns kept, likewise.
    pub cols: (usize, usize),
    pub base: usize,
}

impl AnyResLayout {
    /// Tiles through the tower: the base, then the grid's.
    pub fn tiles(&self) -> usize {
        1 + self.grid.0 * self.grid.1
    }

    /// The base tile's tokens, then each kept row of the grid and its newline.
    pub fn tokens(&self) -> usize {
        self.base + self.rows.1 * (self.cols.1 + 1)
    }
}

impl AnyResGrid {
    /// The size whose image has the most visual tokens: the largest resolution, which
    /// it fills with no padding to drop.
    pub fn largest(&self) -> ImageSize {
        let [height, width] = *self
            .pinpoints
            .iter()
            .max_by_key(|[h, w]| h * w)
            .expect("pinpoints are never empty");
        ImageSize { height, width }
    }

    pub fn layout(&self, size: ImageSize) -> AnyResLayout {
        let [bh, bw] = iris_image::select_best_resolution(size.height, size.width, &self.pinpoints);
        let grid = (bh / self.tile, bw / self.tile);
        let (ch, cw) = (grid.0 * self.side, grid.1 * self.side);
        let (h, w) = (size.height as f64, size.width as f64);
        // Python's `int(round(x, 7))`: rounding to 7 places absorbs float error first.
        let kept = |x: f64| ((x * 1e7).round() / 1e7) as usize;
        let (mut rows, mut cols) = ((0, ch), (0, cw));
        if w / h > cw as f64 / ch as f64 {
            let pad = ch.saturating_sub(kept(h * (cw as f64 / w))) / 2;
            rows = (pad, ch - 2 * pad);
        } else {
            let pad = cw.saturating_sub(kept(w * (ch as f64 / h))) / 2;
            cols = (pad, cw - 2 * pad);
        }
        AnyResLayout {
            grid,
            rows,
            cols,
            base: self.base,
        }
    }
}

impl LlavaConfig {
    pub fn from_value(v: &Value) -> Result<LlavaConfig> {
        let o = Obj(v, "config");
        let tie = o.bool_or("tie_word_embeddings", false)?;
        let empty = Value::Object(Default::default());
        let text = LlamaConfig::from_value(v.get("text_config").unwrap_or(&empty), tie)?;
        let vision = VisionConfig::from_value(v.get("vision_config"))?;
        let vision_feature_layers = match o.get("vision_feature_layer") {
            None => vec![-2],
            Some(Value::Number(n)) => vec![n
                .as_i64()
                .ok_or_else(|| Error::Config("vision_feature_layer must be an integer".into()))?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_i64().ok_or_else(|| {
                        Error::Config("vision_feature_layer must hold integers".into())
                    })
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(Error::Config(
                    "vision_feature_layer must be an integer or a list".into(),
                ))
            }
        };
        let n_states = vision.num_hidden_layers as i64 + 1;
        for &l in &vision_feature_layers {
            if l >= n_states || l < -n_states {
                return Err(Error::Config(format!(
                    "vision_feature_layer {l} is out of range for {} vision layers",
                    vision.num_hidden_layers
                )));
            }
        }
        let select_strategy = match o.str_or("vision_feature_select_strategy", "default")? {
            "default" => SelectStrategy::Default,
            "full" => SelectStrategy::Full,
            other => {
                return Err(Error::Config(format!(
                    "vision_feature_select_strategy `{other}` (expected default or full)"
                )))
            }
        };
        let image_token_id = o
            .get("image_token_id")
            .or_else(|| o.get("image_token_index"))
            .and_then(|x| x.as_u64())
            .unwrap_or(32000) as u32;
        let next = architecture(v).as_deref() == Some(crate::llava::NEXT_ARCHITECTURE)
            || o.str_or("model_type", "")? == "llava_next";
        let grid_pinpoints = next
            .then(|| iris_image::grid_pinpoints(o.get("image_grid_pinpoints")))
            .transpose()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(LlavaConfig {
            vision,
            text,
            vision_feature_layers,
            select_strategy,
            projector_hidden_act: o.act_or("projector_hidden_act", "gelu")?,
            projector_bias: o.bool_or("multimodal_projector_bias", true)?,
            image_token_id,
            dtype: checkpoint_dtype(v).or_else(|| v.get("text_config").and_then(checkpoint_dtype)),
            grid_pinpoints,
        })
    }

    /// How images lie in the prompt; LLaVA-NeXT's is checked to make a grid (each tile's
    /// tokens a square of patches: no class token kept).
    pub fn image_tokens(&self) -> Result<ImageTokens> {
        let Some(pinpoints) = &self.grid_pinpoints else {
            return Ok(ImageTokens::Fixed(self.tokens_per_image()));
        };
        let (tile, side) = (
            self.vision.image_size,
            self.vision.image_size / self.vision.patch_size.max(1),
        );
        let base = self.tokens_per_image();
        if base != side * side {
            return Err(Error::Config(format!(
                "LLaVA-NeXT needs each tile's {base} visual tokens to be its {side}x{side} patches \
                 (vision_feature_select_strategy and the tower's class token disagree)"
            )));
        }
        if let Some(p) = pinpoints
            .iter()
            .find(|p| p[0] % tile != 0 || p[1] % tile != 0)
        {
            return Err(Error::Config(format!(
                "image_grid_pinpoints {p:?} is not a grid of {tile}-pixel tiles"
            )));
        }
        Ok(ImageTokens::AnyRes(AnyResGrid {
            pinpoints: pinpoints.clone(),
            tile,
            side,
            base,
        }))
    }

    /// Visual tokens of one tile (of every image, but for LLaVA-NeXT).
    pub fn tokens_per_image(&self) -> usize {
        let n = self.vision.num_tokens();
        match self.select_strategy {
            SelectStrategy::Default => n - 1,
            SelectStrategy::Full => n,
        }
    }
}

/// HF `T5Config` (T5, T5 v1.1, FlanT5): an encoder-decoder with relative positions.
#[derive(Debug, Clone)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_decoder_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// `gated-<act>` (v1.1, FlanT5: `wi_0`, `wi_1`) or `<act>` (T5: `wi`).
    pub gated: bool,
    pub activation: Activation,
    /// The decoder's output times `d_model^-0.5` before the head (T5 v1.0, whose head
    /// is the embedding; HF's `scale_decoder_outputs`, else `tie_word_embeddings`).
    pub scale_decoder_outputs: bool,
    pub decoder_start_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    /// Positions the decoder is served for (T5 has no position table: `n_positions`).
    pub context_length: usize,
}

impl T5Config {
    pub fn from_value(v: &Value) -> Result<T5Config> {
        let o = Obj(v, "text_config");
        let proj = o.str_or("feed_forward_proj", "relu")?.to_string();
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, proj.as_str()),
            Some(_) => {
                return Err(Error::Config(format!(
                    "text_config.feed_forward_proj `{proj}` (expected `gated-<act>` or `<act>`)"
                )))
            }
        };
        // HF reads "gated-gelu" as the tanh approximation (`gelu_new`).
        let act = if proj == "gated-gelu" {
            "gelu_new"
        } else {
            act
        };
        let activation = Activation::from_hf(act).ok_or_else(|| {
            Error::Config(format!(
                "text_config.feed_forward_proj: unsupported activation `{act}`"
            ))
        })?;
        let num_layers = o.usize_or("num_layers", 6)?;
        let scale_decoder_outputs = match o.get("scale_decoder_outputs") {
            Some(Value::Bool(b)) => *b,
            _ => o.bool_or("tie_word_embeddings", true)?,
        };
        let cfg = T5Config {
            vocab_size: o.usize_or("vocab_size", 32128)?,
            d_model: o.usize_or("d_model", 512)?,
            d_kv: o.usize_or("d_kv", 64)?,
            d_ff: o.usize_or("d_ff", 2048)?,
            num_layers,
            num_decoder_layers: o.usize_or("num_decoder_layers", num_layers)?,
            num_heads: o.usize_or("num_heads", 8)?,
            relative_attention_num_buckets: o.usize_or("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: o.usize_or("relative_attention_max_distance", 128)?,
            layer_norm_epsilon: o.f64_or("layer_norm_epsilon", 1e-6)?,
            gated,
            activation,
            scale_decoder_outputs,
            decoder_start_token_id: o.usize_or("decoder_start_token_id", 0)? as u32,
            eos_token_ids: match o.ids("eos_token_id") {
                ids if ids.is_empty() => vec![1],
                ids => ids,
            },
            context_length: o.usize_or("n_positions", 512)?,
        };
        if cfg.relative_attention_num_buckets < 4 || cfg.relative_attention_max_distance < 2 {
            return Err(Error::Config(
                "text_config: T5 needs at least 4 relative-attention buckets and a max distance of 2"
                    .into(),
            ));
        }
        Ok(cfg)
    }
}

/// The language model behind BLIP-2's Q-Former.
#[derive(Debug, Clone)]
pub enum Blip2Text {
    Opt(OptConfig),
    T5(T5Config),
}

impl Blip2Text {
    pub fn hidden_size(&self) -> usize {
        match self {
            Blip2Text::Opt(c) => c.hidden_size,
            Blip2Text::T5(c) => c.d_model,
        }
    }

    pub fn eos_token_ids(&self) -> Vec<u32> {
        match self {
            Blip2Text::Opt(c) => c.eos_token_ids.clone(),
            Blip2Text::T5(c) => c.eos_token_ids.clone(),
        }
    }

    /// Positions the language model serves (prompt plus output).
    pub fn context_length(&self) -> usize {
        match self {
            Blip2Text::Opt(c) => c.max_position_embeddings,
            Blip2Text::T5(c) => c.context_length,
        }
    }
}

/// HF `OPTConfig`.
#[derive(Debug, Clone)]
pub struct OptConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub ffn_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub word_embed_proj_dim: usize,
    pub do_layer_norm_before: bool,
    /// The decoder's `final_layer_norm` (absent in post-LN checkpoints such as OPT-350m).
    pub final_layer_norm: bool,
    pub activation: Activation,
    pub enable_bias: bool,
    pub eos_token_ids: Vec<u32>,
}

impl OptConfig {
    pub fn from_value(v: &Value) -> Result<OptConfig> {
        let o = Obj(v, "text_config");
        let mt = o.str_or("model_type", "opt")?;
        if mt != "opt" {
            return Err(Error::UnknownArchitecture(format!(
                "text model_type `{mt}` (supported here: opt)"
            )));
        }
        let hidden_size = o.usize_or("hidden_size", 768)?;
        let do_layer_norm_before = o.bool_or("do_layer_norm_before", true)?;
        let cfg = OptConfig {
            vocab_size: o.usize_or("vocab_size", 50272)?,
            hidden_size,
            ffn_dim: o.usize_or("ffn_dim", 3072)?,
            num_hidden_layers: o.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: o.usize_or("num_attention_heads", 12)?,
            max_position_embeddings: o.usize_or("max_position_embeddings", 2048)?,
            word_embed_proj_dim: o.usize_or("word_embed_proj_dim", hidden_size)?,
            do_layer_norm_before,
            final_layer_norm: do_layer_norm_before
                && !o.bool_or("_remove_final_layer_norm", false)?,
            activation: o.act_or("activation_function", "relu")?,
            enable_bias: o.bool_or("enable_bias", true)?,
            eos_token_ids: o.ids("eos_token_id"),
        };
        if !o.bool_or("layer_norm_elementwise_affine", true)? {
            return Err(Error::Config(
                "OPT without elementwise-affine layer norms is not supported".into(),
            ));
        }
        check_heads("OPT", cfg.hidden_size, cfg.num_attention_heads)?;
        Ok(cfg)
    }
}

/// HF `Blip2QFormerConfig`.
#[derive(Debug, Clone)]
pub struct QFormerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub cross_attention_frequency: usize,
    pub encoder_hidden_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// Text input (retrieval): word and position embeddings and the text feed-forward.
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub use_qformer_text_input: bool,
}

impl QFormerConfig {
    pub fn from_value(v: &Value) -> Result<QFormerConfig> {
        let o = Obj(v, "qformer_config");
        let cfg = QFormerConfig {
            hidden_size: o.usize_or("hidden_size", 768)?,
            intermediate_size: o.usize_or("intermediate_size", 3072)?,
            num_hidden_layers: o.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: o.usize_or("num_attention_heads", 12)?,
            cross_attention_frequency: o.usize_or("cross_attention_frequency", 2)?,
            encoder_hidden_size: o.usize_or("encoder_hidden_size", 1408)?,
            hidden_act: o.act_or("hidden_act", "gelu")?,
            layer_norm_eps: o.f64_or("layer_norm_eps", 1e-12)?,
            vocab_size: o.usize_or("vocab_size", 30522)?,
            max_position_embeddings: o.usize_or("max_position_embeddings", 512)?,
            use_qformer_text_input: o.bool_or("use_qformer_text_input", false)?,
        };
        if cfg.cross_attention_frequency == 0 {
            return Err(Error::Config(
                "cross_attention_frequency must be positive".into(),
            ));
        }
        check_heads("Q-Former", cfg.hidden_size, cfg.num_attention_heads)?;
        Ok(cfg)
    }
}

/// HF `Blip2Config` with a decoder-only (OPT) language model.
#[derive(Debug, Clone)]
pub struct Blip2Config {
    pub vision: VisionConfig,
    pub qformer: QFormerConfig,
    pub text: Blip2Text,
    pub num_query_tokens: usize,
    pub image_token_id: u32,
    /// Width of the retrieval projections (ITC).
    pub image_text_hidden_size: usize,
    pub dtype: Option<DType>,
}

impl Blip2Config {
    pub fn from_value(v: &Value) -> Result<Blip2Config> {
        let o = Obj(v, "config");
        let empty = Value::Object(Default::default());
        let vision_value = v
            .get("vision_config")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"model_type": "blip_2_vision_model"}));
        let text = v.get("text_config").unwrap_or(&empty);
        let text = match text.get("model_type").and_then(|m| m.as_str()) {
            None | Some("opt") => Blip2Text::Opt(OptConfig::from_value(text)?),
            Some("t5") => Blip2Text::T5(T5Config::from_value(text)?),
            Some(other) => {
                return Err(Error::UnknownArchitecture(format!(
                    "BLIP-2 with a `{other}` language model (supported: opt, t5)"
                )))
            }
        };
        let image_token_id = o
            .get("image_token_id")
            .or_else(|| o.get("image_token_index"))
            .and_then(|x| x.as_u64())
            .ok_or_else(|| {
                Error::Config("BLIP-2 config has no image_token_id (image_token_index)".into())
            })? as u32;
        Ok(Blip2Config {
            vision: VisionConfig::from_value(Some(&vision_value))?,
            qformer: QFormerConfig::from_value(v.get("qformer_config").unwrap_or(&empty))?,
            text,
            num_query_tokens: o.usize_or("num_query_tokens", 32)?,
            image_token_id,
            image_text_hidden_size: o.usize_or("image_text_hidden_size", 256)?,
            dtype: checkpoint_dtype(v),
        })
    }
}

/// HF `BlipConfig` (`BlipVisionConfig` + `BlipTextConfig`).
#[derive(Debug, Clone)]
pub struct BlipConfig {
    pub vision: VisionConfig,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub encoder_hidden_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// `[DEC]`, which replaces `[CLS]` at the start of a caption.
    pub bos_token_id: u32,
    /// `[SEP]`, which ends a caption.
    pub sep_token_id: u32,
    pub image_text_hidden_size: usize,
    pub dtype: Option<DType>,
}

impl BlipConfig {
    pub fn from_value(v: &Value) -> Result<BlipConfig> {
        let empty = Value::Object(Default::default());
        let vision_value = v
            .get("vision_config")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"model_type": "blip_vision_model"}));
        let t = Obj(v.get("text_config").unwrap_or(&empty), "text_config");
        let vision = VisionConfig::from_value(Some(&vision_value))?;
        let cfg = BlipConfig {
            vocab_size: t.usize_or("vocab_size", 30524)?,
            hidden_size: t.usize_or("hidden_size", 768)?,
            intermediate_size: t.usize_or("intermediate_size", 3072)?,
            num_hidden_layers: t.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: t.usize_or("num_attention_heads", 8)?,
            encoder_hidden_size: t.usize_or("encoder_hidden_size", vision.hidden_size)?,
            max_position_embeddings: t.usize_or("max_position_embeddings", 512)?,
            hidden_act: t.act_or("hidden_act", "gelu")?,
            layer_norm_eps: t.f64_or("layer_norm_eps", 1e-12)?,
            bos_token_id: t.usize_or("bos_token_id", 30522)? as u32,
            sep_token_id: t.usize_or("sep_token_id", 102)? as u32,
            image_text_hidden_size: Obj(v, "config").usize_or("image_text_hidden_size", 256)?,
            dtype: checkpoint_dtype(v),
            vision,
        };
        check_heads("BLIP text", cfg.hidden_size, cfg.num_attention_heads)?;
        Ok(cfg)
    }
}

/// HF `IdeficsConfig`: a LLaMA with gated cross-attention every
/// `cross_layer_interval` layers, a CLIP-style vision tower and a Perceiver Resampler.
#[derive(Debug, Clone)]
pub struct IdeficsConfig {
    pub text: LlamaConfig,
    pub vision: VisionConfig,
    /// Tokens past `text.vocab_size` (`<fake_token_around_image>`, `<image>`) live in
    /// the decoupled `additional_embedding` / `additional_fc`.
    pub additional_vocab_size: usize,
    pub cross_layer_interval: usize,
    pub use_resampler: bool,
    pub resampler_n_latents: usize,
    pub resampler_depth: usize,
    pub resampler_n_heads: usize,
    pub resampler_head_dim: usize,
    /// `alpha_type`: one gate value (`float`) or one per channel (`vector`).
    pub alpha_vector: bool,
    /// Per-head norms of q and k in the gated cross-attention / the resampler.
    pub qk_layer_norms: bool,
    pub qk_layer_norms_perceiver: bool,
    pub dtype: Option<DType>,
}

impl IdeficsConfig {
    pub fn from_value(v: &Value) -> Result<IdeficsConfig> {
        let o = Obj(v, "config");
        let mut text_value = v.clone();
        text_value["model_type"] = Value::from("llama");
        let text = LlamaConfig::from_value(&text_value, false)?;
        let mut vision_value = v
            .get("vision_config")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        vision_value["model_type"] = Value::from("idefics_vision");
        let empty = Value::Object(Default::default());
        let p = Obj(
            v.get("perceiver_config").unwrap_or(&empty),
            "perceiver_config",
        );
        let alpha_vector = match o.str_or("alpha_type", "float")? {
            "float" => false,
            "vector" => true,
            other => return Err(Error::Config(format!("unknown alpha_type `{other}`"))),
        };
        let cfg = IdeficsConfig {
            additional_vocab_size: o.usize_or("additional_vocab_size", 0)?,
            cross_layer_interval: o.usize_or("cross_layer_interval", 1)?,
            use_resampler: o.bool_or("use_resampler", false)?
                || p.bool_or("use_resampler", false)?,
            resampler_n_latents: p.usize_or("resampler_n_latents", 64)?,
            resampler_depth: p.usize_or("resampler_depth", 6)?,
            resampler_n_heads: p.usize_or("resampler_n_heads", 16)?,
            resampler_head_dim: p.usize_or("resampler_head_dim", 96)?,
            alpha_vector,
            qk_layer_norms: o.bool_or("qk_layer_norms", false)?,
            qk_layer_norms_perceiver: p.bool_or("qk_layer_norms_perceiver", false)?,
            dtype: checkpoint_dtype(v),
            vision: VisionConfig::from_value(Some(&vision_value))?,
            text,
        };
        if cfg.cross_layer_interval == 0 {
            return Err(Error::Config(
                "cross_layer_interval must be positive".into(),
            ));
        }
        Ok(cfg)
    }
}

/// The architecture a checkpoint declares (`architectures[0]`, else `model_type`).
pub fn architecture(cfg: &Value) -> Option<String> {
    cfg.get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .or_else(|| cfg.get("model_type").and_then(|m| m.as_str()))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_rope_key_styles_and_hf_defaults() {
        let old = LlamaConfig::from_value(
            &json!({"rope_theta": 500000.0, "num_key_value_heads": 8}),
            false,
        )
        .unwrap();
        let new = LlamaConfig::from_value(
            &json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "num_key_value_heads": 8}),
            false,
        )
        .unwrap();
        assert_eq!(old.rope_theta, 500000.0);
        assert_eq!(new.rope_theta, 500000.0);
        assert_eq!(new.hidden_size, 4096);
        assert_eq!(new.head_dim, 128);
        let l3 = LlamaConfig::from_value(
            &json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}),
            false,
        )
        .unwrap();
        assert!(matches!(l3.rope_scaling, RopeScaling::Llama3 { .. }));
        assert!(
            LlamaConfig::from_value(&json!({"rope_scaling": {"rope_type": "yarn"}}), false)
                .is_err()
        );
        assert!(LlamaConfig::from_value(
            &json!({"num_attention_heads": 6, "num_key_value_heads": 4}),
            false
        )
        .is_err());
        let qwen = LlamaConfig::from_value(&json!({"model_type": "qwen2"}), false).unwrap();
        assert!(qwen.qkv_bias && !qwen.o_bias);
    }

    #[test]
    fn llava_hub_config_with_defaults() {
        // The shape of llava-hf/llava-1.5-7b-hf's config.json.
        let v = json!({
            "architectures": ["LlavaForConditionalGeneration"],
            "image_token_index": 32000,
            "model_type": "llava",
            "text_config": {"max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                            "torch_dtype": "float16", "vocab_size": 32064},
            "torch_dtype": "float16",
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                              "model_type": "clip_vision_model", "num_attention_heads": 16,
                              "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}
        });
        let c = LlavaConfig::from_value(&v).unwrap();
        assert_eq!(c.tokens_per_image(), 576);
        assert_eq!(c.text.num_hidden_layers, 32);
        assert_eq!(c.dtype, Some(DType::F16));
        assert_eq!(c.image_token_id, 32000);
        assert_eq!(c.vision_feature_layers, vec![-2]);
        assert!(LlavaConfig::from_value(&json!({"vision_feature_layer": 40})).is_err());
    }
}
