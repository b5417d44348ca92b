//! The CLIP vision transformer (Radford et al., 2021), as HF's `modeling_clip.py`
//! `CLIPVisionTransformer`: patch embedding + class token + learned positions,
//! `pre_layrnorm`, pre-LN encoder layers. Returns hidden states by index, the way LLaVA
//! selects `vision_feature_layer`.

use iris_tensor::{DType, Tensor};

use crate::config::ClipVisionConfig;
use crate::layers::{sdpa, AttnShape, LayerNorm, Linear, Mlp};
use crate::weights::Vb;
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    shape: AttnShape,
    dtype: DType,
}

impl ClipAttention {
    fn load(vb: &Vb, cfg: &ClipVisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(ClipAttention {
            q_proj: Linear::load(&vb.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&vb.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&vb.pp("out_proj"), d, d, true)?,
            shape: AttnShape {
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_attention_heads,
                head_dim: d / cfg.num_attention_heads,
            },
            dtype: vb.dtype(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let o = sdpa(q.as_f32()?, k.as_f32()?, v.as_f32()?, self.shape, None);
        let o = Tensor::from_f32(o, x.shape())?.round_to(self.dtype);
        self.out_proj.forward(&o)
    }
}

#[derive(Debug, Clone)]
struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
    dtype: DType,
}

impl ClipLayer {
    fn load(vb: &Vb, cfg: &ClipVisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(ClipLayer {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            self_attn: ClipAttention::load(&vb.pp("self_attn"), cfg)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
            mlp: Mlp::load(
                &vb.pp("mlp"),
                ("fc1", "fc2"),
                (d, cfg.intermediate_size, d),
                cfg.hidden_act,
                true,
            )?,
            dtype: vb.dtype(),
        })
    }

    fn forward(&self, x: Tensor) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.layer_norm1.forward(&x)?)?;
        let x = x.add_elem(&h)?.round_to(self.dtype);
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        Ok(x.add_elem(&h)?.round_to(self.dtype))
    }
}

#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    cfg: ClipVisionConfig,
    dtype: DType,
}

impl ClipVisionTransformer {
    /// Loads the embeddings and the first `n_layers` encoder layers (LLaVA never needs
    /// the layers after its `vision_feature_layer`).
    pub fn load(vb: &Vb, cfg: &ClipVisionConfig, n_layers: usize) -> Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let patch_embedding = emb
            .get("patch_embedding.weight", &[d, c, p, p])?
            .reshape(&[d, c * p * p])?;
        let layers = (0..n_layers)
            .map(|i| ClipLayer::load(&vb.pp("encoder.layers").pp(i), cfg))
            .collect::<Result<_>>()?;
        Ok(ClipVisionTransformer {
            patch_embedding,
            class_embedding: emb.get("class_embedding", &[d])?,
            position_embedding: emb
                .get("position_embedding.weight", &[cfg.num_patches() + 1, d])?,
            pre_layrnorm: LayerNorm::load(&vb.pp("pre_layrnorm"), d, cfg.layer_norm_eps)?,
            layers,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Patch embedding as a matrix product: each patch flattened in the conv weight's
    /// (channel, row, column) order.
    fn embeddings(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (c, s, p) = (
            self.cfg.num_channels,
            self.cfg.image_size,
            self.cfg.patch_size,
        );
        if pixel_values.shape() != [c, s, s] {
            return Err(Error::Input(format!(
                "pixel values of shape {:?}, the vision tower takes [{c}, {s}, {s}]",
                pixel_values.shape()
            )));
        }
        let px = pixel_values.clone().round_to(self.dtype);
        let px = px.as_f32()?;
        let g = s / p;
        let mut cols = Vec::with_capacity(g * g * c * p * p);
        for gy in 0..g {
            for gx in 0..g {
                for ch in 0..c {
                    for ky in 0..p {
                        let row = ch * s * s + (gy * p + ky) * s + gx * p;
                        cols.extend_from_slice(&px[row..row + p]);
                    }
                }
            }
        }
        let patches = Tensor::from_f32(cols, &[g * g, c * p * p])?;
        let patch_embeds =
            iris_tensor::linear(&patches, &self.patch_embedding, None)?.round_to(self.dtype);
        let cls = self
            .class_embedding
            .to_dtype(DType::F32)
            .reshape(&[1, self.cfg.hidden_size])?;
        let x = Tensor::cat_rows(&[&cls, &patch_embeds])?;
        Ok(x.add_elem(&self.position_embedding)?.round_to(self.dtype))
    }

    /// Hidden states `indices` (0 = embeddings after `pre_layrnorm`, i = after layer i)
    /// of one image `[C, H, W]`, each `[1 + patches, hidden]`.
    pub fn hidden_states(&self, pixel_values: &Tensor, indices: &[usize]) -> Result<Vec<Tensor>> {
        let last = indices.iter().copied().max().unwrap_or(0);
        if last > self.layers.len() {
            return Err(Error::Input(format!(
                "hidden state {last} requested, {} layers loaded",
                self.layers.len()
            )));
        }
        let mut x = self.pre_layrnorm.forward(&self.embeddings(pixel_values)?)?;
        let mut states = vec![None; last + 1];
        states[0] = Some(x.clone());
        for (i, layer) in self.layers[..last].iter().enumerate() {
            x = layer.forward(x)?;
            states[i + 1] = Some(x.clone());
        }
        Ok(indices
            .iter()
            .map(|&i| {
                states[i]
                    .clone()
                    .expect("state computed for every index ≤ last")
            })
            .collect())
    }
}
