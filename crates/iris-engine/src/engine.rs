//! The serving loop: an actor thread that owns the running batch. Requests arrive on a
//! bounded channel; each step admits waiting requests first-in first-out while KV blocks
//! last (prefilling each), then decodes one token for every running request in a single
//! batched forward pass (continuous batching: a request joins at the next step and
//! leaves when done). Each request streams its tokens on its own channel; dropping the
//! receiver cancels it and frees its blocks at the next step. When blocks run out, the
//! newest running request is preempted: its blocks are freed and it is recomputed later
//! from its prompt plus the tokens it already produced, continuing exactly as it would
//! have, since each draw depends on (seed, position) only.
//!
//! KV blocks are accounted in a `BlockPool` (admission, growth, preemption); the K/V
//! themselves still live in each sequence's contiguous `KvCache`.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use iris_models::layers::KvCache;
use iris_tensor::Tensor;

use crate::blocks::{block_hash, BlockId, BlockPool, TokenKey};
use crate::pipeline::{FinishReason, GenerateOptions, Pipeline};
use crate::processor::PreparedPrompt;
use crate::sampler::Sampler;
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most requests decoded together.
    pub max_batch: usize,
    /// KV budget, in blocks of `block_size` tokens.
    pub kv_blocks: usize,
    pub block_size: usize,
    /// Requests waiting to be admitted before `submit` reports the queue full.
    pub queue: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 16,
            kv_blocks: 4096,
            block_size: 16,
            queue: 256,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: String,
    pub images: Vec<Vec<u8>>,
    pub options: GenerateOptions,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    Token { id: u32, logprob: f32 },
    Finished { reason: FinishReason, text: String },
    Error(String),
}

/// Counters the engine keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub free_blocks: usize,
    pub preemptions: usize,
    pub cancelled: usize,
    pub finished: usize,
    pub steps: usize,
    /// Prompt blocks reused from the prefix cache.
    pub prefix_hits: u64,
}

/// One cached block's keys and values, per layer.
type BlockKv = Vec<(Vec<f32>, Vec<f32>)>;

struct Submission {
    request: EngineRequest,
    events: SyncSender<TokenEvent>,
}

struct Sequence {
    submission: Submission,
    /// BLAKE3 of each image's bytes: part of every block hash.
    image_hashes: Vec<[u8; 32]>,
    prepared: PreparedPrompt,
    visual: Vec<Tensor>,
    output: Vec<u32>,
    cache: KvCache,
    blocks: Vec<BlockId>,
    last_hidden: Tensor,
}

pub struct Engine {
    tx: Option<SyncSender<Submission>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<EngineStats>>,
}

impl Engine {
    pub fn start(pipeline: Arc<Pipeline>, config: EngineConfig) -> Engine {
        Engine::start_with(pipeline, config, Vec::new())
            .expect("no initial requests to refuse")
            .0
    }

    /// Starts with `initial` requests already queued, so the first step sees them all
    /// (a batch job; also what makes scheduling deterministic in tests).
    pub fn start_with(
        pipeline: Arc<Pipeline>,
        config: EngineConfig,
        initial: Vec<EngineRequest>,
    ) -> Result<(Engine, Vec<Receiver<TokenEvent>>)> {
        let (tx, rx) = sync_channel(config.queue.max(initial.len()).max(1));
        let mut receivers = Vec::with_capacity(initial.len());
        for request in initial {
            receivers.push(queue(&tx, request)?);
        }
        let stats = Arc::new(Mutex::new(EngineStats {
            free_blocks: config.kv_blocks,
            ..Default::default()
        }));
        let s = stats.clone();
        let thread = std::thread::spawn(move || Worker::new(pipeline, config, rx, s).run());
        Ok((
            Engine {
                tx: Some(tx),
                thread: Some(thread),
                stats,
            },
            receivers,
        ))
    }

    /// Queues a request; its events arrive on the returned receiver. Errors when the
    /// queue is full.
    pub fn submit(&self, request: EngineRequest) -> Result<Receiver<TokenEvent>> {
        queue(self.tx.as_ref().expect("sender lives until drop"), request)
    }

    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().expect("stats lock")
    }
}

fn queue(tx: &SyncSender<Submission>, request: EngineRequest) -> Result<Receiver<TokenEvent>> {
    request.options.sampling.validate().map_err(Error::Input)?;
    // Room for every event a request can produce: the engine never blocks on a client.
    let (events, rx) = sync_channel(request.options.max_new_tokens + 2);
    tx.try_send(Submission { request, events })
        .map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => {
                Error::Input("the request queue is full".into())
            }
            std::sync::mpsc::TrySendError::Disconnected(_) => {
                Error::Input("the engine has stopped".into())
            }
        })?;
    Ok(rx)
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    pipeline: Arc<Pipeline>,
    config: EngineConfig,
    rx: Receiver<Submission>,
    stats: Arc<Mutex<EngineStats>>,
    pool: BlockPool,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// K/V of cached prefix blocks by block hash.
    prefix: HashMap<u64, BlockKv>,
    closed: bool,
}

impl Worker {
    fn new(
        pipeline: Arc<Pipeline>,
        config: EngineConfig,
        rx: Receiver<Submission>,
        stats: Arc<Mutex<EngineStats>>,
    ) -> Self {
        Worker {
            pool: BlockPool::new(config.kv_blocks, config.block_size),
            pipeline,
            config,
            rx,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefix: HashMap::new(),
            closed: false,
        }
    }

    fn stat(&self, f: impl FnOnce(&mut EngineStats)) {
        let mut s = self.stats.lock().expect("stats lock");
        f(&mut s);
        s.free_blocks = self.pool.available();
    }

    fn run(mut self) {
        loop {
            self.receive();
            if self.closed && self.waiting.is_empty() && self.running.is_empty() {
                return;
            }
            self.admit();
            self.step();
            self.stat(|s| s.steps += 1);
        }
    }

    /// New submissions: block when idle, otherwise take what is there.
    fn receive(&mut self) {
        loop {
            let next = if self.running.is_empty() && self.waiting.is_empty() && !self.closed {
                self.rx.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                self.rx.try_recv()
            };
            match next {
                Ok(sub) => self.prepare(sub),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn prepare(&mut self, submission: Submission) {
        let p = &self.pipeline;
        let r = &submission.request;
        let prepared = p.processor.prepare(&r.prompt, &r.images);
        let budget = self.config.kv_blocks * self.config.block_size;
        let fits = |prep: &PreparedPrompt| {
            let need = prep.input_ids.len() + r.options.max_new_tokens + 1;
            if need > budget {
                return Err(Error::Input(format!(
                    "the request needs {need} KV positions, more than the engine's {budget}"
                )));
            }
            Ok(())
        };
        match prepared.and_then(|prep| {
            fits(&prep)?;
            Ok((p.encode_images(&prep)?, prep))
        }) {
            Ok((visual, prepared)) => self.waiting.push_back(Sequence {
                image_hashes: r
                    .images
                    .iter()
                    .map(|b| *blake3::hash(b).as_bytes())
                    .collect(),
                cache: p.model.language_model().new_cache(),
                submission,
                prepared,
                visual,
                output: Vec::new(),
                blocks: Vec::new(),
                last_hidden: Tensor::zeros(&[1, 1]),
            }),
            Err(e) => {
                let _ = submission.events.send(TokenEvent::Error(e.to_string()));
            }
        }
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }

    /// FIFO admission while the batch has room and the prompt's blocks are available;
    /// a preempted request resumes from its prompt plus its output so far.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch {
            let Some(mut seq) = self.waiting.pop_front() else {
                return;
            };
            match self.start(&mut seq) {
                Ok(true) => self.running.push(seq),
                Ok(false) => {
                    // Not enough blocks yet: it stays first in line.
                    self.waiting.push_front(seq);
                    return;
                }
                Err(e) => self.finish_with_error(seq, e),
            }
        }
    }

    /// Block hashes of a sequence's full blocks (prompt then output). The chain starts
    /// from the images' content hashes, so a block is shared only between sequences with
    /// the same images and the same tokens up to and including it.
    fn block_hashes(&self, seq: &Sequence, tokens: &[u32], blocks: usize) -> Vec<u64> {
        let mut parent = Some(block_hash(
            None,
            &seq.image_hashes
                .iter()
                .map(|h| TokenKey::Image { hash: *h, index: 0 })
                .collect::<Vec<_>>(),
        ));
        let bs = self.config.block_size;
        (0..blocks)
            .map(|b| {
                let keys: Vec<TokenKey> = tokens[b * bs..(b + 1) * bs]
                    .iter()
                    .map(|&t| TokenKey::Text(t))
                    .collect();
                let h = block_hash(parent, &keys);
                parent = Some(h);
                h
            })
            .collect()
    }

    /// Takes blocks for a sequence, reusing cached prefix blocks, and prefills what is
    /// not cached. `Ok(false)` when its blocks are not available yet.
    fn start(&mut self, seq: &mut Sequence) -> Result<bool> {
        let tokens: Vec<u32> = seq
            .prepared
            .input_ids
            .iter()
            .chain(&seq.output)
            .copied()
            .collect();
        let total = tokens.len();
        let bs = self.config.block_size;
        // The last token is always computed: its hidden state picks the next token.
        let hashes = self.block_hashes(seq, &tokens, (total - 1) / bs);
        let mut hits = Vec::new();
        for h in &hashes {
            if !self.prefix.contains_key(h) {
                break;
            }
            match self.pool.lookup(*h) {
                Some(id) => hits.push((id, *h)),
                None => break,
            }
        }
        let fresh = self.blocks_for(total + 1) - hits.len();
        if fresh > self.pool.available() {
            for (id, _) in hits {
                self.pool.release(id).expect("just looked up");
            }
            return Ok(false);
        }
        seq.blocks = hits.iter().map(|(id, _)| *id).collect();
        for _ in 0..fresh {
            seq.blocks
                .push(self.pool.allocate().expect("availability checked"));
        }
        for h in self.pool.take_evicted() {
            self.prefix.remove(&h);
        }
        let model = &self.pipeline.model;
        let lm = model.language_model();
        seq.cache = lm.new_cache();
        model.condition(&mut seq.cache, &seq.prepared.input_ids, &seq.visual)?;
        for (_, h) in &hits {
            seq.cache.extend_block(&self.prefix[h], bs);
        }
        let cached = hits.len() * bs;
        let mut embeds = model.input_embeds(&seq.prepared.input_ids, &seq.visual)?;
        if !seq.output.is_empty() {
            embeds = Tensor::cat_rows(&[&embeds, &lm.embed(&seq.output)?])?;
        }
        let rest = embeds.narrow_rows(cached, total - cached)?;
        let h = lm.forward(&rest, &mut seq.cache)?;
        seq.last_hidden = h.narrow_rows(h.rows() - 1, 1)?;
        // Newly computed full blocks become cached prefix blocks.
        let full = self.block_hashes(seq, &tokens, total / bs);
        for (b, h) in full.iter().enumerate().skip(hits.len()) {
            if self.prefix.contains_key(h) {
                continue;
            }
            self.pool
                .register(seq.blocks[b], *h)
                .expect("the sequence owns its blocks");
            let rows = (0..seq.cache.n_layers())
                .map(|l| seq.cache.rows(l, b * bs..(b + 1) * bs))
                .collect();
            self.prefix.insert(*h, rows);
        }
        let hits_now = self.pool.hits;
        self.stat(|s| s.prefix_hits = hits_now);
        Ok(true)
    }

    /// Frees a sequence's blocks; the stats show it before any event is sent, so a
    /// client that saw its stream end sees the blocks back.
    fn release(&mut self, seq: &mut Sequence) {
        for b in seq.blocks.drain(..) {
            self.pool.release(b).expect("the sequence owns its blocks");
        }
        self.stat(|_| {});
    }

    /// A batched step failed: every running request ends with the error.
    fn fail_running(&mut self, e: &Error) {
        let msg = e.to_string();
        for mut seq in std::mem::take(&mut self.running) {
            self.release(&mut seq);
            let _ = seq.submission.events.send(TokenEvent::Error(msg.clone()));
        }
    }

    fn finish_with_error(&mut self, mut seq: Sequence, e: Error) {
        self.release(&mut seq);
        let _ = seq.submission.events.send(TokenEvent::Error(e.to_string()));
    }

    /// Samples every running sequence's next token from its last hidden state, streams
    /// it, retires finished or cancelled sequences, then runs one batched forward pass.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let pipeline = self.pipeline.clone();
        let lm = pipeline.model.language_model();
        let rows: Vec<&Tensor> = self.running.iter().map(|s| &s.last_hidden).collect();
        let logits = match Tensor::cat_rows(&rows)
            .map_err(Error::from)
            .and_then(|h| Ok(lm.logits(&h)?))
        {
            Ok(l) => l,
            Err(e) => {
                self.fail_running(&e);
                return;
            }
        };
        let v = logits.last_dim();
        let all = logits.as_f32().expect("logits are f32");
        let mut keep = Vec::with_capacity(self.running.len());
        for (i, mut seq) in std::mem::take(&mut self.running).into_iter().enumerate() {
            let row = &all[i * v..(i + 1) * v];
            let opts = &seq.submission.request.options;
            let sampler = Sampler::new(opts.sampling);
            let position = seq.prepared.input_ids.len() + seq.output.len();
            let next = sampler.sample(row, position, &seq.prepared.input_ids, &seq.output);
            let logprob = Tensor::log_softmax_row(row)[next as usize];
            seq.output.push(next);
            if seq
                .submission
                .events
                .send(TokenEvent::Token { id: next, logprob })
                .is_err()
            {
                self.release(&mut seq);
                self.stat(|s| s.cancelled += 1);
                continue;
            }
            let reason = if pipeline.eos_token_ids().contains(&next) {
                Some(FinishReason::Eos)
            } else if opts.stop.token_ids.contains(&next) {
                Some(FinishReason::Stop)
            } else if seq.output.len() >= opts.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                let text = pipeline.processor.decode(&seq.output).unwrap_or_default();
                self.release(&mut seq);
                let _ = seq
                    .submission
                    .events
                    .send(TokenEvent::Finished { reason, text });
                self.stat(|s| s.finished += 1);
                continue;
            }
            keep.push(seq);
        }
        self.running = keep;
        // Room for each sequence's next position; preempt the newest when out of blocks.
        let mut i = 0;
        while i < self.running.len() {
            let need = self.blocks_for(self.running[i].cache.len() + 2);
            if self.running[i].blocks.len() < need {
                match self.pool.allocate() {
                    Ok(b) => {
                        self.running[i].blocks.push(b);
                        for h in self.pool.take_evicted() {
                            self.prefix.remove(&h);
                        }
                    }
                    Err(_) => {
                        let mut victim = self.running.pop().expect("non-empty");
                        self.release(&mut victim);
                        self.waiting.push_front(victim);
                        self.stat(|s| s.preemptions += 1);
                        continue;
                    }
                }
            }
            i += 1;
        }
        if self.running.is_empty() {
            return;
        }
        let embeds: Result<Vec<Tensor>> = self
            .running
            .iter()
            .map(|s| Ok(lm.embed(&s.output[s.output.len() - 1..])?))
            .collect();
        let result = embeds.and_then(|embeds| {
            let mut caches: Vec<&mut KvCache> =
                self.running.iter_mut().map(|s| &mut s.cache).collect();
            Ok(lm.forward_batch(&embeds.iter().collect::<Vec<_>>(), &mut caches)?)
        });
        match result {
            Ok(hidden) => {
                for (seq, h) in self.running.iter_mut().zip(hidden) {
                    seq.last_hidden = h;
                }
            }
            Err(e) => self.fail_running(&e),
        }
    }
}
