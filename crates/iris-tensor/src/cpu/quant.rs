//! Block-quantized weights in ggml's layouts (Q8_0, Q4_0, Q4_1: 32 weights a block
//! with an f16 scale, Q4_1 an f16 minimum too; Q4F, 4-bit values with an f32 scale and
//! offset, is what Q4_K and AWQ / GPTQ groups become; Q16, 16-bit values with an f16
//! scale, what Q6_K becomes) and `x·Wᵀ` over them in integers: each
//! 32-block of an activation row is quantized to int16 with its own scale, and a
//! block's product is one integer dot product (`vpdpwssd`: 32 weights widened to int16
//! × 32 activations, one AVX-512 instruction) scaled by both scales. 4-bit weights
//! skip the widening: each activation is also kept as its two bytes, and two
//! `vpdpbusd`s (64 nibble × byte products each) give the same exact integer sum.
//!
//! llama.cpp quantizes the activations to int8 (Q8_0 / Q8_1); on SmolLM2-135M that
//! moved greedy log-probs by up to 0.18 nats from HF's run on the dequantized weights
//! and flipped an answer whose top two tokens were 0.08 apart. int16 costs the same one
//! instruction a block (512-bit rather than 256-bit) and leaves a relative error of
//! 2⁻¹⁶ a block, near f32's for every purpose here.
//!
//! Every format is `d·q + c` per block (Q8_0: q signed, c = 0; Q4_0: q − 8 with q in
//! 0..16, so c = −8·d; Q4_1: c = m), so a block's product is
//! `d·dₓ·Σ q·qₓ + c·dₓ·Σ qₓ`: the integer sum, and the activation block's own sum,
//! computed once per row. The weights keep the file's bytes, reordered once at load
//! ([`pack_row`]: each 16 blocks' scales together, their values interleaved so one
//! `vpdpwssd` works on all 16 blocks and the 16 block sums land in one vector's lanes):
//! decode reads 34, 18 or 20 bytes per 32 weights, and pays per 16 blocks, not per
//! block, for the scales.

use half::f16;
use rayon::prelude::*;

/// Weights a block.
pub const BLOCK: usize = 32;

/// A block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    Q8_0,
    Q4_0,
    Q4_1,
    /// 4-bit values with an f32 scale and an f32 offset a block (24 bytes): not a
    /// file's format but what Q4_K super-blocks and AWQ / GPTQ groups become at load,
    /// exactly (their scales are products of an f16 and a small integer).
    Q4F,
    /// 16-bit values with an f16 scale a block (66 bytes): what Q6_K super-blocks
    /// become at load, exactly — a value is a 6-bit weight times its 16 weights' int8
    /// scale (|q| ≤ 4096), the block's scale the super-block's f16.
    Q16,
}

impl QuantType {
    /// `q8_0` (also `int8`: 8-bit values, a scale per 32), `q4_0` or `q4_1`, any case.
    pub fn parse(s: &str) -> Option<QuantType> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "int8" => Some(QuantType::Q8_0),
            "q4_0" => Some(QuantType::Q4_0),
            "q4_1" => Some(QuantType::Q4_1),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q4F => "Q4F",
            QuantType::Q16 => "Q16",
        }
    }

    /// Bytes a block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantType::Q8_0 => 34,
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q4F => 24,
            QuantType::Q16 => 66,
        }
    }

    /// The format as a const generic argument ([`QuantType::of_code`] undoes it).
    const fn code(self) -> u8 {
        self as u8
    }

    const fn of_code(code: u8) -> QuantType {
        match code {
            0 => QuantType::Q8_0,
            1 => QuantType::Q4_0,
            2 => QuantType::Q4_1,
            3 => QuantType::Q4F,
            _ => QuantType::Q16,
        }
    }

    /// 4-bit values, two a byte.
    fn nibbles(self) -> bool {
        matches!(self, QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4F)
    }

    /// Bytes of a `[n, k]` matrix (k a multiple of 32).
    pub fn bytes(self, n: usize, k: usize) -> usize {
        n * (k / BLOCK) * self.block_bytes()
    }
}

/// A `[n, k]` matrix of blocks, row-major (row r is `k / 32` blocks).
pub struct QuantMatrix {
    ty: QuantType,
    n: usize,
    k: usize,
    data: Box<dyn AsRef<[u8]> + Send + Sync>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}, {}]", self.ty.name(), self.n, self.k)
    }
}

impl QuantMatrix {
    /// `data` holds `n` rows of `k / 32` blocks of `ty`. Errors (a message) when k is
    /// not a whole number of blocks or the bytes are not the matrix's.
    pub fn new(
        ty: QuantType,
        n: usize,
        k: usize,
        data: Box<dyn AsRef<[u8]> + Send + Sync>,
    ) -> Result<QuantMatrix, String> {
        if k == 0 || !k.is_multiple_of(BLOCK) {
            return Err(format!(
                "{}: {k} inputs is not a whole number of {BLOCK}-weight blocks",
                ty.name()
            ));
        }
        let want = ty.bytes(n, k);
        let got = (*data).as_ref().len();
        if got != want {
            return Err(format!(
                "{}[{n}, {k}] takes {want} bytes, not {got}",
                ty.name()
            ));
        }
        let rb = (k / BLOCK) * ty.block_bytes();
        let packed: Vec<u8> = (*data)
            .as_ref()
            .chunks(rb)
            .flat_map(|row| pack_row(ty, row))
            .collect();
        Ok(QuantMatrix {
            ty,
            n,
            k,
            data: Box::new(packed),
        })
    }

    pub fn ty(&self) -> QuantType {
        self.ty
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The rows, in the interleaved layout ([`pack_row`]): as many bytes as the file's.
    pub fn bytes(&self) -> &[u8] {
        (*self.data).as_ref()
    }

    fn row(&self, r: usize) -> &[u8] {
        self.rows_bytes(r..r + 1)
    }

    /// Rows `rows`' packed bytes, one row after another.
    fn rows_bytes(&self, rows: std::ops::Range<usize>) -> &[u8] {
        let rb = (self.k / BLOCK) * self.ty.block_bytes();
        &self.bytes()[rows.start * rb..rows.end * rb]
    }

    /// Rows `rows` as f32 (`rows.len() × k`).
    pub fn dequantize_rows(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let mut out = vec![0f32; rows.len() * self.k];
        for (o, r) in out.chunks_mut(self.k).zip(rows) {
            dequantize_row(self.ty, &unpack_row(self.ty, self.row(r)), o);
        }
        out
    }

    /// The matrix with its rows in the order `order` gives (`order[i]` is the source
    /// row of row i): rows are packed alone, so a permutation moves bytes only.
    pub fn permute_rows(&self, order: &[usize]) -> QuantMatrix {
        assert_eq!(order.len(), self.n, "permute_rows: one source a row");
        let mut data = Vec::with_capacity(self.bytes().len());
        for &r in order {
            data.extend_from_slice(self.row(r));
        }
        QuantMatrix {
            ty: self.ty,
            n: self.n,
            k: self.k,
            data: Box::new(data),
        }
    }

    /// Rows `rows` as a matrix of their own (a tensor-parallel shard of output rows).
    pub fn slice_rows(&self, rows: std::ops::Range<usize>) -> QuantMatrix {
        QuantMatrix {
            ty: self.ty,
            n: rows.len(),
            k: self.k,
            data: Box::new(self.rows_bytes(rows.clone()).to_vec()),
        }
    }

    /// `x[m, k] · Wᵀ` → `[m, n]` in f32, each activation row quantized per block.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        Self::matmul_many(&[self], x, m)
            .pop()
            .expect("one weight, one product")
    }

    /// [`QuantMatrix::matmul`] of several weights with the same `k` on one input (a
    /// layer's q/k/v or gate/up): `x` is quantized once, and every weight's row chunks
    /// run in one parallel loop — one fork-join for the lot, which is what a decode
    /// step of a small model mostly pays for.
    pub fn matmul_many(ws: &[&QuantMatrix], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let Some(k) = ws.first().map(|w| w.k) else {
            return Vec::new();
        };
        assert!(
            ws.iter().all(|w| w.k == k),
            "quantized matmul: weights of different widths"
        );
        assert_eq!(x.len(), m * k, "quantized matmul: x is not [m, k]");
        if m >= GEMM_ROWS && crate::kernels::has_avx512_bf16() {
            let ns: Vec<usize> = ws.iter().map(|w| w.n).collect();
            return super::packed::matmul_panels_many(x, m, k, &ns, &|j, p, out| {
                ws[j].panel_bf16(p, out)
            });
        }
        let xq = QuantRows::quantize(x, m, k);
        let bytes: usize = ws.iter().map(|w| w.bytes().len()).sum();
        let outputs: usize = ws.iter().map(|w| w.n * m).sum();
        let parallel = bytes >= PARALLEL_BYTES || outputs >= 4096;
        if m == 1 {
            // One row: each weight's rows in STREAMS equal parts, each cut into pieces
            // of CHUNK_ROWS rows; task (w, c) reads piece c of every part of weight w
            // in lockstep and writes its outputs in place. A task is two numbers (its
            // pieces found inside it): a Vec of pieces a task cost a few µs a product,
            // serially, which a 2048-wide decode product (~70 µs) noticed.
            let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.n]).collect();
            let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
            let part = |w: &QuantMatrix| w.n.div_ceil(STREAMS).next_multiple_of(CHUNK_ROWS);
            let tasks: Vec<(usize, usize)> = ws
                .iter()
                .enumerate()
                .flat_map(|(wi, w)| (0..part(w) / CHUNK_ROWS).map(move |c| (wi, c)))
                .collect();
            let run = |&(wi, c): &(usize, usize)| {
                let (w, part) = (ws[wi], part(ws[wi]));
                let mut pieces: [(usize, &mut [f32]); STREAMS] =
                    std::array::from_fn(|_| (0, &mut [][..]));
                let mut count = 0;
                for s in 0..STREAMS {
                    let r0 = s * part + c * CHUNK_ROWS;
                    let r1 = (r0 + CHUNK_ROWS).min((s + 1) * part).min(w.n);
                    if r0 < r1 {
                        // SAFETY: rows r0..r1 of output wi are this task's alone (each
                        // (part, piece) is one task's), inside its n, and `ys` outlives
                        // the loop.
                        let o =
                            unsafe { std::slice::from_raw_parts_mut(outs[wi].0.add(r0), r1 - r0) };
                        pieces[count] = (r0, o);
                        count += 1;
                    }
                }
                w.lockstep_into(&xq, &mut pieces[..count]);
            };
            if parallel {
                tasks.par_iter().for_each(run);
            } else {
                tasks.iter().for_each(run);
            }
            return ys;
        }
        let tasks: Vec<(usize, usize)> = ws
            .iter()
            .enumerate()
            .flat_map(|(wi, w)| (0..w.n.div_ceil(CHUNK_ROWS)).map(move |c| (wi, c)))
            .collect();
        let run = |&(wi, c): &(usize, usize)| ws[wi].chunk(&xq, m, c);
        let parts: Vec<Vec<f32>> = if parallel {
            tasks.par_iter().map(run).collect()
        } else {
            tasks.iter().map(run).collect()
        };
        let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n]).collect();
        for (&(wi, c), part) in tasks.iter().zip(&parts) {
            let (n, y) = (ws[wi].n, &mut ys[wi]);
            let r0 = c * CHUNK_ROWS;
            let len = part.len() / m.max(1);
            for ri in 0..len {
                for i in 0..m {
                    y[i * n + r0 + ri] = part[ri * m + i];
                }
            }
        }
        ys
    }

    /// Output rows `p·PANEL..` dequantized and rounded to bf16, as the bf16 GEMM packs
    /// a panel (`[k/2][PANEL][2]`), zero past the last row.
    fn panel_bf16(&self, p: usize, out: &mut [half::bf16]) {
        self.panel_bf16_with(p, out, has_vnni() && super::kernels::has_avx512_bf16())
    }

    /// [`QuantMatrix::panel_bf16`], the full groups with the SIMD kernel or not.
    fn panel_bf16_with(&self, p: usize, out: &mut [half::bf16], simd: bool) {
        use super::packed::PANEL;
        let bb = self.ty.block_bytes();
        let groups = self.k / BLOCK / GROUP;
        // Pairs from here on are the row's tail blocks (ggml's layout).
        let from = groups * GROUP * BLOCK;
        if simd {
            for c0 in (0..PANEL).step_by(16) {
                let ws: Vec<&[u8]> = (p * PANEL + c0..p * PANEL + c0 + 16)
                    .filter(|&r| r < self.n)
                    .map(|r| self.row(r))
                    .collect();
                for g in 0..groups {
                    // SAFETY: AVX-512 BF16 and the kernels' features were detected; each
                    // row is a whole packed row, and `out` holds the panel's k/2 pairs.
                    unsafe { x86::panel_group(self.ty, &ws, g, c0, out) };
                }
            }
        }
        let mut row = vec![0f32; self.k - from];
        let mut halves = vec![half::bf16::ZERO; self.k - from];
        for c in 0..PANEL {
            let r = p * PANEL + c;
            if r >= self.n {
                for t in 0..self.k / 2 {
                    out[t * PANEL * 2 + c * 2..][..2].fill(half::bf16::ZERO);
                }
                continue;
            }
            let w = self.row(r);
            if !simd {
                row.resize(from, 0.0);
                halves.resize(from, half::bf16::ZERO);
                dequantize_row(
                    self.ty,
                    &unpack_row(self.ty, &w[..groups * GROUP * bb]),
                    &mut row,
                );
                super::kernels::to_bf16(&row, &mut halves);
                for (t, pair) in halves.chunks_exact(2).enumerate() {
                    out[t * PANEL * 2 + c * 2..][..2].copy_from_slice(pair);
                }
                row.resize(self.k - from, 0.0);
                halves.resize(self.k - from, half::bf16::ZERO);
            }
            if from < self.k {
                dequantize_row(self.ty, &w[groups * GROUP * bb..], &mut row);
                super::kernels::to_bf16(&row, &mut halves);
                for (t, pair) in halves.chunks_exact(2).enumerate() {
                    out[(from / 2 + t) * PANEL * 2 + c * 2..][..2].copy_from_slice(pair);
                }
            }
        }
    }

    /// Weight rows `r₀ + i` of every piece `(r₀, out)` · quantized activation row 0
    /// into `out[i]`: with [`STREAMS`] pieces, a row of each at a time, so the streams
    /// are read in lockstep; rows past the shortest piece one by one. Each row's sums
    /// are in the order a lone row's are.
    fn lockstep_into(&self, xq: &QuantRows, pieces: &mut [(usize, &mut [f32])]) {
        let simd = has_vnni();
        let mut done = 0;
        if simd && pieces.len() == STREAMS {
            let len = pieces.iter().map(|p| p.1.len()).min().unwrap_or(0);
            let rows: [&[u8]; STREAMS] =
                std::array::from_fn(|v| self.rows_bytes(pieces[v].0..pieces[v].0 + len));
            let mut outs: [&mut [f32]; STREAMS] = {
                let mut it = pieces.iter_mut().map(|p| &mut p.1[..len]);
                std::array::from_fn(|_| it.next().expect("STREAMS pieces"))
            };
            // SAFETY: AVX-512 VNNI (with BW, F16C and FMA) was detected; each of `rows`
            // is `len` packed rows of k/32 blocks of `ty` and `xq` holds row 0 of k.
            unsafe { x86::dot_streams(self.ty, rows, xq, &mut outs) };
            done = len;
        }
        for (r0, out) in pieces.iter_mut() {
            let rows = *r0 + done..*r0 + out.len();
            if simd && !rows.is_empty() {
                let w = self.rows_bytes(rows);
                // SAFETY: as above, for one stream of the rows left.
                unsafe { x86::dot_streams(self.ty, [w], xq, &mut [&mut out[done..]]) };
                continue;
            }
            for (i, y) in out.iter_mut().enumerate().skip(done) {
                *y = dot_scalar(self.ty, &unpack_row(self.ty, self.row(*r0 + i)), xq, 0);
            }
        }
    }

    /// Chunk `c`'s weight rows · every activation row, as `[rows, m]`: activation rows
    /// in tiles so a tile's quantized values stay in cache while the chunk's rows pass
    /// it, and four at a time within a tile so each weight block is widened once for
    /// four rows.
    fn chunk(&self, xq: &QuantRows, m: usize, c: usize) -> Vec<f32> {
        let rows = (c * CHUNK_ROWS + CHUNK_ROWS).min(self.n) - c * CHUNK_ROWS;
        let mut out = vec![0f32; rows * m];
        self.chunk_into(xq, m, c, &mut out);
        out
    }

    /// [`QuantMatrix::chunk`] into `out` (`[rows, m]`).
    fn chunk_into(&self, xq: &QuantRows, m: usize, c: usize, out: &mut [f32]) {
        // A multiple of the kernel's six rows.
        const TILE: usize = 66;
        let rows = c * CHUNK_ROWS..(c * CHUNK_ROWS + CHUNK_ROWS).min(self.n);
        assert_eq!(out.len(), rows.len() * m, "a chunk's outputs");
        let simd = has_vnni();
        for t0 in (0..m).step_by(TILE) {
            let t1 = (t0 + TILE).min(m);
            let mut ri = 0;
            while ri < rows.len() {
                let r = rows.start + ri;
                if simd && m > 1 && ri + 1 < rows.len() {
                    // Two weight rows at once: each activation vector loaded once for both
                    // (one activation row takes `lockstep_into` instead: two neighbouring
                    // rows a call there ran at 18-21 tok/s at Q4_0 batch 1 against one
                    // row's 33-34, two rows half a weight apart faster than one).
                    let (a, b) = out.split_at_mut((ri + 1) * m);
                    let mut o = [&mut a[ri * m + t0..ri * m + t1], &mut b[t0..t1]];
                    // SAFETY: as below, for rows r and r + 1.
                    unsafe {
                        x86::dot_rows(self.ty, [self.row(r), self.row(r + 1)], xq, t0, &mut o)
                    }
                    ri += 2;
                    continue;
                }
                let w = self.row(r);
                let o = &mut out[ri * m + t0..ri * m + t1];
                if simd {
                    // SAFETY: AVX-512 VNNI (with BW, F16C and FMA) was detected; `w` is
                    // a packed row of k/32 blocks of `ty` and `xq` holds rows t0..t1 of k.
                    unsafe { x86::dot_rows(self.ty, [w], xq, t0, &mut [o]) }
                } else {
                    let w = unpack_row(self.ty, w);
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = dot_scalar(self.ty, &w, xq, t0 + j);
                    }
                }
                ri += 1;
            }
        }
    }
}

/// Weight rows a parallel task takes.
const CHUNK_ROWS: usize = 16;

/// A one-row product's output, written by its tasks, each its own rows.
struct Out(*mut f32);
// SAFETY: the tasks write disjoint rows, and the output outlives the parallel loop.
unsafe impl Sync for Out {}
unsafe impl Send for Out {}

/// Parts of a weight's rows a one-row product reads in lockstep, a row of each at a
/// time: two streams a core, far apart, read faster than one (and give the integer
/// sums two independent chains). Q4_0 batch 1, TinyLlama's shape, alternating steps
/// in one process: +6–24% over one stream; four were no better than two.
const STREAMS: usize = 2;

/// Activation rows from which a product runs on the bf16 GEMM (each weight panel
/// dequantized once for all the rows) rather than in integers: `vpdpwssd` does 32
/// multiply-adds a 512-bit instruction as `vdpbf16ps` does, but this machine (AMD
/// Zen 4) issues it half as often — 95 vs 211 GFLOP/s a core at 608 rows. The
/// weights and activations are then rounded to bf16 (2⁻⁹ of each value), as a bf16
/// model's prefill is; decode and small batches keep the integer path's int16 blocks.
/// The GEMM would already win from ~32 rows — a 5632 × 2048 Q4_0 weight
/// (`examples/quant_gemv`, three alternations): 24 rows 2.3-3.4 ms in integers vs
/// 2.8-3.8 on the GEMM, 32 rows 3.1-4.6 vs 3.0-4.0, 48 rows 5.7-6.9 vs 3.9-4.7 — but a
/// chat prompt of 32-63 tokens would then leave the int16 path's accuracy (SmolLM2's
/// log-probs 1.5e-2 from HF's rather than within 2e-3): kept at 64.
pub const GEMM_ROWS: usize = 64;

/// Weight bytes from which a product is split over the threads: below it, the
/// fork-join costs about what the second core saves.
const PARALLEL_BYTES: usize = 128 << 10;

/// A cache line's bytes, on its boundary.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

/// Bytes that start on a cache line, so the kernels' 64-byte loads at multiples of 64
/// never span two lines (a `Vec`'s 16-byte alignment made most of them do).
struct Lines(Vec<Line>);

impl Lines {
    /// `len` zero bytes, a multiple of 64.
    fn zeroed(len: usize) -> Lines {
        assert!(len.is_multiple_of(64), "whole lines");
        Lines(vec![Line([0; 64]); len / 64])
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `Line` is 64 bytes with no padding; the slice covers the Vec's lines.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.0.len() * 64) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, self.0.len() * 64) }
    }

    fn i16s(&self) -> &[i16] {
        // SAFETY: as in `bytes`; 64-byte aligned, so 2-byte aligned, and any bits are
        // an i16.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const i16, self.0.len() * 32) }
    }

    fn i16s_mut(&mut self) -> &mut [i16] {
        // SAFETY: as in `i16s`, borrowed mutably.
        unsafe {
            std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut i16, self.0.len() * 32)
        }
    }
}

/// Activation rows quantized per 32-block: the int16 values, each block's scale, and
/// each block's scale times the sum of its values.
pub struct QuantRows {
    q: Vec<i16>,
    /// `q` with each group's blocks interleaved as [`pack_row`] interleaves weights:
    /// 16 vectors a group, lane j of vector t holding elements 2t and 2t + 1 of block j
    /// (full groups only; a row's tail blocks are read from `q`).
    qi: Lines,
    /// `q` as two bytes, interleaved as [`pack_row`] lays out 4-bit weights: 16
    /// vectors of 64 bytes a group, vector 2s holding the low bytes (unsigned) and
    /// 2s + 1 the high bytes (signed) of elements 4s..4s + 4 of block j at bytes
    /// 4j..4j + 4 (full groups only). `q = 256·high + low` exactly, so a `vpdpbusd`
    /// of each with the weights' unsigned nibbles gives the int16 product's two parts.
    qb: Lines,
    d: Vec<f32>,
    s: Vec<f32>,
    /// Each block's Σ values, as an integer: Q4_0's products take its −8 offset in
    /// integers (Σ (q − 8)·qₓ = Σ q·qₓ − 8·Σ qₓ, exact).
    n: Vec<i32>,
    k: usize,
}

impl QuantRows {
    pub fn quantize(x: &[f32], m: usize, k: usize) -> QuantRows {
        let mut rows = QuantRows {
            q: vec![0i16; m * k],
            qi: Lines::zeroed(2 * m * (k / BLOCK / GROUP) * GROUP * BLOCK),
            qb: Lines::zeroed(2 * m * (k / BLOCK / GROUP) * GROUP * BLOCK),
            d: vec![0f32; m * (k / BLOCK)],
            s: vec![0f32; m * (k / BLOCK)],
            n: vec![0i32; m * (k / BLOCK)],
            k,
        };
        if has_vnni() {
            // SAFETY: AVX-512 (F, BW) and the rest of the kernels' features were detected.
            unsafe { x86::quantize_rows(x, &mut rows) }
        } else {
            quantize_rows(x, &mut rows)
        }
        rows
    }

    /// Row `i`'s interleaved full groups.
    fn interleaved(&self, i: usize) -> &[i16] {
        let len = self.k / BLOCK / GROUP * GROUP * BLOCK;
        &self.qi.i16s()[i * len..(i + 1) * len]
    }

    /// Row `i`'s full groups as bytes.
    fn interleaved_bytes(&self, i: usize) -> &[u8] {
        let len = 2 * (self.k / BLOCK / GROUP * GROUP * BLOCK);
        &self.qb.bytes()[i * len..(i + 1) * len]
    }

    fn row(&self, i: usize) -> (&[i16], &[f32], &[f32]) {
        let nb = self.k / BLOCK;
        (
            &self.q[i * self.k..(i + 1) * self.k],
            &self.d[i * nb..(i + 1) * nb],
            &self.s[i * nb..(i + 1) * nb],
        )
    }
}

/// Fills `rows` (sized for `x`'s rows) from `x`: each 32-block's values over
/// `max|x| / 32767`, rounded to the nearest (halves away from zero), and each block's scale
/// and scale · Σ values; full groups' values also interleaved as [`pack_row`]
/// interleaves weights (element pair t of block j at pair `t · 16 + j`; as bytes, see
/// [`QuantRows::qb`]). Plain
/// element loops, compiled as they are and, in [`x86::quantize_rows`], with AVX-512
/// enabled: the same operations in the same order either way.
#[inline(always)]
fn quantize_rows(x: &[f32], rows: &mut QuantRows) {
    let k = rows.k;
    let nb = k / BLOCK;
    let full = nb / GROUP * GROUP;
    let per_row = full * BLOCK;
    for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 32767.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let qb: &mut [i16] = &mut rows.q[b * BLOCK..][..BLOCK];
        let mut sum = 0i32;
        for (o, v) in qb.iter_mut().zip(xb) {
            let r = (v * inv).round() as i32;
            *o = r as i16;
            sum += r;
        }
        rows.d[b] = scale;
        rows.s[b] = scale * sum as f32;
        rows.n[b] = sum;
        let (i, j) = (b / nb, b % nb);
        if j < full {
            let at = i * per_row + j / GROUP * GROUP * BLOCK;
            let dst = &mut rows.qi.i16s_mut()[at..][..GROUP * BLOCK];
            let j = j % GROUP;
            for (t, pair) in qb.chunks_exact(2).enumerate() {
                dst[t * 2 * GROUP + 2 * j..][..2].copy_from_slice(pair);
            }
            let dst = &mut rows.qb.bytes_mut()[2 * at..][..2 * GROUP * BLOCK];
            for (x, &v) in qb.iter().enumerate() {
                let (s, e) = (x / 4, x % 4);
                dst[2 * s * 64 + 4 * j + e] = v as u8;
                dst[(2 * s + 1) * 64 + 4 * j + e] = (v >> 8) as u8;
            }
        }
    }
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

/// A Q4F block: scale `d`, offset `c` and 32 values in 0..16 (element order).
pub fn q4f_block(d: f32, c: f32, v: &[u8; BLOCK]) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..4].copy_from_slice(&d.to_le_bytes());
    b[4..8].copy_from_slice(&c.to_le_bytes());
    for j in 0..16 {
        debug_assert!(v[j] < 16 && v[j + 16] < 16);
        b[8 + j] = v[j] | (v[j + 16] << 4);
    }
    b
}

/// A block's scale and offset coefficient (`d·q + c`).
fn block_scales(ty: QuantType, b: &[u8]) -> (f32, f32) {
    match ty {
        QuantType::Q8_0 => (half_at(b, 0), 0.0),
        QuantType::Q4_0 => (half_at(b, 0), -8.0 * half_at(b, 0)),
        QuantType::Q4_1 => (half_at(b, 0), half_at(b, 2)),
        QuantType::Q4F => (f32_at(b, 0), f32_at(b, 4)),
        QuantType::Q16 => (half_at(b, 0), 0.0),
    }
}

/// The block's 32 quantized values, in element order (as unsigned nibbles for Q4).
fn block_values(ty: QuantType, b: &[u8]) -> [i32; BLOCK] {
    let mut v = [0i32; BLOCK];
    match ty {
        QuantType::Q8_0 => {
            for (o, &q) in v.iter_mut().zip(&b[2..34]) {
                *o = q as i8 as i32;
            }
        }
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4F => {
            let qs = &b[ty.block_bytes() - 16..];
            for j in 0..16 {
                v[j] = (qs[j] & 0xF) as i32;
                v[j + 16] = (qs[j] >> 4) as i32;
            }
        }
        QuantType::Q16 => {
            for (o, q) in v.iter_mut().zip(b[2..66].chunks_exact(2)) {
                *o = i16::from_le_bytes([q[0], q[1]]) as i32;
            }
        }
    }
    v
}

/// Blocks a group of the interleaved layout: sixteen, one a lane of a 512-bit vector of
/// int32 sums.
const GROUP: usize = 16;

/// A row of ggml blocks in the layout the SIMD kernel reads, the same bytes in another
/// order: each full group of 16 blocks becomes its 16 scales (f16), for Q4_1 its 16
/// minimums, then its values interleaved so that one 512-bit `vpdpwssd` adds elements
/// 2t and 2t + 1 of all 16 blocks at once, block j in lane j — 16 steps give the 16
/// blocks' integer sums in one vector, scaled by the 16 scales in one multiply, with no
/// sum across lanes. Q8_0: vector t is 32 bytes, byte 2j + e = q[j][2t + e]. Q4 is
/// laid out for `vpdpbusd` instead (four bytes of a block a lane): 64 bytes hold steps
/// 2p (low nibbles) and 2p + 1 (high ones), byte 4j + e = q[j][8p + e] |
/// q[j][8p + 4 + e] << 4 — step s is elements 4s..4s + 4 of every block. Blocks past
/// the last full group stay as they were.
fn pack_row(ty: QuantType, row: &[u8]) -> Vec<u8> {
    let bb = ty.block_bytes();
    let groups = row.len() / bb / GROUP;
    let mut out = row.to_vec();
    for g in 0..groups {
        let blocks: Vec<&[u8]> = (0..GROUP)
            .map(|j| &row[(g * GROUP + j) * bb..(g * GROUP + j + 1) * bb])
            .collect();
        let dst = &mut out[g * GROUP * bb..(g + 1) * GROUP * bb];
        // Each block's scale (and offset) bytes, the scales of the group together and
        // then the offsets.
        let sb = scale_bytes(ty);
        let head = values_offset(ty);
        for (j, b) in blocks.iter().enumerate() {
            for (at, part) in (0..head)
                .step_by(GROUP * sb)
                .zip(b[..head / GROUP].chunks(sb))
            {
                dst[at + sb * j..at + sb * (j + 1)].copy_from_slice(part);
            }
        }
        let values: Vec<[i32; BLOCK]> = blocks.iter().map(|b| block_values(ty, b)).collect();
        let qs = &mut dst[values_offset(ty)..];
        match ty {
            QuantType::Q8_0 => {
                for t in 0..BLOCK / 2 {
                    for (j, v) in values.iter().enumerate() {
                        for e in 0..2 {
                            qs[t * 32 + 2 * j + e] = v[2 * t + e] as i8 as u8;
                        }
                    }
                }
            }
            QuantType::Q16 => {
                // As Q8_0's, two bytes a value: vector t is 64 bytes.
                for t in 0..BLOCK / 2 {
                    for (j, v) in values.iter().enumerate() {
                        for e in 0..2 {
                            let at = 2 * (t * 32 + 2 * j + e);
                            qs[at..at + 2].copy_from_slice(&(v[2 * t + e] as i16).to_le_bytes());
                        }
                    }
                }
            }
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4F => {
                for p in 0..BLOCK / 8 {
                    for (j, v) in values.iter().enumerate() {
                        for e in 0..4 {
                            qs[p * 64 + 4 * j + e] = (v[8 * p + e] | (v[8 * p + 4 + e] << 4)) as u8;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Where a packed group's values start: after its scales (and Q4_1's minimums, Q4F's
/// offsets).
fn values_offset(ty: QuantType) -> usize {
    GROUP * (ty.block_bytes() - values_bytes(ty))
}

/// Bytes of a block's values: one a weight, or a nibble.
fn values_bytes(ty: QuantType) -> usize {
    match ty {
        QuantType::Q8_0 => BLOCK,
        QuantType::Q16 => 2 * BLOCK,
        QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4F => BLOCK / 2,
    }
}

/// Bytes of one of a block's scales (or offsets): f16, or Q4F's f32.
fn scale_bytes(ty: QuantType) -> usize {
    match ty {
        QuantType::Q4F => 4,
        QuantType::Q8_0 | QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q16 => 2,
    }
}

/// [`pack_row`] undone: the row as ggml's blocks.
fn unpack_row(ty: QuantType, row: &[u8]) -> Vec<u8> {
    let bb = ty.block_bytes();
    let groups = row.len() / bb / GROUP;
    let mut out = row.to_vec();
    for g in 0..groups {
        let src = &row[g * GROUP * bb..(g + 1) * GROUP * bb];
        let qs = &src[values_offset(ty)..];
        for j in 0..GROUP {
            let dst = &mut out[(g * GROUP + j) * bb..(g * GROUP + j + 1) * bb];
            let sb = scale_bytes(ty);
            for (p, at) in (0..values_offset(ty)).step_by(GROUP * sb).enumerate() {
                dst[p * sb..(p + 1) * sb].copy_from_slice(&src[at + sb * j..at + sb * (j + 1)]);
            }
            let mut v = [0u8; BLOCK];
            match ty {
                QuantType::Q8_0 => {
                    for (x, o) in v.iter_mut().enumerate() {
                        *o = qs[(x / 2) * 32 + 2 * j + x % 2];
                    }
                    dst[2..].copy_from_slice(&v);
                }
                QuantType::Q16 => {
                    for x in 0..BLOCK {
                        let at = 2 * ((x / 2) * 32 + 2 * j + x % 2);
                        dst[2 + 2 * x..4 + 2 * x].copy_from_slice(&qs[at..at + 2]);
                    }
                }
                QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4F => {
                    for (x, o) in v.iter_mut().enumerate() {
                        let (p, hi, e) = (x / 8, (x / 4) % 2, x % 4);
                        let byte = qs[p * 64 + 4 * j + e];
                        *o = if hi == 1 { byte >> 4 } else { byte & 0xF };
                    }
                    let nib = &mut dst[bb - 16..];
                    for i in 0..16 {
                        nib[i] = v[i] | (v[i + 16] << 4);
                    }
                }
            }
        }
    }
    out
}

/// Weights a Q4_K super-block, and its bytes: f16 `d` and `dmin`, twelve bytes of
/// 6-bit scales and minimums for its eight 32-weight sub-blocks, 128 bytes of nibbles.
pub const Q4_K_WEIGHTS: usize = 256;
pub const Q4_K_BYTES: usize = 144;

/// ggml's Q4_K super-blocks (a row of `k / 256`) as Q4F blocks, exactly: sub-block j's
/// weights are `d·scⱼ·q − dmin·mⱼ`, so its Q4F scale is `d·scⱼ` and its offset
/// `−dmin·mⱼ` (an f16 times a 6-bit integer: exact in f32). Sub-blocks 2i and 2i + 1
/// are the low and high nibbles of bytes 32i..32i + 32 (ggml's `dequantize_row_q4_K`).
pub fn q4_k_to_q4f(row: &[u8]) -> Vec<u8> {
    assert_eq!(row.len() % Q4_K_BYTES, 0, "q4_k_to_q4f: whole super-blocks");
    let mut out = Vec::with_capacity(row.len() / Q4_K_BYTES * 8 * 24);
    for sb in row.chunks(Q4_K_BYTES) {
        let (d, dmin) = (half_at(sb, 0), half_at(sb, 2));
        let sc = &sb[4..16];
        let qs = &sb[16..];
        // ggml's get_scale_min_k4.
        let scale_min = |j: usize| -> (u8, u8) {
            if j < 4 {
                (sc[j] & 63, sc[j + 4] & 63)
            } else {
                (
                    (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                    (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                )
            }
        };
        for j in 0..8 {
            let (s, m) = scale_min(j);
            let bytes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let v: [u8; BLOCK] = std::array::from_fn(|l| {
                if j % 2 == 0 {
                    bytes[l] & 0xF
                } else {
                    bytes[l] >> 4
                }
            });
            out.extend(q4f_block(d * f32::from(s), -(dmin * f32::from(m)), &v));
        }
    }
    out
}

/// Weights and bytes of a Q6_K super-block: 128 bytes of low nibbles, 64 of high bit
/// pairs, 16 int8 scales (one a 16 weights), an f16 scale.
pub const Q6_K_WEIGHTS: usize = 256;
pub const Q6_K_BYTES: usize = 210;

/// A row of Q6_K super-blocks as Q16 blocks, exactly: weight i of a super-block is
/// `d·sc[i / 16]·(q − 32)` (ggml's `dequantize_row_q6_K`), so its Q16 value is
/// `sc[i / 16]·(q − 32)` and every block's scale the super-block's `d`. A Q16 weight
/// `d·v` is then the f32 value gguf-py gives, bit for bit: `d·sc` is exact in f32 (an
/// f16 times an int8) and so are both products with the 6-bit value (24 bits at most)
/// — but for a zero's sign (`d·0` is +0 where ggml's `(d·sc)·0` is −0 under a negative
/// scale: the same in every sum).
pub fn q6_k_to_q16(row: &[u8]) -> Vec<u8> {
    assert_eq!(row.len() % Q6_K_BYTES, 0, "q6_k_to_q16: whole super-blocks");
    let mut out = Vec::with_capacity(row.len() / Q6_K_BYTES * 8 * 66);
    for sb in row.chunks(Q6_K_BYTES) {
        let (ql, qh, sc) = (&sb[..128], &sb[128..192], &sb[192..208]);
        let mut v = [0i16; Q6_K_WEIGHTS];
        for half in 0..2 {
            let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
            for l in 0..32 {
                let q = [
                    (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                    (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                    (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                    (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                ];
                for (j, &q) in q.iter().enumerate() {
                    let i = 128 * half + l + 32 * j;
                    v[i] = (sc[i / 16] as i8 as i16) * (q as i16 - 32);
                }
            }
        }
        for block in v.chunks(BLOCK) {
            out.extend_from_slice(&sb[208..210]);
            for x in block {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    out
}

/// One row of blocks as f32 (ggml's dequantization).
pub fn dequantize_row(ty: QuantType, row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks(ty.block_bytes()).zip(out.chunks_mut(BLOCK)) {
        let (d, c) = block_scales(ty, b);
        for (o, q) in o.iter_mut().zip(block_values(ty, b)) {
            *o = d * q as f32 + c;
        }
    }
}

/// A row of f32 as blocks of `ty` (ggml's reference quantizers: Q8_0 and Q4_0 scale by
/// the block's largest magnitude, Q4_1 spans its minimum to its maximum).
pub fn quantize_row(ty: QuantType, x: &[f32]) -> Vec<u8> {
    assert_eq!(x.len() % BLOCK, 0, "quantize_row: whole blocks only");
    let mut out = Vec::with_capacity(x.len() / BLOCK * ty.block_bytes());
    let h = |v: f32| f16::from_f32(v).to_bits().to_le_bytes();
    for xb in x.chunks(BLOCK) {
        match ty {
            QuantType::Q8_0 => {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend(h(d));
                out.extend(xb.iter().map(|v| (v * id).round() as i8 as u8));
            }
            QuantType::Q16 => {
                // Q6_K's range: values up to 4096 in magnitude.
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = f16::from_f32(amax / 4096.0).to_f32();
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend(h(d));
                for v in xb {
                    out.extend(((v * id).round().clamp(-4096.0, 4096.0) as i16).to_le_bytes());
                }
            }
            QuantType::Q4_0 => {
                // The value of largest magnitude, sign kept, maps to −8.
                let max = xb
                    .iter()
                    .copied()
                    .fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(h(d));
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                for j in 0..16 {
                    out.push(q(xb[j]) | (q(xb[j + 16]) << 4));
                }
            }
            QuantType::Q4_1 | QuantType::Q4F => {
                let (min, max) = xb
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                if ty == QuantType::Q4F {
                    let v: [u8; BLOCK] = std::array::from_fn(|j| q(xb[j]));
                    out.extend(q4f_block(d, min, &v));
                    continue;
                }
                out.extend(h(d));
                out.extend(h(min));
                for j in 0..16 {
                    out.push(q(xb[j]) | (q(xb[j + 16]) << 4));
                }
            }
        }
    }
    out
}

/// A weight row · quantized activation row `i`, block by block in integers.
fn dot_scalar(ty: QuantType, w: &[u8], x: &QuantRows, i: usize) -> f32 {
    let (q, d, s) = x.row(i);
    let mut acc = 0f32;
    for (b, wb) in w.chunks(ty.block_bytes()).enumerate() {
        let (dw, c) = block_scales(ty, wb);
        // Q4_0's offset in integers, as the kernel takes it.
        let (bias, c) = if ty == QuantType::Q4_0 {
            (8, 0.0)
        } else {
            (0, c)
        };
        let dot: i64 = block_values(ty, wb)
            .iter()
            .zip(&q[b * BLOCK..(b + 1) * BLOCK])
            .map(|(&a, &b)| (a - bias) as i64 * b as i64)
            .sum();
        acc += dw * d[b] * dot as f32 + c * s[b];
    }
    acc
}

pub fn has_vnni() -> bool {
    use std::sync::OnceLock;
    static B: OnceLock<bool> = OnceLock::new();
    *B.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return true;
        }
        false
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{values_offset, QuantRows, QuantType, BLOCK, GROUP};
    use std::arch::x86_64::*;

    /// `$f::<.., T>(..)` for the format `$ty` as `T` ([`QuantType::code`]): each
    /// format's kernel compiled on its own, with no test of the format inside.
    macro_rules! typed {
        ($ty:expr, $f:ident :: <$($g:tt),*> ($($a:expr),*)) => {
            match $ty {
                QuantType::Q8_0 => $f::<$($g,)* { QuantType::Q8_0.code() }>($($a),*),
                QuantType::Q4_0 => $f::<$($g,)* { QuantType::Q4_0.code() }>($($a),*),
                QuantType::Q4_1 => $f::<$($g,)* { QuantType::Q4_1.code() }>($($a),*),
                QuantType::Q4F => $f::<$($g,)* { QuantType::Q4F.code() }>($($a),*),
                QuantType::Q16 => $f::<$($g,)* { QuantType::Q16.code() }>($($a),*),
            }
        };
    }

    /// `vpdpwssd acc, a, b` as written. LLVM turns `_mm512_dpwssd_epi32` into two
    /// instructions, `vpmaddwd` and `vpaddd`, unless it tunes for a CPU it knows runs
    /// `vpdpwssd` fast, which a generic x86-64 build does not: the same sums, but a
    /// 512-weight Q4_0 group of one batch-1 row took 16-17 ns a core here that way
    /// and 12-13 ns with the one instruction (`examples/quant_gemv`).
    macro_rules! dpwssd {
        ($acc:expr, $a:expr, $b:expr) => {
            vnni!("vpdpwssd", $acc, $a, $b)
        };
    }

    /// `vpdpbusd acc, a, b` as written (`a`'s bytes unsigned, `b`'s signed), kept
    /// from LLVM's rewriting as [`dpwssd`] is.
    macro_rules! dpbusd {
        ($acc:expr, $a:expr, $b:expr) => {
            vnni!("vpdpbusd", $acc, $a, $b)
        };
    }

    /// The VNNI instruction `$op acc, a, b` on 512-bit registers, as inline assembly.
    macro_rules! vnni {
        ($op:literal, $acc:expr, $a:expr, $b:expr) => {{
            let mut acc: __m512i = $acc;
            std::arch::asm!(
                concat!($op, " {acc}, {a}, {b}"),
                acc = inout(zmm_reg) acc,
                a = in(zmm_reg) $a,
                b = in(zmm_reg) $b,
                options(pure, nomem, nostack, preserves_flags)
            );
            acc
        }};
    }

    /// `f32::round` of each lane (to the nearest, halves away from zero): the value
    /// truncated, plus its sign where the part cut off (exact) is at least a half.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn round(v: __m512) -> __m512 {
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(
            _mm512_abs_ps(_mm512_sub_ps(v, t)),
            _mm512_set1_ps(0.5),
        );
        let sign = _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(v),
            _mm512_set1_epi32(i32::MIN),
        ));
        let one = _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_castps_si512(sign),
            _mm512_castps_si512(_mm512_set1_ps(1.0)),
        ));
        _mm512_mask_add_ps(t, away, t, one)
    }

    /// [`super::quantize_rows`] a block in two vectors: the same operations on each
    /// value (max of |x|, the scale and its inverse in scalars, the product rounded as
    /// `f32::round` rounds), so the same bits.
    ///
    /// # Safety
    /// The CPU has the features enabled here.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn quantize_rows(x: &[f32], rows: &mut QuantRows) {
        let k = rows.k;
        let nb = k / BLOCK;
        let full = nb / GROUP * GROUP;
        let per_row = full * BLOCK;
        let mut pairs = [_mm512_setzero_si512(); GROUP];
        let mut bytes = [_mm512_setzero_si512(); GROUP];
        for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
            let lo = _mm512_loadu_ps(xb.as_ptr());
            let hi = _mm512_loadu_ps(xb.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            let scale = amax / 32767.0;
            let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let ql = _mm512_cvtps_epi32(round(_mm512_mul_ps(lo, inv)));
            let qh = _mm512_cvtps_epi32(round(_mm512_mul_ps(hi, inv)));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ql, qh));
            let qb = rows.q.as_mut_ptr().add(b * BLOCK);
            _mm256_storeu_si256(qb as *mut __m256i, _mm512_cvtepi32_epi16(ql));
            _mm256_storeu_si256(qb.add(16) as *mut __m256i, _mm512_cvtepi32_epi16(qh));
            rows.d[b] = scale;
            rows.s[b] = scale * sum as f32;
            rows.n[b] = sum;
            let (i, j) = (b / nb, b % nb);
            if j < full {
                // Block j's 16 pairs as 32-bit lanes, and its bytes (four elements' low
                // bytes, then their high bytes, a lane each: lane 2s + h is step s,
                // byte h); a group's 16 blocks of each, transposed, are its 16
                // interleaved vectors (lane j of vector t: block j's lane t).
                pairs[j % GROUP] = _mm512_loadu_si512(qb as *const _);
                macro_rules! steps {
                    ($q:expr) => {{
                        let lo = _mm512_cvtepi32_epi8($q);
                        let hi = _mm512_cvtepi32_epi8(_mm512_srai_epi32::<8>($q));
                        (_mm_unpacklo_epi32(lo, hi), _mm_unpackhi_epi32(lo, hi))
                    }};
                }
                let (s01, s23) = steps!(ql);
                let (s45, s67) = steps!(qh);
                bytes[j % GROUP] = _mm512_inserti32x4::<3>(
                    _mm512_inserti32x4::<2>(
                        _mm512_inserti32x4::<1>(_mm512_castsi128_si512(s01), s23),
                        s45,
                    ),
                    s67,
                );
                if j % GROUP == GROUP - 1 {
                    let at = i * per_row + j / GROUP * GROUP * BLOCK;
                    transpose16(&mut pairs);
                    transpose16(&mut bytes);
                    let qi = rows.qi.i16s_mut().as_mut_ptr().add(at);
                    let qb = rows.qb.bytes_mut().as_mut_ptr().add(2 * at);
                    for t in 0..GROUP {
                        _mm512_storeu_si512(qi.add(t * 2 * GROUP) as *mut _, pairs[t]);
                        _mm512_storeu_si512(qb.add(t * 64) as *mut _, bytes[t]);
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn half(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// 16 bytes of nibble pairs as 32 bytes: the low nibbles (elements 0..16), then the
    /// high ones (16..32).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let m4 = _mm_set1_epi8(0x0F);
        let qs = _mm_loadu_si128(p as *const __m128i);
        let lo = _mm_and_si128(qs, m4);
        let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), m4);
        _mm256_set_m128i(hi, lo)
    }

    /// Activation rows a call of [`rows`] takes: with two weight rows, 12 integer and
    /// 12 float accumulators, two weight vectors and an activation vector fill 27 of
    /// the 32 registers.
    const XR: usize = 6;

    /// `W` packed weight rows · quantized activation rows `i0..i0 + len` into `out[v]`
    /// (each `len` long): [`XR`] rows at a time (each weight vector widened once for
    /// them), the rest four, two or one at a time — each (weight row, activation row)
    /// pair's sums in the same order either way, so a row in a batch gets the bits it
    /// gets alone.
    ///
    /// # Safety
    /// The CPU has the features enabled here; each `w[v]` is a packed row of `x.k / 32`
    /// blocks of `ty`, and `x` holds rows up to `i0 + len`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_rows<const W: usize>(
        ty: QuantType,
        w: [&[u8]; W],
        x: &QuantRows,
        i0: usize,
        out: &mut [&mut [f32]; W],
    ) {
        let len = out[0].len();
        let mut j = 0;
        macro_rules! take {
            ($r:expr) => {
                while len - j >= $r {
                    let y = typed!(ty, rows::<W, $r>(w, x, i0 + j));
                    for (o, y) in out.iter_mut().zip(y) {
                        o[j..j + $r].copy_from_slice(&y);
                    }
                    j += $r;
                }
            };
        }
        // Sixes, then what is left in fours, twos and ones: a lone row's sums are one
        // dependency chain each, several times slower a row.
        if ty.nibbles() && W > 1 {
            // Two int32 sums a pair on this path: three rows fill the registers.
            take!(3);
        } else {
            take!(XR);
            take!(4);
        }
        take!(2);
        take!(1);
    }

    /// Activation row 0 · each of `W` streams' packed weight rows (`w[v]`: rows
    /// `0..out[v].len()`, one after another) into `out[v]`: a row of each stream at a
    /// time, in one call (one a row pair cost ~15 ns, a third of a 2048-wide pair's
    /// time); each row's sums as a lone row's.
    ///
    /// # Safety
    /// As [`dot_rows`]'s; each `w[v]` holds `out[v].len()` packed rows, all `out[v]`
    /// of one length.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn dot_streams<const W: usize>(
        ty: QuantType,
        w: [&[u8]; W],
        x: &QuantRows,
        out: &mut [&mut [f32]; W],
    ) {
        let rb = x.k / BLOCK * ty.block_bytes();
        let len = out[0].len();
        for v in 0..W {
            assert!(
                out[v].len() == len && w[v].len() == len * rb,
                "{W} streams of {len} rows"
            );
        }
        for i in 0..len {
            let mut wi: [&[u8]; W] = [&[]; W];
            for v in 0..W {
                wi[v] = w[v].get_unchecked(i * rb..(i + 1) * rb);
            }
            let y = typed!(ty, rows::<W, 1>(wi, x, 0));
            for v in 0..W {
                *out[v].get_unchecked_mut(i) = y[v][0];
            }
        }
    }

    /// `R` activation rows from `i` · `W` packed weight rows of format `T`
    /// ([`QuantType::code`]): per full group, 16 loads of each 8- or 16-bit weight row,
    /// each widened once and `vpdpwssd`-ed with every row's interleaved activations into
    /// that pair's 16 block sums — or, 4-bit, 4 loads, each giving two nibble vectors
    /// `vpdpbusd`-ed with the rows' activation bytes; then the group's scales times the
    /// rows' block scales, and Q4_1's / Q4F's constants times the rows' block sums, in
    /// three vector operations a pair. The tail blocks one by one ([`tail`]).
    // Indices over the (weight row, activation row) accumulator grid read clearer than
    // zipped iterators here.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn rows<const W: usize, const R: usize, const T: u8>(
        w: [&[u8]; W],
        x: &QuantRows,
        i: usize,
    ) -> [[f32; R]; W] {
        let ty = const { QuantType::of_code(T) };
        let nb = x.k / BLOCK;
        let bb = ty.block_bytes();
        for wv in &w {
            assert_eq!(wv.len(), nb * bb, "a weight row of k/32 blocks");
        }
        let groups = nb / GROUP;
        let mut xs: [&[i16]; R] = [&[]; R];
        let mut rows: [(&[i16], &[f32], &[f32]); R] = [(&[], &[], &[]); R];
        for r in 0..R {
            xs[r] = x.interleaved(i + r);
            rows[r] = x.row(i + r);
        }
        let mut acc = [[_mm512_setzero_ps(); R]; W];
        for g in 0..groups {
            let mut gp = [std::ptr::null::<u8>(); W];
            let mut qp = [std::ptr::null::<u8>(); W];
            for v in 0..W {
                gp[v] = w[v].as_ptr().add(g * GROUP * bb);
                qp[v] = gp[v].add(super::values_offset(ty));
            }
            let xo = g * GROUP * BLOCK;
            // A few (weight, activation) pairs give the integer sums too few independent
            // chains to hide `vpdpwssd`'s latency: each pair then sums into two
            // accumulators, added at the group's end (integers: the same bits).
            let split = W * R <= 4;
            let mut sums = [[_mm512_setzero_si512(); R]; W];
            let mut sums2 = [[_mm512_setzero_si512(); R]; W];
            let mut xp = [std::ptr::null::<i16>(); R];
            for r in 0..R {
                xp[r] = xs[r].as_ptr().add(xo);
            }
            let mut wv = [_mm512_setzero_si512(); W];
            // Weight vectors `t` (widened by `$load!(v, t)`) · the rows' activation
            // vectors `t`, summed into `$sums`. (Macros, not closures: a closure is
            // compiled without this function's target features, so it is a call.)
            macro_rules! step {
                ($t:expr, $sums:ident, $load:ident) => {
                    for v in 0..W {
                        wv[v] = $load!(v, $t);
                    }
                    for r in 0..R {
                        let a = _mm512_loadu_si512(xp[r].add($t * 2 * GROUP) as *const _);
                        for v in 0..W {
                            $sums[v][r] = dpwssd!($sums[v][r], wv[v], a);
                        }
                    }
                };
            }
            match ty {
                QuantType::Q16 => {
                    for t in (0..BLOCK / 2).step_by(2) {
                        if t == BLOCK / 4 {
                            // 16 products of up to 4096 · 32767 a lane: the int32 sums
                            // go to the float accumulators before they could overflow.
                            for v in 0..W {
                                let dw =
                                    _mm512_cvtph_ps(_mm256_loadu_si256(gp[v] as *const __m256i));
                                for r in 0..R {
                                    let dx = _mm512_loadu_ps(rows[r].1.as_ptr().add(g * GROUP));
                                    let sum = _mm512_add_epi32(sums[v][r], sums2[v][r]);
                                    acc[v][r] = _mm512_fmadd_ps(
                                        _mm512_cvtepi32_ps(sum),
                                        _mm512_mul_ps(dw, dx),
                                        acc[v][r],
                                    );
                                    sums[v][r] = _mm512_setzero_si512();
                                    sums2[v][r] = _mm512_setzero_si512();
                                }
                            }
                        }
                        macro_rules! load {
                            ($v:expr, $tt:expr) => {
                                _mm512_loadu_si512(qp[$v].add($tt * 64) as *const _)
                            };
                        }
                        step!(t, sums, load);
                        if split {
                            step!(t + 1, sums2, load);
                        } else {
                            step!(t + 1, sums, load);
                        }
                    }
                }
                QuantType::Q8_0 => {
                    macro_rules! load {
                        ($v:expr, $tt:expr) => {
                            _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                                qp[$v].add($tt * 32) as *const __m256i
                            ))
                        };
                    }
                    for t in (0..BLOCK / 2).step_by(2) {
                        step!(t, sums, load);
                        if split {
                            step!(t + 1, sums2, load);
                        } else {
                            step!(t + 1, sums, load);
                        }
                    }
                }
                QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4F => {
                    // Each activation value as 256·high + low: the nibbles (unsigned)
                    // `vpdpbusd` the high bytes (signed) and the low bytes (unsigned)
                    // `vpdpbusd` the nibbles (signed, as they are below 128), 64
                    // products an instruction — no widening of the weights — into two
                    // sums, put together at the group's end (exact in int32).
                    let m4 = _mm512_set1_epi8(0x0F);
                    let mut xb = [std::ptr::null::<u8>(); R];
                    for r in 0..R {
                        xb[r] = x.interleaved_bytes(i + r).as_ptr().add(2 * xo);
                    }
                    // With few pairs, each pair's two sums split once more by the
                    // step's parity, for independent chains enough to hide the latency.
                    let mut low = [[[_mm512_setzero_si512(); R]; W]; 2];
                    let mut high = [[[_mm512_setzero_si512(); R]; W]; 2];
                    let mut nib = [[_mm512_setzero_si512(); 2]; W];
                    for p in 0..BLOCK / 8 {
                        for v in 0..W {
                            let b = _mm512_loadu_si512(qp[v].add(p * 64) as *const _);
                            nib[v] = [
                                _mm512_and_si512(b, m4),
                                _mm512_and_si512(_mm512_srli_epi16::<4>(b), m4),
                            ];
                        }
                        for h in 0..2 {
                            let step = 2 * p + h;
                            for r in 0..R {
                                let lo = _mm512_loadu_si512(xb[r].add(2 * step * 64) as *const _);
                                let hi =
                                    _mm512_loadu_si512(xb[r].add((2 * step + 1) * 64) as *const _);
                                let c = if split { h } else { 0 };
                                for v in 0..W {
                                    low[c][v][r] = dpbusd!(low[c][v][r], lo, nib[v][h]);
                                    high[c][v][r] = dpbusd!(high[c][v][r], nib[v][h], hi);
                                }
                            }
                        }
                    }
                    for v in 0..W {
                        for r in 0..R {
                            let (mut l, mut h) = (low[0][v][r], high[0][v][r]);
                            if split {
                                l = _mm512_add_epi32(l, low[1][v][r]);
                                h = _mm512_add_epi32(h, high[1][v][r]);
                            }
                            sums[v][r] = _mm512_add_epi32(_mm512_slli_epi32::<8>(h), l);
                        }
                    }
                }
            }
            if split && !ty.nibbles() {
                for v in 0..W {
                    for r in 0..R {
                        sums[v][r] = _mm512_add_epi32(sums[v][r], sums2[v][r]);
                    }
                }
            }
            for v in 0..W {
                let dw = match ty {
                    QuantType::Q4F => _mm512_loadu_ps(gp[v] as *const f32),
                    _ => _mm512_cvtph_ps(_mm256_loadu_si256(gp[v] as *const __m256i)),
                };
                let c = match ty {
                    QuantType::Q8_0 | QuantType::Q16 | QuantType::Q4_0 => None,
                    QuantType::Q4_1 => Some(_mm512_cvtph_ps(_mm256_loadu_si256(
                        gp[v].add(32) as *const __m256i
                    ))),
                    QuantType::Q4F => Some(_mm512_loadu_ps(gp[v].add(64) as *const f32)),
                };
                for r in 0..R {
                    let (_, d, s) = rows[r];
                    if ty == QuantType::Q4_0 {
                        // Σ (q − 8)·qₓ: the nibbles' sums less 8·Σ qₓ.
                        let n = x.n[(i + r) * nb + g * GROUP..].as_ptr();
                        let n = _mm512_loadu_si512(n as *const _);
                        sums[v][r] = _mm512_sub_epi32(sums[v][r], _mm512_slli_epi32::<3>(n));
                    }
                    let dx = _mm512_loadu_ps(d.as_ptr().add(g * GROUP));
                    acc[v][r] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(sums[v][r]),
                        _mm512_mul_ps(dw, dx),
                        acc[v][r],
                    );
                    if let Some(c) = c {
                        acc[v][r] = _mm512_fmadd_ps(
                            c,
                            _mm512_loadu_ps(s.as_ptr().add(g * GROUP)),
                            acc[v][r],
                        );
                    }
                }
            }
        }
        let mut out = [[0f32; R]; W];
        for v in 0..W {
            for r in 0..R {
                out[v][r] = _mm512_reduce_add_ps(acc[v][r])
                    + if groups * GROUP < nb {
                        tail(ty, w[v], x, i + r, groups * GROUP)
                    } else {
                        0.0
                    };
            }
        }
        out
    }

    /// Group `g` of up to 16 packed weight rows (`w[c]`: the panel's column `c0 + c`, a
    /// whole row; columns past `w.len()` up to `c0 + 16` are zero), dequantized as
    /// [`super::dequantize_row`] computes each value (`d·q + c`, two roundings), rounded
    /// to bf16 and stored as columns `c0..c0 + 16` of a bf16 GEMM panel (`out`:
    /// `[k/2][PANEL][2]`). A row's vector of pair `t` holds that pair of each of the
    /// group's 16 blocks; the 16 rows' vectors are transposed in registers, so each
    /// block's pair is one 64-byte store of 16 columns (storing each row's pairs where
    /// they go instead scatters 16 lanes 4 KiB apart: 1.5 cycles a weight here).
    ///
    /// # Safety
    /// The CPU has AVX-512 BF16 and the features enabled here; each `w[c]` is a packed
    /// row with group `g` whole; `out` holds the panel's pairs up to those of group `g`;
    /// `c0 + 16 ≤ PANEL`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512bf16")]
    pub unsafe fn panel_group(
        ty: QuantType,
        w: &[&[u8]],
        g: usize,
        c0: usize,
        out: &mut [half::bf16],
    ) {
        use super::super::packed::PANEL;
        let bb = ty.block_bytes();
        assert!(w.len() <= 16 && c0 + 16 <= PANEL);
        assert!(out.len() >= ((g + 1) * GROUP * BLOCK / 2) * PANEL * 2);
        if ty.nibbles() {
            return panel_group_nibbles(ty, w, g, c0, out);
        }
        // Each row's scales and offsets a lane pair: lane l of a 16-lane half is element
        // pair l / 2 of block l / 2 (+ 8 for the upper half), each block's scale twice.
        let lo_idx = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        let hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
        let mut scales = [[_mm512_setzero_ps(); 4]; 16];
        let at = g * GROUP * bb;
        for (sc, wc) in scales.iter_mut().zip(w) {
            assert!(wc.len() >= at + GROUP * bb);
            let (d, off) = group_scales(ty, wc.as_ptr().add(at));
            *sc = [
                _mm512_permutexvar_ps(lo_idx, d),
                _mm512_permutexvar_ps(hi_idx, d),
                _mm512_permutexvar_ps(lo_idx, off),
                _mm512_permutexvar_ps(hi_idx, off),
            ];
        }
        let base = out.as_mut_ptr() as *mut u32;
        for t in 0..BLOCK / 2 {
            let mut v = [_mm512_setzero_si512(); 16];
            for ((vc, wc), sc) in v.iter_mut().zip(w).zip(&scales) {
                let qp = wc.as_ptr().add(at + super::values_offset(ty));
                // Pair t's values of blocks 0..8 and 8..16 as int32 lanes.
                let (a, b) = match ty {
                    QuantType::Q8_0 => {
                        let p = qp.add(t * 32);
                        (
                            _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)),
                            _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i)),
                        )
                    }
                    QuantType::Q16 => {
                        let p = qp.add(t * 64);
                        (
                            _mm512_cvtepi16_epi32(_mm256_loadu_si256(p as *const __m256i)),
                            _mm512_cvtepi16_epi32(_mm256_loadu_si256(p.add(32) as *const __m256i)),
                        )
                    }
                    QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4F => {
                        unreachable!("4-bit groups take panel_group_nibbles")
                    }
                };
                let a = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), sc[0]), sc[2]);
                let b = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(b), sc[1]), sc[3]);
                *vc = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
            }
            transpose16(&mut v);
            // Block j's pair t of this group is pair (16g + j)·16 + t of the row.
            for (j, vj) in v.iter().enumerate() {
                let at = ((g * GROUP + j) * (BLOCK / 2) + t) * PANEL + c0;
                _mm512_storeu_si512(base.add(at) as *mut _, *vj);
            }
        }
    }

    /// A packed group's 16 scales and 16 offsets (`d·q + c`: c is 0 for Q8_0 and Q16,
    /// −8·d for Q4_0), from its start `gp`.
    ///
    /// # Safety
    /// The CPU has the features enabled here; `gp` starts a whole packed group of `ty`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn group_scales(ty: QuantType, gp: *const u8) -> (__m512, __m512) {
        let d = match ty {
            QuantType::Q4F => _mm512_loadu_ps(gp as *const f32),
            _ => _mm512_cvtph_ps(_mm256_loadu_si256(gp as *const __m256i)),
        };
        let off = match ty {
            QuantType::Q8_0 | QuantType::Q16 => _mm512_setzero_ps(),
            QuantType::Q4_0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
            QuantType::Q4_1 => _mm512_cvtph_ps(_mm256_loadu_si256(gp.add(32) as *const __m256i)),
            QuantType::Q4F => _mm512_loadu_ps(gp.add(64) as *const f32),
        };
        (d, off)
    }

    /// [`panel_group`] for the 4-bit formats, whose 64 bytes `p` hold elements
    /// 8p..8p + 8 of each of the 16 blocks ([`super::pack_row`]): each row's nibbles of
    /// one half (`h`: elements 8p + 4h..8p + 4h + 4) of blocks 8c..8c + 8 become 16
    /// pairs — lane l is block 8c + l/2's pair 4p + 2h + l % 2 — so the 16 rows'
    /// vectors, transposed, are again one 64-byte store of 16 columns a (block, pair).
    ///
    /// # Safety
    /// As [`panel_group`]'s, `ty` a 4-bit format.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni,avx512bf16")]
    unsafe fn panel_group_nibbles(
        ty: QuantType,
        w: &[&[u8]],
        g: usize,
        c0: usize,
        out: &mut [half::bf16],
    ) {
        use super::super::packed::PANEL;
        let at = g * GROUP * ty.block_bytes();
        // Each row's scales and offsets for a quarter of the blocks: lane l of quarter
        // q is element l % 4 of block 4q + l / 4.
        let mut quarter = [_mm512_setzero_si512(); 4];
        for (q, idx) in quarter.iter_mut().enumerate() {
            *idx = _mm512_add_epi32(
                _mm512_srli_epi32::<2>(_mm512_set_epi32(
                    15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
                )),
                _mm512_set1_epi32(4 * q as i32),
            );
        }
        let mut scales = [[_mm512_setzero_ps(); 8]; 16];
        for (sc, wc) in scales.iter_mut().zip(w) {
            assert!(wc.len() >= at + GROUP * ty.block_bytes());
            let (d, off) = group_scales(ty, wc.as_ptr().add(at));
            for (q, idx) in quarter.iter().enumerate() {
                sc[q] = _mm512_permutexvar_ps(*idx, d);
                sc[4 + q] = _mm512_permutexvar_ps(*idx, off);
            }
        }
        let m4 = _mm512_set1_epi32(0x0F);
        let base = out.as_mut_ptr() as *mut u32;
        let values = values_offset(ty);
        for p in 0..BLOCK / 8 {
            for h in 0..2 {
                for c in 0..2 {
                    let mut v = [_mm512_setzero_si512(); 16];
                    for ((vc, wc), sc) in v.iter_mut().zip(w).zip(&scales) {
                        let qp = wc.as_ptr().add(at + values + p * 64 + c * 32);
                        let mut ab = [
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(qp as *const __m128i)),
                            _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(16) as *const __m128i)),
                        ];
                        for (e, q) in ab.iter_mut().zip([2 * c, 2 * c + 1]) {
                            let n = if h == 0 {
                                _mm512_and_si512(*e, m4)
                            } else {
                                _mm512_srli_epi32::<4>(*e)
                            };
                            *e = _mm512_castps_si512(_mm512_add_ps(
                                _mm512_mul_ps(_mm512_cvtepi32_ps(n), sc[q]),
                                sc[4 + q],
                            ));
                        }
                        *vc = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
                            _mm512_castsi512_ps(ab[1]),
                            _mm512_castsi512_ps(ab[0]),
                        ));
                    }
                    transpose16(&mut v);
                    for (l, vl) in v.iter().enumerate() {
                        let (j, t) = (8 * c + l / 2, 4 * p + 2 * h + l % 2);
                        let at = ((g * GROUP + j) * (BLOCK / 2) + t) * PANEL + c0;
                        _mm512_storeu_si512(base.add(at) as *mut _, *vl);
                    }
                }
            }
        }
    }

    /// The lane indices of one stage of [`transpose16`] for a two-source permute of
    /// rows `i` (`a`) and `i + d` (`b`): row i keeps its lanes with bit d clear and takes
    /// row i + d's lanes l − d for the rest (`upper`); row i + d takes row i's lanes
    /// l + d and keeps the rest.
    const fn stage_lanes(d: usize, upper: bool) -> [i32; 16] {
        let mut out = [0i32; 16];
        let mut l = 0;
        while l < 16 {
            out[l] = match (upper, l & d == 0) {
                (true, true) => l as i32,
                (true, false) => (16 + l - d) as i32,
                (false, true) => (l + d) as i32,
                (false, false) => (16 + l) as i32,
            };
            l += 1;
        }
        out
    }

    /// One stage of [`transpose16`]: the off-diagonal `D`×`D` blocks swapped.
    #[inline(always)]
    unsafe fn stage<const D: usize>(v: &mut [__m512i; 16]) {
        const fn both(d: usize) -> [[i32; 16]; 2] {
            [stage_lanes(d, true), stage_lanes(d, false)]
        }
        let lanes = const { both(D) };
        let upper = _mm512_loadu_si512(lanes[0].as_ptr() as *const _);
        let lower = _mm512_loadu_si512(lanes[1].as_ptr() as *const _);
        for i in 0..16 {
            if i & D == 0 {
                let (a, b) = (v[i], v[i + D]);
                v[i] = _mm512_permutex2var_epi32(a, upper, b);
                v[i + D] = _mm512_permutex2var_epi32(a, lower, b);
            }
        }
    }

    /// 16 vectors of 16 32-bit lanes, transposed (lane l of vector i to lane i of
    /// vector l): the off-diagonal 8×8, 4×4, 2×2 and 1×1 blocks swapped, one two-source
    /// permute a vector a stage.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    pub unsafe fn transpose16(v: &mut [__m512i; 16]) {
        stage::<8>(v);
        stage::<4>(v);
        stage::<2>(v);
        stage::<1>(v);
    }

    /// Blocks `from..` of a weight row (past its full groups: still ggml's blocks) ·
    /// activation row `i`, block by block: the 32 weights widened to int16, one
    /// `vpdpwssd` with the 32 activations, scaled by both scales; the constants
    /// (`c·dₓ·Σqₓ`) in a scalar beside them.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn tail(ty: QuantType, w: &[u8], x: &QuantRows, i: usize, from: usize) -> f32 {
        let (q, d, s) = x.row(i);
        let nb = x.k / BLOCK;
        let bb = ty.block_bytes();
        let (wp, qp) = (w.as_ptr(), q.as_ptr());
        let mut acc = _mm512_setzero_ps();
        let mut off = 0f32;
        for b in from..nb {
            let blk = wp.add(b * bb);
            let dw = match ty {
                QuantType::Q4F => (blk as *const f32).read_unaligned(),
                _ => half(blk),
            };
            let (wv, c) = match ty {
                QuantType::Q8_0 => (
                    _mm512_cvtepi8_epi16(_mm256_loadu_si256(blk.add(2) as *const __m256i)),
                    0.0,
                ),
                QuantType::Q16 => (_mm512_loadu_si512(blk.add(2) as *const _), 0.0),
                QuantType::Q4_0 => (
                    _mm512_sub_epi16(
                        _mm512_cvtepu8_epi16(nibbles(blk.add(2))),
                        _mm512_set1_epi16(8),
                    ),
                    0.0,
                ),
                QuantType::Q4_1 => (_mm512_cvtepu8_epi16(nibbles(blk.add(4))), half(blk.add(2))),
                QuantType::Q4F => (
                    _mm512_cvtepu8_epi16(nibbles(blk.add(8))),
                    (blk.add(4) as *const f32).read_unaligned(),
                ),
            };
            let xv = _mm512_loadu_si512(qp.add(b * BLOCK) as *const _);
            let dot = dpwssd!(_mm512_setzero_si512(), wv, xv);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(dw * d[b]), acc);
            off += c * s[b];
        }
        _mm512_reduce_add_ps(acc) + off
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub unsafe fn dot_rows<const W: usize>(
        _: super::QuantType,
        _: [&[u8]; W],
        _: &super::QuantRows,
        _: usize,
        _: &mut [&mut [f32]; W],
    ) {
        unreachable!("has_vnni() is false off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every block format.
    const TYPES: [QuantType; 5] = [
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q4F,
        QuantType::Q16,
    ];

    fn matrix(ty: QuantType, n: usize, k: usize, seed: u64) -> QuantMatrix {
        let w = noise(n * k, seed);
        let data: Vec<u8> = w.chunks(k).flat_map(|r| quantize_row(ty, r)).collect();
        QuantMatrix::new(ty, n, k, Box::new(data)).unwrap()
    }

    #[test]
    fn activation_rows_quantize_alike_with_and_without_simd() {
        if !has_vnni() {
            return;
        }
        // Three rows of 40 blocks (two full groups and a tail): noise, a zero block,
        // values exactly halfway between two steps, and one huge value.
        let (m, k) = (3, 40 * BLOCK);
        let mut x = noise(m * k, 11);
        x[BLOCK..2 * BLOCK].fill(0.0);
        for (i, v) in x[2 * BLOCK..3 * BLOCK].iter_mut().enumerate() {
            *v = i as f32 + 0.5;
        }
        x[2 * BLOCK] = 32767.0;
        x[k + 5] = 3e38;
        let plain = {
            let mut rows = QuantRows::quantize(&x, m, k);
            rows.q.fill(0);
            rows.qi.bytes_mut().fill(0);
            rows.qb.bytes_mut().fill(0);
            quantize_rows(&x, &mut rows);
            rows
        };
        let simd = QuantRows::quantize(&x, m, k);
        assert_eq!(simd.q, plain.q);
        assert_eq!(simd.qi.bytes(), plain.qi.bytes());
        assert_eq!(simd.qb.bytes(), plain.qb.bytes());
        assert_eq!(bits(&simd.d), bits(&plain.d));
        assert_eq!(bits(&simd.s), bits(&plain.s));
        // Halves went away from zero (the scale is 1: 1.5, 2.5 and 3.5), as
        // `f32::round` rounds them: round-to-even here moved SmolLM2's log-probs from
        // HF's by up to 1.4e-3 rather than 8.9e-4 (`tests/gguf.rs`).
        assert_eq!(&simd.q[2 * BLOCK + 1..2 * BLOCK + 4], &[2, 3, 4]);
        let mut x: Vec<f32> = (0..BLOCK).map(|i| -(i as f32) - 0.5).collect();
        x[0] = -32767.0;
        let q = QuantRows::quantize(&x, 1, BLOCK);
        let want: Vec<i16> = x.iter().map(|v| v.round() as i16).collect();
        assert_eq!(q.q, want);
        assert_eq!(&q.q[1..3], &[-2, -3]);
        // Just under a half rounds down.
        let below = 0.5f32.next_down();
        let q = QuantRows::quantize(
            &[vec![32767.0, below, -below], vec![0.0; BLOCK - 3]].concat(),
            1,
            BLOCK,
        );
        assert_eq!(&q.q[..3], &[32767, 0, 0]);
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn quantizers_round_trip_within_half_a_step() {
        let x = noise(256, 7);
        // Q4_0 spans −8..7 steps: a value of the opposite sign to the largest one can
        // sit a whole step past the range's end.
        for (ty, step) in [
            (QuantType::Q8_0, 1.0 / 127.0),
            (QuantType::Q4_0, 2.0 / 8.0),
            (QuantType::Q4_1, 2.0 / 15.0),
            (QuantType::Q4F, 2.0 / 15.0),
            (QuantType::Q16, 1.0 / 4096.0),
        ] {
            let mut back = vec![0f32; x.len()];
            dequantize_row(ty, &quantize_row(ty, &x), &mut back);
            let err = x
                .iter()
                .zip(&back)
                .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
            // Half a step, plus the f16 rounding of the scale.
            assert!(err <= step * 0.5 * 1.01 + 1e-3, "{ty:?}: {err}");
        }
    }

    /// The integer products equal the f32 product of the dequantized weights with the
    /// dequantized activation blocks (the same numbers, summed in another order), and
    /// the SIMD kernel gives the scalar one's.
    #[test]
    fn products_are_the_dequantized_products() {
        // 18 blocks a row: one interleaved group and two blocks past it.
        let (m, n, k) = (5, 37, 576);
        let x = noise(m * k, 3);
        let xq = QuantRows::quantize(&x, m, k);
        let xd: Vec<f32> = (0..m * k)
            .map(|j| xq.q[j] as f32 * xq.d[j / BLOCK])
            .collect();
        for ty in TYPES {
            let w = matrix(ty, n, k, 11);
            let wd = w.dequantize_rows(0..n);
            let y = w.matmul(&x, m);
            for i in 0..m {
                for r in 0..n {
                    let want: f64 = (0..k)
                        .map(|j| wd[r * k + j] as f64 * xd[i * k + j] as f64)
                        .sum();
                    let got = y[i * n + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{ty:?} {got} {want}"
                    );
                    let scalar = dot_scalar(ty, &unpack_row(ty, w.row(r)), &xq, i) as f64;
                    assert!((scalar - got).abs() <= 1e-5 * (1.0 + want.abs()), "{ty:?}");
                }
            }
        }
    }

    /// From [`GEMM_ROWS`] rows the product runs on the bf16 GEMM: within bf16's rounding
    /// of weights and activations of the dequantized product.
    #[test]
    fn many_rows_run_on_the_bf16_gemm_within_its_rounding() {
        if !crate::kernels::has_avx512_bf16() {
            return;
        }
        let (m, n, k) = (GEMM_ROWS + 5, 70, 576);
        let x = noise(m * k, 5);
        for ty in TYPES {
            let w = matrix(ty, n, k, 13);
            let wd = w.dequantize_rows(0..n);
            let y = w.matmul(&x, m);
            let mut worst = 0f64;
            for i in 0..m {
                for r in 0..n {
                    let terms = (0..k).map(|j| wd[r * k + j] as f64 * x[i * k + j] as f64);
                    let want: f64 = terms.clone().sum();
                    let size: f64 = terms.map(f64::abs).sum();
                    let err = (y[i * n + r] as f64 - want).abs() / size;
                    worst = worst.max(err);
                }
            }
            // Two roundings of 2⁻⁹ a term at most; their errors mostly cancel.
            assert!(worst <= 2.0 * 2f64.powi(-9), "{ty:?}: {worst}");
            assert!(worst > 0.0, "{ty:?}: the GEMM path ran");
            // The SIMD panel is the scalar one, bit for bit, the padding past n included.
            let len = k / 2 * super::super::packed::PANEL * 2;
            for p in 0..n.div_ceil(super::super::packed::PANEL) {
                let (mut a, mut b) = (vec![half::bf16::ONE; len], vec![half::bf16::ZERO; len]);
                w.panel_bf16_with(p, &mut a, true);
                w.panel_bf16_with(p, &mut b, false);
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{ty:?} panel {p}"
                );
            }
        }
    }

    /// Several weights on one input give each weight's own product, bit for bit, and
    /// each row of a batch its product alone, at row counts that take the six-row
    /// kernel and its remainder, weight row counts that take the two-row kernel and
    /// its remainder, and the parallel path.
    #[test]
    fn many_weights_at_once_are_each_alone() {
        let k = 1056;
        for m in [1, 3, 4, 9, 13] {
            let x = noise(m * k, 17 + m as u64);
            let ws = [
                matrix(QuantType::Q8_0, 40, k, 1),
                matrix(QuantType::Q4_0, 1100, k, 2),
                matrix(QuantType::Q4_1, 7, k, 3),
                matrix(QuantType::Q4F, 33, k, 4),
                matrix(QuantType::Q16, 21, k, 5),
            ];
            let refs: Vec<&QuantMatrix> = ws.iter().collect();
            let many = QuantMatrix::matmul_many(&refs, &x, m);
            for (w, y) in ws.iter().zip(&many) {
                assert_eq!(y, &w.matmul(&x, m), "{:?} m={m}", w.ty());
                // A row in a batch gets the bits it gets alone.
                for i in 0..m {
                    let alone = w.matmul(&x[i * k..(i + 1) * k], 1);
                    assert_eq!(&y[i * w.n()..(i + 1) * w.n()], &alone[..], "row {i} of {m}");
                }
                let xq = QuantRows::quantize(&x, m, k);
                for i in 0..m {
                    for r in 0..w.n() {
                        let scalar = dot_scalar(w.ty(), &unpack_row(w.ty(), w.row(r)), &xq, i);
                        let got = y[i * w.n() + r];
                        assert!((scalar - got).abs() <= 1e-5 * (1.0 + got.abs()));
                    }
                }
            }
        }
        assert!(QuantMatrix::matmul_many(&[], &[], 1).is_empty());
    }

    /// 4-bit products split each activation into its two bytes: nibbles 0 and 15
    /// against activations at the int16 limits and at values whose low byte is 0xFF or
    /// 0x00 (−1, −256, 255, 256) give the exact sums, a group and a tail block alike.
    #[test]
    fn nibble_products_at_the_extremes_are_exact() {
        let k = 18 * BLOCK;
        let mut row = Vec::new();
        let nib = |i: usize| if i % 5 < 2 { 15u8 } else { 0 };
        for b in 0..k / BLOCK {
            row.extend(f16::from_f32(1.0).to_bits().to_le_bytes());
            for e in 0..16 {
                row.push(nib(b * BLOCK + e) | (nib(b * BLOCK + e + 16) << 4));
            }
        }
        let w = QuantMatrix::new(QuantType::Q4_0, 1, k, Box::new(row)).unwrap();
        // Each block's scale is 1 (its largest value 32767): the values are the int16s.
        let vals = [32767.0, -32767.0, -1.0, -256.0, 255.0, 256.0, 0.0, -255.0];
        let x: Vec<f32> = (0..k)
            .map(|i| {
                if i % BLOCK == 0 {
                    32767.0
                } else {
                    vals[i * 7 % vals.len()]
                }
            })
            .collect();
        let xq = QuantRows::quantize(&x, 1, k);
        assert!(xq.d.iter().all(|&d| d == 1.0));
        let want: f64 = (0..k).map(|i| (nib(i) as f64 - 8.0) * x[i] as f64).sum();
        let got = w.matmul(&x, 1)[0] as f64;
        assert!((got - want).abs() <= 1e-6 * want.abs(), "{got} {want}");
        let scalar = dot_scalar(
            QuantType::Q4_0,
            &unpack_row(QuantType::Q4_0, w.row(0)),
            &xq,
            0,
        );
        assert!((scalar as f64 - want).abs() <= 1e-6 * want.abs());
    }

    /// Q16 values reach 4096 in magnitude: a row of them against a row of activations
    /// at the int16 limit (every product 4096 · 32767) gives the exact sum, in the
    /// kernel as in the scalar path, a group and a tail block alike.
    #[test]
    fn q16_products_at_the_extremes_do_not_overflow() {
        let k = 18 * BLOCK;
        let mut row = Vec::new();
        for b in 0..k / BLOCK {
            row.extend(f16::from_f32(0.5).to_bits().to_le_bytes());
            for e in 0..BLOCK {
                let v: i16 = if (b * BLOCK + e).is_multiple_of(3) {
                    4096
                } else {
                    -4096
                };
                row.extend(v.to_le_bytes());
            }
        }
        let w = QuantMatrix::new(QuantType::Q16, 1, k, Box::new(row)).unwrap();
        let x: Vec<f32> = (0..k)
            .map(|i| if i % 3 == 0 { 2.0 } else { -2.0 })
            .collect();
        let xq = QuantRows::quantize(&x, 1, k);
        assert!(xq.q.iter().all(|&q| q.abs() == 32767));
        // Every product is +0.5·4096·2: the sum is exact in f32.
        let want = k as f32 * 0.5 * 4096.0 * 2.0;
        assert_eq!(w.matmul(&x, 1), vec![want]);
        assert_eq!(
            dot_scalar(
                QuantType::Q16,
                &unpack_row(QuantType::Q16, w.row(0)),
                &xq,
                0
            ),
            want
        );
    }

    /// The interleaved layout holds the file's bytes: unpacked, every row is the
    /// ggml row it was made from, for rows with and without a tail past their groups.
    #[test]
    fn packed_rows_unpack_to_the_files_blocks() {
        for ty in TYPES {
            for k in [64, 512, 576, 1056] {
                let w = noise(3 * k, k as u64);
                let rows: Vec<Vec<u8>> = w.chunks(k).map(|r| quantize_row(ty, r)).collect();
                let m = QuantMatrix::new(ty, 3, k, Box::new(rows.concat())).unwrap();
                for (r, row) in rows.iter().enumerate() {
                    assert_eq!(m.row(r).len(), row.len());
                    assert_eq!(&unpack_row(ty, m.row(r)), row, "{ty:?} k={k} row {r}");
                    if k >= 512 {
                        assert_ne!(m.row(r), &row[..], "{ty:?} k={k}: a full group is packed");
                    }
                }
            }
        }
    }

    #[test]
    fn rows_permute_and_slice_as_bytes() {
        let w = matrix(QuantType::Q4_1, 6, 64, 5);
        let p = w.permute_rows(&[5, 4, 3, 2, 1, 0]);
        assert_eq!(p.dequantize_rows(0..1), w.dequantize_rows(5..6));
        assert_eq!(
            w.slice_rows(2..4).dequantize_rows(0..2),
            w.dequantize_rows(2..4)
        );
        assert!(QuantMatrix::new(QuantType::Q8_0, 2, 48, Box::new(vec![0u8; 10])).is_err());
        assert!(QuantMatrix::new(QuantType::Q8_0, 2, 64, Box::new(vec![0u8; 10])).is_err());
    }
}
