//! Attention as tensor operations: scaled dot-product attention with grouped-query
//! heads (Ainslie et al., 2023) over given keys and values (prefill, a ViT's images,
//! cross-attention) or over sequences' caches (a batch step over the paged KV arena).
//! Each runs on its operands' backend.

use std::ops::Range;

use crate::error::shape_err;
use crate::kv::KvCache;
use crate::storage::{BackendStorage, Storage};
use crate::{Device, Result, Tensor};

/// Heads of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// From this many queries the products run in bf16 with f32 sums, the scale on the
    /// f32 scores and the probabilities rounded to bf16 before they mix the values —
    /// PyTorch's CPU flash attention for bf16, step for step: `Some(0)` for a bf16 model
    /// (its queries, keys and values are bf16 values), `Some(quant::GEMM_ROWS)` for a
    /// block-quantized one (whose products round to bf16 from as many rows), `None`
    /// for f32 throughout.
    pub bf16_products_from: Option<usize>,
}

impl AttnShape {
    fn q_width(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    fn check(&self, q: &Tensor) -> Result<()> {
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return shape_err(
                "attention",
                format!(
                    "{} query heads over {} KV heads",
                    self.n_heads, self.n_kv_heads
                ),
            );
        }
        if q.last_dim() != self.q_width() {
            return shape_err(
                "attention",
                format!(
                    "queries {:?} for {} heads of {}",
                    q.shape(),
                    self.n_heads,
                    self.head_dim
                ),
            );
        }
        Ok(())
    }
}

/// `q` `[tq, n_heads·hd]` attending to `k`, `v` `[tk, n_kv_heads·hd]`: with `causal =
/// Some(p)` query `i` sits at position `p + i` and sees keys `0..=p+i`; with `None`
/// every query sees every key. Returns `[tq, n_heads·hd]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    causal: Option<usize>,
) -> Result<Tensor> {
    attention_blocks(q, k, v, q.rows(), s, causal)
}

/// [`attention`] of independent blocks of `tokens` rows each (a ViT's images, batched
/// for the projections): block `b`'s queries see only block `b`'s keys.
pub fn attention_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    tokens: usize,
    s: AttnShape,
    causal: Option<usize>,
) -> Result<Tensor> {
    s.check(q)?;
    if k.shape() != v.shape() || k.last_dim() != s.kv_width() {
        return shape_err(
            "attention",
            format!(
                "keys {:?} values {:?} for {} KV heads",
                k.shape(),
                v.shape(),
                s.n_kv_heads
            ),
        );
    }
    let blocks = q.rows().checked_div(tokens).unwrap_or(0);
    if blocks * tokens != q.rows()
        || (blocks > 0 && !k.rows().is_multiple_of(blocks))
        || (blocks > 1 && k.rows() != q.rows())
    {
        return shape_err(
            "attention",
            format!(
                "{} queries, {} keys in blocks of {tokens}",
                q.rows(),
                k.rows()
            ),
        );
    }
    let out = Storage::attention(&q.storage, &k.storage, &v.storage, s, causal, blocks.max(1))?;
    Ok(Tensor::new(out, vec![q.rows(), s.q_width()]))
}

/// A batch step's attention over the sequences' caches: sequence `i`'s queries are the
/// next `rows[i]` rows of `q` (`[Σ rows, n_heads·hd]`), its keys and values `layer` of
/// `caches[i]` — this step's already written (`KvCache::write`) after its `len()`
/// cached rows — causally from its `len()`. One parallel loop for the whole step.
pub fn attention_cached(
    q: &Tensor,
    caches: &[&mut KvCache],
    rows: &[usize],
    layer: usize,
    s: AttnShape,
) -> Result<Tensor> {
    s.check(q)?;
    if rows.len() != caches.len() || rows.iter().sum::<usize>() != q.rows() {
        return shape_err(
            "attention_cached",
            format!(
                "{} rows for {:?} over {} caches",
                q.rows(),
                rows,
                caches.len()
            ),
        );
    }
    // Caches in a GPU arena: the paged kernel, on the arena's device.
    #[cfg(feature = "cuda")]
    if let Some(dev) = caches
        .first()
        .and_then(|c| c.paged_parts())
        .filter(|(a, _)| a.gpu().is_some())
        .map(|(a, _)| a.device())
    {
        let out = crate::cuda::paged_attention(&q.to_device(dev)?, caches, rows, layer, s)?;
        return out.to_device(q.device());
    }
    // Host caches: the host kernels (a device's queries visit the host and come back,
    // for the tools and tests that keep a sequence's own buffers).
    let host = q.to_device(Device::Cpu)?;
    let out =
        crate::cpu::attention::sdpa_batch(host.as_f32()?, caches, rows, layer, s.kv_width(), s);
    Tensor::from_f32(out, &[q.rows(), s.q_width()])?.to_device(q.device())
}

/// `q` attending to the cross-attention keys and values `layer` of `cache` holds (an
/// image's), their rows `keys` when given (one image of several); `None` when the
/// cache has none for `layer`.
pub fn attention_cross(
    q: &Tensor,
    cache: &KvCache,
    layer: usize,
    keys: Option<Range<usize>>,
    s: AttnShape,
) -> Result<Option<Tensor>> {
    s.check(q)?;
    if let Some((k, v)) = cache.cross_tensors(layer) {
        // Keys and values the sequence holds as tensors, on any device.
        let (k, v) = match keys {
            Some(r) if r.end > k.rows() => {
                return shape_err("attention_cross", format!("keys {r:?} of {}", k.rows()))
            }
            Some(r) => (
                k.narrow_rows(r.start, r.len())?,
                v.narrow_rows(r.start, r.len())?,
            ),
            None => (k.clone(), v.clone()),
        };
        return attention(q, &k, &v, s, None).map(Some);
    }
    let Some(kv) = cache.cross(layer, s.kv_width()) else {
        return Ok(None);
    };
    let kv = match keys {
        Some(r) if r.end > kv.len() => {
            return shape_err("attention_cross", format!("keys {r:?} of {}", kv.len()))
        }
        Some(r) => kv.rows(r),
        None => kv,
    };
    // Rows in a host arena's blocks.
    let host = q.to_device(Device::Cpu)?;
    let out = crate::cpu::attention::sdpa_view(host.as_f32()?, &kv, s, None);
    Ok(Some(
        Tensor::from_f32(out, &[q.rows(), s.q_width()])?.to_device(q.device())?,
    ))
}
