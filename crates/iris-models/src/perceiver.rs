//! The Perceiver Resampler (Alayrac et al., 2022, "Flamingo"; HF
//! `models/idefics/perceiver.py`): learned latents attend to `[image tokens; latents]`
//! (LayerNorms on both, no biases), then a ReLU MLP, each with a residual; a final
//! LayerNorm. Any number of image tokens in, `n_latents` out.

use iris_tensor::{Activation, DType, Tensor};

use crate::layers::{attention, AttnShape, LayerNorm, Linear};
use crate::weights::Vb;
use crate::Result;

#[derive(Debug, Clone)]
struct PerceiverBlock {
    context_layer_norm: LayerNorm,
    latents_layer_norm: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    output_proj: Linear,
    ln: LayerNorm,
    fc: Linear,
    c_proj: Linear,
    /// LayerNorms over each head of q and k (`qk_layer_norms_perceiver`).
    qk_norms: Option<(LayerNorm, LayerNorm)>,
    shape: AttnShape,
}

fn per_head(norm: &LayerNorm, x: Tensor, head_dim: usize) -> Result<Tensor> {
    let shape = x.shape().to_vec();
    let rows = x.elem_count() / head_dim;
    Ok(norm
        .forward(&x.reshape(&[rows, head_dim])?)?
        .reshape(&shape)?)
}

#[derive(Debug, Clone)]
pub struct PerceiverResampler {
    latents: Tensor,
    blocks: Vec<PerceiverBlock>,
    layer_norm: LayerNorm,
}

/// Sizes of a resampler.
#[derive(Debug, Clone, Copy)]
pub struct PerceiverDims {
    pub embed_dim: usize,
    pub depth: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    pub n_latents: usize,
    pub qk_layer_norms: bool,
}

impl PerceiverResampler {
    pub fn load(vb: &Vb, d: PerceiverDims) -> Result<Self> {
        let (e, inner) = (d.embed_dim, d.n_heads * d.head_dim);
        let eps = 1e-5; // nn.LayerNorm's default
        let blocks = (0..d.depth)
            .map(|i| {
                let a = vb.pp("blocks").pp(i).pp(0);
                let m = vb.pp("blocks").pp(i).pp(1);
                Ok(PerceiverBlock {
                    context_layer_norm: LayerNorm::load(&a.pp("context_layer_norm"), e, eps)?,
                    latents_layer_norm: LayerNorm::load(&a.pp("latents_layer_norm"), e, eps)?,
                    q_proj: Linear::load(&a.pp("q_proj"), e, inner, false)?,
                    k_proj: Linear::load(&a.pp("k_proj"), e, inner, false)?,
                    v_proj: Linear::load(&a.pp("v_proj"), e, inner, false)?,
                    output_proj: Linear::load(&a.pp("output_proj"), inner, e, false)?,
                    ln: LayerNorm::load(&m.pp("ln"), e, eps)?,
                    fc: Linear::load(&m.pp("fc"), e, 4 * e, false)?,
                    c_proj: Linear::load(&m.pp("c_proj"), 4 * e, e, false)?,
                    qk_norms: if d.qk_layer_norms {
                        Some((
                            LayerNorm::load(&a.pp("q_layer_norm"), d.head_dim, eps)?,
                            LayerNorm::load(&a.pp("k_layer_norm"), d.head_dim, eps)?,
                        ))
                    } else {
                        None
                    },
                    shape: AttnShape {
                        n_heads: d.n_heads,
                        n_kv_heads: d.n_heads,
                        head_dim: d.head_dim,
                        bf16_products_from: None,
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(PerceiverResampler {
            latents: vb.get("latents", &[d.n_latents, e])?.to_dtype(DType::F32)?,
            blocks,
            layer_norm: LayerNorm::load(&vb.pp("layer_norm"), e, eps)?,
        })
    }

    /// `[n_latents, embed_dim]` for one image's tokens `[tokens, embed_dim]`.
    pub fn forward(&self, context: &Tensor) -> Result<Tensor> {
        let mut latents = self.latents.clone();
        for b in &self.blocks {
            let ctx = b.context_layer_norm.forward(context)?;
            let lat = b.latents_layer_norm.forward(&latents)?;
            let kv_in = Tensor::cat_rows(&[&ctx, &lat])?;
            let mut q = b.q_proj.forward(&lat)?;
            let mut k = b.k_proj.forward(&kv_in)?;
            if let Some((qn, kn)) = &b.qk_norms {
                q = per_head(qn, q, b.shape.head_dim)?;
                k = per_head(kn, k, b.shape.head_dim)?;
            }
            let v = b.v_proj.forward(&kv_in)?;
            let o = attention(&q, &k, &v, b.shape, None)?;
            let attn = b.output_proj.forward(&o)?;
            latents = attn.add_elem(&latents)?;
            let h =
                b.fc.forward(&b.ln.forward(&latents)?)?
                    .activation(Activation::Relu)?;
            latents = b.c_proj.forward(&h)?.add_elem(&latents)?;
        }
        self.layer_norm.forward(&latents)
    }
}
