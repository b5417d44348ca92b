//! The CPU backend's attention over contiguous `[tokens, heads·head_dim]` buffers or a
//! paged cache's blocks, with grouped-query attention (Ainslie et al., 2023) and an
//! optional causal mask. Scores, softmax and mixing are f32 (as PyTorch's CPU kernels
//! accumulate); heads run in parallel.

use crate::attention::AttnShape;
use crate::kv::{KvCache, KvRow, KvView};
use rayon::prelude::*;

/// From this many queries at once, attention runs as matrix products.
const GEMM_MIN_QUERIES: usize = 16;

/// Queries per block of the bf16 path: a block's scores stop at its last query's keys.
const QUERY_BLOCK: usize = 96;

/// `q`: `[tq, n_heads·hd]`; `k`, `v`: `[tk, n_kv_heads·hd]`. With `causal_offset =
/// Some(p)`, query `i` sits at position `p + i` and sees keys `0..=p+i`; with `None`
/// every query sees every key. Returns `[tq, n_heads·hd]`.
pub(crate) fn sdpa(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    causal_offset: Option<usize>,
) -> Vec<f32> {
    let width = s.n_kv_heads * s.head_dim;
    sdpa_view(q, &KvView::Rows { k, v, width }, s, causal_offset)
}

/// What every attention path derives from its inputs: (head width, query row width,
/// queries, keys, query heads per KV head, 1/√head_dim).
fn dims(q: &[f32], kv: &KvView, s: AttnShape) -> (usize, usize, usize, usize, usize, f32) {
    let hd = s.head_dim;
    let qw = s.n_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    (
        hd,
        qw,
        q.len() / qw,
        kv.len(),
        s.n_heads / s.n_kv_heads,
        scale,
    )
}

/// [`sdpa`] over keys and values wherever they live (a sequence's rows or the blocks
/// of a paged cache, read through its block table).
pub(crate) fn sdpa_view(
    q: &[f32],
    kv: &KvView,
    s: AttnShape,
    causal_offset: Option<usize>,
) -> Vec<f32> {
    let (hd, qw, tq, tk, group, scale) = dims(q, kv, s);
    let key = |j: usize, h: usize| kv.row(j).0.part(h * hd..(h + 1) * hd);
    let value = |j: usize, h: usize| kv.row(j).1.part(h * hd..(h + 1) * hd);
    if tq >= GEMM_MIN_QUERIES
        && s.bf16_products_from.is_some_and(|from| tq >= from)
        && crate::kernels::has_avx512_bf16()
    {
        return sdpa_bf16(q, kv, s, causal_offset);
    }
    if tq < GEMM_MIN_QUERIES {
        // Decode: a task per KV head, its query heads together (they share its keys).
        let per_group: Vec<Vec<f32>> = (0..s.n_kv_heads)
            .into_par_iter()
            .map(|g| attend_group(q, kv, s, causal_offset, g))
            .collect();
        return interleave(&per_group, tq, group * hd);
    }
    let per_head: Vec<Vec<f32>> = (0..s.n_heads)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            // Prefill / ViT: scores and mixing as two matrix products per head.
            // The scale goes on the queries (tq·hd products, not tq·tk).
            let mut qh = gather(tq, hd, |i| &q[i * qw + h * hd..i * qw + (h + 1) * hd]);
            qh.iter_mut().for_each(|x| *x *= scale);
            let kh = gather_rows(tk, hd, |j| key(j, kvh));
            let vh = gather_rows(tk, hd, |j| value(j, kvh));
            let mut scores = crate::cpu::matmul::gemm_f32(&qh, &kh, tq, tk, hd, true);
            for (i, row) in scores.chunks_exact_mut(tk).enumerate() {
                let limit = causal_offset.map_or(tk, |p| (p + i + 1).min(tk));
                crate::softmax_in_place(&mut row[..limit]);
                row[limit..].iter_mut().for_each(|x| *x = 0.0);
            }
            crate::cpu::matmul::gemm_f32(&scores, &vh, tq, hd, tk, false)
        })
        .collect();
    interleave(&per_head, tq, hd)
}

/// The few queries of a decode step for the query heads of KV head `g`, one query and
/// head at a time (f32 dot products, softmax, then the values mixed in key order):
/// `[tq, group·hd]`.
fn attend_group(
    q: &[f32],
    kv: &KvView,
    s: AttnShape,
    causal_offset: Option<usize>,
    g: usize,
) -> Vec<f32> {
    let (hd, qw, tq, tk, group, scale) = dims(q, kv, s);
    let mut out = vec![0f32; tq * group * hd];
    // Scores of the group's heads, `[head][key]`.
    let mut scores = vec![0f32; group * tk];
    let key = |j: usize| kv.row(j).0.part(g * hd..(g + 1) * hd);
    for i in 0..tq {
        let limit = causal_offset.map_or(tk, |p| (p + i + 1).min(tk));
        let q_of = |h: usize| &q[i * qw + (g * group + h) * hd..i * qw + (g * group + h + 1) * hd];
        // Four heads and four keys a tile: each key is loaded once for four heads.
        let tiled = if group % 4 == 0 { limit / 4 * 4 } else { 0 };
        for h0 in (0..group).step_by(4).filter(|_| tiled > 0) {
            let qs = [q_of(h0), q_of(h0 + 1), q_of(h0 + 2), q_of(h0 + 3)];
            for j0 in (0..tiled).step_by(4) {
                let ks = [key(j0), key(j0 + 1), key(j0 + 2), key(j0 + 3)];
                let t = KvRow::dot_4x4(ks, qs).expect("one view, one dtype");
                for (dj, tj) in t.iter().enumerate() {
                    for (dh, v) in tj.iter().enumerate() {
                        scores[(h0 + dh) * tk + j0 + dj] = v * scale;
                    }
                }
            }
        }
        for h in 0..group {
            let row = &mut scores[h * tk..h * tk + limit];
            for (j, sc) in row.iter_mut().enumerate().skip(tiled) {
                *sc = key(j).dot(q_of(h)) * scale;
            }
            crate::softmax_in_place(row);
        }
        let o = &mut out[i * group * hd..(i + 1) * group * hd];
        for j in 0..limit {
            // One value row mixed into every head of the group while it is in cache.
            let v = kv.row(j).1.part(g * hd..(g + 1) * hd);
            for (h, oh) in o.chunks_exact_mut(hd).enumerate() {
                v.add_scaled(scores[h * tk + j], oh);
            }
        }
    }
    out
}

/// Causal attention of a batch step: sequence `i`'s queries are the next `rows[i]` rows
/// of `q` (`[Σ rows, n_heads·hd]`) and its keys and values `layer` of `caches[i]`, this
/// step's already written after its `len()` cached rows. One parallel loop for the
/// whole step (one fork-join a layer, not one a sequence): a task per decoding
/// sequence and KV head, or per sequence with a prefill's many queries; outputs back to
/// back.
pub(crate) fn sdpa_batch(
    q: &[f32],
    caches: &[&mut KvCache],
    rows: &[usize],
    layer: usize,
    kv_width: usize,
    s: AttnShape,
) -> Vec<f32> {
    let qw = s.n_heads * s.head_dim;
    let first: Vec<usize> = rows
        .iter()
        .scan(0, |r0, &t| {
            let at = *r0;
            *r0 += t;
            Some(at)
        })
        .collect();
    // Decoding sequences by KV head (`Some(g)`), a prefill chunk whole (`None`).
    let tasks: Vec<(usize, Option<usize>)> = rows
        .iter()
        .enumerate()
        .flat_map(|(i, &t)| {
            let parts: Vec<Option<usize>> = if t < GEMM_MIN_QUERIES {
                (0..s.n_kv_heads).map(Some).collect()
            } else {
                vec![None]
            };
            parts.into_iter().map(move |g| (i, g))
        })
        .collect();
    let outs: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(i, g)| {
            let (t, r0, start) = (rows[i], first[i], caches[i].len());
            let kv = caches[i].view(layer, kv_width, start + t);
            let q = &q[r0 * qw..(r0 + t) * qw];
            match g {
                Some(g) => attend_group(q, &kv, s, Some(start), g),
                None => sdpa_view(q, &kv, s, Some(start)),
            }
        })
        .collect();
    // Tasks are in sequence order: each sequence's rows from its part(s).
    let mut parts = outs.into_iter();
    let mut out = Vec::with_capacity(q.len());
    for &t in rows {
        if t < GEMM_MIN_QUERIES {
            let groups: Vec<Vec<f32>> = parts.by_ref().take(s.n_kv_heads).collect();
            out.extend(interleave(&groups, t, qw / s.n_kv_heads));
        } else {
            out.extend(parts.next().expect("a part for each prefill chunk"));
        }
    }
    out
}

/// Heads' `[tq, hd]` outputs back into `[tq, n_heads·hd]` rows.
fn interleave(per_head: &[Vec<f32>], tq: usize, hd: usize) -> Vec<f32> {
    let qw = per_head.len() * hd;
    let mut out = vec![0f32; tq * qw];
    for (h, ph) in per_head.iter().enumerate() {
        for i in 0..tq {
            out[i * qw + h * hd..i * qw + (h + 1) * hd].copy_from_slice(&ph[i * hd..(i + 1) * hd]);
        }
    }
    out
}

/// Many queries of a bf16 model: each KV head's keys, and values transposed, are packed
/// once for the packed `vdpbf16ps` GEMM; queries go in blocks, and a causal block's
/// scores and mixing stop at the keys its last query sees.
fn sdpa_bf16(q: &[f32], kv: &KvView, s: AttnShape, causal_offset: Option<usize>) -> Vec<f32> {
    use crate::packed::{matmul_packed_part, PackedBf16};
    let (hd, qw, tq, tk, group, scale) = dims(q, kv, s);
    let packed: Vec<(PackedBf16, PackedBf16)> = (0..s.n_kv_heads)
        .into_par_iter()
        .map(|h| {
            let kh = gather_rows(tk, hd, |j| kv.row(j).0.part(h * hd..(h + 1) * hd));
            let vh = gather_rows(tk, hd, |j| kv.row(j).1.part(h * hd..(h + 1) * hd));
            (
                PackedBf16::pack_fn(tk, hd, |j, d| kh[j * hd + d]),
                PackedBf16::pack_fn(hd, tk, |d, j| vh[j * hd + d]),
            )
        })
        .collect();
    let per_head: Vec<Vec<f32>> = (0..s.n_heads)
        .into_par_iter()
        .map(|h| {
            let (pk, pv) = &packed[h / group];
            let qh = gather(tq, hd, |i| &q[i * qw + h * hd..i * qw + (h + 1) * hd]);
            let mut out = Vec::with_capacity(tq * hd);
            for i0 in (0..tq).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(tq - i0);
                let sees = |i: usize| causal_offset.map_or(tk, |p| (p + i + 1).min(tk));
                let keys = sees(i0 + rows - 1);
                let mut scores =
                    matmul_packed_part(&qh[i0 * hd..(i0 + rows) * hd], rows, hd, pk, keys);
                for (r, row) in scores.chunks_exact_mut(keys).enumerate() {
                    let limit = sees(i0 + r);
                    crate::softmax_scaled_in_place(&mut row[..limit], scale);
                    row[limit..].iter_mut().for_each(|x| *x = 0.0);
                }
                out.extend(matmul_packed_part(&scores, rows, keys, pv, hd));
            }
            out
        })
        .collect();
    interleave(&per_head, tq, hd)
}

/// One head's rows back to back, one copy per row.
fn gather<'a>(n: usize, hd: usize, row: impl Fn(usize) -> &'a [f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * hd);
    (0..n).for_each(|j| out.extend_from_slice(row(j)));
    out
}

/// [`gather`] of K/V rows in whatever dtype the cache keeps them, as f32.
fn gather_rows<'a>(n: usize, hd: usize, row: impl Fn(usize) -> KvRow<'a>) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * hd);
    (0..n).for_each(|j| row(j).extend_into(&mut out));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrix_path_matches_the_query_loop() {
        let s = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            bf16_products_from: None,
        };
        let (tq, tk) = (20, 20);
        let f = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 37 + seed) % 23) as f32 - 11.0) / 13.0)
                .collect()
        };
        let (q, k, v) = (f(tq * 32, 1), f(tk * 16, 2), f(tk * 16, 3));
        for causal in [None, Some(0)] {
            let fast = sdpa(&q, &k, &v, s, causal);
            // The same queries one at a time take the loop.
            let mut slow = Vec::new();
            for i in 0..tq {
                let qi = &q[i * 32..(i + 1) * 32];
                let (kk, vv) = match causal {
                    Some(_) => (&k[..(i + 1) * 16], &v[..(i + 1) * 16]),
                    None => (&k[..], &v[..]),
                };
                slow.extend(sdpa(qi, kk, vv, s, causal.map(|_| i)));
            }
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() < 1e-5, "{causal:?}: {a} vs {b}");
            }
        }
    }

    /// The bf16 path (packed products, blocks of queries cut at the causal limit) gives
    /// the f32 path's result up to the bf16 rounding of the probabilities.
    #[test]
    fn bf16_products_match_the_f32_path() {
        // Without the instruction `bf16_products` takes the f32 path: still run, the
        // two agree trivially, and the note says so.
        crate::kernels::bf16_kernels_testable("bf16_products_match_the_f32_path");
        let shape = |bf16: bool| AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 40,
            bf16_products_from: bf16.then_some(0),
        };
        let f = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let x = (((i * 7919 + seed * 131) % 1009) as f32 - 504.0) / 300.0;
                    crate::round_scalar(x, crate::DType::BF16)
                })
                .collect()
        };
        for (tq, tk, causal) in [(150, 150, Some(0)), (40, 200, Some(160)), (30, 70, None)] {
            let (q, k, v) = (f(tq * 160, 1), f(tk * 80, 2), f(tk * 80, 3));
            let want = sdpa(&q, &k, &v, shape(false), causal);
            let got = sdpa(&q, &k, &v, shape(true), causal);
            assert_eq!(got.len(), want.len());
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 2e-2, "tq {tq} tk {tk} {causal:?}: off by {worst}");
        }
    }

    #[test]
    fn causal_first_query_copies_first_value_and_gqa_shares_kv() {
        let s = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            bf16_products_from: None,
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

    /// A batch step (decoding sequences by KV head, a prefill chunk whole) gives each
    /// sequence exactly what it gets attending alone.
    #[test]
    fn a_batch_step_equals_each_sequence_alone() {
        let s = AttnShape {
            n_heads: 8,
            n_kv_heads: 2,
            head_dim: 16,
            bf16_products_from: None,
        };
        let (qw, kw) = (8 * 16, 2 * 16);
        let f = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 37 + seed * 11) % 29) as f32 - 14.0) / 15.0)
                .collect()
        };
        // (cached rows, new rows): decode, a few rows, a prefill chunk.
        let shapes = [(5, 1), (9, 3), (0, 20), (30, 1)];
        let mut caches: Vec<KvCache> = Vec::new();
        let mut q = Vec::new();
        for (n, &(cached, new)) in shapes.iter().enumerate() {
            let mut c = KvCache::new(1);
            let total = cached + new;
            c.write_rows(0, &f(cached * kw, 3 * n), &f(cached * kw, 3 * n + 1), kw)
                .unwrap();
            c.advance(cached);
            c.write_rows(0, &f(new * kw, 3 * n + 2), &f(new * kw, 3 * n), kw)
                .unwrap();
            assert_eq!(c.view(0, kw, total).len(), total);
            q.extend(f(new * qw, 7 + n));
            caches.push(c);
        }
        let rows: Vec<usize> = shapes.iter().map(|&(_, t)| t).collect();
        let refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let batch = sdpa_batch(&q, &refs, &rows, 0, kw, s);
        let mut r0 = 0;
        for (c, &(cached, new)) in caches.iter().zip(&shapes) {
            let kv = c.view(0, kw, cached + new);
            let alone = sdpa_view(&q[r0 * qw..(r0 + new) * qw], &kv, s, Some(cached));
            assert_eq!(alone, &batch[r0 * qw..(r0 + new) * qw]);
            r0 += new;
        }
    }
}
