//! HF checkpoints quantized to int4 by AWQ or GPTQ (`quantization_config` in
//! `config.json`): each quantized linear layer `P` stores `P.qweight` (int32 words of
//! eight 4-bit values), `P.qzeros` (the same for each group's zero point) and
//! `P.scales` (f16, a scale a group of `group_size` inputs and an output), and its
//! weight is `scale · (q − zero)`. At open each becomes a Q4F weight `P.weight`
//! (`[out, in]`): every 32-input block lies in one group, so its Q4F scale is the
//! group's scale and its offset `−scale · zero` — exact in f32 (an f16 times a 4-bit
//! integer).
//!
//! The two packings (AutoAWQ's GEMM and AutoGPTQ's, as their `dequantize` code reads
//! them):
//! - AWQ: `qweight[in, out/8]`, word `j` of input row `i` holding outputs `8j..8j + 8`
//!   with output `8j + c` in nibble `[0, 4, 1, 5, 2, 6, 3, 7][c]`; `qzeros[in/g,
//!   out/8]` packed the same way; `scales[in/g, out]`.
//! - GPTQ: `qweight[in/8, out]`, nibble `t` of word `(j, o)` holding input `8j + t`;
//!   `qzeros[in/g, out/8]`, nibble `t` of word `(g, j)` holding output `8j + t`, stored
//!   one less than the zero point by the original (`checkpoint_format` "gptq", v1)
//!   packer, as is (v2); `scales[in/g, out]`; `g_idx[in]`, which must be `i / g`
//!   (`desc_act` / act-order checkpoints permute inputs and are refused).

use iris_tensor::quant::{q4f_block, BLOCK};

use crate::{Error, Result};

/// Which packer wrote the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Awq,
    /// `zero_offset`: what to add to a stored zero (1 for v1 checkpoints).
    Gptq {
        zero_offset: u8,
    },
}

/// An int4 checkpoint's `quantization_config`, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int4 {
    pub method: Method,
    /// Inputs a group shares a scale and zero over; `None`: one group a row.
    pub group_size: Option<usize>,
}

impl Int4 {
    /// The checkpoint's format from its `config.json` (`None` when it has no
    /// `quantization_config`); a method, bit width or option Iris does not read is an
    /// error naming it.
    pub fn from_config(config: &serde_json::Value) -> Result<Option<Int4>> {
        let Some(q) = config.get("quantization_config") else {
            return Ok(None);
        };
        let bad = |m: String| Error::Config(format!("quantization_config: {m}"));
        let method = q
            .get("quant_method")
            .and_then(|m| m.as_str())
            .ok_or_else(|| bad("no `quant_method`".into()))?;
        let bits = q
            .get("bits")
            .or_else(|| q.get("w_bit"))
            .and_then(|b| b.as_u64());
        if bits != Some(4) {
            return Err(bad(format!(
                "{method} with {bits:?} bits: only 4-bit AWQ and GPTQ are read"
            )));
        }
        let group = q
            .get("group_size")
            .or_else(|| q.get("q_group_size"))
            .and_then(|g| g.as_i64())
            .ok_or_else(|| bad("no `group_size`".into()))?;
        let group_size = match group {
            -1 => None,
            g if g > 0 && (g as usize).is_multiple_of(BLOCK) => Some(g as usize),
            g => {
                return Err(bad(format!(
                    "group size {g}: groups of whole {BLOCK}-input blocks (or -1) are read"
                )))
            }
        };
        let method = match method {
            "awq" => {
                let version = q.get("version").and_then(|v| v.as_str()).unwrap_or("gemm");
                if !version.eq_ignore_ascii_case("gemm") {
                    return Err(bad(format!(
                        "AWQ version {version:?}: the GEMM packing is read"
                    )));
                }
                if q.get("zero_point").and_then(|z| z.as_bool()) == Some(false) {
                    return Err(bad("AWQ without zero points is not read".into()));
                }
                Method::Awq
            }
            "gptq" => {
                if q.get("desc_act").and_then(|d| d.as_bool()) == Some(true) {
                    return Err(bad(
                        "GPTQ with desc_act (act-order) permutes the inputs: not read".into(),
                    ));
                }
                let format = q
                    .get("checkpoint_format")
                    .and_then(|f| f.as_str())
                    .unwrap_or("gptq");
                let zero_offset = match format {
                    "gptq" => 1,
                    "gptq_v2" => 0,
                    other => {
                        return Err(bad(format!("GPTQ checkpoint format {other:?} is not read")))
                    }
                };
                Method::Gptq { zero_offset }
            }
            other => {
                return Err(bad(format!(
                    "quant_method {other:?}: AWQ and GPTQ (4-bit) are read"
                )))
            }
        };
        Ok(Some(Int4 { method, group_size }))
    }
}

/// A stored tensor handed to [`to_q4f`]: its shape and its values (int32 words, or
/// scales as f32).
pub struct Part<'a, T> {
    pub name: &'a str,
    pub shape: &'a [usize],
    pub values: &'a [T],
}

fn nibble(word: i32, t: usize) -> u8 {
    ((word as u32 >> (4 * t)) & 0xF) as u8
}

/// AWQ's nibble for output `c` of a word of eight.
const AWQ_NIBBLE: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// One layer's packed tensors as a Q4F `[out, in]` matrix's bytes, and its shape.
pub fn to_q4f(
    int4: Int4,
    qweight: Part<i32>,
    qzeros: Part<i32>,
    scales: Part<f32>,
    g_idx: Option<Part<i32>>,
) -> Result<(Vec<u8>, [usize; 2])> {
    let bad = |m: String| Error::Config(m);
    let [a, b] = match qweight.shape {
        &[a, b] => [a, b],
        s => {
            return Err(bad(format!(
                "{}: shape {s:?}, not two dimensions",
                qweight.name
            )))
        }
    };
    let (k, n) = match int4.method {
        Method::Awq => (a, b * 8),
        Method::Gptq { .. } => (a * 8, b),
    };
    let g = int4.group_size.unwrap_or(k);
    if k == 0 || !k.is_multiple_of(g) {
        return Err(bad(format!(
            "{}: group size {g} does not divide the input dimension {k}",
            qweight.name
        )));
    }
    if !k.is_multiple_of(BLOCK) {
        return Err(bad(format!(
            "{}: {k} inputs is not a whole number of {BLOCK}-input blocks",
            qweight.name
        )));
    }
    let groups = k / g;
    let want = |name: &str, got: &[usize], shape: [usize; 2]| -> Result<()> {
        if got != shape {
            return Err(bad(format!(
                "{name}: shape {got:?}, want {shape:?} ({k} inputs, {n} outputs, groups of {g})"
            )));
        }
        Ok(())
    };
    want(qzeros.name, qzeros.shape, [groups, n / 8])?;
    want(scales.name, scales.shape, [groups, n])?;
    if !n.is_multiple_of(8) {
        return Err(bad(format!(
            "{}: {n} outputs, not words of 8",
            qweight.name
        )));
    }
    if let Some(gi) = &g_idx {
        if gi.shape != [k] {
            return Err(bad(format!(
                "{}: shape {:?}, want [{k}]",
                gi.name, gi.shape
            )));
        }
        if let Some(i) = (0..k).find(|&i| gi.values[i] != (i / g) as i32) {
            return Err(bad(format!(
                "{}: input {i} in group {}, not {}: act-order (desc_act) checkpoints are not read",
                gi.name,
                gi.values[i],
                i / g
            )));
        }
    }
    let (q, z, s) = (qweight.values, qzeros.values, scales.values);
    let mut out = Vec::with_capacity(n * k / BLOCK * 24);
    for o in 0..n {
        for blk in 0..k / BLOCK {
            let i0 = blk * BLOCK;
            let gi = i0 / g;
            let scale = s[gi * n + o];
            let (zero, v): (u8, [u8; BLOCK]) = match int4.method {
                Method::Awq => {
                    let t = AWQ_NIBBLE[o % 8];
                    let w = n / 8;
                    (
                        nibble(z[gi * w + o / 8], t),
                        std::array::from_fn(|j| nibble(q[(i0 + j) * w + o / 8], t)),
                    )
                }
                Method::Gptq { zero_offset } => (
                    nibble(z[gi * (n / 8) + o / 8], o % 8) + zero_offset,
                    std::array::from_fn(|j| nibble(q[(i0 + j) / 8 * n + o], (i0 + j) % 8)),
                ),
            };
            out.extend(q4f_block(scale, -(scale * f32::from(zero)), &v));
        }
    }
    Ok((out, [n, k]))
}
