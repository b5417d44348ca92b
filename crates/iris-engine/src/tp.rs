//! The step protocol of a tensor-parallel group: rank 0 runs the engine — scheduler,
//! block accounting, prefix cache, sampling — over [`TpLeader`], a model that, before
//! each call into the sharded language model, broadcasts what the call is (the ids, the
//! embeddings, every sequence's block table and length, an image's visual tokens);
//! every other rank runs [`follow`], which makes the same call on its own shard, in the
//! same order, so the collectives inside meet. Each rank keeps its shard of every
//! sequence's K/V in its own arena under the same block ids; only rank 0 decides them.
//! Vision and connector stay on rank 0 (they are not split).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use iris_comm::Communicator;
use iris_models::config::{ImageSize, ImageTokens};
use iris_models::layers::{KvArena, KvCache, KvDtype};
use iris_models::vlm::{CausalLm, VisionLanguageModel};
use iris_tensor::{DType, Tensor};

use crate::{Error, Result};

/// What the leader asks of every rank.
#[derive(Debug)]
enum Msg {
    Arena {
        blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    },
    Condition {
        cache: u64,
        ids: Vec<u32>,
        images: Vec<Tensor>,
    },
    InputEmbeds {
        ids: Vec<u32>,
        images: Vec<Tensor>,
    },
    Embed {
        ids: Vec<u32>,
    },
    Forward {
        dropped: Vec<u64>,
        seqs: Vec<SeqState>,
        embeds: Vec<Tensor>,
    },
    Logits {
        hidden: Tensor,
    },
    Stop,
}

/// A sequence's cache as the leader has it before a step.
#[derive(Debug)]
struct SeqState {
    id: u64,
    /// `None`: the sequence keeps its own buffers (not paged).
    tables: Option<(Vec<u32>, Vec<u32>)>,
    len: usize,
}

// ------------------------------------------------------------------ encoding

#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32s(&mut self, v: &[u32]) {
        self.u64(v.len() as u64);
        v.iter()
            .for_each(|x| self.0.extend_from_slice(&x.to_le_bytes()));
    }
    fn tensor(&mut self, t: &Tensor) -> Result<()> {
        let t = t.to_dtype(DType::F32)?;
        self.u64(t.rank() as u64);
        t.shape().iter().for_each(|&d| self.u64(d as u64));
        let bytes = t.to_le_bytes()?;
        self.u64(bytes.len() as u64);
        self.0.extend_from_slice(&bytes);
        Ok(())
    }
    fn tensors(&mut self, ts: &[Tensor]) -> Result<()> {
        self.u64(ts.len() as u64);
        ts.iter().try_for_each(|t| self.tensor(t))
    }
}

struct R<'a>(&'a [u8]);

fn short() -> Error {
    Error::Input("tensor-parallel message cut short".into())
}

impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(short());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| short())?,
        ))
    }
    fn len(&mut self, each: usize) -> Result<usize> {
        let n = self.u64()? as usize;
        if n.saturating_mul(each) > self.0.len() {
            return Err(short());
        }
        Ok(n)
    }
    fn u32s(&mut self) -> Result<Vec<u32>> {
        let n = self.len(4)?;
        Ok(self
            .take(4 * n)?
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
    fn tensor(&mut self) -> Result<Tensor> {
        let rank = self.len(8)?;
        let shape = (0..rank)
            .map(|_| self.u64().map(|d| d as usize))
            .collect::<Result<Vec<_>>>()?;
        let n = self.len(1)?;
        Ok(Tensor::from_le_bytes(self.take(n)?, DType::F32, &shape)?)
    }
    fn tensors(&mut self) -> Result<Vec<Tensor>> {
        let n = self.len(8)?;
        (0..n).map(|_| self.tensor()).collect()
    }
}

impl Msg {
    fn encode(&self) -> Result<Vec<u8>> {
        let mut w = W::default();
        match self {
            Msg::Arena {
                blocks,
                block_size,
                dtype,
            } => {
                w.u64(1);
                w.u64(*blocks as u64);
                w.u64(*block_size as u64);
                w.u64(matches!(dtype, KvDtype::Bf16) as u64);
            }
            Msg::Condition { cache, ids, images } => {
                w.u64(2);
                w.u64(*cache);
                w.u32s(ids);
                w.tensors(images)?;
            }
            Msg::InputEmbeds { ids, images } => {
                w.u64(3);
                w.u32s(ids);
                w.tensors(images)?;
            }
            Msg::Embed { ids } => {
                w.u64(4);
                w.u32s(ids);
            }
            Msg::Forward {
                dropped,
                seqs,
                embeds,
            } => {
                w.u64(5);
                w.u64(dropped.len() as u64);
                dropped.iter().for_each(|&d| w.u64(d));
                w.u64(seqs.len() as u64);
                for s in seqs {
                    w.u64(s.id);
                    w.u64(s.len as u64);
                    match &s.tables {
                        Some((t, c)) => {
                            w.u64(1);
                            w.u32s(t);
                            w.u32s(c);
                        }
                        None => w.u64(0),
                    }
                }
                w.tensors(embeds)?;
            }
            Msg::Logits { hidden } => {
                w.u64(6);
                w.tensor(hidden)?;
            }
            Msg::Stop => w.u64(7),
        }
        Ok(w.0)
    }

    fn decode(b: &[u8]) -> Result<Msg> {
        let mut r = R(b);
        Ok(match r.u64()? {
            1 => Msg::Arena {
                blocks: r.u64()? as usize,
                block_size: r.u64()? as usize,
                dtype: if r.u64()? == 1 {
                    KvDtype::Bf16
                } else {
                    KvDtype::F32
                },
            },
            2 => Msg::Condition {
                cache: r.u64()?,
                ids: r.u32s()?,
                images: r.tensors()?,
            },
            3 => Msg::InputEmbeds {
                ids: r.u32s()?,
                images: r.tensors()?,
            },
            4 => Msg::Embed { ids: r.u32s()? },
            5 => {
                let n = r.len(8)?;
                let dropped = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
                let n = r.len(24)?;
                let seqs = (0..n)
                    .map(|_| {
                        let id = r.u64()?;
                        let len = r.u64()? as usize;
                        let tables = match r.u64()? {
                            1 => Some((r.u32s()?, r.u32s()?)),
                            _ => None,
                        };
                        Ok(SeqState { id, tables, len })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Msg::Forward {
                    dropped,
                    seqs,
                    embeds: r.tensors()?,
                }
            }
            6 => Msg::Logits {
                hidden: r.tensor()?,
            },
            7 => Msg::Stop,
            k => return Err(Error::Input(format!("tensor-parallel message of kind {k}"))),
        })
    }
}

// ------------------------------------------------------------------ the leader

/// Rank 0's model: the rank's own shards, with every language-model call announced to
/// the other ranks first (one call at a time).
#[derive(Debug)]
pub struct TpLeader {
    inner: Arc<dyn VisionLanguageModel>,
    lm: Arc<TpLeaderLm>,
}

/// Whether a group can still serve. It breaks once, for good: a collective failed, a
/// rank was found gone between steps (the leader looks every [`CHECK_EVERY`]), or the
/// caller saw a rank leave (its etcd registration expired). A broken group refuses
/// every call at once (UNAVAILABLE) instead of waiting on a rank that will not come.
#[derive(Debug, Default)]
pub struct GroupHealth {
    broken: Mutex<Option<String>>,
}

impl GroupHealth {
    /// Why the group broke, if it did.
    pub fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .map_or(Some("poisoned".into()), |b| b.clone())
    }

    /// Breaks the group (the first reason stays).
    pub fn fail(&self, why: impl Into<String>) {
        if let Ok(mut b) = self.broken.lock() {
            if b.is_none() {
                let why = why.into();
                tracing::error!("the tensor-parallel group broke: {why}");
                *b = Some(why);
            }
        }
    }
}

/// How often an idle leader looks whether its ranks are still there.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Debug)]
struct TpLeaderLm {
    inner: Arc<dyn VisionLanguageModel>,
    comm: Arc<dyn Communicator>,
    /// Held from a call's announcement to its end: the ranks see calls in the order
    /// their collectives run.
    order: Mutex<()>,
    /// Ids of dropped caches, for the next step's message.
    drops: Mutex<std::sync::mpsc::Receiver<u64>>,
    health: Arc<GroupHealth>,
}

impl TpLeader {
    /// `inner` is rank 0's model (loaded with `comm`).
    pub fn new(inner: Box<dyn VisionLanguageModel>, comm: Arc<dyn Communicator>) -> TpLeader {
        let inner: Arc<dyn VisionLanguageModel> = Arc::from(inner);
        let lm = Arc::new(TpLeaderLm {
            inner: inner.clone(),
            comm,
            order: Mutex::new(()),
            drops: Mutex::new(KvCache::drops()),
            health: Arc::new(GroupHealth::default()),
        });
        // Between calls, look whether the ranks are still there; ends with the leader.
        let watched = Arc::downgrade(&lm);
        let _ = std::thread::Builder::new()
            .name("iris-tp-watch".into())
            .spawn(move || loop {
                std::thread::sleep(CHECK_EVERY);
                let Some(lm) = watched.upgrade() else { return };
                if lm.health.broken().is_some() {
                    return;
                }
                // Not during a call: its collectives report a gone rank themselves.
                let call = lm.order.try_lock();
                if call.is_ok() {
                    if let Err(e) = lm.comm.check() {
                        lm.health.fail(e.to_string());
                    }
                }
                drop(call);
            });
        TpLeader { lm, inner }
    }

    /// The group's health (shared: a caller may break it too).
    pub fn health(&self) -> Arc<GroupHealth> {
        self.lm.health.clone()
    }

    /// Tells the other ranks to return from [`follow`] (also done when dropped; a
    /// broken group has no one to tell).
    pub fn stop(&self) -> Result<()> {
        if self.lm.health.broken().is_some() {
            return Ok(());
        }
        self.lm.announce(&Msg::Stop, || Ok(()))
    }
}

impl Drop for TpLeader {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("stopping the tensor-parallel ranks: {e}");
        }
    }
}

impl TpLeaderLm {
    fn lm(&self) -> Result<&dyn CausalLm> {
        Ok(self.inner.language_model()?)
    }

    /// Broadcasts `msg`, then runs `f` (this rank's part of the same call).
    fn announce<T>(&self, msg: &Msg, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _order = self
            .order
            .lock()
            .map_err(|_| Error::Input("tensor-parallel leader poisoned".into()))?;
        if let Some(why) = self.health.broken() {
            return Err(Error::Unavailable(format!(
                "the tensor-parallel group is broken: {why}"
            )));
        }
        let bytes = msg.encode()?;
        let sent = self.comm.broadcast_bytes(&bytes, 0);
        if let Err(e) = &sent {
            self.health.fail(e.to_string());
        }
        sent.map_err(iris_models::Error::from)?;
        let out = f();
        // A collective inside the call failed: the ranks are out of step for good.
        if let Err(Error::Model(iris_models::Error::Comm(e))) = &out {
            self.health.fail(e.to_string());
        }
        out
    }
}

impl CausalLm for TpLeaderLm {
    fn new_cache(&self) -> KvCache {
        self.lm().map(|l| l.new_cache()).unwrap_or_default()
    }

    fn kv_width(&self) -> usize {
        self.lm().map_or(0, |l| l.kv_width())
    }

    fn embed(&self, ids: &[u32]) -> iris_models::Result<Tensor> {
        let msg = Msg::Embed { ids: ids.to_vec() };
        self.announce(&msg, || Ok(self.lm()?.embed(ids)?))
            .map_err(into_model)
    }

    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> iris_models::Result<Tensor> {
        Ok(self.forward_batch(&[embeds], &mut [cache])?.remove(0))
    }

    fn logits(&self, hidden: &Tensor) -> iris_models::Result<Tensor> {
        let msg = Msg::Logits {
            hidden: hidden.clone(),
        };
        self.announce(&msg, || Ok(self.lm()?.logits(hidden)?))
            .map_err(into_model)
    }

    fn forward_batch(
        &self,
        embeds: &[&Tensor],
        caches: &mut [&mut KvCache],
    ) -> iris_models::Result<Vec<Tensor>> {
        let seqs = caches
            .iter()
            .map(|c| SeqState {
                id: c.id(),
                tables: c.tables().map(|(t, x)| (t.to_vec(), x.to_vec())),
                len: c.len(),
            })
            .collect();
        let dropped = self
            .drops
            .lock()
            .map(|d| d.try_iter().collect())
            .unwrap_or_default();
        let msg = Msg::Forward {
            dropped,
            seqs,
            embeds: embeds.iter().map(|&e| e.clone()).collect(),
        };
        self.announce(&msg, || Ok(self.lm()?.forward_batch(embeds, caches)?))
            .map_err(into_model)
    }
}

fn into_model(e: Error) -> iris_models::Error {
    match e {
        Error::Model(m) => m,
        Error::Tensor(t) => iris_models::Error::Tensor(t),
        other => iris_models::Error::Config(other.to_string()),
    }
}

impl VisionLanguageModel for TpLeader {
    fn image_features(&self, pixel_values: &Tensor) -> iris_models::Result<Tensor> {
        self.inner.image_features(pixel_values)
    }
    fn image_features_batch(&self, pv: &[&Tensor]) -> iris_models::Result<Vec<Tensor>> {
        self.inner.image_features_batch(pv)
    }
    fn connect(&self, features: &Tensor, size: ImageSize) -> iris_models::Result<Tensor> {
        self.inner.connect(features, size)
    }
    fn image_token_id(&self) -> u32 {
        self.inner.image_token_id()
    }
    fn image_tokens(&self) -> ImageTokens {
        self.inner.image_tokens()
    }
    fn decoder_prompt(&self, input_ids: &[u32]) -> Vec<u32> {
        self.inner.decoder_prompt(input_ids)
    }
    fn feature_shape(&self, size: ImageSize) -> [usize; 2] {
        self.inner.feature_shape(size)
    }
    fn visual_shape(&self, size: ImageSize) -> [usize; 2] {
        self.inner.visual_shape(size)
    }
    fn language_model(&self) -> iris_models::Result<&dyn CausalLm> {
        self.inner.language_model()?;
        Ok(&*self.lm)
    }
    fn dtype(&self) -> DType {
        self.inner.dtype()
    }
    fn prepare_kv(
        &self,
        blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> iris_models::Result<()> {
        let msg = Msg::Arena {
            blocks,
            block_size,
            dtype,
        };
        self.lm.announce(&msg, || Ok(())).map_err(into_model)
    }
    fn condition(
        &self,
        cache: &mut KvCache,
        input_ids: &[u32],
        images: &[Tensor],
    ) -> iris_models::Result<()> {
        let msg = Msg::Condition {
            cache: cache.id(),
            ids: input_ids.to_vec(),
            images: images.to_vec(),
        };
        self.lm
            .announce(&msg, || {
                Ok(self.inner.condition(cache, input_ids, images)?)
            })
            .map_err(into_model)
    }
    fn input_embeds(&self, ids: &[u32], images: &[Tensor]) -> iris_models::Result<Tensor> {
        // The merge embeds the prompt's ids (a collective): the other ranks run it too.
        let msg = Msg::InputEmbeds {
            ids: ids.to_vec(),
            images: images.to_vec(),
        };
        self.lm
            .announce(&msg, || Ok(self.inner.input_embeds(ids, images)?))
            .map_err(into_model)
    }
}

// ------------------------------------------------------------------ the followers

/// A rank other than 0: runs the calls rank 0 announces on `model` (its shards, on
/// `device`) until rank 0 stops, keeping each sequence's cache under rank 0's id.
pub fn follow(
    model: &dyn VisionLanguageModel,
    comm: &dyn Communicator,
    device: iris_tensor::Device,
) -> Result<()> {
    let lm = model.language_model()?;
    let mut arena: Option<Arc<KvArena>> = None;
    let mut caches: HashMap<u64, KvCache> = HashMap::new();
    loop {
        let bytes = comm
            .broadcast_bytes(&[], 0)
            .map_err(iris_models::Error::from)?;
        match Msg::decode(&bytes)? {
            Msg::Stop => return Ok(()),
            Msg::Arena {
                blocks,
                block_size,
                dtype,
            } => {
                let n_layers = lm.new_cache().n_layers();
                arena = Some(Arc::new(KvArena::reserved_on(
                    n_layers,
                    blocks,
                    block_size,
                    lm.kv_width(),
                    dtype,
                    device,
                )?));
            }
            Msg::Condition { cache, ids, images } => {
                let c = caches.entry(cache).or_insert_with(|| lm.new_cache());
                model.condition(c, &ids, &images)?;
            }
            Msg::InputEmbeds { ids, images } => {
                model.input_embeds(&ids, &images)?;
            }
            Msg::Embed { ids } => {
                lm.embed(&ids)?;
            }
            Msg::Logits { hidden } => {
                lm.logits(&hidden)?;
            }
            Msg::Forward {
                dropped,
                seqs,
                embeds,
            } => {
                for id in dropped {
                    caches.remove(&id);
                }
                for s in &seqs {
                    let c = caches.entry(s.id).or_insert_with(|| lm.new_cache());
                    if let Some((table, cross)) = &s.tables {
                        if c.tables().is_none() {
                            let a = arena.clone().ok_or_else(|| {
                                Error::Input("a paged sequence before the arena".into())
                            })?;
                            *c = std::mem::take(c).paged(
                                a,
                                table.clone(),
                                cross.clone(),
                                lm.kv_width(),
                            );
                        }
                        c.mirror(table, s.len);
                    } else {
                        c.mirror(&[], s.len);
                    }
                }
                // Each sequence's cache once, in the leader's order.
                let mut taken: Vec<(u64, KvCache)> = seqs
                    .iter()
                    .map(|s| (s.id, caches.remove(&s.id).unwrap_or_default()))
                    .collect();
                let refs: Vec<&Tensor> = embeds.iter().collect();
                let mut cache_refs: Vec<&mut KvCache> = taken.iter_mut().map(|(_, c)| c).collect();
                let run = lm.forward_batch(&refs, &mut cache_refs);
                for (id, c) in taken {
                    caches.insert(id, c);
                }
                run?;
            }
        }
    }
}
