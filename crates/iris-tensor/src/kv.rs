//! Per-sequence self-attention keys and values for incremental decoding, either in the
//! sequence's own buffers (`[tokens, kv_heads·head_dim]` per layer) or paged: in
//! fixed-size blocks of a shared [`KvArena`], found through the sequence's block table,
//! so sequences share prompt blocks and nothing is reserved for tokens never produced.

use std::sync::{RwLock, RwLockReadGuard};

use crate::kernels::{dot_bf16, dot_f32};
use crate::{Result, Tensor};
use half::bf16;

/// How the arena stores keys and values: f32, or bf16 (half the bytes; exact for a
/// bf16 model, whose K/V are bf16 values already).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    Bf16,
}

impl KvDtype {
    pub fn size_in_bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
        })
    }
}

/// One row (or part of a row) of keys or values, in the arena's dtype.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum KvRow<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> KvRow<'a> {
    #[cfg(test)]
    fn len(self) -> usize {
        match self {
            KvRow::F32(r) => r.len(),
            KvRow::Bf16(r) => r.len(),
        }
    }

    /// Elements `range` (one head's part of the row).
    #[inline]
    pub fn part(self, range: std::ops::Range<usize>) -> KvRow<'a> {
        match self {
            KvRow::F32(r) => KvRow::F32(&r[range]),
            KvRow::Bf16(r) => KvRow::Bf16(&r[range]),
        }
    }

    /// `q · row`, in the same order for both dtypes (a bf16 value widens exactly).
    #[inline]
    pub fn dot(self, q: &[f32]) -> f32 {
        match self {
            KvRow::F32(r) => dot_f32(q, r),
            KvRow::Bf16(r) => dot_bf16(r, q),
        }
    }

    /// `qs[i] · keys[j]` for four keys and four queries at once (each loaded key serves
    /// four queries: a decode step's heads of one KV group), as `[j][i]`; `None` when
    /// the rows are not all of one dtype.
    #[inline]
    pub fn dot_4x4(keys: [KvRow<'_>; 4], qs: [&[f32]; 4]) -> Option<[[f32; 4]; 4]> {
        use crate::kernels::dot_tile_4x4;
        match keys {
            [KvRow::F32(a), KvRow::F32(b), KvRow::F32(c), KvRow::F32(d)] => {
                Some(dot_tile_4x4([a, b, c, d], qs))
            }
            [KvRow::Bf16(a), KvRow::Bf16(b), KvRow::Bf16(c), KvRow::Bf16(d)] => {
                Some(dot_tile_4x4([a, b, c, d], qs))
            }
            _ => None,
        }
    }

    /// `out += p · row`.
    #[inline]
    pub fn add_scaled(self, p: f32, out: &mut [f32]) {
        match self {
            KvRow::F32(r) => out.iter_mut().zip(r).for_each(|(o, v)| *o += p * v),
            KvRow::Bf16(r) => out
                .iter_mut()
                .zip(r)
                .for_each(|(o, v)| *o += p * v.to_f32()),
        }
    }

    /// Appends the row, as f32, to `out`.
    pub fn extend_into(self, out: &mut Vec<f32>) {
        match self {
            KvRow::F32(r) => out.extend_from_slice(r),
            KvRow::Bf16(r) => out.extend(r.iter().map(|v| v.to_f32())),
        }
    }

    #[cfg(test)]
    pub fn to_vec(self) -> Vec<f32> {
        let mut v = Vec::with_capacity(self.len());
        self.extend_into(&mut v);
        v
    }
}

#[derive(Debug)]
enum Data {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl Default for Data {
    fn default() -> Self {
        Data::F32(Vec::new())
    }
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::F32(d) => d.len(),
            Data::Bf16(d) => d.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Data::F32(d) => d.len() * 4,
            Data::Bf16(d) => d.len() * 2,
        }
    }

    #[inline]
    fn row(&self, range: std::ops::Range<usize>) -> KvRow<'_> {
        match self {
            Data::F32(d) => KvRow::F32(&d[range]),
            Data::Bf16(d) => KvRow::Bf16(&d[range]),
        }
    }

    fn put(&mut self, at: usize, row: &[f32]) {
        match self {
            Data::F32(d) => d[at..at + row.len()].copy_from_slice(row),
            Data::Bf16(d) => crate::kernels::to_bf16(row, &mut d[at..at + row.len()]),
        }
    }
}

/// Shared K/V storage in blocks of `block_size` tokens. Per layer one buffer holds, for
/// block `b`, its `block_size` key rows then its `block_size` value rows. Buffers are
/// zero-allocated when a layer is first written, so untouched blocks cost no memory.
#[derive(Debug)]
pub struct KvArena {
    block_size: usize,
    blocks: usize,
    layers: Vec<RwLock<LayerBlocks>>,
    /// On a GPU: every layer's blocks in device memory (then `layers` stay empty).
    #[cfg(feature = "cuda")]
    gpu: Option<GpuArena>,
}

/// A KV arena in device memory: per layer one buffer laid out as the host's.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub(crate) struct GpuArena {
    pub(crate) layers: Vec<RwLock<crate::cuda::CudaStorage>>,
    pub(crate) width: usize,
    pub(crate) dtype: KvDtype,
}

#[derive(Debug, Default)]
pub(crate) struct LayerBlocks {
    width: usize,
    data: Data,
}

impl KvArena {
    /// An arena whose layers are allocated when first written (tests, small tools).
    pub fn new(n_layers: usize, blocks: usize, block_size: usize) -> KvArena {
        KvArena {
            block_size,
            blocks,
            layers: (0..n_layers).map(|_| RwLock::default()).collect(),
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// [`KvArena::reserved`] on `device`: in device memory on a GPU.
    pub fn reserved_on(
        n_layers: usize,
        blocks: usize,
        block_size: usize,
        width: usize,
        dtype: KvDtype,
        device: crate::Device,
    ) -> Result<KvArena> {
        match device {
            crate::Device::Cpu => Ok(KvArena::reserved(
                n_layers, blocks, block_size, width, dtype,
            )),
            #[cfg(feature = "cuda")]
            crate::Device::Cuda(n) => {
                let elems = blocks * 2 * block_size * width;
                let layers = (0..n_layers)
                    .map(|_| crate::cuda::CudaStorage::zeros(n, elems, dtype).map(RwLock::new))
                    .collect::<Result<_>>()?;
                Ok(KvArena {
                    block_size,
                    blocks,
                    layers: (0..n_layers).map(|_| RwLock::default()).collect(),
                    gpu: Some(GpuArena {
                        layers,
                        width,
                        dtype,
                    }),
                })
            }
            #[cfg(not(feature = "cuda"))]
            crate::Device::Cuda(_) => Err(crate::Error::NotCompiledWithCuda),
        }
    }

    /// Where the blocks are.
    pub fn device(&self) -> crate::Device {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return g.layers[0].read().expect("kv arena lock").device_of();
        }
        crate::Device::Cpu
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn gpu(&self) -> Option<&GpuArena> {
        self.gpu.as_ref()
    }

    /// An arena for rows `width` floats wide, every layer allocated now, in one buffer
    /// each, and its pages committed (touched), so the process's memory is what it
    /// will be for good: serving never grows it.
    pub fn reserved(
        n_layers: usize,
        blocks: usize,
        block_size: usize,
        width: usize,
        dtype: KvDtype,
    ) -> KvArena {
        let n = blocks * 2 * block_size * width;
        // The allocator hands out zeroed pages it has not committed yet; a store of a
        // value the compiler cannot see is zero commits each page now.
        let zero = std::hint::black_box(0.0f32);
        let layers = (0..n_layers)
            .map(|_| {
                let data = match dtype {
                    KvDtype::F32 => {
                        let mut d = vec![0f32; n];
                        d.chunks_mut(1024).for_each(|page| page[0] = zero);
                        Data::F32(d)
                    }
                    KvDtype::Bf16 => {
                        let mut d = vec![bf16::ZERO; n];
                        let z = bf16::from_f32(zero);
                        d.chunks_mut(2048).for_each(|page| page[0] = z);
                        Data::Bf16(d)
                    }
                };
                RwLock::new(LayerBlocks { width, data })
            })
            .collect();
        KvArena {
            block_size,
            blocks,
            layers,
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// Bytes the arena's layers hold now.
    pub fn bytes(&self) -> usize {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            let per = self.blocks * 2 * self.block_size * g.width * g.dtype.size_in_bytes();
            return g.layers.len() * per;
        }
        self.layers
            .iter()
            .map(|l| l.read().expect("kv arena lock").data.bytes())
            .sum()
    }

    /// Bytes one block takes across `n_layers` layers of rows `width` values wide.
    pub fn block_bytes(n_layers: usize, block_size: usize, width: usize, dtype: KvDtype) -> usize {
        n_layers * 2 * block_size * width * dtype.size_in_bytes()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The row width `layer` holds, once written.
    fn width(&self, layer: usize) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            return Some(g.width);
        }
        let l = self.layers[layer].read().expect("kv arena lock");
        (l.data.len() > 0).then_some(l.width)
    }

    /// Writes rows `k`, `v` (`width` floats each) at positions `start..` of a sequence
    /// whose blocks are `table`.
    fn write(&self, layer: usize, table: &[u32], start: usize, kv: (&[f32], &[f32]), w: usize) {
        let (k, v) = kv;
        let mut l = self.layers[layer].write().expect("kv arena lock");
        if l.data.len() == 0 {
            l.width = w;
            l.data = Data::F32(vec![0f32; self.blocks * 2 * self.block_size * w]);
        }
        assert_eq!(l.width, w, "one K/V width per layer");
        let bs = self.block_size;
        for (i, (kr, vr)) in k.chunks_exact(w).zip(v.chunks_exact(w)).enumerate() {
            let pos = start + i;
            let base = table[pos / bs] as usize * 2 * bs * w + (pos % bs) * w;
            l.data.put(base, kr);
            l.data.put(base + bs * w, vr);
        }
    }
}

/// Keys and values one attention call reads: contiguous rows, or rows found through a
/// block table.
pub(crate) enum KvView<'a> {
    Rows {
        k: &'a [f32],
        v: &'a [f32],
        width: usize,
    },
    Paged {
        layer: RwLockReadGuard<'a, LayerBlocks>,
        table: &'a [u32],
        block_size: usize,
        /// Rows `first..first + len` of what the table holds.
        first: usize,
        len: usize,
    },
}

impl<'a> KvView<'a> {
    /// Number of key (and value) rows.
    pub fn len(&self) -> usize {
        match self {
            KvView::Rows { k, width, .. } => k.len() / width.max(&1),
            KvView::Paged { len, .. } => *len,
        }
    }

    /// Rows `range` of this view (one image's keys and values, for cross-attention).
    pub fn rows(self, range: std::ops::Range<usize>) -> KvView<'a> {
        assert!(range.end <= self.len(), "rows {range:?} of {}", self.len());
        match self {
            KvView::Rows { k, v, width } => KvView::Rows {
                k: &k[range.start * width..range.end * width],
                v: &v[range.start * width..range.end * width],
                width,
            },
            KvView::Paged {
                layer,
                table,
                block_size,
                first,
                ..
            } => KvView::Paged {
                layer,
                table,
                block_size,
                first: first + range.start,
                len: range.len(),
            },
        }
    }

    /// Row `j`'s keys and values.
    #[inline]
    pub fn row(&self, j: usize) -> (KvRow<'_>, KvRow<'_>) {
        match self {
            KvView::Rows { k, v, width } => {
                let r = j * width..(j + 1) * width;
                (KvRow::F32(&k[r.clone()]), KvRow::F32(&v[r]))
            }
            KvView::Paged {
                layer,
                table,
                block_size: bs,
                first,
                ..
            } => {
                let (w, j) = (layer.width, j + first);
                let base = table[j / bs] as usize * 2 * bs * w + (j % bs) * w;
                (
                    layer.data.row(base..base + w),
                    layer.data.row(base + bs * w..base + bs * w + w),
                )
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Store {
    Own {
        k: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    },
    Paged {
        arena: std::sync::Arc<KvArena>,
        table: Vec<u32>,
    },
}

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Unique in the process: a tensor-parallel group's other ranks keep their shard of
    /// this sequence's cache under it.
    id: u64,
    store: Store,
    n_layers: usize,
    len: usize,
    /// Per layer, the keys and values of what cross-attention reads (the image), computed
    /// once per sequence (BLIP's text decoder; Flamingo's gated layers): here until
    /// `paged` moves them into the arena's blocks (`cross_table`).
    cross: Vec<Option<(Tensor, Tensor)>>,
    /// Paged: the blocks holding cross-attention rows, and each slot's row count.
    cross_table: Vec<u32>,
    cross_rows: Vec<usize>,
    /// Which image each prompt position's cross-attention reads (IDEFICS: the latest
    /// image before it); positions past the prompt read what its last token read.
    image_of: Vec<Option<usize>>,
}

impl Default for KvCache {
    fn default() -> Self {
        KvCache::new(0)
    }
}

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Who hears of dropped caches ([`KvCache::drops`]: tensor-parallel leaders).
static DROP_SUBSCRIBERS: std::sync::Mutex<Vec<std::sync::mpsc::Sender<u64>>> =
    std::sync::Mutex::new(Vec::new());
static ANY_SUBSCRIBER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Drop for KvCache {
    fn drop(&mut self) {
        if ANY_SUBSCRIBER.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(mut subs) = DROP_SUBSCRIBERS.lock() {
                // A subscriber that went away is forgotten.
                subs.retain(|s| s.send(self.id).is_ok());
            }
        }
    }
}

impl KvCache {
    pub fn new(n_layers: usize) -> KvCache {
        KvCache {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            store: Store::Own {
                k: vec![Vec::new(); n_layers],
                v: vec![Vec::new(); n_layers],
            },
            n_layers,
            len: 0,
            cross: vec![None; n_layers],
            cross_table: Vec::new(),
            cross_rows: vec![0; n_layers],
            image_of: Vec::new(),
        }
    }

    /// This (empty) cache keeps its K/V in `arena`'s blocks, `table` first; the caller
    /// grows the table (`push_block`) before positions past it are written. Its
    /// cross-attention K/V (`width` floats a row, as the arena's layers) move into the
    /// blocks of `cross_table` (at least `cross_rows_max` rows; see `cross_rows_max`).
    pub fn paged(
        mut self,
        arena: std::sync::Arc<KvArena>,
        table: Vec<u32>,
        cross_table: Vec<u32>,
        width: usize,
    ) -> KvCache {
        assert!(self.len == 0, "only an empty cache becomes paged");
        // Cross K/V move into a host arena's blocks; on a GPU they stay device tensors
        // of the sequence (read by the same attention kernel as any given K/V).
        let fits = arena.device() == crate::Device::Cpu
            && self
                .cross
                .iter()
                .flatten()
                .all(|(k, _)| k.device() == crate::Device::Cpu)
            && self
                .cross_rows_max(width)
                .is_some_and(|rows| rows <= cross_table.len() * arena.block_size());
        // Cross K/V of another width than the arena's stay where they are.
        for (slot, c) in self.cross.iter_mut().enumerate().filter(|_| fits) {
            if let Some((k, v)) = c.take() {
                let (k, v) = (
                    k.as_f32().expect("set_cross keeps host f32"),
                    v.as_f32().expect("set_cross keeps host f32"),
                );
                arena.write(slot, &cross_table, 0, (k, v), width);
                self.cross_rows[slot] = k.len() / width.max(1);
            }
        }
        self.cross_table = cross_table;
        self.store = Store::Paged { arena, table };
        self
    }

    /// Floats of cross-attention K/V held in the cache's own buffers.
    pub fn cross_floats(&self) -> usize {
        self.cross
            .iter()
            .flatten()
            .map(|(k, v)| k.elem_count() + v.elem_count())
            .sum()
    }

    /// Rows of the largest slot's cross-attention keys (the blocks `paged` needs for
    /// them), when every slot's rows are `width` wide; `None` when they are not.
    pub fn cross_rows_max(&self, width: usize) -> Option<usize> {
        let mut most = 0;
        for (k, _) in self.cross.iter().flatten() {
            if width == 0 || k.last_dim() != width {
                return None;
            }
            most = most.max(k.rows());
        }
        Some(most)
    }

    pub fn push_block(&mut self, block: u32) {
        if let Store::Paged { table, .. } = &mut self.store {
            table.push(block);
        }
    }

    /// Positions the cache can hold before it needs another block (unbounded when it
    /// owns its buffers).
    pub fn capacity(&self) -> usize {
        match &self.store {
            Store::Own { .. } => usize::MAX,
            Store::Paged { arena, table } => table.len() * arena.block_size(),
        }
    }

    pub fn set_image_of(&mut self, image_of: Vec<Option<usize>>) {
        self.image_of = image_of;
    }

    /// The image position `pos` reads through cross-attention, if any.
    pub fn image_at(&self, pos: usize) -> Option<usize> {
        self.image_of
            .get(pos)
            .or(self.image_of.last())
            .copied()
            .flatten()
    }

    /// The keys and values `[rows, width]` cross-attention reads in `layer` (an
    /// image's, computed once per sequence).
    pub fn set_cross(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<()> {
        if k.shape() != v.shape() || k.rank() != 2 {
            return crate::error::shape_err(
                "set_cross",
                format!("keys {:?} values {:?}", k.shape(), v.shape()),
            );
        }
        // Held in f32 on their device, as the attention kernels read them.
        let (k, v) = (
            k.to_dtype(crate::DType::F32)?,
            v.to_dtype(crate::DType::F32)?,
        );
        self.cross[layer] = Some((k, v));
        Ok(())
    }

    /// Whether `layer` has cross-attention keys and values.
    pub fn has_cross(&self, layer: usize) -> bool {
        self.cross.get(layer).is_some_and(|c| c.is_some())
            || (matches!(self.store, Store::Paged { .. })
                && self.cross_rows.get(layer).is_some_and(|&r| r > 0))
    }

    /// The keys and values cross-attention reads in `layer` (rows `width` wide).
    pub(crate) fn cross(&self, layer: usize, width: usize) -> Option<KvView<'_>> {
        if let Some((k, v)) = self.cross.get(layer).and_then(|c| c.as_ref()) {
            let (k, v) = (k.as_f32().ok()?, v.as_f32().ok()?);
            return Some(KvView::Rows { k, v, width });
        }
        match &self.store {
            Store::Paged { arena, .. } if self.cross_rows.get(layer).is_some_and(|&r| r > 0) => {
                Some(KvView::Paged {
                    layer: arena.layers[layer].read().expect("kv arena lock"),
                    table: &self.cross_table,
                    block_size: arena.block_size(),
                    first: 0,
                    len: self.cross_rows[layer],
                })
            }
            _ => None,
        }
    }

    /// This cache's process-unique id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The ids of every cache of this process dropped from now on (a tensor-parallel
    /// leader tells its ranks; ids are unique, so other leaders' drops are harmless).
    pub fn drops() -> std::sync::mpsc::Receiver<u64> {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(mut subs) = DROP_SUBSCRIBERS.lock() {
            subs.push(tx);
        }
        ANY_SUBSCRIBER.store(true, std::sync::atomic::Ordering::Relaxed);
        rx
    }

    /// The block table and cross-attention blocks of a paged cache.
    pub fn tables(&self) -> Option<(&[u32], &[u32])> {
        match &self.store {
            Store::Paged { table, .. } => Some((table, &self.cross_table)),
            Store::Own { .. } => None,
        }
    }

    /// Mirrors another rank's cache of the same sequence: its block table and its
    /// length (a paged cache; its K/V are in this rank's blocks of the same ids).
    pub fn mirror(&mut self, table: &[u32], len: usize) {
        if let Store::Paged { table: t, .. } = &mut self.store {
            t.clear();
            t.extend_from_slice(table);
        }
        self.len = len;
    }

    /// Tokens cached so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes a step's keys and values (`[rows, width]` each) to `layer` after the
    /// `len()` rows cached; attention then reads them with the cached ones. Errors
    /// when a paged cache's table has no block for the new positions (the engine
    /// allocates blocks before it runs a step).
    pub fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        if k.shape() != v.shape() {
            return crate::error::shape_err(
                "kv write",
                format!("keys {:?} values {:?}", k.shape(), v.shape()),
            );
        }
        let rows = [k.rows()];
        KvCache::write_batch(&mut [self], &rows, layer, k, v)
    }

    /// [`KvCache::write`] of a batch step: sequence `i`'s keys and values are the next
    /// `rows[i]` rows of `k` and `v`.
    pub fn write_batch(
        caches: &mut [&mut KvCache],
        rows: &[usize],
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        if k.shape() != v.shape()
            || rows.len() != caches.len()
            || rows.iter().sum::<usize>() != k.rows()
        {
            return crate::error::shape_err(
                "kv write",
                format!(
                    "keys {:?} values {:?} for rows {rows:?}",
                    k.shape(),
                    v.shape()
                ),
            );
        }
        let w = k.last_dim();
        // Into a GPU arena on the GPU (host rows are uploaded first).
        #[cfg(feature = "cuda")]
        if let Some(dev) = caches
            .first()
            .and_then(|c| c.arena())
            .filter(|a| a.gpu().is_some())
            .map(|a| a.device())
        {
            let (k, v) = (k.to_device(dev)?, v.to_device(dev)?);
            return crate::cuda::kv_write_batch(caches, rows, layer, &k, &v);
        }
        let (k, v) = (k.f32_host()?, v.f32_host()?);
        let mut r0 = 0;
        for (cache, &t) in caches.iter_mut().zip(rows) {
            let r = r0 * w..(r0 + t) * w;
            cache.write_rows(layer, &k[r.clone()], &v[r], w)?;
            r0 += t;
        }
        Ok(())
    }

    /// The arena and block table of a paged cache.
    #[cfg(feature = "cuda")]
    pub(crate) fn paged_parts(&self) -> Option<(&std::sync::Arc<KvArena>, &[u32])> {
        match &self.store {
            Store::Paged { arena, table } => Some((arena, table)),
            Store::Own { .. } => None,
        }
    }

    #[cfg(feature = "cuda")]
    fn arena(&self) -> Option<&std::sync::Arc<KvArena>> {
        self.paged_parts().map(|p| p.0)
    }

    /// The cross-attention keys and values `layer` keeps as tensors (not moved into
    /// host blocks).
    pub(crate) fn cross_tensors(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.cross.get(layer).and_then(|c| c.as_ref())
    }

    /// Writes host rows and returns everything `layer` holds, them included (tests).
    #[cfg(test)]
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        width: usize,
    ) -> KvView<'_> {
        self.write_rows(layer, k, v, width)
            .expect("blocks for the rows");
        self.view(layer, width, self.len + k.len() / width.max(1))
    }

    /// [`KvCache::write`] of host rows.
    pub(crate) fn write_rows(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        width: usize,
    ) -> Result<()> {
        let t = k.len() / width.max(1);
        match &mut self.store {
            Store::Own { k: ks, v: vs } => {
                ks[layer].extend_from_slice(k);
                vs[layer].extend_from_slice(v);
            }
            Store::Paged { arena, table } => {
                let end = self.len + t;
                if end > table.len() * arena.block_size() {
                    return Err(crate::Error::Kv(format!(
                        "paged KV cache: position {end} past the block table"
                    )));
                }
                if let Some(w) = arena.width(layer).filter(|&w| w != width) {
                    return Err(crate::Error::Kv(format!(
                        "rows of {width} values in a layer of {w}"
                    )));
                }
                arena.write(layer, table, self.len, (k, v), width);
            }
        }
        Ok(())
    }

    /// The first `rows` rows `layer` holds (`len()` plus what this step wrote).
    pub(crate) fn view(&self, layer: usize, width: usize, rows: usize) -> KvView<'_> {
        match &self.store {
            Store::Own { k: ks, v: vs } => KvView::Rows {
                k: &ks[layer][..rows * width],
                v: &vs[layer][..rows * width],
                width,
            },
            Store::Paged { arena, table } => KvView::Paged {
                layer: arena.layers[layer].read().expect("kv arena lock"),
                table,
                block_size: arena.block_size(),
                first: 0,
                len: rows,
            },
        }
    }

    /// Keys and values of `layer`'s first `rows` rows (`len()` plus what this step
    /// wrote), `width` wide, as host f32: for attention the kernels do not cover (T5's
    /// relative-position bias).
    pub fn read(&self, layer: usize, width: usize, rows: usize) -> (Vec<f32>, Vec<f32>) {
        let view = self.view(layer, width, rows);
        let (mut k, mut v) = (
            Vec::with_capacity(rows * width),
            Vec::with_capacity(rows * width),
        );
        for j in 0..rows {
            let (kr, vr) = view.row(j);
            kr.extend_into(&mut k);
            vr.extend_into(&mut v);
        }
        (k, v)
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// Counts `t` positions whose K/V are already in the cache's blocks (a prefix-cache
    /// hit), or, after a step, that every layer has appended.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Drops whatever layers appended beyond `len` (a step that failed half-way); paged
    /// blocks are simply overwritten by the next step.
    pub fn rollback(&mut self, width: usize) {
        let keep = self.len * width;
        if let Store::Own { k, v } = &mut self.store {
            k.iter_mut()
                .chain(v.iter_mut())
                .for_each(|c| c.truncate(keep));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn paged_rows_read_back_through_the_table() {
        let arena = Arc::new(KvArena::new(2, 8, 4));
        // Blocks out of order, as a pool hands them out.
        let mut paged = KvCache::new(2).paged(arena.clone(), vec![5, 2], vec![], 3);
        let mut own = KvCache::new(2);
        let rows = |t: usize, s: f32| -> Vec<f32> { (0..t * 3).map(|i| i as f32 + s).collect() };
        for (step, t) in [6usize, 1, 1].into_iter().enumerate() {
            if paged.len() + t > paged.capacity() {
                paged.push_block(7);
            }
            for layer in 0..2 {
                let s = (step * 10 + layer) as f32 * 100.0;
                let (k, v) = (rows(t, s), rows(t, s + 50.0));
                let a: Vec<_> = {
                    let view = paged.append(layer, &k, &v, 3);
                    (0..view.len())
                        .map(|j| (view.row(j).0.to_vec(), view.row(j).1.to_vec()))
                        .collect()
                };
                let view = own.append(layer, &k, &v, 3);
                let b: Vec<_> = (0..view.len())
                    .map(|j| (view.row(j).0.to_vec(), view.row(j).1.to_vec()))
                    .collect();
                assert_eq!(a, b);
            }
            paged.advance(t);
            own.advance(t);
        }
        assert_eq!(paged.len(), 8);
        // Another sequence sharing the first block reads the same rows.
        let mut other = KvCache::new(2).paged(arena, vec![5, 3], vec![], 3);
        other.advance(4);
        let view = other.append(0, &[9.0; 3], &[9.0; 3], 3);
        let view_own = own.append(0, &[], &[], 3);
        for j in 0..4 {
            assert_eq!(view.row(j), view_own.row(j));
        }
        assert_eq!(view.row(4).0.to_vec(), &[9.0; 3]);
    }

    #[test]
    fn cross_attention_rows_move_into_the_arena() {
        let arena = Arc::new(KvArena::new(2, 8, 4));
        let mut own = KvCache::new(2);
        let k: Vec<f32> = (0..6 * 3).map(|i| i as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        let t = |x: &Vec<f32>| Tensor::from_f32(x.clone(), &[6, 3]).unwrap();
        own.set_cross(1, t(&k), t(&v)).unwrap();
        assert_eq!(own.cross_rows_max(3), Some(6));
        let rows = |c: &KvCache| -> Vec<(Vec<f32>, Vec<f32>)> {
            let view = c.cross(1, 3).unwrap().rows(2..5);
            (0..view.len())
                .map(|j| (view.row(j).0.to_vec(), view.row(j).1.to_vec()))
                .collect()
        };
        let want = rows(&own);
        let paged = own.paged(arena, vec![0], vec![6, 3], 3);
        assert_eq!(paged.cross_floats(), 0, "moved out of the sequence");
        assert_eq!(rows(&paged), want);
        assert!(paged.cross(0, 3).is_none());
    }
}
