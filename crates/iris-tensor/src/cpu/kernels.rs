//! Dot-product kernels for the matrix-vector path (decode), with AVX-512 versions
//! chosen at run time and portable fallbacks.
//!
//! Decode is memory-bound, so a bf16 weight is widened to f32 in registers (a shift)
//! and multiplied with f32 activations: the same products PyTorch forms, at 2 bytes
//! read per weight.

use half::{bf16, f16};

/// Which SIMD path this CPU takes, decided once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    Portable,
}

/// For tests of the `vdpbf16ps` kernels: whether they can run here. When they cannot,
/// says so on stderr (`cargo test -- --nocapture` shows it), so a green run on such a
/// CPU does not pass for a check of them; the test then checks the portable path on
/// the same inputs.
pub fn bf16_kernels_testable(test: &str) -> bool {
    let yes = has_avx512_bf16();
    if !yes {
        eprintln!(
            "note: {test}: no AVX-512 BF16 on this CPU: the vdpbf16ps kernels are not run, \
             the portable path is checked on the same inputs"
        );
    }
    yes
}

/// Whether the CPU has AVX-512 BF16 (`vdpbf16ps`), decided once.
pub fn has_avx512_bf16() -> bool {
    use std::sync::OnceLock;
    static B: OnceLock<bool> = OnceLock::new();
    *B.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bf16")
            && std::arch::is_x86_feature_detected!("avx512f")
        {
            return true;
        }
        false
    })
}

/// `w · x` for bf16 weights and bf16 activations with `vdpbf16ps` (pairs of products
/// summed into f32), in the same order as `dot_tile_4x4_bf16`; call only when
/// `has_avx512_bf16()`.
pub fn dot_bf16_dp(w: &[bf16], x: &[bf16]) -> f32 {
    assert!(has_avx512_bf16(), "dot_bf16_dp needs AVX-512 BF16");
    assert_eq!(w.len(), x.len(), "dot_bf16_dp: lengths differ");
    // SAFETY: the features were detected at run time; equal lengths asserted.
    unsafe { x86::dot_dp(w, x) }
}

/// The 4×4 tile of `dot_bf16_dp`s; call only when `has_avx512_bf16()`.
pub fn dot_tile_4x4_bf16(w: [&[bf16]; 4], x: [&[bf16]; 4]) -> [[f32; 4]; 4] {
    assert!(has_avx512_bf16(), "dot_tile_4x4_bf16 needs AVX-512 BF16");
    let k = w[0].len();
    assert!(
        w.iter().chain(&x).all(|r| r.len() == k),
        "dot_tile_4x4_bf16: rows of different lengths"
    );
    // SAFETY: the features were detected at run time; equal lengths asserted.
    unsafe { x86::tile_dp(w, x) }
}

/// `softmax(scale · row)` in place (`scale` > 0) with a 16-lane exp (Cephes' `expf`
/// polynomial, within 2 ulp of the libm result); call only when `simd()` is `Avx512`.
pub fn softmax_avx512(row: &mut [f32], scale: f32) {
    assert!(simd() == Simd::Avx512, "softmax_avx512 needs AVX-512");
    assert!(scale > 0.0, "softmax: scale {scale} is not positive");
    // SAFETY: the feature was detected at run time.
    unsafe { x86::softmax(row, scale) }
}

/// Rounds every value to bf16 precision in place, exactly as `bf16::from_f32(x).to_f32()`
/// (round to nearest even, NaN stays NaN), 16 lanes at a time where AVX-512 is present.
pub fn round_bf16_in_place(v: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512 {
        // SAFETY: the feature was detected at run time.
        done = unsafe { x86::round_bf16(v) };
    }
    v[done..]
        .iter_mut()
        .for_each(|x| *x = bf16::from_f32(*x).to_f32());
}

/// `x` converted to bf16 into `out` (same length), as `bf16::from_f32` does.
pub fn to_bf16(x: &[f32], out: &mut [bf16]) {
    assert_eq!(x.len(), out.len(), "to_bf16: lengths differ");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512 {
        // SAFETY: the feature was detected at run time; equal lengths asserted.
        done = unsafe { x86::to_bf16(x, out) };
    }
    for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = bf16::from_f32(v);
    }
}

/// `x·σ(a·x)` in place (SiLU with `a` = 1, quick GELU with 1.702), every lane with the
/// same 16-lane exp as `softmax_avx512`; call only when `simd()` is `Avx512`.
pub fn sigmoid_gate_avx512(v: &mut [f32], a: f32) {
    assert!(simd() == Simd::Avx512, "sigmoid_gate_avx512 needs AVX-512");
    // SAFETY: the feature was detected at run time.
    unsafe { x86::sigmoid_gate(v, a) }
}

pub fn simd() -> Simd {
    use std::sync::OnceLock;
    static S: OnceLock<Simd> = OnceLock::new();
    *S.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Simd::Avx512;
        }
        Simd::Portable
    })
}

/// `a · b`; the slices must have equal lengths (asserted: the SIMD path reads
/// `a.len()` values of both).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512 {
        // SAFETY: avx512f was detected at run time; slices have equal length.
        return unsafe { x86::dot(a, b) };
    }
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(x, y)| x * y).sum::<f32>()
}

/// `w · x` for bf16 weights; equal lengths asserted.
pub fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512 {
        // SAFETY: avx512f was detected at run time; slices have equal length.
        return unsafe { x86::dot(w, x) };
    }
    w.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum()
}

/// `w · x` for f16 weights; equal lengths asserted.
pub fn dot_f16(w: &[f16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512 {
        // SAFETY: avx512f was detected at run time; slices have equal length.
        return unsafe { x86::dot(w, x) };
    }
    w.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum()
}

/// Weight element types the tiled kernel reads.
pub trait WeightElem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// `w · x` with the SIMD kernel for this type.
    fn dot(w: &[Self], x: &[f32]) -> f32;
}
impl WeightElem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn dot(w: &[f32], x: &[f32]) -> f32 {
        dot_f32(w, x)
    }
}
impl WeightElem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn dot(w: &[bf16], x: &[f32]) -> f32 {
        dot_bf16(w, x)
    }
}
impl WeightElem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn dot(w: &[f16], x: &[f32]) -> f32 {
        dot_f16(w, x)
    }
}

/// `out[j][i] = w[j] · x[i]` for 4 weight rows and 4 activation rows: each loaded
/// weight vector serves 4 rows and each activation vector 4 weights, so a small batch
/// is compute-bound at the FMA rate instead of at one load per FMA.
pub fn dot_tile_4x4<W: WeightElem + TileLanes>(w: [&[W]; 4], x: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let k = w[0].len();
    assert!(
        w.iter().all(|r| r.len() == k) && x.iter().all(|r| r.len() == k),
        "dot_tile_4x4: rows of different lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512 {
        // SAFETY: avx512f was detected at run time; equal lengths asserted.
        return unsafe { x86::tile_4x4(w, x) };
    }
    let mut out = [[0f32; 4]; 4];
    for (j, wr) in w.iter().enumerate() {
        for (i, xr) in x.iter().enumerate() {
            out[j][i] = wr.iter().zip(xr.iter()).map(|(a, b)| a.to_f32() * b).sum();
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
pub use x86::Lanes as TileLanes;
#[cfg(not(target_arch = "x86_64"))]
pub trait TileLanes {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> TileLanes for T {}

/// Sums a buffer: the memory-bandwidth probe of the decode benchmark. Its four quarters
/// are read side by side, four streams on a core, with eight independent sums: on this
/// machine that reads 10-20% faster than one stream (or a dot product with ones), so
/// the roofline it sets is not understated.
pub fn sum_f32(a: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd() == Simd::Avx512 {
        // SAFETY: avx512f was detected at run time.
        return unsafe { x86::sum_streams(a) };
    }
    a.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::{bf16, f16};
    use std::arch::x86_64::*;

    /// An element type whose 16 consecutive values load into one f32 vector.
    pub trait Lanes: Copy {
        /// # Safety
        /// 16 values must be readable at `p`, and the CPU must have avx512f.
        unsafe fn load16(p: *const Self) -> __m512;
        fn widen(self) -> f32;
    }

    impl Lanes for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: the caller guarantees 16 readable values and avx512f.
            unsafe { _mm512_loadu_ps(p) }
        }
        fn widen(self) -> f32 {
            self
        }
    }

    impl Lanes for bf16 {
        /// bf16 is the top half of an f32: zero-extend to 32 bits and shift left.
        #[inline(always)]
        unsafe fn load16(p: *const bf16) -> __m512 {
            // SAFETY: the caller guarantees 16 readable values and avx512f.
            unsafe {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    impl Lanes for f16 {
        #[inline(always)]
        unsafe fn load16(p: *const f16) -> __m512 {
            // SAFETY: the caller guarantees 16 readable values and avx512f.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    /// The bf16 bit patterns (in the high halves) of 16 f32 values: round to nearest
    /// even by adding 0x7fff plus the kept part's lowest bit, NaNs made quiet.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn bf16_bits(v: __m512i) -> __m512i {
        let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(1));
        let r = _mm512_add_epi32(v, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
        let nan = _mm512_cmpgt_epu32_mask(
            _mm512_and_si512(v, _mm512_set1_epi32(0x7fff_ffff)),
            _mm512_set1_epi32(0x7f80_0000),
        );
        let quiet = _mm512_or_si512(v, _mm512_set1_epi32(0x0040_0000));
        let r = _mm512_mask_mov_epi32(r, nan, quiet);
        _mm512_and_si512(r, _mm512_set1_epi32(0xffff_0000u32 as i32))
    }

    /// Rounds whole groups of 16 in place; returns how many values it did.
    ///
    /// # Safety
    /// avx512f must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn round_bf16(v: &mut [f32]) -> usize {
        let n = v.len() / 16 * 16;
        let p = v.as_mut_ptr();
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 ≤ len.
            unsafe {
                let x = _mm512_loadu_si512(p.add(i) as *const _);
                _mm512_storeu_si512(p.add(i) as *mut _, bf16_bits(x));
            }
        }
        n
    }

    /// Converts whole groups of 16; returns how many values it did.
    ///
    /// # Safety
    /// avx512f must be present; `out` at least as long as `x`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn to_bf16(x: &[f32], out: &mut [bf16]) -> usize {
        let n = x.len() / 16 * 16;
        let (px, po) = (x.as_ptr(), out.as_mut_ptr());
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 ≤ both lengths.
            unsafe {
                let b = bf16_bits(_mm512_loadu_si512(px.add(i) as *const _));
                let h = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(b));
                _mm256_storeu_si256(po.add(i) as *mut __m256i, h);
            }
        }
        n
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_bh(p: *const bf16) -> __m512bh {
        // SAFETY: the caller guarantees 32 readable bf16 values at p.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const _)) }
    }

    fn tail(w: &[bf16], x: &[bf16], from: usize) -> f32 {
        w[from..]
            .iter()
            .zip(&x[from..])
            .map(|(a, b)| a.to_f32() * b.to_f32())
            .sum()
    }

    /// # Safety
    /// avx512f and avx512bf16 must be present; equal lengths.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot_dp(w: &[bf16], x: &[bf16]) -> f32 {
        let n = w.len();
        let mut acc = _mm512_setzero_ps();
        let mut k = 0;
        while k + 32 <= n {
            // SAFETY: k + 32 ≤ n for both slices.
            let (a, b) = unsafe { (load_bh(w.as_ptr().add(k)), load_bh(x.as_ptr().add(k))) };
            acc = _mm512_dpbf16_ps(acc, a, b);
            k += 32;
        }
        _mm512_reduce_add_ps(acc) + tail(w, x, k)
    }

    /// # Safety
    /// avx512f and avx512bf16 must be present; all rows of equal length.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn tile_dp(w: [&[bf16]; 4], x: [&[bf16]; 4]) -> [[f32; 4]; 4] {
        let n = w[0].len();
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut k = 0;
        while k + 32 <= n {
            // SAFETY: k + 32 ≤ n for every row.
            let xs = [0, 1, 2, 3].map(|i| unsafe { load_bh(x[i].as_ptr().add(k)) });
            for j in 0..4 {
                let wv = unsafe { load_bh(w[j].as_ptr().add(k)) };
                for i in 0..4 {
                    acc[j][i] = _mm512_dpbf16_ps(acc[j][i], wv, xs[i]);
                }
            }
            k += 32;
        }
        let mut out = [[0f32; 4]; 4];
        for j in 0..4 {
            for i in 0..4 {
                out[j][i] = _mm512_reduce_add_ps(acc[j][i]) + tail(w[j], x[i], k);
            }
        }
        out
    }

    /// The 4×4 tile of dot products (see `dot_tile_4x4`).
    ///
    /// # Safety
    /// The CPU must have avx512f; all eight rows must have the same length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_4x4<W: Lanes + super::WeightElem>(
        w: [&[W]; 4],
        x: [&[f32]; 4],
    ) -> [[f32; 4]; 4] {
        let n = w[0].len();
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut k = 0;
        while k + 16 <= n {
            // SAFETY: k + 16 ≤ n for every row.
            let xs = [0, 1, 2, 3].map(|i| unsafe { _mm512_loadu_ps(x[i].as_ptr().add(k)) });
            for j in 0..4 {
                let wv = unsafe { W::load16(w[j].as_ptr().add(k)) };
                for i in 0..4 {
                    acc[j][i] = _mm512_fmadd_ps(wv, xs[i], acc[j][i]);
                }
            }
            k += 16;
        }
        let mut out = [[0f32; 4]; 4];
        for j in 0..4 {
            for i in 0..4 {
                let mut r = _mm512_reduce_add_ps(acc[j][i]);
                for t in k..n {
                    r += w[j][t].widen() * x[i][t];
                }
                out[j][i] = r;
            }
        }
        out
    }

    /// e^x for 16 lanes: x = n·ln2 + r, e^r by Cephes' `expf` polynomial, times 2^n.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        let x = _mm512_max_ps(
            _mm512_min_ps(x, _mm512_set1_ps(88.376_26)),
            _mm512_set1_ps(-103.0),
        );
        let n =
            _mm512_roundscale_ps::<0>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let p = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(p, n)
    }

    /// # Safety
    /// The CPU must have avx512f.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sigmoid_gate(v: &mut [f32], a: f32) {
        let n = v.len();
        let p = v.as_mut_ptr();
        let na = _mm512_set1_ps(-a);
        let one = _mm512_set1_ps(1.0);
        let mut i = 0;
        while i < n {
            // The tail masked, not scalar: a value's result never depends on where it sits.
            let m = ((1u32 << (n - i).min(16)) - 1) as __mmask16;
            // SAFETY: lanes past n are masked off.
            unsafe {
                let x = _mm512_maskz_loadu_ps(m, p.add(i));
                let e = exp16(_mm512_mul_ps(na, x));
                _mm512_mask_storeu_ps(p.add(i), m, _mm512_div_ps(x, _mm512_add_ps(one, e)));
            }
            i += 16;
        }
    }

    /// # Safety
    /// The CPU must have avx512f.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax(row: &mut [f32], scale: f32) {
        let n = row.len();
        let p = row.as_mut_ptr();
        let full = n / 16 * 16;
        let mask = |i: usize| -> __mmask16 { ((1u32 << (n - i).min(16)) - 1) as __mmask16 };
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < n {
            // SAFETY: lanes past n are masked off.
            let v = unsafe {
                _mm512_mask_loadu_ps(vmax, if i < full { 0xffff } else { mask(i) }, p.add(i))
            };
            vmax = _mm512_max_ps(vmax, v);
            i += 16;
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        let scale = _mm512_set1_ps(scale);
        let mut vsum = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let m = if i < full { 0xffff } else { mask(i) };
            // SAFETY: as above.
            unsafe {
                let x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(i)), max);
                let e = exp16(_mm512_mul_ps(x, scale));
                let e = _mm512_maskz_mov_ps(m, e);
                vsum = _mm512_add_ps(vsum, e);
                _mm512_mask_storeu_ps(p.add(i), m, e);
            }
            i += 16;
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
        let mut i = 0;
        while i < n {
            let m = if i < full { 0xffff } else { mask(i) };
            // SAFETY: as above.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, p.add(i));
                _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(v, inv));
            }
            i += 16;
        }
    }

    /// # Safety
    /// avx512f must be present.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_streams(a: &[f32]) -> f32 {
        let q = a.len() / 4 / 32 * 32;
        let p = a.as_ptr();
        let mut acc = [_mm512_setzero_ps(); 8];
        let mut i = 0;
        while i < q {
            for s in 0..4 {
                for j in 0..2 {
                    // SAFETY: s·q + i + 32 ≤ 4q ≤ len.
                    let v = unsafe { _mm512_loadu_ps(p.add(s * q + i + 16 * j)) };
                    acc[2 * s + j] = _mm512_add_ps(acc[2 * s + j], v);
                }
            }
            i += 32;
        }
        let total = acc
            .iter()
            .fold(_mm512_setzero_ps(), |t, &v| _mm512_add_ps(t, v));
        _mm512_reduce_add_ps(total) + a[4 * q..].iter().sum::<f32>()
    }

    /// `Σ w[i]·x[i]`, one accumulator in the tile kernel's order, so a row computed
    /// alone and the same row inside a batch tile give identical bits. (Decode is
    /// memory-bound: one FMA chain per 16 loaded weights is not the limit.)
    ///
    /// # Safety
    /// The CPU must have avx512f; `w` and `x` must have equal length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot<W: Lanes>(w: &[W], x: &[f32]) -> f32 {
        let n = w.len();
        let (pw, px) = (w.as_ptr(), x.as_ptr());
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 ≤ n for both slices.
            let a = unsafe { W::load16(pw.add(i)) };
            let b = unsafe { _mm512_loadu_ps(px.add(i)) };
            acc = _mm512_fmadd_ps(a, b, acc);
            i += 16;
        }
        let mut r = _mm512_reduce_add_ps(acc);
        while i < n {
            r += w[i].widen() * x[i];
            i += 1;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bandwidth probe sums everything, its four streams and the tail past them.
    #[test]
    fn sum_f32_adds_every_value() {
        for n in [0, 5, 127, 128, 129, 1000, 4099] {
            let a: Vec<f32> = (0..n).map(|i| (i % 13) as f32 - 6.0).collect();
            let want: f64 = a.iter().map(|&x| x as f64).sum();
            assert_eq!(sum_f32(&a) as f64, want, "n = {n}");
        }
    }

    #[test]
    fn bf16_dot_product_kernels_agree() {
        let dp = bf16_kernels_testable("bf16_dot_product_kernels_agree");
        for n in [7, 32, 64, 100, 2048] {
            let row = |s: usize| -> Vec<bf16> {
                (0..n)
                    .map(|i| bf16::from_f32((((i * 7 + s * 13) % 17) as f32 - 8.0) / 5.0))
                    .collect()
            };
            let ws: Vec<Vec<bf16>> = (0..4).map(row).collect();
            let xs: Vec<Vec<bf16>> = (0..4).map(|i| row(10 + i)).collect();
            // The widening kernel (every CPU) on the same inputs.
            for w in &ws {
                for xr in &xs {
                    let x: Vec<f32> = xr.iter().map(|v| v.to_f32()).collect();
                    let exact: f64 = w
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| a.to_f32() as f64 * *b as f64)
                        .sum();
                    let d = dot_bf16(w, &x);
                    assert!((d as f64 - exact).abs() < 1e-3 * exact.abs().max(1.0));
                }
            }
            if !dp {
                continue;
            }
            let t = dot_tile_4x4_bf16(
                [&ws[0][..], &ws[1], &ws[2], &ws[3]],
                [&xs[0][..], &xs[1], &xs[2], &xs[3]],
            );
            for j in 0..4 {
                for i in 0..4 {
                    let exact: f64 = ws[j]
                        .iter()
                        .zip(&xs[i])
                        .map(|(a, b)| a.to_f32() as f64 * b.to_f32() as f64)
                        .sum();
                    let d = dot_bf16_dp(&ws[j], &xs[i]);
                    assert_eq!(t[j][i].to_bits(), d.to_bits(), "tile and dot differ, n={n}");
                    assert!(
                        (d as f64 - exact).abs() < 1e-3 * exact.abs().max(1.0),
                        "n={n}: {d} vs {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn tile_matches_dots() {
        for n in [5, 16, 40, 129] {
            let row = |s: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * 7 + s * 13) % 17) as f32 - 8.0) / 5.0)
                    .collect()
            };
            let ws: Vec<Vec<bf16>> = (0..4)
                .map(|j| row(j).into_iter().map(bf16::from_f32).collect())
                .collect();
            let xs: Vec<Vec<f32>> = (0..4).map(|i| row(10 + i)).collect();
            let t = dot_tile_4x4(
                [&ws[0][..], &ws[1], &ws[2], &ws[3]],
                [&xs[0][..], &xs[1], &xs[2], &xs[3]],
            );
            for j in 0..4 {
                for i in 0..4 {
                    assert!(
                        (t[j][i] - dot_bf16(&ws[j], &xs[i])).abs() < 1e-4,
                        "n={n} ({j},{i})"
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_half_bit_for_bit() {
        let mut v: Vec<f32> = (0..4000u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .collect();
        v.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MAX,
            f32::MIN_POSITIVE / 3.0,
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::from_bits(0x7fbf_ffff),
        ]);
        let want: Vec<u16> = v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let mut out = vec![bf16::ZERO; v.len()];
        to_bf16(&v, &mut out);
        assert_eq!(out.iter().map(|b| b.to_bits()).collect::<Vec<_>>(), want);
        let scalar: Vec<u32> = v
            .iter()
            .map(|&x| crate::round_scalar(x, crate::DType::BF16).to_bits())
            .collect();
        let mut r = v.clone();
        round_bf16_in_place(&mut r);
        assert_eq!(
            scalar,
            want.iter().map(|&b| (b as u32) << 16).collect::<Vec<_>>()
        );
        let got: Vec<u32> = r.iter().map(|x| x.to_bits()).collect();
        let want: Vec<u32> = want.iter().map(|&b| (b as u32) << 16).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn simd_dots_match_scalar() {
        for n in [1, 15, 16, 17, 64, 100, 333] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) / 7.0).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot_f32(&a, &b) as f64 - want).abs() < 1e-4, "f32 n={n}");
            let wb: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
            let want_b: f64 = wb
                .iter()
                .zip(&b)
                .map(|(x, y)| x.to_f32() as f64 * *y as f64)
                .sum();
            assert!(
                (dot_bf16(&wb, &b) as f64 - want_b).abs() < 1e-4,
                "bf16 n={n}"
            );
            let wh: Vec<f16> = a.iter().map(|&x| f16::from_f32(x)).collect();
            let want_h: f64 = wh
                .iter()
                .zip(&b)
                .map(|(x, y)| x.to_f32() as f64 * *y as f64)
                .sum();
            assert!((dot_f16(&wh, &b) as f64 - want_h).abs() < 1e-4, "f16 n={n}");
        }
    }
}
