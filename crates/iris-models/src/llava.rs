//! LLaVA (Liu et al., 2023; "Improved Baselines", LLaVA-1.5): CLIP ViT → select
//! hidden state → 2-layer MLP projector → LLaMA, visual tokens replacing the image
//! placeholder ids. Follows HF's `modeling_llava.py` and loads every checkpoint layout
//! in use: the hub's (`vision_tower.vision_model.*`, `language_model.model.*`,
//! `language_model.lm_head`), the one transformers 5 writes (`vision_tower.*`), and
//! the `model.*` form (`model.vision_tower.*`, `model.language_model.*`, `lm_head`).
//!
//! LLaVA-NeXT (`modeling_llava_next.py`) is the same model with images tiled: each
//! image's tiles (the whole image downscaled, then its grid) go through the tower as one
//! batch, the projector maps every row, and the grid's rows are put back in picture
//! order, the padding's rows and columns dropped (`unpad_image`), `image_newline` after
//! each row — a token count set by the image's size.

use std::path::Path;
use std::sync::Arc;

use iris_comm::Communicator;
use iris_tensor::{DType, Tensor};

use crate::config::{AnyResLayout, ImageSize, ImageTokens, LlavaConfig, SelectStrategy};
use crate::layers::Mlp;
use crate::llama::Llama;
use crate::registry::{load_if, part, Checkpoint, Family, Part, Parts};
use crate::vit::VisionTransformer;
use crate::vlm::{CausalLm, VisionLanguageModel};
use crate::Result;

pub const ARCHITECTURE: &str = "LlavaForConditionalGeneration";
pub const NEXT_ARCHITECTURE: &str = "LlavaNextForConditionalGeneration";

#[derive(Debug, Clone)]
pub struct Llava {
    cfg: LlavaConfig,
    vision_tower: Option<VisionTransformer>,
    multi_modal_projector: Option<Mlp>,
    language_model: Option<Llama>,
    /// LLaVA-NeXT's row separator, `[1, text hidden]` (with the connector).
    image_newline: Option<Tensor>,
    tokens: ImageTokens,
    dtype: DType,
    /// Hidden-state indices of `vision_feature_layer`, made non-negative.
    feature_layers: Vec<usize>,
}

impl Llava {
    /// Loads `dir` (config.json + safetensors), every part. `dtype` overrides the
    /// checkpoint's.
    pub fn load(dir: &Path, dtype: Option<DType>, comm: Arc<dyn Communicator>) -> Result<Llava> {
        Llava::from_checkpoint(&Checkpoint::open(dir, dtype)?, Parts::ALL, comm)
    }

    /// The `parts` of an opened checkpoint; each reads only its own tensors.
    pub fn from_checkpoint(
        ck: &Checkpoint,
        parts: Parts,
        comm: Arc<dyn Communicator>,
    ) -> Result<Llava> {
        ck.expect(Family::Llava)?;
        let cfg = LlavaConfig::from_value(&ck.config)?;
        let tokens = cfg.image_tokens()?;
        let (w, dtype) = (&ck.weights, ck.dtype);
        let n_states = cfg.vision.num_hidden_layers as i64 + 1;
        let feature_layers: Vec<usize> = cfg
            .vision_feature_layers
            .iter()
            .map(|&l| {
                if l < 0 {
                    (n_states + l) as usize
                } else {
                    l as usize
                }
            })
            .collect();
        let n_layers = feature_layers.iter().copied().max().unwrap_or(0);
        let vision_in = cfg.vision.hidden_size * feature_layers.len();
        let text_d = cfg.text.hidden_size;
        let vision_tower = load_if(parts, Part::Vision, || {
            let vision = w.find_prefix(
                &[
                    "vision_tower.vision_model",
                    "vision_tower",
                    "model.vision_tower.vision_model",
                    "model.vision_tower",
                ],
                "embeddings.patch_embedding.weight",
            )?;
            VisionTransformer::load(&w.pp(vision), &cfg.vision, n_layers)
        })?;
        let multi_modal_projector = load_if(parts, Part::Connector, || {
            let projector = w.find_prefix(
                &["multi_modal_projector", "model.multi_modal_projector"],
                "linear_1.weight",
            )?;
            Mlp::load(
                &w.pp(projector),
                ("linear_1", "linear_2"),
                (vision_in, text_d, text_d),
                cfg.projector_hidden_act,
                cfg.projector_bias,
            )
        })?;
        let language_model = load_if(parts, Part::Language, || {
            let lm = w.find_prefix(
                &[
                    "language_model.model",
                    "model.language_model",
                    "language_model",
                    "model.language_model.model",
                ],
                "embed_tokens.weight",
            )?;
            let head = ["language_model.lm_head", "lm_head", "model.lm_head"]
                .into_iter()
                .find(|p| w.contains(&format!("{p}.weight")))
                .unwrap_or("lm_head");
            Llama::load(&w.lm(lm), &w.lm(head), &cfg.text, comm)
        })?;
        let image_newline = match tokens {
            ImageTokens::AnyRes(_) => load_if(parts, Part::Connector, || {
                let name = ["image_newline", "model.image_newline"]
                    .into_iter()
                    .find(|n| w.contains(n))
                    .unwrap_or("image_newline");
                w.get(name, &[text_d])?
                    .reshape(&[1, text_d])
                    .map_err(Into::into)
            })?,
            _ => None,
        };
        Ok(Llava {
            vision_tower,
            multi_modal_projector,
            language_model,
            image_newline,
            tokens,
            feature_layers,
            dtype,
            cfg,
        })
    }

    pub fn config(&self) -> &LlavaConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The language model (an error where this process did not load it).
    pub fn llama(&self) -> Result<&Llama> {
        part(&self.language_model, Part::Language)
    }

    /// The selected vision features of one image `[C, H, W]` (LLaVA-NeXT: its tiles
    /// `[tiles, C, H, W]`): `[tokens, hidden·layers]`, tile after tile.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut all = self.image_features_batch(&[pixel_values])?;
        Ok(all.pop().expect("one image"))
    }

    /// `image_features` of several images in one stacked ViT pass (every tile of every
    /// image in it).
    pub fn image_features_batch(&self, pixel_values: &[&Tensor]) -> Result<Vec<Tensor>> {
        let mut tiles = Vec::new();
        let mut counts = Vec::with_capacity(pixel_values.len());
        for pv in pixel_values {
            let before = tiles.len();
            match pv.shape() {
                [n, c, h, w] => {
                    let flat = pv.reshape(&[*n, c * h * w])?;
                    for i in 0..*n {
                        tiles.push(flat.narrow_rows(i, 1)?.reshape(&[*c, *h, *w])?);
                    }
                }
                _ => tiles.push((*pv).clone()),
            }
            counts.push(tiles.len() - before);
        }
        let per_tile: Vec<Tensor> = part(&self.vision_tower, Part::Vision)?
            .hidden_states_batch(&tiles.iter().collect::<Vec<_>>(), &self.feature_layers)?
            .into_iter()
            .map(|states| self.select(states))
            .collect::<Result<_>>()?;
        let mut per_tile = per_tile.into_iter();
        counts
            .into_iter()
            .map(|n| {
                let mine: Vec<Tensor> = per_tile.by_ref().take(n).collect();
                match mine.len() {
                    1 => Ok(mine.into_iter().next().expect("one tile")),
                    _ => Ok(Tensor::cat_rows(&mine.iter().collect::<Vec<_>>())?),
                }
            })
            .collect()
    }

    /// `vision_feature_layer`'s states of one image, its CLS row dropped or not
    /// (`vision_feature_select_strategy`), several layers side by side.
    fn select(&self, states: Vec<Tensor>) -> Result<Tensor> {
        let skip = match self.cfg.select_strategy {
            SelectStrategy::Default => 1,
            SelectStrategy::Full => 0,
        };
        let rows = states[0].rows() - skip;
        let selected: Vec<Tensor> = states
            .iter()
            .map(|s| s.narrow_rows(skip, rows))
            .collect::<std::result::Result<_, _>>()?;
        if selected.len() == 1 {
            return Ok(selected.into_iter().next().expect("one state"));
        }
        // Several layers are concatenated along the feature dimension.
        Ok(Tensor::cat_cols(&selected.iter().collect::<Vec<_>>())?)
    }

    pub fn project(&self, features: &Tensor) -> Result<Tensor> {
        part(&self.multi_modal_projector, Part::Connector)?.forward(features)
    }

    /// Visual tokens of an image of `size` from its vision features: projected, and for
    /// LLaVA-NeXT packed.
    pub fn connect_sized(&self, features: &Tensor, size: ImageSize) -> Result<Tensor> {
        let projected = self.project(features)?;
        match &self.tokens {
            ImageTokens::AnyRes(g) => self.pack(&projected, &g.layout(size), g.side),
            _ => Ok(projected),
        }
    }

    /// HF's `pack_image_features`: the base tile's rows, then the grid's in picture
    /// order (tile rows of patch rows), the kept window of each, `image_newline` after
    /// every row.
    fn pack(&self, projected: &Tensor, l: &AnyResLayout, side: usize) -> Result<Tensor> {
        let newline = part(&self.image_newline, Part::Connector)?;
        let per_tile = side * side;
        let with_newline = Tensor::cat_rows(&[projected, newline])?;
        let newline_row = (l.tiles() * per_tile) as u32;
        let mut rows: Vec<u32> = (0..l.base as u32).collect();
        rows.reserve(l.tokens() - l.base);
        for y in l.rows.0..l.rows.0 + l.rows.1 {
            for x in l.cols.0..l.cols.0 + l.cols.1 {
                let tile = 1 + (y / side) * l.grid.1 + x / side;
                rows.push((tile * per_tile + (y % side) * side + x % side) as u32);
            }
            rows.push(newline_row);
        }
        Ok(with_newline.index_rows(&rows)?)
    }

    /// Visual tokens of one image of `size`, in the language model's space.
    pub fn encode_image(&self, pixel_values: &Tensor, size: ImageSize) -> Result<Tensor> {
        self.connect_sized(&self.image_features(pixel_values)?, size)
    }

    /// `[rows, width]` of the vision features of an image of `size`.
    fn features_of(&self, size: ImageSize) -> [usize; 2] {
        let tiles = match &self.tokens {
            ImageTokens::AnyRes(g) => g.layout(size).tiles(),
            _ => 1,
        };
        [
            tiles * self.cfg.tokens_per_image(),
            self.cfg.vision.hidden_size * self.feature_layers.len(),
        ]
    }
}

impl VisionLanguageModel for Llava {
    fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Llava::image_features(self, pixel_values)
    }
    fn image_features_batch(&self, pixel_values: &[&Tensor]) -> Result<Vec<Tensor>> {
        Llava::image_features_batch(self, pixel_values)
    }
    fn connect(&self, features: &Tensor, size: ImageSize) -> Result<Tensor> {
        self.connect_sized(features, size)
    }
    fn image_token_id(&self) -> u32 {
        self.cfg.image_token_id
    }
    fn image_tokens(&self) -> ImageTokens {
        self.tokens.clone()
    }
    fn feature_shape(&self, size: ImageSize) -> [usize; 2] {
        self.features_of(size)
    }
    fn visual_shape(&self, size: ImageSize) -> [usize; 2] {
        [self.tokens.count(size), self.cfg.text.hidden_size]
    }
    fn language_model(&self) -> Result<&dyn CausalLm> {
        Ok(self.llama()?)
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}
