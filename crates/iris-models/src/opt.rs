//! OPT (Zhang et al., 2022) as HF's `modeling_opt.py`: learned positions with their
//! offset of 2, pre-LN (or post-LN) layers with biased projections and a ReLU MLP,
//! optional `project_in`/`project_out`, head tied to the token embeddings.

use std::sync::Arc;

use iris_comm::Communicator;
use iris_tensor::{Activation, DType, Tensor};

use crate::config::OptConfig;
use crate::layers::{
    attention_cached, AttnShape, ColumnParallelLinear, KvCache, LayerNorm, Linear,
    RowParallelLinear, VocabParallelEmbedding,
};
use crate::vlm::CausalLm;
use crate::weights::Vb;
use crate::{Error, Result};

/// OPT's learned position table starts its positions at row 2.
const POSITION_OFFSET: usize = 2;

#[derive(Debug, Clone)]
struct OptLayer {
    self_attn_layer_norm: LayerNorm,
    q_proj: ColumnParallelLinear,
    k_proj: ColumnParallelLinear,
    v_proj: ColumnParallelLinear,
    out_proj: RowParallelLinear,
    final_layer_norm: LayerNorm,
    fc1: ColumnParallelLinear,
    fc2: RowParallelLinear,
    act: Activation,
    /// Heads on this rank.
    shape: AttnShape,
    pre_ln: bool,
    dtype: DType,
}

impl OptLayer {
    fn load(vb: &Vb, cfg: &OptConfig, comm: &Arc<dyn Communicator>) -> Result<Self> {
        let (d, b, ws) = (cfg.hidden_size, cfg.enable_bias, comm.world_size());
        let nh = cfg.num_attention_heads;
        let a = vb.pp("self_attn");
        if !nh.is_multiple_of(ws) {
            return Err(Error::Config(format!(
                "{}: {nh} attention heads do not split over {ws} ranks",
                a.pp("q_proj").path_of("weight")
            )));
        }
        if !cfg.ffn_dim.is_multiple_of(ws) {
            return Err(Error::Config(format!(
                "{}: {} rows do not split over {ws} ranks",
                vb.pp("fc1").path_of("weight"),
                cfg.ffn_dim
            )));
        }
        let c = comm.as_ref();
        let col = |name: &str, i, o| ColumnParallelLinear::load(&a.pp(name), i, o, b, c);
        Ok(OptLayer {
            self_attn_layer_norm: LayerNorm::load(&vb.pp("self_attn_layer_norm"), d, 1e-5)?,
            q_proj: col("q_proj", d, d)?,
            k_proj: col("k_proj", d, d)?,
            v_proj: col("v_proj", d, d)?,
            out_proj: RowParallelLinear::load(&a.pp("out_proj"), d, d, b, comm.clone())?,
            final_layer_norm: LayerNorm::load(&vb.pp("final_layer_norm"), d, 1e-5)?,
            fc1: ColumnParallelLinear::load(&vb.pp("fc1"), d, cfg.ffn_dim, b, c)?,
            fc2: RowParallelLinear::load(&vb.pp("fc2"), cfg.ffn_dim, d, b, comm.clone())?,
            act: cfg.activation,
            shape: AttnShape {
                n_heads: nh / ws,
                n_kv_heads: nh / ws,
                head_dim: d / cfg.num_attention_heads,
                bf16_products_from: (vb.dtype() == iris_tensor::DType::BF16).then_some(0),
            },
            pre_ln: cfg.do_layer_norm_before,
            dtype: vb.dtype(),
        })
    }

    /// `x` holds the rows of several sequences back to back (`rows[i]` each), each
    /// continuing its own cache: projections run once over all rows, then every
    /// sequence's K/V is written and all sequences attend in one parallel loop.
    fn attention(
        &self,
        x: &Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        rows: &[usize],
    ) -> Result<Tensor> {
        let [q, k, v]: [Tensor; 3] =
            ColumnParallelLinear::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?
                .try_into()
                .expect("three projections");
        KvCache::write_batch(caches, rows, layer, &k, &v)?;
        let o = attention_cached(&q, caches, rows, layer, self.shape)?.round_to(self.dtype)?;
        self.out_proj.forward(&o)
    }

    /// `fc2(act(fc1(x)))`, the hidden width split over the ranks.
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .fc1
            .forward(x)?
            .activation(self.act)?
            .round_to(self.dtype)?;
        self.fc2.forward(&h)
    }

    fn forward(
        &self,
        x: Tensor,
        layer: usize,
        caches: &mut [&mut KvCache],
        rows: &[usize],
    ) -> Result<Tensor> {
        let dt = self.dtype;
        if self.pre_ln {
            let h = self.attention(&self.self_attn_layer_norm.forward(&x)?, layer, caches, rows)?;
            let x = x.add_elem(&h)?.round_to(dt)?;
            let h = self.mlp(&self.final_layer_norm.forward(&x)?)?;
            Ok(x.add_elem(&h)?.round_to(dt)?)
        } else {
            let h = self.attention(&x, layer, caches, rows)?;
            let x = self
                .self_attn_layer_norm
                .forward(&x.add_elem(&h)?.round_to(dt)?)?;
            let h = self.mlp(&x)?;
            self.final_layer_norm
                .forward(&x.add_elem(&h)?.round_to(dt)?)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Opt {
    /// This rank's rows of the vocabulary; the head is tied to them.
    embed_tokens: VocabParallelEmbedding,
    embed_positions: Tensor,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<OptLayer>,
    final_layer_norm: Option<LayerNorm>,
    lm_head: Linear,
    cfg: OptConfig,
    dtype: DType,
}

impl Opt {
    /// `vb` points at the decoder (`embed_tokens`, `embed_positions`, `layers`, ...);
    /// the head is tied to `embed_tokens`, as in every OPT checkpoint. `comm`: this
    /// rank's group (heads, MLP and vocabulary split over it; `iris_comm::single()`
    /// for the whole model).
    pub fn load(vb: &Vb, cfg: &OptConfig, comm: Arc<dyn Communicator>) -> Result<Opt> {
        let (d, e) = (cfg.hidden_size, cfg.word_embed_proj_dim);
        let embed_tokens = VocabParallelEmbedding::load(
            vb,
            "embed_tokens.weight",
            cfg.vocab_size,
            e,
            comm.clone(),
        )?;
        let projections = if e != d {
            (
                Some(Linear::load(&vb.pp("project_in"), e, d, false)?),
                Some(Linear::load(&vb.pp("project_out"), d, e, false)?),
            )
        } else {
            (None, None)
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| OptLayer::load(&vb.pp("layers").pp(i), cfg, &comm))
            .collect::<Result<_>>()?;
        let final_layer_norm = if cfg.final_layer_norm {
            Some(LayerNorm::load(&vb.pp("final_layer_norm"), d, 1e-5)?)
        } else {
            None
        };
        Ok(Opt {
            embed_positions: vb.get(
                "embed_positions.weight",
                &[cfg.max_position_embeddings + POSITION_OFFSET, d],
            )?,
            lm_head: crate::layers::tied_head(
                vb,
                &embed_tokens,
                "embed_tokens.weight",
                &[cfg.vocab_size, d],
            )?,
            embed_tokens,
            project_in: projections.0,
            project_out: projections.1,
            layers,
            final_layer_norm,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &OptConfig {
        &self.cfg
    }
}

impl CausalLm for Opt {
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    fn kv_width(&self) -> usize {
        self.layers.first().map_or(self.cfg.hidden_size, |l| {
            l.shape.n_kv_heads * l.shape.head_dim
        })
    }

    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        self.embed_tokens.embed(ids)
    }

    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self
            .forward_batch(&[embeds], &mut [cache])?
            .pop()
            .expect("one sequence, one output"))
    }

    /// Every sequence's rows in one pass through the layers (weights read once a step).
    fn forward_batch(
        &self,
        embeds: &[&Tensor],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Tensor>> {
        let rows: Vec<usize> = embeds.iter().map(|e| e.rows()).collect();
        let mut positions: Vec<u32> = Vec::with_capacity(rows.iter().sum());
        for (cache, &t) in caches.iter().zip(&rows) {
            let start = cache.len();
            if start + t > self.cfg.max_position_embeddings {
                return Err(Error::Input(format!(
                    "{} tokens exceed the model's {} positions",
                    start + t,
                    self.cfg.max_position_embeddings
                )));
            }
            positions.extend((start..start + t).map(|p| (p + POSITION_OFFSET) as u32));
        }
        let embeds = Tensor::cat_rows(embeds)?;
        let mut x = match &self.project_in {
            Some(p) => p.forward(&embeds)?,
            None => embeds,
        };
        x = x
            .add_elem(&self.embed_positions.index_rows(&positions)?)?
            .round_to(self.dtype)?;
        let layers = iris_tensor::on_pool(|| {
            for (i, layer) in self.layers.iter().enumerate() {
                x = layer.forward(x, i, caches, &rows)?;
            }
            Ok::<_, Error>(x)
        });
        let mut x = match layers {
            Ok(x) => x,
            Err(e) => {
                let width = self.kv_width();
                for cache in caches.iter_mut() {
                    cache.rollback(width);
                }
                return Err(e);
            }
        };
        for (cache, &t) in caches.iter_mut().zip(&rows) {
            cache.advance(t);
        }
        if let Some(n) = &self.final_layer_norm {
            x = n.forward(&x)?;
        }
        let x = match &self.project_out {
            Some(p) => p.forward(&x)?,
            None => x,
        };
        let mut r0 = 0;
        rows.iter()
            .map(|&t| {
                let part = x.narrow_rows(r0, t);
                r0 += t;
                Ok(part?)
            })
            .collect()
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.embed_tokens
            .gather_logits(self.lm_head.forward(hidden)?)
    }
}
