//! T5 (Raffel et al., 2020) and its v1.1 / FlanT5 form, the encoder-decoder behind
//! BLIP-2's best-known checkpoints. Follows HF's `modeling_t5.py`: T5's layer norm (RMS,
//! no mean, no bias), attention without the 1/√d scale plus a learned bias per head
//! for each bucketed distance (computed by each stack's first layer, shared by its
//! others; both directions in the encoder, only the past in the decoder; none in the
//! cross-attention), a ReLU or gated-GELU feed-forward, and the decoder's output scaled
//! by `d_model^-0.5` before a head tied to the embedding (T5) or its own (FlanT5).
//!
//! The encoder runs once per request ([`T5::encode`]); its output gives every decoder
//! layer's cross-attention keys and values ([`T5::cross_kv`]), which the engine keeps in
//! the sequence's KV blocks. As a [`CausalLm`] the model is its decoder.

use iris_tensor::{Activation, DType, Tensor};

use crate::config::T5Config;
use crate::layers::{attention_cross, AttnShape, KvCache, Linear, RmsNorm};
use crate::vlm::CausalLm;
use crate::weights::Vb;
use crate::{Error, Result};

/// HF's `_relative_position_bucket`: exact buckets for short distances, logarithmic
/// ones up to `max_distance`, the last bucket beyond; the encoder's split by direction.
fn bucket(relative: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut n = num_buckets as i64;
    let mut out = 0;
    let distance = if bidirectional {
        n /= 2;
        if relative > 0 {
            out += n;
        }
        relative.abs()
    } else {
        (-relative).max(0)
    };
    let max_exact = n / 2;
    if distance < max_exact {
        return (out + distance) as usize;
    }
    // In f32, as PyTorch computes it.
    let large = max_exact
        + ((distance as f32 / max_exact as f32).ln()
            / (max_distance as f32 / max_exact as f32).ln()
            * (n - max_exact) as f32) as i64;
    (out + large.min(n - 1)) as usize
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
}

impl Attention {
    fn load(vb: &Vb, cfg: &T5Config) -> Result<Attention> {
        let inner = cfg.num_heads * cfg.d_kv;
        let lin = |n: &str, i, o| Linear::load(&vb.pp(n), i, o, false);
        Ok(Attention {
            q: lin("q", cfg.d_model, inner)?,
            k: lin("k", cfg.d_model, inner)?,
            v: lin("v", cfg.d_model, inner)?,
            o: lin("o", inner, cfg.d_model)?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }
}

/// The relative-position bias of a stack: `[buckets, heads]` as HF stores it.
#[derive(Debug, Clone)]
struct PositionBias {
    table: Vec<f32>,
    heads: usize,
    buckets: usize,
    max_distance: usize,
    bidirectional: bool,
}

impl PositionBias {
    /// Bias of every (head, query, key): query `i` at position `q0 + i`, key `j` at `j`;
    /// `[heads][tq][tk]`, flattened.
    fn matrix(&self, q0: usize, tq: usize, tk: usize) -> Vec<f32> {
        // One bucket per distance, the distances running from -(q0+tq-1) to tk-1.
        let lowest = -((q0 + tq) as i64 - 1);
        let per_distance: Vec<usize> = (lowest..tk as i64)
            .map(|d| bucket(d, self.bidirectional, self.buckets, self.max_distance))
            .collect();
        let mut out = vec![0f32; self.heads * tq * tk];
        for h in 0..self.heads {
            for i in 0..tq {
                let row = &mut out[(h * tq + i) * tk..(h * tq + i + 1) * tk];
                for (j, r) in row.iter_mut().enumerate() {
                    let d = j as i64 - (q0 + i) as i64;
                    let b = per_distance[(d - lowest) as usize];
                    *r = self.table[b * self.heads + h];
                }
            }
        }
        out
    }
}

/// `softmax(q·kᵀ + bias)·v` per head with no scale, queries `q0 + i` seeing keys
/// `0..=q0 + i` when `causal`; host f32, `[tq, heads·d_kv]`. With `bf16` the
/// exponentials are rounded to bf16 before they mix the values and the sum divides
/// after, as PyTorch's CPU flash attention (HF's SDPA) does for bf16.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    d_kv: usize,
    bias: &[f32],
    q0: usize,
    causal: bool,
    bf16: bool,
) -> Vec<f32> {
    let round = |x: f32| match bf16 {
        true => half::bf16::from_f32(x).to_f32(),
        false => x,
    };
    let width = heads * d_kv;
    let (tq, tk) = (q.len() / width, k.len() / width);
    let mut out = vec![0f32; tq * width];
    let mut scores = vec![0f32; tk];
    for h in 0..heads {
        let cols = h * d_kv..(h + 1) * d_kv;
        for i in 0..tq {
            let seen = if causal { (q0 + i + 1).min(tk) } else { tk };
            let qi = &q[i * width..][cols.clone()];
            let mut max = f32::NEG_INFINITY;
            for (j, s) in scores[..seen].iter_mut().enumerate() {
                let kj = &k[j * width..][cols.clone()];
                let dot: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum();
                *s = dot + bias[(h * tq + i) * tk + j];
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in &mut scores[..seen] {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[i * width..][cols.clone()];
            for (j, p) in scores[..seen].iter().enumerate() {
                let (p, vj) = (round(*p), &v[j * width..][cols.clone()]);
                for (x, y) in o.iter_mut().zip(vj) {
                    *x += p * y;
                }
            }
            o.iter_mut().for_each(|x| *x /= sum);
        }
    }
    out
}

#[derive(Debug, Clone)]
enum FeedForward {
    /// `wo(act(wi x))` (T5).
    Plain { wi: Linear, wo: Linear },
    /// `wo(act(wi_0 x) · wi_1 x)` (T5 v1.1, FlanT5).
    Gated {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
}

impl FeedForward {
    fn load(vb: &Vb, cfg: &T5Config) -> Result<FeedForward> {
        let (d, ff) = (cfg.d_model, cfg.d_ff);
        let lin = |n: &str, i, o| Linear::load(&vb.pp(n), i, o, false);
        Ok(if cfg.gated {
            FeedForward::Gated {
                wi_0: lin("wi_0", d, ff)?,
                wi_1: lin("wi_1", d, ff)?,
                wo: lin("wo", ff, d)?,
            }
        } else {
            FeedForward::Plain {
                wi: lin("wi", d, ff)?,
                wo: lin("wo", ff, d)?,
            }
        })
    }

    fn forward(&self, x: &Tensor, act: Activation, dtype: DType) -> Result<Tensor> {
        match self {
            FeedForward::Plain { wi, wo } => {
                wo.forward(&wi.forward(x)?.activation(act)?.round_to(dtype)?)
            }
            FeedForward::Gated { wi_0, wi_1, wo } => {
                let gate = wi_0.forward(x)?.activation(act)?.round_to(dtype)?;
                let h = gate.mul_elem(&wi_1.forward(x)?)?.round_to(dtype)?;
                wo.forward(&h)
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Block {
    self_norm: RmsNorm,
    self_attn: Attention,
    /// The decoder's cross-attention over the encoder's output.
    cross: Option<(RmsNorm, Attention)>,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

#[derive(Debug, Clone)]
struct Stack {
    blocks: Vec<Block>,
    bias: PositionBias,
    final_norm: RmsNorm,
}

impl Stack {
    fn load(vb: &Vb, cfg: &T5Config, decoder: bool) -> Result<Stack> {
        let layers = if decoder {
            cfg.num_decoder_layers
        } else {
            cfg.num_layers
        };
        let eps = cfg.layer_norm_epsilon;
        let blocks = (0..layers)
            .map(|i| {
                let b = vb.pp(format!("block.{i}.layer"));
                let ff_at = if decoder { 2 } else { 1 };
                Ok(Block {
                    self_norm: RmsNorm::load(&b.pp("0.layer_norm"), cfg.d_model, eps)?,
                    self_attn: Attention::load(&b.pp("0.SelfAttention"), cfg)?,
                    cross: match decoder {
                        true => Some((
                            RmsNorm::load(&b.pp("1.layer_norm"), cfg.d_model, eps)?,
                            Attention::load(&b.pp("1.EncDecAttention"), cfg)?,
                        )),
                        false => None,
                    },
                    ff_norm: RmsNorm::load(&b.pp(format!("{ff_at}.layer_norm")), cfg.d_model, eps)?,
                    ff: FeedForward::load(&b.pp(format!("{ff_at}.DenseReluDense")), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (buckets, heads) = (cfg.relative_attention_num_buckets, cfg.num_heads);
        let table = vb
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get("weight", &[buckets, heads])?
            .host_f32()?;
        Ok(Stack {
            blocks,
            bias: PositionBias {
                table,
                heads,
                buckets,
                max_distance: cfg.relative_attention_max_distance,
                bidirectional: !decoder,
            },
            final_norm: RmsNorm::load(&vb.pp("final_layer_norm"), cfg.d_model, eps)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct T5 {
    cfg: T5Config,
    /// `shared`: the encoder's and decoder's embedding (and the head where tied).
    shared: Tensor,
    encoder: Stack,
    decoder: Stack,
    lm_head: Linear,
    dtype: DType,
}

impl T5 {
    /// The model under `vb` (`shared`, `encoder.*`, `decoder.*`, `lm_head` when the
    /// checkpoint has its own head).
    pub fn load(vb: &Vb, cfg: &T5Config) -> Result<T5> {
        let shared = vb
            .pp("shared")
            .get("weight", &[cfg.vocab_size, cfg.d_model])?;
        let lm_head = match vb.contains("lm_head.weight") {
            true => Linear::load(&vb.pp("lm_head"), cfg.d_model, cfg.vocab_size, false)?,
            false => Linear::new(shared.clone(), None, vb.dtype())?,
        };
        Ok(T5 {
            encoder: Stack::load(&vb.pp("encoder"), cfg, false)?,
            decoder: Stack::load(&vb.pp("decoder"), cfg, true)?,
            lm_head,
            shared,
            dtype: vb.dtype(),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    fn width(&self) -> usize {
        self.cfg.num_heads * self.cfg.d_kv
    }

    /// The encoder's last hidden state for input embeddings `[n, d_model]`.
    pub fn encode(&self, embeds: &Tensor) -> Result<Tensor> {
        let (dt, act) = (self.dtype, self.cfg.activation);
        let n = embeds.rows();
        let bias = self.encoder.bias.matrix(0, n, n);
        let mut x = embeds.clone().round_to(dt)?;
        for b in &self.encoder.blocks {
            let h = b.self_norm.forward(&x)?;
            let a = &b.self_attn;
            let [q, k, v] =
                [&a.q, &a.k, &a.v].map(|l| l.forward(&h).and_then(|t| Ok(t.host_f32()?)));
            let bf16 = dt == DType::BF16;
            let o = attend(&q?, &k?, &v?, a.heads, a.d_kv, &bias, 0, false, bf16);
            let o = Tensor::from_f32(o, &[n, self.width()])?.round_to(dt)?;
            x = x.add_elem(&a.o.forward(&o)?)?.round_to(dt)?;
            let h = b.ff.forward(&b.ff_norm.forward(&x)?, act, dt)?;
            x = x.add_elem(&h)?.round_to(dt)?;
        }
        self.encoder.final_norm.forward(&x)
    }

    /// Each decoder layer's cross-attention keys and values of the encoder's output.
    pub fn cross_kv(&self, encoded: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        self.decoder
            .blocks
            .iter()
            .map(|b| {
                let (_, a) = b.cross.as_ref().expect("decoder blocks cross-attend");
                Ok((a.k.forward(encoded)?, a.v.forward(encoded)?))
            })
            .collect()
    }

    fn decoder_layers(&self, mut x: Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (dt, act, width) = (self.dtype, self.cfg.activation, self.width());
        let (t, start) = (x.rows(), cache.len());
        let bias = self.decoder.bias.matrix(start, t, start + t);
        // Cross-attention through the kernels: queries scaled by √d_kv cancel their
        // 1/√d_kv (a power of two for every T5, so exactly).
        let scale = (self.cfg.d_kv as f32).sqrt();
        let shape = AttnShape {
            n_heads: self.cfg.num_heads,
            n_kv_heads: self.cfg.num_heads,
            head_dim: self.cfg.d_kv,
            bf16_products_from: (dt == DType::BF16).then_some(0),
        };
        for (i, b) in self.decoder.blocks.iter().enumerate() {
            let h = b.self_norm.forward(&x)?;
            let a = &b.self_attn;
            let (q, k, v) = (a.q.forward(&h)?, a.k.forward(&h)?, a.v.forward(&h)?);
            cache.write(i, &k, &v)?;
            let (keys, values) = cache.read(i, width, start + t);
            let bf16 = dt == DType::BF16;
            let o = attend(
                &q.host_f32()?,
                &keys,
                &values,
                a.heads,
                a.d_kv,
                &bias,
                start,
                true,
                bf16,
            );
            let o = Tensor::from_f32(o, &[t, width])?.round_to(dt)?;
            x = x.add_elem(&a.o.forward(&o)?)?.round_to(dt)?;
            let (norm, c) = b.cross.as_ref().expect("decoder blocks cross-attend");
            let q = c.q.forward(&norm.forward(&x)?)?.scale(scale)?;
            let o = attention_cross(&q, cache, i, None, shape)?.ok_or_else(|| {
                Error::Input("T5's decoder runs after its encoder: no cross-attention keys".into())
            })?;
            x = x.add_elem(&c.o.forward(&o.round_to(dt)?)?)?.round_to(dt)?;
            let h = b.ff.forward(&b.ff_norm.forward(&x)?, act, dt)?;
            x = x.add_elem(&h)?.round_to(dt)?;
        }
        Ok(x)
    }
}

impl CausalLm for T5 {
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.decoder.blocks.len())
    }

    fn kv_width(&self) -> usize {
        self.width()
    }

    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        Ok(self.shared.index_rows(ids)?.round_to(self.dtype)?)
    }

    /// The decoder over `embeds` after the cached positions (cross-attention keys and
    /// values set by the encoder first); its final hidden states, normed.
    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = embeds.rows();
        match iris_tensor::on_pool(|| self.decoder_layers(embeds.clone(), cache)) {
            Ok(x) => {
                cache.advance(t);
                self.decoder.final_norm.forward(&x)
            }
            Err(e) => {
                cache.rollback(self.width());
                Err(e)
            }
        }
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let hidden = match self.cfg.scale_decoder_outputs {
            true => hidden
                .clone()
                .scale((self.cfg.d_model as f32).powf(-0.5))?
                .round_to(self.dtype)?,
            false => hidden.clone(),
        };
        self.lm_head.forward(&hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_follow_hf() {
        // HF's `_relative_position_bucket` at 32 buckets, max distance 128.
        let enc: Vec<usize> = [-200, -128, -50, -9, -8, -1, 0, 1, 7, 8, 20, 127, 500]
            .iter()
            .map(|&d| bucket(d, true, 32, 128))
            .collect();
        assert_eq!(enc, [15, 15, 13, 8, 8, 1, 0, 17, 23, 24, 26, 31, 31]);
        let dec: Vec<usize> = [-200, -50, -16, -15, -1, 0, 5]
            .iter()
            .map(|&d| bucket(d, false, 32, 128))
            .collect();
        assert_eq!(dec, [31, 24, 16, 15, 1, 0, 0]);
    }
}
