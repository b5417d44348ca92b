//! The vision transformer of CLIP (Radford et al., 2021; HF `modeling_clip.py`
//! `CLIPVisionTransformer`) and of BLIP / BLIP-2 (Li et al., 2022/2023; HF
//! `modeling_blip_2.py` `Blip2VisionModel`): the same pre-LN encoder layer, written once.
//! What differs is read from the checkpoint: CLIP has separate `q/k/v_proj` +
//! `out_proj`, a `pre_layrnorm` and no patch bias; BLIP has a fused `qkv` (bias from
//! `qkv.bias`, or `q_bias`/`v_bias` with a zero key bias) + `projection`, a patch bias
//! and a `post_layernorm` on its output.

use iris_tensor::{DType, Tensor};

use crate::config::VisionConfig;
use crate::layers::{attention_blocks, AttnShape, LayerNorm, Linear, Mlp};
use crate::weights::Vb;
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct VitAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    shape: AttnShape,
    dtype: DType,
}

/// Rows `i·d..(i+1)·d` of a fused `[3d, ..]` weight or `[3d]` bias, in its dtype.
fn third(t: &Tensor, i: usize, d: usize) -> Result<Tensor> {
    if t.rank() == 1 {
        return Ok(t.reshape(&[3, d])?.narrow_rows(i, 1)?.reshape(&[d])?);
    }
    Ok(t.narrow_rows(i * d, d)?)
}

impl VitAttention {
    fn load(vb: &Vb, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let dtype = vb.dtype();
        let (q, k, v, out) = if vb.contains("qkv.weight") {
            let w = vb.get("qkv.weight", &[3 * d, d])?;
            let bias = if vb.contains("qkv.bias") {
                Some(vb.get("qkv.bias", &[3 * d])?)
            } else if vb.contains("q_bias") {
                // BLIP-2's ViT has no key bias: zeros between the query's and value's.
                let (qb, vb_) = (
                    vb.get("q_bias", &[d])?.reshape(&[1, d])?,
                    vb.get("v_bias", &[d])?.reshape(&[1, d])?,
                );
                let zeros = Tensor::zeros_on(&[1, d], qb.device())?;
                let all = Tensor::cat_rows(&[&qb, &zeros, &vb_])?;
                Some(all.reshape(&[3 * d])?.to_dtype(dtype)?)
            } else {
                None
            };
            let part = |i| -> Result<Linear> {
                let b = bias.as_ref().map(|b| third(b, i, d)).transpose()?;
                Linear::new(third(&w, i, d)?, b, dtype)
            };
            let out = Linear::load(&vb.pp("projection"), d, d, true)?;
            (part(0)?, part(1)?, part(2)?, out)
        } else {
            (
                Linear::load(&vb.pp("q_proj"), d, d, true)?,
                Linear::load(&vb.pp("k_proj"), d, d, true)?,
                Linear::load(&vb.pp("v_proj"), d, d, true)?,
                Linear::load(&vb.pp("out_proj"), d, d, true)?,
            )
        };
        Ok(VitAttention {
            q,
            k,
            v,
            out,
            shape: AttnShape {
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_attention_heads,
                head_dim: d / cfg.num_attention_heads,
                bf16_products_from: (dtype == iris_tensor::DType::BF16).then_some(0),
            },
            dtype,
        })
    }

    /// `x` holds the rows of one or more images, `tokens` rows each: the projections
    /// run over all of them at once, attention within each image.
    fn forward(&self, x: &Tensor, tokens: usize) -> Result<Tensor> {
        let q = self.q.forward(x)?;
        let k = self.k.forward(x)?;
        let v = self.v.forward(x)?;
        let o = attention_blocks(&q, &k, &v, tokens, self.shape, None)?
            .reshape(x.shape())?
            .round_to(self.dtype)?;
        self.out.forward(&o)
    }
}

#[derive(Debug, Clone)]
struct VitLayer {
    layer_norm1: LayerNorm,
    self_attn: VitAttention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
    dtype: DType,
}

impl VitLayer {
    fn load(vb: &Vb, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(VitLayer {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            self_attn: VitAttention::load(&vb.pp("self_attn"), cfg)?,
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

    fn forward(&self, x: Tensor, tokens: usize) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(&x)?, tokens)?;
        let x = x.add_elem(&h)?.round_to(self.dtype)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        Ok(x.add_elem(&h)?.round_to(self.dtype)?)
    }
}

#[derive(Debug, Clone)]
pub struct VisionTransformer {
    patch_embedding: Tensor,
    patch_bias: Option<Tensor>,
    /// CLIP's and BLIP's class token (SigLIP has none).
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    pre_layrnorm: Option<LayerNorm>,
    layers: Vec<VitLayer>,
    post_layernorm: Option<LayerNorm>,
    cfg: VisionConfig,
    dtype: DType,
}

/// A tensor stored as `[d]`, `[1, d]` or `[1, 1, d]` (or `[n, d]` / `[1, n, d]`).
fn get_squeezed(vb: &Vb, names: &[&str], shape: &[usize]) -> Result<Tensor> {
    for name in names {
        for lead in 0..3 {
            let mut s = vec![1; lead];
            s.extend_from_slice(shape);
            if vb.contains(name) && vb.shape(name).as_deref() == Some(&s[..]) {
                return Ok(vb.get(name, &s)?.reshape(shape)?);
            }
        }
    }
    // Not found in any accepted form: report against the first name.
    vb.get(names[0], shape)
}

impl VisionTransformer {
    /// Loads the embeddings and the first `n_layers` encoder layers (LLaVA never needs
    /// the layers after its `vision_feature_layer`); `post_layernorm` only when all
    /// layers are loaded (BLIP's output).
    pub fn load(vb: &Vb, cfg: &VisionConfig, n_layers: usize) -> Result<Self> {
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let emb = vb.pp("embeddings");
        let patch_embedding = emb
            .get("patch_embedding.weight", &[d, c, p, p])?
            .reshape(&[d, c * p * p])?;
        let patch_bias = if emb.contains("patch_embedding.bias") {
            Some(emb.get("patch_embedding.bias", &[d])?)
        } else {
            None
        };
        let n_pos = cfg.num_tokens();
        let layers = (0..n_layers)
            .map(|i| VitLayer::load(&vb.pp("encoder.layers").pp(i), cfg))
            .collect::<Result<_>>()?;
        let eps = cfg.layer_norm_eps;
        let optional_norm = |name: &str| -> Result<Option<LayerNorm>> {
            match vb.contains(&format!("{name}.weight")) {
                true => Ok(Some(LayerNorm::load(&vb.pp(name), d, eps)?)),
                false => Ok(None),
            }
        };
        let post_layernorm = if n_layers == cfg.num_hidden_layers {
            optional_norm("post_layernorm")?
        } else {
            None
        };
        Ok(VisionTransformer {
            patch_embedding,
            patch_bias,
            class_embedding: cfg
                .class_token
                .then(|| get_squeezed(&emb, &["class_embedding"], &[d]))
                .transpose()?,
            position_embedding: get_squeezed(
                &emb,
                &["position_embedding.weight", "position_embedding"],
                &[n_pos, d],
            )?,
            pre_layrnorm: optional_norm("pre_layrnorm")?,
            layers,
            post_layernorm,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// BLIP's and BLIP-2's whole tower, under `vision_model` (or `model.vision_model`).
    pub fn load_vision_model(
        w: &std::sync::Arc<crate::weights::Weights>,
        cfg: &VisionConfig,
    ) -> Result<Self> {
        let prefix = w.find_prefix(
            &["vision_model", "model.vision_model"],
            "embeddings.patch_embedding.weight",
        )?;
        Self::load(&w.pp(prefix), cfg, cfg.num_hidden_layers)
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
        // Pixels come from the host: uploaded to the tower's device first.
        let patches = pixel_values
            .to_device(self.patch_embedding.device())?
            .round_to(self.dtype)?
            .patches(p)?;
        let patch_embeds =
            iris_tensor::linear(&patches, &self.patch_embedding, self.patch_bias.as_ref())?
                .round_to(self.dtype)?;
        let x = match &self.class_embedding {
            Some(cls) => {
                let cls = cls
                    .to_dtype(DType::F32)?
                    .reshape(&[1, self.cfg.hidden_size])?;
                Tensor::cat_rows(&[&cls, &patch_embeds])?
            }
            None => patch_embeds,
        };
        Ok(x.add_elem(&self.position_embedding)?.round_to(self.dtype)?)
    }

    /// Hidden states `indices` (0 = embeddings, after `pre_layrnorm` where the model has
    /// one; i = after layer i) of one image `[C, H, W]`, each `[tokens, hidden]` (the
    /// class token, if the tower has one, then the patches).
    pub fn hidden_states(&self, pixel_values: &Tensor, indices: &[usize]) -> Result<Vec<Tensor>> {
        let mut per_image = self.hidden_states_batch(&[pixel_values], indices)?;
        Ok(per_image.pop().expect("one image in, one out"))
    }

    /// `hidden_states` of several images in one stacked pass: every linear layer runs
    /// once over all their rows (the weights are read once for the batch), attention
    /// within each image. Each image's states equal what it gives alone.
    pub fn hidden_states_batch(
        &self,
        pixel_values: &[&Tensor],
        indices: &[usize],
    ) -> Result<Vec<Vec<Tensor>>> {
        let last = indices.iter().copied().max().unwrap_or(0);
        if last > self.layers.len() {
            return Err(Error::Input(format!(
                "hidden state {last} requested, {} layers loaded",
                self.layers.len()
            )));
        }
        if pixel_values.is_empty() {
            return Ok(Vec::new());
        }
        let tokens = self.cfg.num_tokens();
        let states = iris_tensor::on_pool(|| {
            let embeds = pixel_values
                .iter()
                .map(|pv| self.embeddings(pv))
                .collect::<Result<Vec<_>>>()?;
            let mut x = Tensor::cat_rows(&embeds.iter().collect::<Vec<_>>())?;
            if let Some(n) = &self.pre_layrnorm {
                x = n.forward(&x)?;
            }
            let mut states = vec![None; last + 1];
            states[0] = Some(x.clone());
            for (i, layer) in self.layers[..last].iter().enumerate() {
                x = layer.forward(x, tokens)?;
                states[i + 1] = Some(x.clone());
            }
            Ok::<_, Error>(states)
        })?;
        (0..pixel_values.len())
            .map(|img| {
                indices
                    .iter()
                    .map(|&i| {
                        let all = states[i]
                            .as_ref()
                            .expect("state computed for every index ≤ last");
                        Ok(all.narrow_rows(img * tokens, tokens)?)
                    })
                    .collect()
            })
            .collect()
    }

    /// The last hidden state after `post_layernorm` (BLIP's `last_hidden_state`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut out = self.forward_batch(&[pixel_values])?;
        Ok(out.pop().expect("one image in, one out"))
    }

    /// `forward` of several images in one stacked pass.
    pub fn forward_batch(&self, pixel_values: &[&Tensor]) -> Result<Vec<Tensor>> {
        self.hidden_states_batch(pixel_values, &[self.layers.len()])?
            .into_iter()
            .map(|mut states| {
                let x = states.pop().expect("one state");
                match &self.post_layernorm {
                    Some(n) => n.forward(&x),
                    None => Ok(x),
                }
            })
            .collect()
    }
}
