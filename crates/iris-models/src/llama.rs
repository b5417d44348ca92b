//! The LLaMA decoder (Touvron et al., 2023) as HF's `modeling_llama.py`: RMSNorm,
//! RoPE, grouped-query attention with optional q/k/v(/o) bias (Qwen2), SwiGLU, tied or
//! untied head; Megatron tensor parallelism through the column/row-parallel layers.

use std::sync::Arc;

use iris_comm::Communicator;
use iris_tensor::{DType, Tensor};

use crate::config::LlamaConfig;
use crate::layers::{
    attention_cached, AttnShape, ColumnParallelLinear, GatedMlp, KvCache, Linear, RmsNorm,
    RopeTable, RotaryEmbedding, RowParallelLinear, VocabParallelEmbedding,
};
use crate::weights::Vb;
use crate::{Error, Result};

#[derive(Debug, Clone)]
struct LlamaAttention {
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    o_proj: RowParallelLinear,
    /// Heads on this rank.
    shape: AttnShape,
    dtype: DType,
}

impl LlamaAttention {
    fn load(vb: &Vb, cfg: &LlamaConfig, comm: &Arc<dyn Communicator>) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        let (ws, rank) = (comm.world_size(), comm.rank());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        if !nh.is_multiple_of(ws) {
            return Err(Error::Config(format!(
                "{}: {nh} attention heads do not split over {ws} ranks",
                vb.pp("q_proj").path_of("weight")
            )));
        }
        // KV heads split over the ranks, or — fewer heads than ranks — each replicated
        // on the ranks whose query heads read it (as vLLM does).
        let (kv_rows, local_kv) = if nkv % ws == 0 {
            let per = nkv / ws;
            (rank * per * hd..(rank + 1) * per * hd, per)
        } else if ws % nkv == 0 {
            let h = rank / (ws / nkv);
            (h * hd..(h + 1) * hd, 1)
        } else {
            return Err(Error::Config(format!(
                "{}: {nkv} KV heads neither split over nor replicate onto {ws} ranks",
                vb.pp("k_proj").path_of("weight")
            )));
        };
        let c = comm.as_ref();
        let kv = |name: &str| {
            ColumnParallelLinear::load_rows(
                &vb.pp(name),
                d,
                nkv * hd,
                cfg.qkv_bias,
                kv_rows.clone(),
            )
        };
        let q_proj = ColumnParallelLinear::load(&vb.pp("q_proj"), d, nh * hd, cfg.qkv_bias, c)?;
        // A quantized model's prefill rounds its products to bf16 from GEMM_ROWS rows
        // (`quant::GEMM_ROWS`): its attention then runs on the bf16 kernel too.
        let bf16_products_from = if vb.dtype() == iris_tensor::DType::BF16 {
            Some(0)
        } else if q_proj.quantized() {
            Some(iris_tensor::quant::GEMM_ROWS)
        } else {
            None
        };
        Ok(LlamaAttention {
            q_proj,
            k_proj: kv("k_proj")?,
            v_proj: kv("v_proj")?,
            o_proj: RowParallelLinear::load(
                &vb.pp("o_proj"),
                nh * hd,
                d,
                cfg.o_bias,
                comm.clone(),
            )?,
            shape: AttnShape {
                n_heads: nh / ws,
                n_kv_heads: local_kv,
                head_dim: hd,
                bf16_products_from,
            },
            dtype: vb.dtype(),
        })
    }

    /// `x` holds the rows of several sequences back to back (`rows[i]` each), each
    /// continuing its own cache: projections run once over all rows (weights read once
    /// per step), attention per sequence.
    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTable,
        layer: usize,
        caches: &mut [&mut KvCache],
        rows: &[usize],
    ) -> Result<Tensor> {
        let [q, k, v]: [Tensor; 3] =
            ColumnParallelLinear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?
                .try_into()
                .expect("three projections");
        // Every row rotated at its own position, every sequence's K/V written, then
        // attention for all of them at once.
        let q = q.rope(rope, self.shape.n_heads)?;
        let k = k.rope(rope, self.shape.n_kv_heads)?;
        KvCache::write_batch(caches, rows, layer, &k, &v)?;
        let o = attention_cached(&q, caches, rows, layer, self.shape)?.round_to(self.dtype)?;
        self.o_proj.forward(&o)
    }
}

/// One LLaMA decoder layer (also IDEFICS' text layers).
#[derive(Debug, Clone)]
pub(crate) struct LlamaLayer {
    input_layernorm: RmsNorm,
    self_attn: LlamaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: GatedMlp,
    dtype: DType,
}

impl LlamaLayer {
    pub(crate) fn load(vb: &Vb, cfg: &LlamaConfig, comm: &Arc<dyn Communicator>) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(LlamaLayer {
            input_layernorm: RmsNorm::load(&vb.pp("input_layernorm"), d, cfg.rms_norm_eps)?,
            self_attn: LlamaAttention::load(&vb.pp("self_attn"), cfg, comm)?,
            post_attention_layernorm: RmsNorm::load(
                &vb.pp("post_attention_layernorm"),
                d,
                cfg.rms_norm_eps,
            )?,
            mlp: GatedMlp::load(
                &vb.pp("mlp"),
                d,
                cfg.intermediate_size,
                cfg.hidden_act,
                cfg.mlp_bias,
                comm,
            )?,
            dtype: vb.dtype(),
        })
    }

    pub(crate) fn forward(
        &self,
        x: Tensor,
        rope: &RotaryEmbedding,
        layer: usize,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let rows = [x.rows()];
        let positions: Vec<usize> = (cache.len()..cache.len() + x.rows()).collect();
        let table = rope.table(&positions, x.device())?;
        self.forward_batch(x, &table, layer, &mut [cache], &rows)
    }

    /// Values of one token's keys (or values) in this layer's cache, on this rank.
    pub(crate) fn kv_width(&self) -> usize {
        self.self_attn.shape.n_kv_heads * self.self_attn.shape.head_dim
    }

    /// Several sequences' rows back to back (see `LlamaAttention::forward`).
    pub(crate) fn forward_batch(
        &self,
        x: Tensor,
        rope: &RopeTable,
        layer: usize,
        caches: &mut [&mut KvCache],
        rows: &[usize],
    ) -> Result<Tensor> {
        let h = self.self_attn.forward(
            &self.input_layernorm.forward(&x)?,
            rope,
            layer,
            caches,
            rows,
        )?;
        let x = x.add_elem(&h)?.round_to(self.dtype)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok(x.add_elem(&h)?.round_to(self.dtype)?)
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    /// This rank's rows of the vocabulary (all of them at one rank).
    embed_tokens: VocabParallelEmbedding,
    layers: Vec<LlamaLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    cfg: LlamaConfig,
}

impl Llama {
    /// `vb` points at the decoder (`embed_tokens`, `layers`, `norm`); `head` at
    /// `lm_head` (ignored when the embeddings are tied).
    pub fn load(
        vb: &Vb,
        head: &Vb,
        cfg: &LlamaConfig,
        comm: Arc<dyn Communicator>,
    ) -> Result<Llama> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        // Vocab-parallel embedding and head: each rank its rows of the vocabulary.
        let embed_tokens =
            VocabParallelEmbedding::load(vb, "embed_tokens.weight", v, d, comm.clone())?;
        let lm_head = if cfg.tie_word_embeddings {
            crate::layers::tied_head(vb, &embed_tokens, "embed_tokens.weight", &[v, d])?
        } else {
            Linear::from_weight(
                head.weight_rows("weight", &[v, d], embed_tokens.rows())?,
                None,
                head.dtype(),
            )
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| LlamaLayer::load(&vb.pp("layers").pp(i), cfg, &comm))
            .collect::<Result<_>>()?;
        Ok(Llama {
            embed_tokens,
            layers,
            norm: RmsNorm::load(&vb.pp("norm"), d, cfg.rms_norm_eps)?,
            lm_head,
            rope: RotaryEmbedding::new(cfg, vb.dtype()),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Token embeddings `[ids, hidden]`; errors on ids outside the vocabulary.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        self.embed_tokens.embed(ids)
    }

    /// Runs `embeds` (`[t, hidden]`) after the cached tokens; returns the final-normed
    /// hidden states `[t, hidden]` and extends `cache`.
    pub fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.forward_batch(&[embeds], &mut [cache])?.remove(0))
    }

    /// One step of several sequences at once: `embeds[i]` continues `caches[i]`. The
    /// linear layers see all rows together, so each weight is read once per step for
    /// the whole batch; attention runs per sequence over its own cache.
    pub fn forward_batch(
        &self,
        embeds: &[&Tensor],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Tensor>> {
        if embeds.len() != caches.len() {
            return Err(Error::Input(format!(
                "{} inputs for {} caches",
                embeds.len(),
                caches.len()
            )));
        }
        let rows: Vec<usize> = embeds.iter().map(|e| e.rows()).collect();
        for (cache, &t) in caches.iter().zip(&rows) {
            if cache.len() + t > self.cfg.max_position_embeddings {
                return Err(Error::Input(format!(
                    "{} tokens exceed the model's {} positions",
                    cache.len() + t,
                    self.cfg.max_position_embeddings
                )));
            }
        }
        iris_tensor::on_pool(|| self.layers_batch(embeds, caches, &rows))
    }

    fn layers_batch(
        &self,
        embeds: &[&Tensor],
        caches: &mut [&mut KvCache],
        rows: &[usize],
    ) -> Result<Vec<Tensor>> {
        let mut x = Tensor::cat_rows(embeds)?;
        // Every row's position (its sequence's cached length on), rotated the same way in
        // every layer: cos and sin once a step.
        let positions: Vec<usize> = caches
            .iter()
            .zip(rows)
            .flat_map(|(c, &t)| c.len()..c.len() + t)
            .collect();
        let rope = self.rope.table(&positions, x.device())?;
        for (i, layer) in self.layers.iter().enumerate() {
            match layer.forward_batch(x, &rope, i, caches, rows) {
                Ok(y) => x = y,
                Err(e) => {
                    // Leave every cache as it was before this call.
                    caches
                        .iter_mut()
                        .for_each(|c| c.rollback(self.cache_width()));
                    return Err(e);
                }
            }
        }
        caches.iter_mut().zip(rows).for_each(|(c, &t)| c.advance(t));
        let x = self.norm.forward(&x)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut r0 = 0;
        for &t in rows {
            out.push(x.narrow_rows(r0, t)?);
            r0 += t;
        }
        Ok(out)
    }

    fn cache_width(&self) -> usize {
        self.layers.first().map_or(0, |l| {
            l.self_attn.shape.n_kv_heads * l.self_attn.shape.head_dim
        })
    }

    /// Logits `[t, vocab]` of final hidden states (every rank's part of the vocabulary,
    /// gathered).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.embed_tokens
            .gather_logits(self.lm_head.forward(hidden)?)
    }
}

impl crate::vlm::CausalLm for Llama {
    fn new_cache(&self) -> KvCache {
        Llama::new_cache(self)
    }
    fn kv_width(&self) -> usize {
        self.cache_width()
    }
    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        Llama::embed(self, ids)
    }
    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Llama::forward(self, embeds, cache)
    }
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Llama::logits(self, hidden)
    }
    fn forward_batch(
        &self,
        embeds: &[&Tensor],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Tensor>> {
        Llama::forward_batch(self, embeds, caches)
    }
}
