//! bf16 × bf16 matrix product for many rows (prefill, the ViT) with `vdpbf16ps`, laid
//! out as a classic GEMM (Goto & van de Geijn, 2008): the weight is packed into panels
//! of 32 output columns whose k-pairs sit side by side, so one step of the micro-kernel
//! loads two vectors of weights (32 columns × 2 k), broadcasts one pair of each of 12
//! activation rows and issues 24 `vdpbf16ps` into 24 accumulators. k is blocked only
//! past 2048 pairs: a weight micro-panel stays in L2 while the activations' row tiles
//! (packed 12 rows side by side) stream past it, and each output tile is stored once.
//!
//! Each output is one f32 accumulator fed k-pairs in order (blocking only stores and
//! reloads it), so results do not depend on the blocking, the row tile or the thread.

use half::bf16;
use rayon::prelude::*;

/// Output columns per packed panel (two AVX-512 vectors of f32).
pub const PANEL: usize = 32;
/// Activation rows per micro-kernel call (24 accumulators, of 32 registers).
const MR: usize = 12;
/// k-pairs per cache block: a weight micro-panel is `KC·PANEL·4` bytes (256 KiB), so it
/// stays in L2 while every row tile passes it. Blocking k finer (128 pairs, 16 KiB for
/// L1) made each output tile be loaded and stored once per block, from a working set
/// that no longer fit L2: 165-190 GFLOP/s a core vs 205-220 (peak 231) at 608 rows.
const KC: usize = 2048;
/// Parts of a weight's panels a one-row product reads in lockstep, a panel of each at
/// a time: two streams a core read faster than one. bf16 batch 1, TinyLlama's shape,
/// steps alternating in one process: 91–93% of the weight-read bound vs 89–92% with
/// one panel at a time, and 89–90% with two neighbouring panels (each stream then
/// jumps every 128 KiB); four parts were no better.
const STREAMS: usize = 2;

/// `w` (`[n, k]` bf16) packed in panels of `PANEL` columns, each `[k/2][PANEL][2]`,
/// zero-padded to whole panels and an even k.
#[derive(Clone)]
pub struct PackedBf16 {
    data: Vec<bf16>,
    n: usize,
    k: usize,
    /// k-pairs.
    kp: usize,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16[{}, {}]", self.n, self.k)
    }
}

impl PackedBf16 {
    pub fn pack(w: &[bf16], n: usize, k: usize) -> PackedBf16 {
        assert_eq!(w.len(), n * k, "pack: weight is not [n, k]");
        let kp = k.div_ceil(2);
        let mut data = vec![bf16::ZERO; n.div_ceil(PANEL) * kp * PANEL * 2];
        data.par_chunks_mut(kp * PANEL * 2)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..PANEL.min(n - p * PANEL) {
                    let row = &w[(p * PANEL + c) * k..(p * PANEL + c + 1) * k];
                    for (t, pair) in row.chunks(2).enumerate() {
                        let at = t * PANEL * 2 + c * 2;
                        panel[at] = pair[0];
                        if let Some(&b) = pair.get(1) {
                            panel[at + 1] = b;
                        }
                    }
                }
            });
        PackedBf16 { data, n, k, kp }
    }

    /// Packs the `[n, k]` matrix whose row `j`, column `t` is `at(j, t)` (rounded to
    /// bf16): attention packs a head's keys, and its values transposed, this way.
    pub fn pack_fn(n: usize, k: usize, at: impl Fn(usize, usize) -> f32) -> PackedBf16 {
        let kp = k.div_ceil(2);
        let mut data = vec![bf16::ZERO; n.div_ceil(PANEL) * kp * PANEL * 2];
        for (p, panel) in data.chunks_mut(kp * PANEL * 2).enumerate() {
            for c in 0..PANEL.min(n - p * PANEL) {
                for t in 0..k {
                    // As bf16::from_f32, through the inlined rounding.
                    let v = crate::round_scalar(at(p * PANEL + c, t), crate::DType::BF16);
                    panel[(t / 2) * PANEL * 2 + c * 2 + t % 2] =
                        bf16::from_bits((v.to_bits() >> 16) as u16);
                }
            }
        }
        PackedBf16 { data, n, k, kp }
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input columns.
    pub fn k(&self) -> usize {
        self.k
    }
}

/// `x[m, k] · Wᵀ` for f32 activations (rounded to bf16, as PyTorch's bf16 matmul takes
/// them) and a packed bf16 weight; returns `[m, n]` f32. Needs AVX-512 BF16.
pub fn matmul_packed(x: &[f32], m: usize, k: usize, w: &PackedBf16) -> Vec<f32> {
    assert!(
        crate::kernels::has_avx512_bf16(),
        "matmul_packed needs AVX-512 BF16"
    );
    assert_eq!(x.len(), m * k, "matmul_packed: x is not [m, k]");
    assert_eq!(
        w.kp,
        k.div_ceil(2),
        "matmul_packed: k differs from the weight's"
    );
    matmul_packed_many(x, m, k, &[w])
        .pop()
        .expect("one weight, one product")
}

/// `x · Wᵢᵀ` for several weights of the same `k` (a layer's q, k and v, or gate and
/// up): the activations are packed once and every weight's panels share one parallel
/// loop, so the threads meet once rather than once a weight.
pub fn matmul_packed_many(x: &[f32], m: usize, k: usize, ws: &[&PackedBf16]) -> Vec<Vec<f32>> {
    assert!(
        crate::kernels::has_avx512_bf16(),
        "matmul_packed needs AVX-512 BF16"
    );
    assert_eq!(x.len(), m * k, "matmul_packed: x is not [m, k]");
    let kp = k.div_ceil(2);
    for w in ws {
        assert_eq!(w.kp, kp, "matmul_packed: k differs from the weight's");
    }
    let a = pack_rows(x, m, k, kp, true, m == 1);
    let parts: Vec<_> = ws.iter().map(|w| (*w, w.n)).collect();
    products(&a, m, kp, &parts, true)
}

/// [`matmul_packed`] on one thread (for use inside a parallel loop, e.g. over attention
/// heads) with only the first `k` of the weight's inputs and its first `n` outputs:
/// `x[m, k] · W[..n, ..k]ᵀ`, returns `[m, n]`.
pub fn matmul_packed_part(x: &[f32], m: usize, k: usize, w: &PackedBf16, n: usize) -> Vec<f32> {
    assert!(
        crate::kernels::has_avx512_bf16(),
        "matmul_packed_part needs AVX-512 BF16"
    );
    assert_eq!(x.len(), m * k, "matmul_packed_part: x is not [m, k]");
    assert!(
        k <= w.k && n <= w.n,
        "matmul_packed_part: [{n}, {k}] of a [{}, {}] weight",
        w.n,
        w.k
    );
    let kp = k.div_ceil(2);
    let a = pack_rows(x, m, k, kp, false, m == 1);
    products(&a, m, kp, &[(w, n)], false)
        .pop()
        .expect("one weight, one product")
}

/// Rows packed by `pack_rows` (`kp` pairs each; one row compact) times the first `kp`
/// pairs and `n` columns of each `(w, n)`.
fn products(
    a: &[u32],
    m: usize,
    kp: usize,
    ws: &[(&PackedBf16, usize)],
    parallel: bool,
) -> Vec<Vec<f32>> {
    // Not zeroed: the first k-block of every tile stores (rather than adds) each of its
    // rows' columns, so every element is written before `set_len` below.
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|&(_, n)| Vec::with_capacity(m * n)).collect();
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    // One task a panel of one weight (each writes only its panel's columns; rayon
    // balances them over the threads): the panel's k-block meets every row tile in turn.
    // One row: each weight's panels in STREAMS parts, a task a panel of each, read in
    // lockstep (a part's panels are one contiguous run).
    let per_task = if m == 1 { STREAMS } else { 1 };
    let tasks: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(j, &(_, n))| (0..n.div_ceil(PANEL).div_ceil(per_task)).map(move |p| (j, p)))
        .collect();
    let panel = |&(j, p): &(usize, usize)| {
        let (w, n) = ws[j];
        let b = &w.data[p * w.kp * PANEL * 2..][..kp * PANEL * 2];
        // SAFETY: panel p's columns of output j are written by this task alone.
        unsafe { panel_product(a, m, kp, b, &ptrs[j], n, p) };
    };
    let group = |&(j, p): &(usize, usize)| {
        let (w, n) = ws[j];
        let panels = n.div_ceil(PANEL);
        let part = panels.div_ceil(STREAMS);
        let ps: [usize; STREAMS] = std::array::from_fn(|s| p + s * part);
        if ps[STREAMS - 1] < panels {
            // SAFETY: these panels of output j are this task's alone.
            unsafe { gemv_panels(a, kp, w, &ptrs[j], n, ps) };
        } else {
            for &p in ps.iter().filter(|&&p| p < panels) {
                // SAFETY: as above, for one panel.
                unsafe { gemv_panels(a, kp, w, &ptrs[j], n, [p]) };
            }
        }
    };
    let run: &(dyn Fn(&(usize, usize)) + Sync) = if m == 1 { &group } else { &panel };
    if parallel {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
    for (o, &(_, n)) in outs.iter_mut().zip(ws) {
        // SAFETY: every element of the m × n output was stored above.
        unsafe { o.set_len(m * n) };
    }
    outs
}

/// Rows packed by `pack_rows` times one packed panel `b` (`kp` pairs of `PANEL`
/// columns), into panel `p`'s columns of the `[m, n]` output at `c`.
///
/// # Safety
/// AVX-512 BF16 is present; no other thread writes panel `p`'s columns of `c` meanwhile.
unsafe fn panel_product(
    a: &[u32],
    m: usize,
    kp: usize,
    b: &[bf16],
    c: &OutPtr,
    n: usize,
    p: usize,
) {
    for k0 in (0..kp).step_by(KC) {
        let kc = KC.min(kp - k0);
        let b = &b[k0 * PANEL * 2..][..kc * PANEL * 2];
        let cols = PANEL.min(n - p * PANEL);
        let mut i = 0;
        while i < m {
            let rows = MR.min(m - i);
            let a = &a[i * kp + k0 * MR..];
            // SAFETY: `a` holds the row tile's pairs from `k0` on, `b` kc pairs of PANEL
            // columns; the output rows i.. and columns of panel p are the caller's.
            unsafe { x86::micro(a, b, kc, c.0.add(i * n + p * PANEL), n, rows, cols, k0 > 0) };
            i += rows;
        }
    }
}

/// One row (`a`, its `kp` pairs, compact) times panels `ps` of `w`, read in lockstep,
/// into their columns of the `[1, n]` output at `c`.
///
/// # Safety
/// AVX-512 BF16 is present; panels `ps` exist; no other thread writes their columns of
/// `c` meanwhile.
unsafe fn gemv_panels<const S: usize>(
    a: &[u32],
    kp: usize,
    w: &PackedBf16,
    c: &OutPtr,
    n: usize,
    ps: [usize; S],
) {
    let bs = ps.map(|p| &w.data[p * w.kp * PANEL * 2..][..kp * PANEL * 2]);
    // SAFETY: panel p's columns are inside the output (the caller's).
    let outs = ps.map(|p| unsafe { c.0.add(p * PANEL) });
    let cols = ps.map(|p| PANEL.min(n - p * PANEL));
    for k0 in (0..kp).step_by(KC) {
        let kc = KC.min(kp - k0);
        let b = bs.map(|b| &b[k0 * PANEL * 2..][..kc * PANEL * 2]);
        // SAFETY: as the caller's; `a` holds row 0's pairs from k0 on.
        unsafe { x86::gemv(&a[k0..], b, kc, outs, cols, k0 > 0) };
    }
}

/// `x[m, k] · Wᵢᵀ` for weights given panel by panel rather than packed ahead:
/// `panel(i, p, out)` writes weight i's panel p (its output columns `p·PANEL..`, zero
/// past its `nᵢ`) as [`PackedBf16`] lays a panel out, `[k/2][PANEL][2]`, into `out`.
/// Each parallel task makes its panel, then meets every row tile with it: a
/// block-quantized weight's prefill runs on the bf16 GEMM, dequantizing each panel once
/// for all the rows. Needs AVX-512 BF16.
pub fn matmul_panels_many(
    x: &[f32],
    m: usize,
    k: usize,
    ns: &[usize],
    panel: &(dyn Fn(usize, usize, &mut [bf16]) + Sync),
) -> Vec<Vec<f32>> {
    assert!(
        crate::kernels::has_avx512_bf16(),
        "matmul_panels_many needs AVX-512 BF16"
    );
    assert_eq!(x.len(), m * k, "matmul_panels_many: x is not [m, k]");
    let kp = k.div_ceil(2);
    let a = pack_rows(x, m, k, kp, true, false);
    let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| Vec::with_capacity(m * n)).collect();
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| OutPtr(o.as_mut_ptr())).collect();
    let tasks: Vec<(usize, usize)> = ns
        .iter()
        .enumerate()
        .flat_map(|(j, &n)| (0..n.div_ceil(PANEL)).map(move |p| (j, p)))
        .collect();
    tasks.par_iter().for_each_init(
        || vec![bf16::ZERO; kp * PANEL * 2],
        |buf, &(j, p)| {
            panel(j, p, buf);
            // SAFETY: AVX-512 BF16 was checked above; panel p of output j is this task's.
            unsafe { panel_product(&a, m, kp, buf, &ptrs[j], ns[j], p) };
        },
    );
    for (o, &n) in outs.iter_mut().zip(ns) {
        // SAFETY: every element of the m × n output was stored above (the first
        // k-block of every tile stores).
        unsafe { o.set_len(m * n) };
    }
    outs
}

/// The activations rounded to bf16 and packed by tiles of `MR` rows: tile `r` is
/// `[kp][MR][2]` (pair `t` of its rows side by side, zero past `m` and `k`), so the
/// micro-kernel reads one contiguous run per k-pair instead of `MR` rows a whole row
/// apart (which, at k = 2048, all fall into the same L1 set). `compact`: one row as
/// its pairs alone, `[kp]`, as the one-row GEMV reads it.
fn pack_rows(x: &[f32], m: usize, k: usize, kp: usize, parallel: bool, compact: bool) -> Vec<u32> {
    if compact {
        // One row, for the GEMV: its pairs alone. A 12-row tile of it was 12 times the
        // bytes, zeroed in a temporary as large: past 128 KiB (k = 5632) glibc maps and
        // unmaps both every call, and the kernel's page work showed in decode profiles.
        assert_eq!(m, 1, "a compact pack is one row");
        let mut a = vec![0u32; kp];
        // SAFETY: a u32 is two bf16 in memory order, and u32's alignment is larger.
        let halves = unsafe { std::slice::from_raw_parts_mut(a.as_mut_ptr() as *mut bf16, kp * 2) };
        crate::kernels::to_bf16(&x[..k], &mut halves[..k]);
        return a;
    }
    let tile = kp * MR;
    let len = m.div_ceil(MR) * tile;
    let mut a: Vec<u32> = Vec::with_capacity(len);
    let pack = |(r, tile): (usize, &mut [std::mem::MaybeUninit<u32>])| {
        // The tile's rows converted side by side (rows past m stay zero), then
        // interleaved pair by pair.
        let mut rows = vec![0u32; MR * kp];
        for (i, row) in rows
            .chunks_exact_mut(kp)
            .take(MR.min(m - r * MR))
            .enumerate()
        {
            // SAFETY: a u32 is two bf16 in memory order, and u32's alignment is larger.
            let halves =
                unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr() as *mut bf16, kp * 2) };
            crate::kernels::to_bf16(&x[(r * MR + i) * k..][..k], &mut halves[..k]);
        }
        for (t, pairs) in tile.chunks_exact_mut(MR).enumerate() {
            for (i, p) in pairs.iter_mut().enumerate() {
                p.write(rows[i * kp + t]);
            }
        }
    };
    let spare = &mut a.spare_capacity_mut()[..len];
    if parallel {
        spare.par_chunks_mut(tile).enumerate().for_each(pack);
    } else {
        spare.chunks_mut(tile).enumerate().for_each(pack);
    }
    // SAFETY: every element of every tile was written above.
    unsafe { a.set_len(len) };
    a
}

/// The output's base pointer, shared by the threads that write disjoint panels of it.
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of columns, and `out` outlives the loop.
unsafe impl Sync for OutPtr {}
unsafe impl Send for OutPtr {}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::bf16;
    use std::arch::x86_64::*;

    use super::{MR, PANEL};

    /// The store masks of a panel's two vectors for its first `cols` columns.
    fn col_masks(cols: usize) -> (u16, u16) {
        let lanes = |c: usize| {
            if c >= 16 {
                0xffff
            } else {
                (1u32 << c) as u16 - 1
            }
        };
        (lanes(cols), lanes(cols.saturating_sub(16)))
    }

    /// `c[rows, cols] (+)= a[kc pairs][MR rows] · b[kc pairs, PANEL]`, `c` with row stride
    /// `ldc`, accumulating onto `c` when `accumulate`.
    ///
    /// # Safety
    /// avx512f and avx512bf16 must be present; the slices as `matmul_packed` cuts them;
    /// `c` valid for `rows` rows of `cols` ≤ PANEL floats at stride `ldc`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn micro(
        a: &[u32],
        b: &[bf16],
        kc: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let masks = col_masks(cols);
        // One monomorphised loop per row count keeps the accumulators in registers.
        macro_rules! go {
            ($($r:literal)*) => {
                match rows {
                    $($r => unsafe { micro_n::<$r>(a, b, kc, c, ldc, masks, accumulate) },)*
                    _ => unreachable!("rows ≤ MR"),
                }
            };
        }
        const _: () = assert!(MR == 12);
        go!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    /// One row's pairs (`a`, compact: pair t at `a[t]`) times `S`
    /// panels read in lockstep, into `S` outputs of `cols[s]` columns.
    ///
    /// # Safety
    /// avx512f and avx512bf16 are present; each `b[s]` holds `kc` pairs of PANEL columns;
    /// each `c[s]` is valid for its columns.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn gemv<const S: usize>(
        a: &[u32],
        b: [&[bf16]; S],
        kc: usize,
        c: [*mut f32; S],
        cols: [usize; S],
        accumulate: bool,
    ) {
        assert!(a.len() >= kc);
        let masks = cols.map(col_masks);
        let mut acc = [[_mm512_setzero_ps(); 2]; S];
        for s in 0..S {
            assert!(b[s].len() >= kc * PANEL * 2);
            if accumulate {
                // SAFETY: c[s] is valid for its masked columns (the caller's).
                unsafe {
                    acc[s][0] = _mm512_maskz_loadu_ps(masks[s].0, c[s]);
                    acc[s][1] = _mm512_maskz_loadu_ps(masks[s].1, c[s].add(16));
                }
            }
        }
        let pa = a.as_ptr();
        let pb = b.map(|b| b.as_ptr());
        for t in 0..kc {
            // SAFETY: pair t of each panel and of the row is in bounds (asserted).
            unsafe {
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*pa.add(t) as i32));
                for s in 0..S {
                    let b0: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(pb[s].add(t * 64) as _));
                    let b1: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(pb[s].add(t * 64 + 32) as _));
                    acc[s][0] = _mm512_dpbf16_ps(acc[s][0], ai, b0);
                    acc[s][1] = _mm512_dpbf16_ps(acc[s][1], ai, b1);
                }
            }
        }
        for s in 0..S {
            // SAFETY: as above.
            unsafe {
                _mm512_mask_storeu_ps(c[s], masks[s].0, acc[s][0]);
                _mm512_mask_storeu_ps(c[s].add(16), masks[s].1, acc[s][1]);
            }
        }
    }

    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn micro_n<const R: usize>(
        a: &[u32],
        b: &[bf16],
        kc: usize,
        c: *mut f32,
        ldc: usize,
        (m0, m1): (u16, u16),
        accumulate: bool,
    ) {
        assert!(b.len() >= kc * PANEL * 2);
        assert!(a.len() >= kc * MR);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: c is valid for R rows of the masked columns (the caller's).
                unsafe {
                    row[0] = _mm512_maskz_loadu_ps(m0, c.add(i * ldc));
                    row[1] = _mm512_maskz_loadu_ps(m1, c.add(i * ldc + 16));
                }
            }
        }
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        for t in 0..kc {
            // SAFETY: pair t of the panel and of each row is in bounds (asserted).
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(t * 64) as _));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(pb.add(t * 64 + 32) as _));
                for (i, row) in acc.iter_mut().enumerate() {
                    let pair = *pa.add(t * MR + i) as i32;
                    let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: as above.
            unsafe {
                _mm512_mask_storeu_ps(c.add(i * ldc), m0, row[0]);
                _mm512_mask_storeu_ps(c.add(i * ldc + 16), m1, row[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_matmul_matches_a_naive_product() {
        let packed = crate::kernels::bf16_kernels_testable("packed_matmul_matches_a_naive_product");
        // The last two span three k-blocks (the later ones add onto the first); one
        // row reads two panels at a time (the last of an odd count alone).
        for (m, n, k) in [
            (1, 1, 1),
            (1, 70, 300),
            (1, 130, 2 * KC * 2 + 9),
            (13, 33, 7),
            (30, 70, 300),
            (25, 64, 257),
            (13, 33, 2 * KC * 2 + 9),
        ] {
            let w: Vec<bf16> = (0..n * k)
                .map(|i| bf16::from_f32(((i * 31 % 17) as f32 - 8.0) / 8.0))
                .collect();
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 13 % 7) as f32 - 3.0) / 4.0)
                .collect();
            // The portable product always, the packed one where it runs.
            let mut products = vec![portable(&x, m, &w, n, k)];
            if packed {
                products.push(matmul_packed(&x, m, k, &PackedBf16::pack(&w, n, k)));
            }
            for got in products {
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k)
                            .map(|t| bf16::from_f32(x[i * k + t]).to_f32() * w[j * k + t].to_f32())
                            .sum();
                        let g = got[i * n + j];
                        assert!(
                            (g - want).abs() < 1e-3,
                            "m{m} n{n} k{k} [{i},{j}]: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// A part of a weight packed from a function: only its first n columns and k inputs.
    #[test]
    fn a_part_of_a_function_packed_weight_matches_a_naive_product() {
        if !crate::kernels::bf16_kernels_testable("a_part_of_a_function_packed_weight…") {
            // `pack_fn` exists for the packed kernel only; the portable product of such
            // a weight is `packed_matmul_matches_a_naive_product`'s.
            return;
        }
        let (n, k) = (70, 45);
        let at = |j: usize, t: usize| {
            bf16::from_f32(((j * 13 + t * 7) % 19) as f32 / 8.0 - 1.0).to_f32()
        };
        let w = PackedBf16::pack_fn(n, k, at);
        for (m, n2, k2) in [(5, 70, 45), (13, 33, 20), (25, 1, 45), (12, 64, 1)] {
            let x: Vec<f32> = (0..m * k2)
                .map(|i| ((i * 11 % 9) as f32 - 4.0) / 4.0)
                .collect();
            let got = matmul_packed_part(&x, m, k2, &w, n2);
            assert_eq!(got.len(), m * n2);
            for i in 0..m {
                for j in 0..n2 {
                    let want: f32 = (0..k2).map(|t| x[i * k2 + t] * at(j, t)).sum();
                    let g = got[i * n2 + j];
                    assert!(
                        (g - want).abs() < 1e-4,
                        "m{m} n{n2} k{k2} [{i},{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// A row's result does not depend on how many rows are multiplied with it.
    #[test]
    fn rows_are_independent_of_the_batch() {
        let packed = crate::kernels::bf16_kernels_testable("rows_are_independent_of_the_batch");
        let (n, k) = (40, 600);
        let w: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32(((i * 7 % 23) as f32 - 11.0) / 9.0))
            .collect();
        let pw = PackedBf16::pack(&w, n, k);
        let x: Vec<f32> = (0..29 * k)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 5.0)
            .collect();
        let product = |x: &[f32], m| match packed {
            true => matmul_packed(x, m, k, &pw),
            false => portable(x, m, &w, n, k),
        };
        let all = product(&x, 29);
        for i in [0, 11, 12, 28] {
            let one = product(&x[i * k..(i + 1) * k], 1);
            if packed {
                assert_eq!(one, &all[i * n..(i + 1) * n]);
            } else {
                // The portable kernels tile rows: equal up to summation order.
                for (a, b) in one.iter().zip(&all[i * n..(i + 1) * n]) {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
                }
            }
        }
    }

    /// The product every CPU has: `linear` with the bf16 weight as a tensor.
    fn portable(x: &[f32], m: usize, w: &[bf16], n: usize, k: usize) -> Vec<f32> {
        let x = crate::Tensor::from_f32(x.to_vec(), &[m, k]).unwrap();
        let w = crate::Tensor::from_bf16(w.to_vec(), &[n, k]).unwrap();
        crate::linear(&x, &w, None).unwrap().to_f32_vec()
    }
}
