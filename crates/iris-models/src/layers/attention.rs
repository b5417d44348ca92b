//! Scaled dot-product attention over contiguous `[tokens, heads·head_dim]` buffers,
//! with grouped-query attention (Ainslie et al., 2023) and an optional causal mask.
//! Scores, softmax and mixing are f32 (as PyTorch's CPU kernels accumulate); heads run
//! in parallel.

use iris_tensor::kernels::dot_f32;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// `q`: `[tq, n_heads·hd]`; `k`, `v`: `[tk, n_kv_heads·hd]`. With `causal_offset =
/// Some(p)`, query `i` sits at position `p + i` and sees keys `0..=p+i`; with `None`
/// every query sees every key. Returns `[tq, n_heads·hd]`.
pub fn sdpa(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    causal_offset: Option<usize>,
) -> Vec<f32> {
    let hd = s.head_dim;
    let (qw, kw) = (s.n_heads * hd, s.n_kv_heads * hd);
    let tq = q.len() / qw;
    let tk = k.len() / kw;
    let group = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let per_head: Vec<Vec<f32>> = (0..s.n_heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            let mut out = vec![0f32; tq * hd];
            let mut scores = vec![0f32; tk];
            for i in 0..tq {
                let limit = causal_offset.map_or(tk, |p| (p + i + 1).min(tk));
                let qi = &q[i * qw + h * hd..i * qw + (h + 1) * hd];
                for (j, sc) in scores[..limit].iter_mut().enumerate() {
                    *sc = dot_f32(qi, &k[j * kw + kvh * hd..j * kw + (kvh + 1) * hd]) * scale;
                }
                iris_tensor::softmax_in_place(&mut scores[..limit]);
                let o = &mut out[i * hd..(i + 1) * hd];
                for (j, &p) in scores[..limit].iter().enumerate() {
                    let vj = &v[j * kw + kvh * hd..j * kw + (kvh + 1) * hd];
                    o.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
                }
            }
            out
        })
        .collect();
    let mut out = vec![0f32; tq * qw];
    for (h, ph) in per_head.iter().enumerate() {
        for i in 0..tq {
            out[i * qw + h * hd..i * qw + (h + 1) * hd].copy_from_slice(&ph[i * hd..(i + 1) * hd]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_first_query_copies_first_value_and_gqa_shares_kv() {
        let s = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
        };
        let q = vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5];
        let k = vec![1.0, 0.0, 0.0, 1.0];
        let v = vec![3.0, 4.0, 5.0, 6.0];
        let o = sdpa(&q, &k, &v, s, Some(0));
        assert_eq!(&o[..4], &[3.0, 4.0, 3.0, 4.0]);
        // Second query sees both keys with equal scores: the mean of the values.
        assert!((o[4] - 4.0).abs() < 1e-6 && (o[5] - 5.0).abs() < 1e-6);
        let full = sdpa(&q[..4], &k, &v, s, None);
        assert!(full[0] > 3.0 && full[0] < 5.0);
    }
}
