//! GGUF headers (llama.cpp's checkpoint format, versions 2 and 3): the metadata and the
//! tensor table, checked against the file before anything is read from it — every
//! count, string and array bounded by the bytes that remain, tensor types and sizes
//! known, data ranges aligned, inside the file and not overlapping. The quantized
//! weights themselves are read by their users.

use std::path::Path;

use crate::error::{io_err, Error, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A ggml tensor type: its id, name, elements per block and bytes per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block: u64,
    pub block_bytes: u64,
}

const TYPES: &[GgmlType] = &[
    t(0, "F32", 1, 4),
    t(1, "F16", 1, 2),
    t(2, "Q4_0", 32, 18),
    t(3, "Q4_1", 32, 20),
    t(6, "Q5_0", 32, 22),
    t(7, "Q5_1", 32, 24),
    t(8, "Q8_0", 32, 34),
    t(9, "Q8_1", 32, 36),
    t(10, "Q2_K", 256, 84),
    t(11, "Q3_K", 256, 110),
    t(12, "Q4_K", 256, 144),
    t(13, "Q5_K", 256, 176),
    t(14, "Q6_K", 256, 210),
    t(15, "Q8_K", 256, 292),
    t(24, "I8", 1, 1),
    t(25, "I16", 1, 2),
    t(26, "I32", 1, 4),
    t(27, "I64", 1, 8),
    t(28, "F64", 1, 8),
    t(30, "BF16", 1, 2),
    t(30, "BF16", 1, 2),
];

const fn t(id: u32, name: &'static str, block: u64, block_bytes: u64) -> GgmlType {
    GgmlType {
        id,
        name,
        block,
        block_bytes,
    }
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES.iter().copied().find(|t| t.id == id)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's order: the fastest-varying dimension first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// From the start of the data section.
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts in the file.
    pub data_start: u64,
    pub alignment: u64,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Tensors in a file at most (llama.cpp's own bound is far lower in practice).
const MAX_TENSORS: u64 = 1 << 20;
/// Arrays of arrays are allowed this deep.
const MAX_DEPTH: usize = 2;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Gguf(msg.into())
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(bad(format!(
                "{what} needs {n} bytes at offset {}, {left} left",
                self.at
            )));
        }
        let s = &self.bytes[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(bad(format!("{what}: bool byte {b}"))),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(bad(format!("{what}: arrays nested too deep")));
                }
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes a byte at least: a count past the bytes left is
                // refused before anything is allocated for it.
                if n > (self.bytes.len() - self.at) as u64 {
                    return Err(bad(format!("{what}: {n} elements in a shorter file")));
                }
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1, what)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(bad(format!("{what}: unknown value type {other}"))),
        })
    }
}

/// Parses and checks the header of a GGUF file whose bytes (all of them, or a mapping
/// of the whole file) are `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Header> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4, "the magic")? != b"GGUF" {
        return Err(bad("not a GGUF file (no `GGUF` magic)"));
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(bad(format!("GGUF version {version} (2 and 3 are read)")));
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    if n_tensors > MAX_TENSORS {
        return Err(bad(format!("{n_tensors} tensors")));
    }
    let mut metadata = Vec::new();
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key {i}"))?;
        let ty = r.u32(&format!("the type of `{key}`"))?;
        let v = r.value(ty, 0, &format!("`{key}`"))?;
        if metadata.iter().any(|(k, _)| *k == key) {
            return Err(bad(format!("metadata key `{key}` twice")));
        }
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => 32,
        Some((_, v)) => match v {
            Value::U32(a) if a.is_power_of_two() => u64::from(*a),
            other => return Err(bad(format!("general.alignment {other:?}"))),
        },
    };
    let mut tensors: Vec<TensorInfo> = Vec::new();
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor name {i}"))?;
        let n_dims = r.u32(&format!("the rank of `{name}`"))?;
        if !(1..=4).contains(&n_dims) {
            return Err(bad(format!("`{name}` has {n_dims} dimensions (1 to 4)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&format!("the shape of `{name}`"))?);
        }
        let type_id = r.u32(&format!("the type of `{name}`"))?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| bad(format!("`{name}` has unknown ggml type {type_id}")))?;
        let offset = r.u64(&format!("the offset of `{name}`"))?;
        let elems = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&e| e > 0)
            .ok_or_else(|| bad(format!("`{name}` has shape {dims:?}")))?;
        if dims[0] % ggml_type.block != 0 {
            return Err(bad(format!(
                "`{name}`: a row of {} is not whole {} blocks of {}",
                dims[0], ggml_type.name, ggml_type.block
            )));
        }
        let bytes = (elems / ggml_type.block)
            .checked_mul(ggml_type.block_bytes)
            .ok_or_else(|| bad(format!("`{name}` is too large")))?;
        if offset % alignment != 0 {
            return Err(bad(format!(
                "`{name}` at offset {offset}, not {alignment}-aligned"
            )));
        }
        if tensors.iter().any(|t| t.name == name) {
            return Err(bad(format!("tensor `{name}` twice")));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            bytes,
        });
    }
    let data_start = (r.at as u64).div_ceil(alignment) * alignment;
    let file = bytes.len() as u64;
    let mut ranges: Vec<(u64, u64, &str)> = Vec::with_capacity(tensors.len());
    for t in &tensors {
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.bytes))
            .filter(|&e| e <= file)
            .ok_or_else(|| {
                bad(format!(
                    "`{}` ({} bytes at {}) runs past the end of the file ({file} bytes)",
                    t.name, t.bytes, t.offset
                ))
            })?;
        ranges.push((data_start + t.offset, end, &t.name));
    }
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!("`{}` and `{}` overlap", w[0].2, w[1].2)));
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        data_start,
        alignment,
    })
}

/// The header of the GGUF file at `path` (mapped, not read).
pub fn read(path: &Path) -> Result<Header> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only mapping of a checkpoint, as in `Weights::open_files`.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    parse(&map).map_err(|e| match e {
        Error::Gguf(msg) => Error::Gguf(format!("{}: {msg}", path.display())),
        other => other,
    })
}

/// A LLaMA-architecture GGUF as a HF checkpoint: its `config.json` (from the `llama.*`
/// metadata), and for each tensor its HF name with how to read its rows (llama.cpp
/// stores q and k with each head's rotary halves interleaved: HF order is restored by
/// moving whole rows).
pub struct LlamaGguf {
    pub config: serde_json::Value,
    /// (HF name, tensor, for q / k: the heads whose rows to un-interleave)
    pub tensors: Vec<(String, TensorInfo, Option<usize>)>,
}

impl Header {
    fn count(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("no integer `{key}` in the metadata")))
    }

    fn float(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Value::F32(v) => Some(f64::from(*v)),
            Value::F64(v) => Some(*v),
            _ => None,
        }
    }

    /// The file read as a LLaMA checkpoint; errors for another architecture or a
    /// tensor a LLaMA does not have.
    pub fn llama(&self) -> Result<LlamaGguf> {
        let arch = self
            .get("general.architecture")
            .and_then(Value::as_str)
            .unwrap_or("<none>");
        if arch != "llama" {
            return Err(bad(format!(
                "architecture `{arch}`: only LLaMA-architecture GGUF files are read"
            )));
        }
        let heads = self.count("llama.attention.head_count")?;
        let kv_heads = self.count("llama.attention.head_count_kv").unwrap_or(heads);
        let hidden = self.count("llama.embedding_length")?;
        let vocab = match self.get("tokenizer.ggml.tokens") {
            Some(Value::Array(t)) => t.len() as u64,
            _ => self.count("llama.vocab_size")?,
        };
        let mut tensors = Vec::new();
        for t in &self.tensors {
            let (name, permute) = hf_name(&t.name, heads as usize, kv_heads as usize)
                .ok_or_else(|| bad(format!("tensor `{}` is not part of a LLaMA model", t.name)))?;
            tensors.push((name, t.clone(), permute));
        }
        let tied = !self.tensors.iter().any(|t| t.name == "output.weight");
        let token = |k: &str| self.get(k).and_then(Value::as_u64);
        let mut config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.count("llama.feed_forward_length")?,
            "num_hidden_layers": self.count("llama.block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "max_position_embeddings": self.count("llama.context_length")?,
            "rms_norm_eps": self.float("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            "rope_theta": self.float("llama.rope.freq_base").unwrap_or(10000.0),
            "hidden_act": "silu",
            "tie_word_embeddings": tied,
        });
        if let Ok(dim) = self.count("llama.rope.dimension_count") {
            if dim * heads != hidden {
                config["head_dim"] = dim.into();
            }
        }
        if let Some(b) = token("tokenizer.ggml.bos_token_id") {
            config["bos_token_id"] = b.into();
        }
        if let Some(e) = token("tokenizer.ggml.eos_token_id") {
            config["eos_token_id"] = e.into();
        }
        Ok(LlamaGguf { config, tensors })
    }
}

/// llama.cpp's tensor names for a LLaMA → HF's, and for q / k their head count.
fn hf_name(name: &str, heads: usize, kv_heads: usize) -> Option<(String, Option<usize>)> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some((t.to_string(), None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, what) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, permute) = match what {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(kv_heads)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), permute))
}

/// For a `[heads·hd, k]` q or k weight stored llama.cpp's way: the stored row of each
/// HF row (HF keeps a head's two rotary halves apart, llama.cpp interleaves them).
pub fn unpermute_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(bad(format!(
            "{rows} rows do not split into {heads} heads of even size"
        )));
    }
    let hd = rows / heads;
    Ok((0..rows)
        .map(|r| {
            let (h, rem) = (r / hd, r % hd);
            let (t, j) = (rem / (hd / 2), rem % (hd / 2));
            h * hd + 2 * j + t
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A GGUF v3 file: metadata, then tensors of `(name, dims, type id, bytes)` laid out
    /// one after another at 32-byte alignment.
    pub(crate) fn file(meta: &[(&str, Value)], tensors: &[(&str, &[u64], u32, usize)]) -> Vec<u8> {
        let s = |b: &mut Vec<u8>, x: &str| {
            b.extend((x.len() as u64).to_le_bytes());
            b.extend(x.as_bytes());
        };
        fn val(b: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U32(x) => b.extend(x.to_le_bytes()),
                Value::Str(x) => {
                    b.extend((x.len() as u64).to_le_bytes());
                    b.extend(x.as_bytes());
                }
                Value::F32(x) => b.extend(x.to_le_bytes()),
                Value::Array(items) => {
                    b.extend(ty(&items[0]).to_le_bytes());
                    b.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|i| val(b, i));
                }
                other => panic!("test writer: {other:?}"),
            }
        }
        fn ty(v: &Value) -> u32 {
            match v {
                Value::U32(_) => 4,
                Value::F32(_) => 6,
                Value::Str(_) => 8,
                Value::Array(_) => 9,
                other => panic!("test writer: {other:?}"),
            }
        }
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            s(&mut b, k);
            b.extend(ty(v).to_le_bytes());
            val(&mut b, v);
        }
        let mut offset = 0u64;
        for (name, dims, t, bytes) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(t.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (*bytes as u64).div_ceil(32) * 32;
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        for (_, _, _, bytes) in tensors {
            let at = b.len();
            b.resize(at + bytes.div_ceil(32) * 32, 7);
        }
        b
    }

    #[test]
    fn a_header_reads_back_with_its_sizes() {
        let bytes = file(
            &[
                ("general.architecture", Value::Str("llama".into())),
                ("llama.block_count", Value::U32(2)),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(vec![Value::Str("<s>".into()), Value::Str("a".into())]),
                ),
            ],
            &[("tok", &[64, 3], 3, 2 * 3 * 20), ("norm", &[64], 0, 256)],
        );
        let h = parse(&bytes).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(
            h.get("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        assert_eq!(h.get("llama.block_count").unwrap().as_u64(), Some(2));
        assert_eq!(h.tensors[0].ggml_type.name, "Q4_1");
        assert_eq!(h.tensors[0].bytes, 120);
        assert_eq!(h.tensors[1].bytes, 256);
        assert_eq!(h.data_start % 32, 0);
    }

    #[test]
    fn hostile_headers_are_errors() {
        let good = file(&[], &[("w", &[32, 2], 8, 68)]);
        let data_end = parse(&good).unwrap().data_start as usize + 68;
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        // Truncated anywhere, the last byte of the data included.
        for n in [0, 3, 8, 20, data_end - 1] {
            cases.push((good[..n].to_vec(), "truncated"));
        }
        let mut v = good.clone();
        v[4] = 9;
        cases.push((v, "version"));
        // A tensor count with no tensors behind it, and an element count past the file.
        let mut v = good.clone();
        v[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push((v, "tensor count"));
        let huge = file(&[], &[("w", &[32, 1 << 40], 8, 68)]);
        cases.push((huge, "past the end"));
        let ragged = file(&[], &[("w", &[33, 2], 8, 68)]);
        cases.push((ragged, "blocks"));
        let unknown = file(&[], &[("w", &[32], 99, 32)]);
        cases.push((unknown, "unknown ggml type"));
        let twice = file(&[], &[("w", &[8], 0, 32), ("w", &[8], 0, 32)]);
        cases.push((twice, "twice"));
        for (bytes, what) in cases {
            let e = parse(&bytes).expect_err(what);
            assert!(matches!(e, Error::Gguf(_)), "{what}: {e}");
        }
        // An array whose count is far past the file is refused before allocating.
        let mut v = b"GGUF".to_vec();
        v.extend(3u32.to_le_bytes());
        v.extend(0u64.to_le_bytes());
        v.extend(1u64.to_le_bytes());
        v.extend(1u64.to_le_bytes());
        v.extend(b"k");
        v.extend(9u32.to_le_bytes());
        v.extend(0u32.to_le_bytes());
        v.extend(u64::MAX.to_le_bytes());
        assert!(parse(&v).unwrap_err().to_string().contains("elements"));
    }
}
