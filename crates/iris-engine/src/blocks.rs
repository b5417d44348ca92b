//! The KV block pool of the paged cache (Kwon et al., 2023, "PagedAttention"), with
//! prefix caching: fixed-size blocks, reference counts, a free list, and full blocks
//! keyed by a hash chain over their contents, where an image position contributes the
//! image's content hash, so the same image at the same place reuses blocks and a
//! different image of the same size never does. Unreferenced cached blocks stay
//! reusable until memory is needed, then go least recently used first.
//!
//! This is the allocator the scheduler and the attention's block tables build on.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

pub type BlockId = u32;

/// One position of a block's contents: a text token, or an image position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKey {
    Text(u32),
    /// The `index`-th visual token of the image with this content hash.
    Image {
        hash: [u8; 32],
        index: u32,
    },
}

/// The chained hash of a full block: its parent's hash and its contents.
pub fn block_hash(parent: Option<u64>, contents: &[TokenKey]) -> u64 {
    // SipHash with fixed keys: stable within and across runs of the same binary.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    contents.hash(&mut h);
    h.finish()
}

/// The hash chain of a prompt's first `blocks` full blocks of `block_size` tokens: it
/// starts from the images' content hashes ([`crate::engine::visual_hash`] of their
/// visual tokens), so a block is shared only between sequences with the same images
/// and the same tokens up to and including it. The engine keys its prefix cache by it;
/// a gateway computes the same chain to route a request to the decoder holding the
/// longest prefix of it.
pub fn chain_hashes(
    image_hashes: &[[u8; 32]],
    tokens: &[u32],
    block_size: usize,
    blocks: usize,
) -> Vec<u64> {
    let mut parent = Some(block_hash(
        None,
        &image_hashes
            .iter()
            .map(|h| TokenKey::Image { hash: *h, index: 0 })
            .collect::<Vec<_>>(),
    ));
    let blocks = blocks.min(tokens.len() / block_size.max(1));
    (0..blocks)
        .map(|b| {
            let keys: Vec<TokenKey> = tokens[b * block_size..(b + 1) * block_size]
                .iter()
                .map(|&t| TokenKey::Text(t))
                .collect();
            let h = block_hash(parent, &keys);
            parent = Some(h);
            h
        })
        .collect()
}

/// A change to the set of prefix blocks an engine holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrefixDelta {
    /// Everything held now (a subscriber's first message, and after the engine
    /// started over with a fresh pool).
    Snapshot(Vec<u64>),
    Changed {
        stored: Vec<u64>,
        removed: Vec<u64>,
    },
}

/// The prefix-block hashes an engine holds (cached full blocks, referenced or not),
/// for subscribers that route by them (the gateways' KV-aware routing): each gets a
/// snapshot, then every change, as events — never a poll.
#[derive(Debug)]
pub struct PrefixIndex {
    block_size: usize,
    inner: Mutex<PrefixInner>,
}

#[derive(Debug, Default)]
struct PrefixInner {
    held: std::collections::HashSet<u64>,
    subscribers: Vec<tokio::sync::mpsc::UnboundedSender<PrefixDelta>>,
}

impl PrefixIndex {
    pub fn new(block_size: usize) -> PrefixIndex {
        PrefixIndex {
            block_size,
            inner: Mutex::new(PrefixInner::default()),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// A snapshot now, then every change, until the receiver is dropped.
    pub fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<PrefixDelta> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut g = self.inner.lock().expect("prefix index lock");
        let _ = tx.send(PrefixDelta::Snapshot(g.held.iter().copied().collect()));
        g.subscribers.push(tx);
        rx
    }

    fn publish(g: &mut PrefixInner, d: PrefixDelta) {
        g.subscribers.retain(|s| s.send(d.clone()).is_ok());
    }

    pub(crate) fn apply(&self, stored: Vec<u64>, removed: Vec<u64>) {
        if stored.is_empty() && removed.is_empty() {
            return;
        }
        let mut g = self.inner.lock().expect("prefix index lock");
        removed.iter().for_each(|h| {
            g.held.remove(h);
        });
        g.held.extend(stored.iter().copied());
        PrefixIndex::publish(&mut g, PrefixDelta::Changed { stored, removed });
    }

    pub(crate) fn reset(&self) {
        let mut g = self.inner.lock().expect("prefix index lock");
        g.held.clear();
        PrefixIndex::publish(&mut g, PrefixDelta::Snapshot(Vec::new()));
    }

    /// Whether `hash` is held now.
    pub fn holds(&self, hash: u64) -> bool {
        self.inner
            .lock()
            .expect("prefix index lock")
            .held
            .contains(&hash)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    #[error("out of KV blocks")]
    Exhausted,
    #[error("block {0} is not allocated")]
    NotAllocated(BlockId),
}

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    refcount: Vec<u32>,
    free: Vec<BlockId>,
    /// Cached (full, hashed) blocks: hash → block, and each block's hash.
    by_hash: HashMap<u64, BlockId>,
    hash_of: Vec<Option<u64>>,
    /// Unreferenced cached blocks by last use, oldest first.
    evictable: BTreeMap<u64, BlockId>,
    last_use: Vec<u64>,
    clock: u64,
    pub hits: u64,
    pub misses: u64,
    /// Hashes whose cached block `allocate` evicted since the last `take_evicted`.
    evicted: Vec<u64>,
    /// Hashes newly cached since the last `take_stored`.
    stored: Vec<u64>,
}

impl BlockPool {
    pub fn new(n_blocks: usize, block_size: usize) -> BlockPool {
        BlockPool {
            block_size,
            refcount: vec![0; n_blocks],
            free: (0..n_blocks as BlockId).rev().collect(),
            by_hash: HashMap::new(),
            hash_of: vec![None; n_blocks],
            evictable: BTreeMap::new(),
            last_use: vec![0; n_blocks],
            clock: 0,
            hits: 0,
            misses: 0,
            evicted: Vec::new(),
            stored: Vec::new(),
        }
    }

    /// The hashes newly cached since the last call.
    pub fn take_stored(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.stored)
    }

    /// The hashes evicted since the last call (so their cached contents can be dropped).
    pub fn take_evicted(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.evicted)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks an allocation can get: free ones and unreferenced cached ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn refcount(&self, id: BlockId) -> u32 {
        self.refcount[id as usize]
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// A fresh block (refcount 1); evicts the least recently used cached block when
    /// nothing is free.
    pub fn allocate(&mut self) -> Result<BlockId, BlockError> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (&t, &id) = self.evictable.iter().next().ok_or(BlockError::Exhausted)?;
                self.evictable.remove(&t);
                if let Some(h) = self.hash_of[id as usize].take() {
                    self.by_hash.remove(&h);
                    self.evicted.push(h);
                }
                id
            }
        };
        debug_assert_eq!(self.refcount[id as usize], 0);
        self.refcount[id as usize] = 1;
        Ok(id)
    }

    /// Another owner of `id` (a forked or prefix-sharing sequence).
    pub fn retain(&mut self, id: BlockId) -> Result<(), BlockError> {
        match self.refcount.get_mut(id as usize) {
            Some(c) if *c > 0 => {
                *c += 1;
                Ok(())
            }
            _ => Err(BlockError::NotAllocated(id)),
        }
    }

    /// One owner gives `id` up; at zero a cached block becomes evictable, others free.
    pub fn release(&mut self, id: BlockId) -> Result<(), BlockError> {
        let c = match self.refcount.get_mut(id as usize) {
            Some(c) if *c > 0 => c,
            _ => return Err(BlockError::NotAllocated(id)),
        };
        *c -= 1;
        if *c == 0 {
            if self.hash_of[id as usize].is_some() {
                let t = self.tick();
                self.last_use[id as usize] = t;
                self.evictable.insert(t, id);
            } else {
                self.free.push(id);
            }
        }
        Ok(())
    }

    /// Whether a block with this hash is cached (no owner taken).
    pub fn contains(&self, hash: u64) -> bool {
        self.by_hash.contains_key(&hash)
    }

    /// A cached block with this hash, now owned once more by the caller (a hit).
    pub fn lookup(&mut self, hash: u64) -> Option<BlockId> {
        let Some(&id) = self.by_hash.get(&hash) else {
            self.misses += 1;
            return None;
        };
        if self.refcount[id as usize] == 0 {
            self.evictable.remove(&self.last_use[id as usize]);
        }
        self.refcount[id as usize] += 1;
        self.hits += 1;
        Some(id)
    }

    /// Marks a full, allocated block as holding the contents `hash` names. A hash
    /// already cached keeps its block; this one stays private.
    pub fn register(&mut self, id: BlockId, hash: u64) -> Result<(), BlockError> {
        if self.refcount.get(id as usize).is_none_or(|&c| c == 0) {
            return Err(BlockError::NotAllocated(id));
        }
        if self.hash_of[id as usize].is_none() && !self.by_hash.contains_key(&hash) {
            self.by_hash.insert(hash, id);
            self.hash_of[id as usize] = Some(hash);
            self.stored.push(hash);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut s = seed;
        move |n| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % n
        }
    }

    /// Random allocate / retain / release / register / lookup sequences against a model
    /// of who owns what: no block is handed out while owned, refcounts equal the owners
    /// held, nothing leaks, and releasing everything returns every block.
    #[test]
    fn allocator_invariants_hold_under_random_operations() {
        for seed in 0..20 {
            let mut r = rng(seed);
            let mut pool = BlockPool::new(16, 4);
            let mut owned: Vec<BlockId> = Vec::new(); // one entry per reference held
            for _ in 0..3000 {
                match r(5) {
                    0 => match pool.allocate() {
                        Ok(id) => {
                            assert!(
                                !owned.contains(&id),
                                "seed {seed}: block {id} handed out while owned"
                            );
                            owned.push(id);
                        }
                        Err(e) => {
                            assert_eq!(e, BlockError::Exhausted);
                            assert_eq!(pool.available(), 0);
                        }
                    },
                    1 if !owned.is_empty() => {
                        let id = owned[r(owned.len() as u64) as usize];
                        pool.retain(id).unwrap();
                        owned.push(id);
                    }
                    2 if !owned.is_empty() => {
                        let id = owned.swap_remove(r(owned.len() as u64) as usize);
                        pool.release(id).unwrap();
                    }
                    3 if !owned.is_empty() => {
                        let id = owned[r(owned.len() as u64) as usize];
                        pool.register(id, r(8)).unwrap();
                    }
                    4 => {
                        if let Some(id) = pool.lookup(r(8)) {
                            owned.push(id);
                        }
                    }
                    _ => {}
                }
                for id in 0..16 {
                    let held = owned.iter().filter(|&&o| o == id).count() as u32;
                    assert_eq!(pool.refcount(id), held, "seed {seed}: refcount of {id}");
                }
                let in_use = (0..16).filter(|&id| pool.refcount(id) > 0).count();
                assert_eq!(in_use + pool.available(), 16, "seed {seed}: a block leaked");
            }
            for id in owned.drain(..) {
                pool.release(id).unwrap();
            }
            assert_eq!(pool.available(), 16);
            assert!(pool.release(0).is_err(), "double release is refused");
        }
    }

    #[test]
    fn prefix_blocks_are_shared_and_images_keep_them_apart() {
        let mut pool = BlockPool::new(4, 2);
        let img = |b: u8| TokenKey::Image {
            hash: [b; 32],
            index: 0,
        };
        let a = block_hash(None, &[TokenKey::Text(1), img(7)]);
        let same = block_hash(None, &[TokenKey::Text(1), img(7)]);
        let other_image = block_hash(None, &[TokenKey::Text(1), img(8)]);
        assert_eq!(a, same);
        assert_ne!(a, other_image);
        assert_ne!(
            block_hash(Some(a), &[TokenKey::Text(2)]),
            block_hash(Some(other_image), &[TokenKey::Text(2)])
        );

        let b = pool.allocate().unwrap();
        pool.register(b, a).unwrap();
        pool.release(b).unwrap();
        assert_eq!(pool.lookup(same), Some(b), "same image, same place: a hit");
        assert_eq!(
            pool.lookup(other_image),
            None,
            "a different image never hits"
        );
        assert_eq!((pool.hits, pool.misses), (1, 1));
        pool.release(b).unwrap();
        // Under pressure the cached block is evicted (least recently used) and reused.
        let all: Vec<BlockId> = (0..4).map(|_| pool.allocate().unwrap()).collect();
        assert!(all.contains(&b));
        assert_eq!(pool.lookup(a), None, "evicted");
        assert_eq!(pool.allocate(), Err(BlockError::Exhausted));
    }
}
