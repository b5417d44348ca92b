//! BERT-style post-norm layers (Devlin et al., 2019), written once for BLIP-2's
//! Q-Former (HF `modeling_blip_2.py` `Blip2QFormer*`) and BLIP's text encoder / decoder
//! (`modeling_blip_text.py`): attention whose output passes `dense → LayerNorm(· +
//! input)`, optional cross-attention to image features, and a feed-forward
//! `intermediate → output` with the same residual norm. Q-Former queries use the
//! `*_query` feed-forward; text tokens use the plain one.

use iris_tensor::{Activation, Tensor};

use crate::layers::{
    attention, attention_cached, attention_cross, AttnShape, KvCache, LayerNorm, Linear,
};
use crate::weights::Vb;
use crate::{Error, Result};

/// Sizes shared by the layers of one BERT stack.
#[derive(Debug, Clone, Copy)]
pub struct BertDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    /// Width of the features cross-attention reads (the vision hidden size).
    pub encoder_hidden: usize,
    pub eps: f64,
    pub act: Activation,
}

/// `attention.{query,key,value}` + `output.{dense,LayerNorm}`.
#[derive(Debug, Clone)]
pub struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    shape: AttnShape,
}

impl BertAttention {
    /// `vb` is the block (`…attention` or `…crossattention`); `inner` names its
    /// projections' module (`attention` in the Q-Former, `self` in BERT).
    pub fn load(vb: &Vb, inner: &str, d: &BertDims, cross: bool) -> Result<Self> {
        let kv_in = if cross { d.encoder_hidden } else { d.hidden };
        let a = vb.pp(inner);
        Ok(BertAttention {
            query: Linear::load(&a.pp("query"), d.hidden, d.hidden, true)?,
            key: Linear::load(&a.pp("key"), kv_in, d.hidden, true)?,
            value: Linear::load(&a.pp("value"), kv_in, d.hidden, true)?,
            dense: Linear::load(&vb.pp("output.dense"), d.hidden, d.hidden, true)?,
            norm: LayerNorm::load(&vb.pp("output.LayerNorm"), d.hidden, d.eps)?,
            shape: AttnShape {
                n_heads: d.heads,
                n_kv_heads: d.heads,
                head_dim: d.hidden / d.heads,
                bf16_products_from: None,
            },
        })
    }

    /// Attention of `x` over `context` (itself when `None`), then the residual norm.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (k, v) = self.context_kv(context.unwrap_or(x))?;
        let q = self.query.forward(x)?;
        self.finish(x, attention(&q, &k, &v, self.shape, None)?)
    }

    /// Keys and values of a context (computed once per image for cross-attention).
    pub fn context_kv(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.key.forward(context)?, self.value.forward(context)?))
    }

    /// The output projection and residual norm of attention's output `o`.
    fn finish(&self, x: &Tensor, o: Tensor) -> Result<Tensor> {
        let o = self.dense.forward(&o)?;
        self.norm.forward(&o.add_elem(x)?)
    }

    /// `x` attending to the cross-attention keys and values `layer` of `cache` holds.
    pub fn attend_cross(&self, x: &Tensor, cache: &KvCache, layer: usize) -> Result<Tensor> {
        let q = self.query.forward(x)?;
        let o = attention_cross(&q, cache, layer, None, self.shape)?
            .ok_or_else(|| Error::Input("the text decoder needs an image".into()))?;
        self.finish(x, o)
    }

    /// Causal self-attention over the cache (a decoder step); writes this step's K/V.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache, layer: usize) -> Result<Tensor> {
        let (k, v) = self.context_kv(x)?;
        cache.write(layer, &k, &v)?;
        let q = self.query.forward(x)?;
        let o = attention_cached(&q, &[cache], &[x.rows()], layer, self.shape)?;
        self.finish(x, o)
    }
}

/// `intermediate.dense → act → output.dense → output.LayerNorm(· + input)`.
#[derive(Debug, Clone)]
pub struct BertFeedForward {
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    act: Activation,
}

impl BertFeedForward {
    pub fn load(vb: &Vb, intermediate: &str, output: &str, d: &BertDims) -> Result<Self> {
        Ok(BertFeedForward {
            intermediate: Linear::load(
                &vb.pp(intermediate).pp("dense"),
                d.hidden,
                d.intermediate,
                true,
            )?,
            output: Linear::load(&vb.pp(output).pp("dense"), d.intermediate, d.hidden, true)?,
            norm: LayerNorm::load(&vb.pp(output).pp("LayerNorm"), d.hidden, d.eps)?,
            act: d.act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.intermediate.forward(x)?.activation(self.act)?;
        let h = self.output.forward(&h)?;
        self.norm.forward(&h.add_elem(x)?)
    }
}

/// One Q-Former layer. Queries (the first `n_query` rows) and text share the
/// self-attention; queries then cross-attend to the image and take the `*_query`
/// feed-forward, text takes the plain one (present only with `use_qformer_text_input`).
#[derive(Debug, Clone)]
pub struct QFormerLayer {
    attention: BertAttention,
    crossattention: Option<BertAttention>,
    ffn_query: BertFeedForward,
    ffn_text: Option<BertFeedForward>,
}

impl QFormerLayer {
    pub fn load(vb: &Vb, d: &BertDims, has_cross: bool, text_input: bool) -> Result<Self> {
        let crossattention = if has_cross {
            Some(BertAttention::load(
                &vb.pp("crossattention"),
                "attention",
                d,
                true,
            )?)
        } else {
            None
        };
        let ffn_text = if text_input {
            Some(BertFeedForward::load(vb, "intermediate", "output", d)?)
        } else {
            None
        };
        Ok(QFormerLayer {
            attention: BertAttention::load(&vb.pp("attention"), "attention", d, false)?,
            crossattention,
            ffn_query: BertFeedForward::load(vb, "intermediate_query", "output_query", d)?,
            ffn_text,
        })
    }

    pub fn forward(&self, x: &Tensor, n_query: usize, image: Option<&Tensor>) -> Result<Tensor> {
        let a = self.attention.forward(x, None)?;
        let n_text = a.rows() - n_query;
        let mut parts = Vec::with_capacity(2);
        if n_query > 0 {
            let mut q = a.narrow_rows(0, n_query)?;
            if let Some(c) = &self.crossattention {
                let image = image.ok_or_else(|| {
                    Error::Input("the Q-Former's queries need image features".into())
                })?;
                q = c.forward(&q, Some(image))?;
            }
            parts.push(self.ffn_query.forward(&q)?);
        }
        if n_text > 0 {
            let ffn = self
                .ffn_text
                .as_ref()
                .ok_or_else(|| Error::Input("this Q-Former takes no text input".into()))?;
            parts.push(ffn.forward(&a.narrow_rows(n_query, n_text)?)?);
        }
        Ok(Tensor::cat_rows(&parts.iter().collect::<Vec<_>>())?)
    }
}

/// The Q-Former (Li et al., 2023): learned queries (optionally followed by text), a
/// LayerNorm, then the layers, with cross-attention to the image every
/// `cross_attention_frequency` layers.
#[derive(Debug, Clone)]
pub struct QFormer {
    layernorm: LayerNorm,
    layers: Vec<QFormerLayer>,
}

impl QFormer {
    pub fn load(
        vb: &Vb,
        d: &BertDims,
        n_layers: usize,
        cross_every: usize,
        text_input: bool,
    ) -> Result<Self> {
        let layers = (0..n_layers)
            .map(|i| {
                QFormerLayer::load(
                    &vb.pp("encoder.layer").pp(i),
                    d,
                    i % cross_every == 0,
                    text_input,
                )
            })
            .collect::<Result<_>>()?;
        Ok(QFormer {
            layernorm: LayerNorm::load(&vb.pp("layernorm"), d.hidden, d.eps)?,
            layers,
        })
    }

    /// Outputs for `embeds` (`[n_query + text, hidden]`: queries first, then text
    /// embeddings); `image` is needed when `n_query > 0`.
    pub fn forward(
        &self,
        embeds: &Tensor,
        n_query: usize,
        image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut x = self.layernorm.forward(embeds)?;
        for layer in &self.layers {
            x = layer.forward(&x, n_query, image)?;
        }
        Ok(x)
    }
}

/// BLIP's text embeddings: `LayerNorm(word + position)`.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    norm: LayerNorm,
    vocab_size: usize,
}

impl BertEmbeddings {
    pub fn load(vb: &Vb, vocab_size: usize, max_positions: usize, d: &BertDims) -> Result<Self> {
        Ok(BertEmbeddings {
            word_embeddings: vb.get("word_embeddings.weight", &[vocab_size, d.hidden])?,
            position_embeddings: vb
                .get("position_embeddings.weight", &[max_positions, d.hidden])?,
            norm: LayerNorm::load(&vb.pp("LayerNorm"), d.hidden, d.eps)?,
            vocab_size,
        })
    }

    pub fn word_embeddings(&self) -> &Tensor {
        &self.word_embeddings
    }

    /// Token embeddings alone (positions and the norm come in `forward`).
    pub fn words(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        Ok(self.word_embeddings.index_rows(ids)?)
    }

    /// `LayerNorm(words + positions start..)`.
    pub fn forward(&self, words: &Tensor, start: usize) -> Result<Tensor> {
        let n = self.position_embeddings.rows();
        if start + words.rows() > n {
            return Err(Error::Input(format!(
                "{} tokens exceed the model's {n} positions",
                start + words.rows()
            )));
        }
        let positions: Vec<u32> = (start..start + words.rows()).map(|p| p as u32).collect();
        self.norm.forward(
            &words
                .clone()
                .add_elem(&self.position_embeddings.index_rows(&positions)?)?,
        )
    }
}

/// A BLIP text layer: self-attention (`attention.self`), cross-attention to the image
/// (`crossattention.self`), feed-forward.
#[derive(Debug, Clone)]
pub struct BertLayer {
    attention: BertAttention,
    crossattention: Option<BertAttention>,
    ffn: BertFeedForward,
}

impl BertLayer {
    pub fn load(vb: &Vb, d: &BertDims, has_cross: bool) -> Result<Self> {
        Ok(BertLayer {
            attention: BertAttention::load(&vb.pp("attention"), "self", d, false)?,
            crossattention: if has_cross {
                Some(BertAttention::load(
                    &vb.pp("crossattention"),
                    "self",
                    d,
                    true,
                )?)
            } else {
                None
            },
            ffn: BertFeedForward::load(vb, "intermediate", "output", d)?,
        })
    }

    /// Bidirectional (encoder) pass, optionally reading `image`.
    pub fn forward(&self, x: &Tensor, image: Option<&Tensor>) -> Result<Tensor> {
        let mut a = self.attention.forward(x, None)?;
        if let (Some(c), Some(img)) = (&self.crossattention, image) {
            a = c.forward(&a, Some(img))?;
        }
        self.ffn.forward(&a)
    }

    /// Causal (decoder) step over the cache, reading the image K/V stored in it.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut KvCache, layer: usize) -> Result<Tensor> {
        let mut a = self.attention.forward_cached(x, cache, layer)?;
        if let Some(c) = &self.crossattention {
            a = c.attend_cross(&a, cache, layer)?;
        }
        self.ffn.forward(&a)
    }

    /// This layer's cross-attention K/V of an image.
    pub fn cross_kv(&self, image: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        self.crossattention
            .as_ref()
            .map(|c| c.context_kv(image))
            .transpose()
    }
}
