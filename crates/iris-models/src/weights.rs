//! Safetensors checkpoints: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped, headers validated once at open,
//! tensors converted to the requested dtype as they are read. A LLaMA GGUF file is read
//! the same way under HF's tensor names: its block-quantized tensors become quantized
//! weights of the linear layers (`Vb::weight`), dequantized where a layer needs values.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use iris_tensor::quant::{QuantMatrix, QuantType};
use iris_tensor::{DType, Device, Tensor, Weight};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use crate::error::io_err;
use crate::{Error, Result};

/// Tensors read from any checkpoint by this process (a check that a role which should
/// hold no weights, the gateway, never reads one).
static TENSORS_READ: AtomicU64 = AtomicU64::new(0);

/// How many checkpoint tensors this process has read so far.
pub fn tensors_read_in_process() -> u64 {
    TENSORS_READ.load(Ordering::Relaxed)
}

#[derive(Debug)]
struct Entry {
    file: usize,
    dtype: DType,
    /// Block-quantized (a GGUF tensor): `dtype` is what its values dequantize to.
    quant: Option<QuantType>,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    range: std::ops::Range<usize>,
    /// The bytes held in memory instead (a GGUF q / k weight with its rows reordered).
    owned: Option<Arc<Vec<u8>>>,
}

/// A tensor's bytes inside a shared memory map.
struct MapSlice(Arc<Mmap>, std::ops::Range<usize>);

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        &self.0[self.1.clone()]
    }
}

/// Each AWQ / GPTQ layer `P` (`P.qweight`, `P.qzeros`, `P.scales`, GPTQ's `P.g_idx`)
/// as a Q4F entry `P.weight`; its scales entry goes.
fn int4_layers(
    int4: crate::int4::Int4,
    maps: &[Arc<Mmap>],
    ints: &HashMap<String, (usize, Vec<usize>, std::ops::Range<usize>)>,
    entries: &mut HashMap<String, Entry>,
) -> Result<()> {
    use crate::int4::Part;
    let words = |name: &str| -> Option<(&[usize], Vec<i32>)> {
        let (file, shape, range) = ints.get(name)?;
        let values = maps[*file][range.clone()]
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("four bytes")))
            .collect();
        Some((shape.as_slice(), values))
    };
    let missing = |name: String| Error::MissingTensor(name);
    let mut layers: Vec<&str> = ints
        .keys()
        .filter_map(|n| n.strip_suffix(".qweight"))
        .collect();
    layers.sort_unstable();
    for p in layers {
        let (qn, zn, sn, gn) = (
            format!("{p}.qweight"),
            format!("{p}.qzeros"),
            format!("{p}.scales"),
            format!("{p}.g_idx"),
        );
        let (q_shape, q) = words(&qn).expect("listed");
        let (z_shape, z) = words(&zn).ok_or_else(|| missing(zn.clone()))?;
        let se = entries.remove(&sn).ok_or_else(|| missing(sn.clone()))?;
        let scales = Tensor::from_le_bytes(&maps[se.file][se.range.clone()], se.dtype, &se.shape)?
            .to_f32_vec();
        let g = words(&gn);
        let (data, [n, k]) = crate::int4::to_q4f(
            int4,
            Part {
                name: &qn,
                shape: q_shape,
                values: &q,
            },
            Part {
                name: &zn,
                shape: z_shape,
                values: &z,
            },
            Part {
                name: &sn,
                shape: &se.shape,
                values: &scales,
            },
            g.as_ref().map(|(shape, values)| Part {
                name: &gn,
                shape,
                values,
            }),
        )?;
        let (file, _, range) = ints[&qn].clone();
        entries.insert(
            format!("{p}.weight"),
            Entry {
                file,
                dtype: DType::F32,
                quant: Some(QuantType::Q4F),
                shape: vec![n, k],
                range,
                owned: Some(Arc::new(data)),
            },
        );
    }
    Ok(())
}

/// All tensors of a checkpoint, by name.
#[derive(Debug)]
pub struct Weights {
    maps: Vec<Arc<Mmap>>,
    entries: HashMap<String, Entry>,
    /// Tensors held in memory (benchmarks with random weights, tests).
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    /// Where tensors go when read (the host by default).
    device: Device,
    /// Names of the tensors read so far, in order (what a part loaded).
    read: Mutex<Vec<String>>,
    /// Checkpoint bytes read so far (a shard counts its slice only).
    bytes_read: AtomicU64,
    /// Linear layers' dense weights quantized to this format as they load.
    quantize: Option<QuantType>,
}

impl Weights {
    /// Opens the checkpoint in `dir`; tensors will be returned as `dtype`.
    pub fn open(dir: &Path, dtype: DType) -> Result<Weights> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    path: index.clone(),
                    source,
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::Config(format!("{}: no `weight_map` object", index.display()))
                })?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::Config(format!(
                    "{}: neither model.safetensors nor model.safetensors.index.json",
                    dir.display()
                )));
            }
            vec![single]
        };
        let config = dir.join("config.json");
        let int4 = match std::fs::read_to_string(&config) {
            Ok(text) => {
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|source| Error::Json {
                        path: config.clone(),
                        source,
                    })?;
                crate::int4::Int4::from_config(&v).map_err(|e| match e {
                    Error::Config(m) => Error::Config(format!("{}: {m}", config.display())),
                    other => other,
                })?
            }
            Err(_) => None,
        };
        Self::open_checkpoint(&files, dtype, int4)
    }

    pub fn open_files(files: &[PathBuf], dtype: DType) -> Result<Weights> {
        Self::open_checkpoint(files, dtype, None)
    }

    /// The safetensors `files`; with `int4`, an AWQ / GPTQ checkpoint's int32 tensors
    /// are read and each quantized layer becomes a Q4F weight ([`crate::int4`]).
    fn open_checkpoint(
        files: &[PathBuf],
        dtype: DType,
        int4: Option<crate::int4::Int4>,
    ) -> Result<Weights> {
        let mut maps = Vec::new();
        let mut entries = HashMap::new();
        // Int32 tensors of an int4 checkpoint: file, shape, byte range.
        let mut ints: HashMap<String, (usize, Vec<usize>, std::ops::Range<usize>)> = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(io_err(path))?;
            // SAFETY: the checkpoint is opened read-only; a file changed under a running
            // server is outside what Iris guards against (as in every mmap loader).
            let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
            let bad = |msg: String| Error::Safetensors {
                path: path.clone(),
                msg,
            };
            // Full validation: header JSON, offsets within the buffer, sizes vs shapes.
            let st = SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
            let (header_len, _) =
                SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
            let data_start = 8 + header_len;
            for (name, view) in st.tensors() {
                let dt = match view.dtype() {
                    StDtype::F32 => DType::F32,
                    StDtype::BF16 => DType::BF16,
                    StDtype::F16 => DType::F16,
                    StDtype::I32 if int4.is_some() => {
                        let offset = view.data().as_ptr() as usize - map.as_ptr() as usize;
                        ints.insert(
                            name,
                            (i, view.shape().to_vec(), offset..offset + view.data().len()),
                        );
                        continue;
                    }
                    other => {
                        return Err(Error::TensorDType {
                            name,
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                let data = view.data();
                let offset = data.as_ptr() as usize - map.as_ptr() as usize;
                debug_assert!(offset >= data_start);
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype: dt,
                        quant: None,
                        shape: view.shape().to_vec(),
                        range: offset..offset + data.len(),
                        owned: None,
                    },
                );
            }
            maps.push(Arc::new(map));
        }
        if let Some(int4) = int4 {
            int4_layers(int4, &maps, &ints, &mut entries)?;
        }
        Ok(Weights {
            maps,
            entries,
            tensors: HashMap::new(),
            dtype,
            device: Device::Cpu,
            read: Mutex::new(Vec::new()),
            bytes_read: AtomicU64::new(0),
            quantize: None,
        })
    }

    /// A LLaMA GGUF file under HF's names, and its config (`gguf::Header::llama`).
    /// F32 / F16 / BF16 tensors read as a safetensors file's; Q8_0 / Q4_0 / Q4_1 stay
    /// in their blocks, Q4_K super-blocks become Q4F blocks and Q6_K ones Q16 blocks
    /// (exactly; llama.cpp's Q4_K_M files hold their head and some layers in Q6_K);
    /// another type is an error naming the tensor.
    pub fn open_gguf(path: &Path, dtype: DType) -> Result<(Weights, serde_json::Value)> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: as in `open_files`.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let in_file = |e: Error| match e {
            Error::Gguf(msg) => Error::Gguf(format!("{}: {msg}", path.display())),
            other => other,
        };
        let header = crate::gguf::parse(&map).map_err(in_file)?;
        let llama = header.llama().map_err(in_file)?;
        let mut entries = HashMap::new();
        for (name, t, permute) in llama.tensors {
            let (dt, quant) = match t.ggml_type.name {
                "F32" => (DType::F32, None),
                "F16" => (DType::F16, None),
                "BF16" => (DType::BF16, None),
                "Q8_0" => (DType::F32, Some(QuantType::Q8_0)),
                "Q4_0" => (DType::F32, Some(QuantType::Q4_0)),
                "Q4_1" => (DType::F32, Some(QuantType::Q4_1)),
                "Q4_K" => (DType::F32, Some(QuantType::Q4F)),
                "Q6_K" => (DType::F32, Some(QuantType::Q16)),
                other => {
                    return Err(Error::TensorDType {
                        name: format!(
                            "{} ({}; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K are read)",
                            t.name,
                            path.display()
                        ),
                        dtype: other.to_string(),
                    })
                }
            };
            // ggml lists the fastest-varying dimension first.
            let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
            let start = (header.data_start + t.offset) as usize;
            let range = start..start + t.bytes as usize;
            let rows = shape[..shape.len().saturating_sub(1)]
                .iter()
                .product::<usize>();
            let row = range.len() / rows.max(1);
            let order = match permute {
                Some(heads) if shape.len() == 2 => {
                    Some(crate::gguf::unpermute_order(shape[0], heads).map_err(&in_file)?)
                }
                _ => None,
            };
            // Q4_K rows become Q4F rows, Q6_K rows Q16 rows (the scales multiplied out),
            // llama.cpp's q / k row order is undone: either way the tensor is held, not
            // mapped.
            let convert = matches!(t.ggml_type.name, "Q4_K" | "Q6_K");
            let owned = (order.is_some() || convert).then(|| {
                let all = &map[range.clone()];
                let order = order.unwrap_or_else(|| (0..rows).collect());
                let mut bytes = Vec::with_capacity(all.len() * 4 / 3);
                for r in order {
                    let src = &all[r * row..(r + 1) * row];
                    match t.ggml_type.name {
                        "Q4_K" => bytes.extend(iris_tensor::quant::q4_k_to_q4f(src)),
                        "Q6_K" => bytes.extend(iris_tensor::quant::q6_k_to_q16(src)),
                        _ => bytes.extend_from_slice(src),
                    }
                }
                Arc::new(bytes)
            });
            entries.insert(
                name,
                Entry {
                    file: 0,
                    dtype: dt,
                    quant,
                    shape,
                    range,
                    owned,
                },
            );
        }
        let weights = Weights {
            maps: vec![Arc::new(map)],
            entries,
            tensors: HashMap::new(),
            dtype,
            device: Device::Cpu,
            read: Mutex::new(Vec::new()),
            bytes_read: AtomicU64::new(0),
            quantize: None,
        };
        Ok((weights, llama.config))
    }

    /// `other`'s tensors added under `rename` of their names (a GGUF language model
    /// inside a LLaVA folder: `model.*` → `language_model.model.*`); a name both hold is
    /// an error naming `source`.
    pub fn attach(
        &mut self,
        other: Weights,
        rename: impl Fn(&str) -> String,
        source: &Path,
    ) -> Result<()> {
        let offset = self.maps.len();
        self.maps.extend(other.maps);
        for (name, mut e) in other.entries {
            let name = rename(&name);
            if self.entries.contains_key(&name) {
                return Err(Error::Config(format!(
                    "{name} is both in the safetensors and in {}",
                    source.display()
                )));
            }
            e.file += offset;
            self.entries.insert(name, e);
        }
        Ok(())
    }

    /// A stored tensor's bytes.
    fn bytes_of<'a>(&'a self, e: &'a Entry) -> &'a [u8] {
        match &e.owned {
            Some(b) => b,
            None => &self.maps[e.file][e.range.clone()],
        }
    }

    /// Whether `name` is stored block-quantized.
    pub fn is_quantized(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.quant.is_some())
    }

    /// The weight of a linear layer: rows `rows` (dimension 0) or columns `cols`
    /// (dimension 1) of `name`, checked against `shape`. A block-quantized tensor stays
    /// in its blocks (a whole one shares the memory map; columns must be whole blocks);
    /// any other is read as `get_host_slice` reads it.
    fn weight_slice(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        quantize: Option<QuantType>,
        dim: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Weight> {
        let Some(e) = self.entries.get(name).filter(|e| e.quant.is_some()) else {
            let t = self.get_host_slice(name, shape, dtype, dim, range)?;
            if let Some(ty) = quantize.filter(|_| t.rank() == 2) {
                let (n, k) = t.dims2()?;
                if k.is_multiple_of(32) && self.device == Device::Cpu {
                    let values = t.to_f32_vec();
                    let data: Vec<u8> = values
                        .chunks(k)
                        .flat_map(|r| iris_tensor::quant::quantize_row(ty, r))
                        .collect();
                    let m = QuantMatrix::new(ty, n, k, Box::new(data))
                        .map_err(|m| Error::Config(format!("{name}: {m}")))?;
                    return Ok(Weight::quantized(m));
                }
            }
            return Ok(Weight::new(t.to_device(self.device)?)?);
        };
        let ty = e.quant.expect("filtered");
        if e.shape != shape || shape.len() != 2 {
            return Err(Error::TensorShape {
                name: name.to_string(),
                want: shape.to_vec(),
                got: e.shape.clone(),
            });
        }
        if self.device != Device::Cpu {
            if ty == QuantType::Q16 {
                // Q6_K has no GPU kernel: its exact values, a dense weight there.
                let t = self.get_host_slice(name, shape, dtype, dim, range)?;
                return Ok(Weight::new(t.to_device(self.device)?)?);
            }
            return Err(Error::Config(format!(
                "{name}: {} weights run on the CPU backend only",
                ty.name()
            )));
        }
        TENSORS_READ.fetch_add(1, Ordering::Relaxed);
        self.read
            .lock()
            .expect("the read log is never poisoned")
            .push(name.to_string());
        let (n, k) = (shape[0], shape[1]);
        let bad = |m: String| Error::Config(format!("{name}: {m}"));
        let whole = range == (0..shape[dim]);
        let m = if whole {
            let data: Box<dyn AsRef<[u8]> + Send + Sync> = match &e.owned {
                Some(b) => Box::new(b.to_vec()),
                None => Box::new(MapSlice(self.maps[e.file].clone(), e.range.clone())),
            };
            QuantMatrix::new(ty, n, k, data).map_err(bad)?
        } else {
            let full =
                QuantMatrix::new(ty, n, k, Box::new(self.bytes_of(e).to_vec())).map_err(bad)?;
            match dim {
                0 if range.end <= n => full.slice_rows(range),
                1 if range.end <= k
                    && range.start.is_multiple_of(32)
                    && range.len().is_multiple_of(32) =>
                {
                    let bb = ty.block_bytes();
                    let (b0, b1) = (range.start / 32 * bb, range.end / 32 * bb);
                    let row = k / 32 * bb;
                    let bytes: Vec<u8> = self
                        .bytes_of(e)
                        .chunks(row)
                        .flat_map(|r| r[b0..b1].iter().copied())
                        .collect();
                    QuantMatrix::new(ty, n, range.len(), Box::new(bytes)).map_err(bad)?
                }
                _ => {
                    return Err(bad(format!(
                        "{} slice {range:?} of dimension {dim} is not whole 32-weight blocks",
                        ty.name()
                    )))
                }
            }
        };
        self.bytes_read
            .fetch_add(m.bytes().len() as u64, Ordering::Relaxed);
        Ok(Weight::quantized(m))
    }

    /// Weights from in-memory tensors, served as `dtype`.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType) -> Weights {
        Weights {
            maps: Vec::new(),
            entries: HashMap::new(),
            tensors,
            dtype,
            device: Device::Cpu,
            read: Mutex::new(Vec::new()),
            bytes_read: AtomicU64::new(0),
            quantize: None,
        }
    }

    /// These weights with the language model's linear layers quantized to `ty` as they
    /// load (`--quantize`: through [`Weights::lm`]; a layer whose inputs are not whole
    /// 32-blocks stays dense). Embeddings, norms and the vision and connector parts keep
    /// the served dtype.
    pub fn quantize_linear(mut self, ty: QuantType) -> Weights {
        self.quantize = Some(ty);
        self
    }

    /// These weights, read onto `device` (each tensor uploaded as a part loads it).
    pub fn on(mut self, device: Device) -> Weights {
        self.device = device;
        self
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every tensor's name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self
            .entries
            .keys()
            .chain(self.tensors.keys())
            .cloned()
            .collect();
        n.sort();
        n
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name) || self.tensors.contains_key(name)
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match self.tensors.get(name) {
            Some(t) => Some(t.shape().to_vec()),
            None => self.entries.get(name).map(|e| e.shape.clone()),
        }
    }

    /// The tensor `name`, checked against `shape`, as the checkpoint's load dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Ok(self.get_host(name, shape, dtype)?.to_device(self.device)?)
    }

    /// [`Weights::get_as`] on the host.
    fn get_host(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let full = shape.first().map_or(0..1, |&n| 0..n);
        self.get_host_slice(name, shape, dtype, 0, full)
    }

    /// The slice `range` of dimension `dim` of `name` (checked against `shape`), as
    /// `dtype` on the host: from a memory-mapped file only the slice's bytes are read,
    /// so a rank's shards touch only their own pages of the checkpoint.
    fn get_host_slice(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        dim: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        TENSORS_READ.fetch_add(1, Ordering::Relaxed);
        self.read
            .lock()
            .expect("the read log is never poisoned")
            .push(name.to_string());
        let slice_err = || {
            Err(Error::Config(format!(
                "{name}: rows {range:?} of dimension {dim} of {shape:?}"
            )))
        };
        let (outer, mid, inner) = match shape.get(dim) {
            Some(&m) if range.end <= m && range.start <= range.end => (
                shape[..dim].iter().product::<usize>(),
                m,
                shape[dim + 1..].iter().product::<usize>(),
            ),
            _ if shape.is_empty() && range == (0..1) => (1, 1, 1),
            _ => return slice_err(),
        };
        let mut new_shape = shape.to_vec();
        if let Some(n) = new_shape.get_mut(dim) {
            *n = range.len();
        }
        if let Some(t) = self.tensors.get(name) {
            if t.shape() != shape {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    want: shape.to_vec(),
                    got: t.shape().to_vec(),
                });
            }
            let t = t.to_dtype(dtype)?;
            let held = (outer * range.len() * inner * dtype.size_in_bytes()) as u64;
            self.bytes_read.fetch_add(held, Ordering::Relaxed);
            if range.len() == mid {
                return Ok(t);
            }
            if shape.len() == 2 && dim == 1 {
                return Ok(t.narrow_cols(range.start, range.len())?);
            }
            // [outer, mid, inner] → the middle rows of each outer block.
            let parts = (0..outer)
                .map(|o| {
                    t.reshape(&[outer * mid, inner])?
                        .narrow_rows(o * mid + range.start, range.len())
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let refs: Vec<&Tensor> = parts.iter().collect();
            return Ok(Tensor::cat_rows(&refs)?
                .to_dtype(dtype)?
                .reshape(&new_shape)?);
        }
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))?;
        if e.shape != shape {
            return Err(Error::TensorShape {
                name: name.to_string(),
                want: shape.to_vec(),
                got: e.shape.clone(),
            });
        }
        if let Some(ty) = e.quant {
            // Dequantized rows (a vocabulary shard of an embedding reads its own).
            let k = shape.last().copied().unwrap_or(1);
            let row = k / 32 * ty.block_bytes();
            let n = self.bytes_of(e).len() / row;
            let rows = if dim == 0 { range.clone() } else { 0..n };
            let bytes = &self.bytes_of(e)[rows.start * row..rows.end * row];
            let mut values = vec![0f32; rows.len() * k];
            for (b, v) in bytes.chunks(row).zip(values.chunks_mut(k)) {
                iris_tensor::quant::dequantize_row(ty, b, v);
            }
            self.bytes_read
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let mut t = Tensor::from_f32(values, &[rows.len(), k])?;
            if dim == 1 {
                t = t.narrow_cols(range.start, range.len())?;
            }
            return Ok(t.reshape(&new_shape)?.to_dtype(dtype)?);
        }
        let all = self.bytes_of(e);
        let es = e.dtype.size_in_bytes();
        let t = if range.len() == mid {
            self.bytes_read
                .fetch_add(all.len() as u64, Ordering::Relaxed);
            Tensor::from_le_bytes(all, e.dtype, shape)?
        } else {
            // Each outer block's rows `range`, contiguous in the file.
            let mut bytes = Vec::with_capacity(outer * range.len() * inner * es);
            for o in 0..outer {
                let a = ((o * mid + range.start) * inner) * es;
                let b = ((o * mid + range.end) * inner) * es;
                bytes.extend_from_slice(&all[a..b]);
            }
            self.bytes_read
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Tensor::from_le_bytes(&bytes, e.dtype, &new_shape)?
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// Bytes of the tensors handed out so far (a shard: its slice), in the stored dtype
    /// for files and the served dtype for in-memory tensors: what the parts loaded hold.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Names of every tensor read so far (each once per read), in order.
    pub fn tensors_read(&self) -> Vec<String> {
        self.read
            .lock()
            .expect("the read log is never poisoned")
            .clone()
    }

    /// Bytes the checkpoint stores for `name` (0 when absent).
    pub fn stored_bytes(&self, name: &str) -> usize {
        match self.tensors.get(name) {
            Some(t) => t.elem_count() * t.dtype().size_in_bytes(),
            None => self.entries.get(name).map_or(0, |e| e.range.len()),
        }
    }

    /// The first of `candidates` under which `probe` exists (checkpoint layouts differ
    /// between transformers versions and the hub); looking does not read a tensor.
    pub fn find_prefix<'a>(&self, candidates: &[&'a str], probe: &str) -> Result<&'a str> {
        candidates
            .iter()
            .copied()
            .find(|p| self.contains(&format!("{p}.{probe}")))
            .ok_or_else(|| Error::MissingTensor(format!("{}.{probe}", candidates[0])))
    }

    /// A view of the tensors under `prefix.`.
    pub fn pp(self: &Arc<Self>, prefix: &str) -> Vb {
        Vb {
            w: self.clone(),
            prefix: prefix.to_string(),
            dtype: self.dtype,
            quantize: None,
        }
    }

    /// [`Weights::pp`] for a language model: its linear layers quantized as
    /// [`Weights::quantize_linear`] asked.
    pub fn lm(self: &Arc<Self>, prefix: &str) -> Vb {
        self.pp(prefix).quantized(self.quantize)
    }
}

/// A prefix into a checkpoint, as candle's `VarBuilder`: `vb.pp("mlp").get("fc1.weight")`.
#[derive(Debug, Clone)]
pub struct Vb {
    w: Arc<Weights>,
    prefix: String,
    dtype: DType,
    /// Dense linear weights under this prefix are quantized to this as they load.
    quantize: Option<QuantType>,
}

impl Vb {
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb {
        Vb {
            w: self.w.clone(),
            prefix: self.path(&name.to_string()),
            dtype: self.dtype,
            quantize: self.quantize,
        }
    }

    /// The same tensors with dense linear weights quantized to `ty` as they load.
    pub fn quantized(&self, ty: Option<QuantType>) -> Vb {
        Vb {
            quantize: ty,
            ..self.clone()
        }
    }

    /// The same tensors served as `dtype` (HF keeps some modules in f32 whatever the
    /// checkpoint's dtype, e.g. BLIP-2's Q-Former).
    pub fn with_dtype(&self, dtype: DType) -> Vb {
        Vb {
            dtype,
            ..self.clone()
        }
    }

    /// The full name of `name` under this prefix (for errors).
    pub fn path_of(&self, name: &str) -> String {
        self.path(name)
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn contains(&self, name: &str) -> bool {
        self.w.contains(&self.path(name))
    }

    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.w.shape(&self.path(name))
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.w.get_as(&self.path(name), shape, self.dtype)
    }

    /// Whether `name` is stored block-quantized (a GGUF tensor).
    pub fn is_quantized(&self, name: &str) -> bool {
        self.w.is_quantized(&self.path(name))
    }

    /// A linear layer's weight `name` (`[out, in]`), as its backend multiplies it: a
    /// block-quantized tensor stays quantized.
    pub fn weight(&self, name: &str, shape: &[usize]) -> Result<Weight> {
        self.weight_slice(name, shape, 0, 0..shape[0])
    }

    /// Rows `range` of a linear layer's weight (a column-parallel shard).
    pub fn weight_rows(
        &self,
        name: &str,
        shape: &[usize],
        range: std::ops::Range<usize>,
    ) -> Result<Weight> {
        self.weight_slice(name, shape, 0, range)
    }

    /// Columns `range` of a linear layer's weight (a row-parallel shard).
    pub fn weight_cols(
        &self,
        name: &str,
        shape: &[usize],
        range: std::ops::Range<usize>,
    ) -> Result<Weight> {
        self.weight_slice(name, shape, 1, range)
    }

    /// `Weights::weight_slice` under this prefix, in its dtype and `--quantize` format.
    fn weight_slice(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Weight> {
        let name = self.path(name);
        (self.w).weight_slice(&name, shape, self.dtype, self.quantize, dim, range)
    }

    /// Rows `range` of a 2-D (or 1-D) tensor: the shard a column-parallel rank owns.
    pub fn get_rows(
        &self,
        name: &str,
        shape: &[usize],
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        self.get_shard(name, shape, 0, range)
    }

    /// Columns `range` of a 2-D tensor: the shard a row-parallel rank owns.
    pub fn get_cols(
        &self,
        name: &str,
        shape: &[usize],
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        self.get_shard(name, shape, 1, range)
    }

    /// The slice `range` of dimension `dim` (0 or 1) of tensor `name`.
    fn get_shard(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        range: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        if range == (0..shape[dim]) {
            return self.get(name, shape);
        }
        Ok(self
            .w
            .get_host_slice(&self.path(name), shape, self.dtype, dim, range)?
            .to_device(self.w.device)?)
    }

    /// Where this checkpoint's tensors are read onto.
    pub fn device(&self) -> Device {
        self.w.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn write(dir: &Path, name: &str, tensors: &[(&str, Vec<f32>, Vec<usize>)]) -> PathBuf {
        let bufs: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, v, _)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: HashMap<String, safetensors::tensor::TensorView> = tensors
            .iter()
            .zip(&bufs)
            .map(|((n, _, s), b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(StDtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let path = dir.join(name);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    }

    #[test]
    fn loads_converts_and_checks_shapes() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "model.safetensors",
            &[("a.w", vec![1.0, 2.0, 3.0, 4.0], vec![2, 2])],
        );
        let w = Arc::new(Weights::open(dir.path(), DType::BF16).unwrap());
        let t = w.pp("a").get("w", &[2, 2]).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(t.to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0]);
        assert!(matches!(w.get("a.w", &[4]), Err(Error::TensorShape { .. })));
        assert!(matches!(w.get("b", &[4]), Err(Error::MissingTensor(_))));
        let before = w.bytes_read();
        let c = w.pp("a").get_cols("w", &[2, 2], 1..2).unwrap();
        assert_eq!(c.to_f32_vec(), vec![2.0, 4.0]);
        let r = w.pp("a").get_rows("w", &[2, 2], 1..2).unwrap();
        assert_eq!(r.to_f32_vec(), vec![3.0, 4.0]);
        // A shard reads its own bytes only (two f32 values each; the dtype conversion
        // happens after the read).
        assert_eq!(w.bytes_read() - before, 16);
        // The same shards of in-memory tensors.
        let m = Arc::new(Weights::from_tensors(
            [(
                "w".to_string(),
                Tensor::from_f32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap(),
            )]
            .into(),
            DType::F32,
        ));
        assert_eq!(
            m.pp("").get_cols("w", &[2, 3], 1..3).unwrap().to_f32_vec(),
            vec![2.0, 3.0, 5.0, 6.0]
        );
        assert_eq!(
            m.pp("").get_rows("w", &[2, 3], 1..2).unwrap().to_f32_vec(),
            vec![4.0, 5.0, 6.0]
        );
        assert!(m.pp("").get_rows("w", &[2, 3], 1..3).is_err());
    }

    #[test]
    fn truncated_and_corrupt_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "model.safetensors",
            &[("a", vec![1.0; 64], vec![64])],
        );
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let e = Weights::open(dir.path(), DType::F32).unwrap_err();
        assert!(matches!(e, Error::Safetensors { .. }), "{e}");
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        assert!(matches!(
            Weights::open(dir.path(), DType::F32),
            Err(Error::Safetensors { .. })
        ));
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(
            Weights::open(dir.path(), DType::F32),
            Err(Error::Safetensors { .. })
        ));
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(
            Weights::open(dir.path(), DType::F32),
            Err(Error::Config(_))
        ));
    }

    /// A LLaMA GGUF with one q weight (2 heads of 4 rows, Q8_0, each row a constant
    /// equal to its stored index) and what else the metadata needs.
    fn gguf_file(q_type: u32, q_bytes: usize) -> Vec<u8> {
        use crate::gguf::Value;
        let meta = [
            ("general.architecture", Value::Str("llama".into())),
            ("llama.block_count", Value::U32(1)),
            ("llama.embedding_length", Value::U32(8)),
            ("llama.feed_forward_length", Value::U32(16)),
            ("llama.context_length", Value::U32(64)),
            ("llama.attention.head_count", Value::U32(2)),
            ("llama.vocab_size", Value::U32(4)),
        ];
        crate::gguf::tests::file(&meta, &[("blk.0.attn_q.weight", &[32, 8], q_type, q_bytes)])
    }

    #[test]
    fn a_gguf_reads_under_hf_names_with_q_rows_in_hf_order() {
        use iris_tensor::quant::{quantize_row, QuantType};
        let mut bytes = gguf_file(8, 8 * 34);
        let start = crate::gguf::parse(&bytes).unwrap().data_start as usize;
        for r in 0..8 {
            let row = quantize_row(QuantType::Q8_0, &[r as f32; 32]);
            bytes[start + r * 34..start + (r + 1) * 34].copy_from_slice(&row);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let (w, config) = Weights::open_gguf(&path, DType::F32).unwrap();
        assert_eq!(config["num_attention_heads"], 2);
        assert_eq!(config["tie_word_embeddings"], true);
        let name = "model.layers.0.self_attn.q_proj.weight";
        assert!(w.is_quantized(name));
        let t = w.get(name, &[8, 32]).unwrap().to_f32_vec();
        // HF row (head h, half t, j) is llama.cpp's row h·4 + 2j + t.
        // (The f16 scale rounds each constant a little.)
        let stored: Vec<f32> = (0..8).map(|r| t[r * 32].round()).collect();
        assert_eq!(stored, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        let w = Arc::new(w);
        let lin = w.pp("").weight(name, &[8, 32]).unwrap();
        assert_eq!(lin.quant_type(), Some(QuantType::Q8_0));
        let y = lin
            .linear(&Tensor::from_f32(vec![1.0; 32], &[1, 32]).unwrap(), None)
            .unwrap()
            .to_f32_vec();
        let want: Vec<f32> = stored.iter().map(|v| v * 32.0).collect();
        assert!(
            y.iter().zip(&want).all(|(a, b)| (a - b).abs() < 0.05),
            "{y:?}"
        );
        // Columns of whole blocks only.
        assert!(w.pp("").weight_cols(name, &[8, 32], 0..16).is_err());
    }

    /// The K-quant golden `file` (`tools/gen_q4k_golden.py`: super-blocks of random
    /// bytes and gguf-py's values) as a one-tensor GGUF of ggml type `ty`, opened; its
    /// tensor (HF's name) must read as gguf-py dequantizes it, bit for bit. Returns the
    /// weights, the tensor's name, its shape and the values.
    fn k_quant_golden(file: &str, ty: u32) -> (Weights, &'static str, usize, usize, Vec<f32>) {
        let golden: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../tests/fixtures/gguf")
                    .join(file),
            )
            .unwrap(),
        )
        .unwrap();
        let (n, k) = (
            golden["rows"].as_u64().unwrap() as usize,
            golden["k"].as_u64().unwrap() as usize,
        );
        let hex = golden["bytes_hex"].as_str().unwrap();
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = golden["value_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| f32::from_bits(b.as_u64().unwrap() as u32))
            .collect();
        let name = "blk.0.ffn_up.weight";
        let mut bytes = crate::gguf::tests::file(
            &[
                (
                    "general.architecture",
                    crate::gguf::Value::Str("llama".into()),
                ),
                ("llama.block_count", crate::gguf::Value::U32(1)),
                ("llama.embedding_length", crate::gguf::Value::U32(k as u32)),
                (
                    "llama.feed_forward_length",
                    crate::gguf::Value::U32(n as u32),
                ),
                ("llama.context_length", crate::gguf::Value::U32(64)),
                ("llama.attention.head_count", crate::gguf::Value::U32(2)),
                ("llama.vocab_size", crate::gguf::Value::U32(4)),
            ],
            &[(name, &[k as u64, n as u64], ty, raw.len())],
        );
        let start = crate::gguf::parse(&bytes).unwrap().data_start as usize;
        bytes[start..start + raw.len()].copy_from_slice(&raw);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let (w, _) = Weights::open_gguf(&path, DType::F32).unwrap();
        let hf = "model.layers.0.mlp.up_proj.weight";
        let got = w.get(hf, &[n, k]).unwrap().to_f32_vec();
        assert_eq!(got.len(), want.len());
        for (i, (g, e)) in got.iter().zip(&want).enumerate() {
            // Bit for bit, but for the sign of a zero: Q16 multiplies the super-block's
            // scale by `sc·(q − 32)`, where ggml forms `(d·sc)·(q − 32)`, so a zero weight
            // under a negative scale is +0 here and −0 there — the same in every sum.
            let same = g.to_bits() == e.to_bits() || (*g == 0.0 && *e == 0.0);
            assert!(same, "value {i}: {g} vs gguf-py's {e}");
        }
        (w, hf, n, k, want)
    }

    /// Q6_K rows (llama.cpp's Q4_K_M files hold their head and some layers so) read as
    /// gguf-py dequantizes them, bit for bit (zeros' signs aside), held as Q16 blocks (16 bits a weight,
    /// not f32's 32) whose product is the product of those values.
    #[test]
    fn q6_k_tensors_read_exactly_as_ggufs_reference_dequantizes_them() {
        use iris_tensor::quant::QuantType;
        let (w, hf, n, k, want) = k_quant_golden("q6_k.json", 14);
        assert_products_of(w, hf, n, k, &want, QuantType::Q16);
    }

    /// Q4_K rows read as gguf-py dequantizes them, bit for bit (the golden from
    /// `tools/gen_q4k_golden.py`), held as Q4F blocks whose product is the product of
    /// those values.
    #[test]
    fn q4_k_tensors_read_exactly_as_ggufs_reference_dequantizes_them() {
        use iris_tensor::quant::QuantType;
        let (w, hf, n, k, want) = k_quant_golden("q4_k.json", 12);
        assert_products_of(w, hf, n, k, &want, QuantType::Q4F);
    }

    /// `hf` is held in `ty`'s blocks and its products with two activation rows are
    /// those of the reference values `want`, within the int16 activations' rounding.
    fn assert_products_of(
        w: Weights,
        hf: &str,
        n: usize,
        k: usize,
        want: &[f32],
        ty: iris_tensor::quant::QuantType,
    ) {
        let w = Arc::new(w);
        let lin = w.pp("").weight(hf, &[n, k]).unwrap();
        assert_eq!(lin.quant_type(), Some(ty));
        let x: Vec<f32> = (0..2 * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let y = lin
            .linear(&Tensor::from_f32(x.clone(), &[2, k]).unwrap(), None)
            .unwrap()
            .to_f32_vec();
        for i in 0..2 {
            for r in 0..n {
                let e: f64 = (0..k)
                    .map(|j| f64::from(want[r * k + j]) * f64::from(x[i * k + j]))
                    .sum();
                let scale: f64 = (0..k)
                    .map(|j| (f64::from(want[r * k + j]) * f64::from(x[i * k + j])).abs())
                    .sum();
                // The activations are quantized to int16 per 32: 2⁻¹⁶ of each block.
                assert!(
                    (f64::from(y[i * n + r]) - e).abs() <= 1e-4 * scale,
                    "row {r}: {} vs {e}",
                    y[i * n + r]
                );
            }
        }
    }

    #[test]
    fn gguf_files_that_cannot_be_read_are_errors_naming_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        // A type Iris does not read (Q5_0): the error names the tensor and the type.
        std::fs::write(&path, gguf_file(6, 8 * 22)).unwrap();
        let e = Weights::open_gguf(&path, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("Q5_0"),
            "{e}"
        );
        // Truncated inside the tensor data, and inside the header.
        let whole = gguf_file(8, 8 * 34);
        for cut in [whole.len() - 40, 60] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let e = Weights::open_gguf(&path, DType::F32).unwrap_err();
            assert!(matches!(e, Error::Gguf(_)), "{e}");
            assert!(e.to_string().contains("m.gguf"), "{e}");
        }
        // Another architecture.
        let other = crate::gguf::tests::file(
            &[(
                "general.architecture",
                crate::gguf::Value::Str("gpt2".into()),
            )],
            &[],
        );
        std::fs::write(&path, other).unwrap();
        let e = Weights::open_gguf(&path, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gpt2"), "{e}");
    }

    #[test]
    fn dense_linear_weights_quantize_as_they_load() {
        use iris_tensor::quant::QuantType;
        let values: Vec<f32> = (0..4 * 64)
            .map(|i| ((i * 37) % 19) as f32 / 19.0 - 0.5)
            .collect();
        let mut map = HashMap::new();
        map.insert(
            "w".to_string(),
            Tensor::from_f32(values.clone(), &[4, 64]).unwrap(),
        );
        map.insert(
            "odd".to_string(),
            Tensor::from_f32(vec![0.5; 4 * 40], &[4, 40]).unwrap(),
        );
        let w = Arc::new(Weights::from_tensors(map, DType::F32).quantize_linear(QuantType::Q8_0));
        let q = w.lm("").weight("w", &[4, 64]).unwrap();
        assert_eq!(q.quant_type(), Some(QuantType::Q8_0));
        // Only a language model's prefix quantizes (a vision tower keeps its dtype).
        assert_eq!(w.pp("").weight("w", &[4, 64]).unwrap().quant_type(), None);
        let x = Tensor::from_f32(vec![1.0; 64], &[1, 64]).unwrap();
        let y = q.linear(&x, None).unwrap().to_f32_vec();
        for (r, got) in y.iter().enumerate() {
            let want: f32 = values[r * 64..(r + 1) * 64].iter().sum();
            assert!((got - want).abs() < 0.05, "row {r}: {got} vs {want}");
        }
        // Inputs that are not whole blocks stay dense.
        assert_eq!(w.lm("").weight("odd", &[4, 40]).unwrap().quant_type(), None);
    }
}
