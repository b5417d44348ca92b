//! The serving loop: an actor thread that owns the running batch. Requests arrive on a
//! bounded channel; each step admits waiting requests first-in first-out while KV blocks
//! last, prefills up to `prefill_chunk` prompt tokens (a long prompt takes several steps,
//! so it never stalls the requests already decoding), then samples and streams a token
//! for every request whose last position is computed and decodes them all in one batched
//! forward pass (continuous batching: a request joins at the next step and leaves when
//! done). Each request streams its events on its own channel; dropping the stream
//! cancels it and frees its blocks at the next step. When blocks run out, the newest
//! running request is preempted: its blocks are freed and it is recomputed later from
//! its prompt plus the tokens it already produced, continuing exactly as it would have,
//! since each draw depends on (seed, position) only.
//!
//! KV memory is paged: a `BlockPool` hands out fixed-size blocks of one shared
//! `KvArena`, each sequence's cache holds its block table, and attention reads K/V
//! through it. Full prompt blocks are registered under a hash chain seeded with the
//! images' BLAKE3 hashes: a later request with the same images and prefix puts those
//! blocks straight into its table (no copy, no recompute). Cross-attention K/V (BLIP's
//! decoder, Flamingo's gated layers) lives in blocks of the same pool too.

use std::collections::{HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use iris_models::config::ImageSize;
use iris_models::vlm::CausalLm;
use iris_tensor::kv::{KvArena, KvCache, KvDtype};
use iris_tensor::Tensor;
use tokio::sync::mpsc;

use crate::blocks::{BlockId, BlockPool, PrefixIndex};
use crate::constrain::{Dead, Grammars, Guide};
use crate::pipeline::{FinishReason, GenerateOptions, Generation, Pipeline};
use crate::processor::PreparedPrompt;
use crate::{Error, ErrorKind, Result};
use iris_tensor::sample::{Draw, Sampler};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most requests running together (prefilling or decoding).
    pub max_batch: usize,
    /// KV budget, in blocks of `block_size` tokens.
    pub kv_blocks: usize,
    pub block_size: usize,
    /// Requests waiting to be admitted before `submit` reports the queue full.
    pub queue: usize,
    /// Prompt tokens prefilled per step, across requests: a long prompt is prefilled in
    /// chunks between decode steps instead of stalling every running request.
    pub prefill_chunk: usize,
    /// A pause after every step: a test hook that makes tiny models decode slowly
    /// enough to kill a decoder mid-stream. Zero in service.
    pub step_delay: std::time::Duration,
    /// Test hook: panic in the first step from step N on (counted from 0) that decodes,
    /// once, mid-way through the batched decode, to show the engine fails that step's requests and goes on.
    /// `None` in service.
    pub panic_at_step: Option<usize>,
    /// How K/V are stored; `None`: the model's dtype (bf16 for a bf16 model, else f32).
    pub kv_dtype: Option<KvDtype>,
    /// Test hook: the engine thread itself dies (a panic outside the guarded step) once
    /// it has run this many steps, to show a dead engine is reported, not hidden.
    /// `None` in service.
    pub die_at_step: Option<usize>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 16,
            kv_blocks: 4096,
            block_size: 16,
            queue: 256,
            prefill_chunk: 512,
            step_delay: std::time::Duration::ZERO,
            panic_at_step: None,
            kv_dtype: None,
            die_at_step: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub prompt: String,
    pub images: Vec<Vec<u8>>,
    pub options: GenerateOptions,
    /// Already tokenized and encoded elsewhere (the gateway and the vision and
    /// connector tiers): `prompt` and `images` are then ignored.
    pub encoded: Option<EncodedPrompt>,
}

impl EngineRequest {
    pub fn new(prompt: impl Into<String>, images: Vec<Vec<u8>>, options: GenerateOptions) -> Self {
        EngineRequest {
            prompt: prompt.into(),
            images,
            options,
            encoded: None,
        }
    }
}

/// A prompt's ids (image placeholders expanded) and its images' visual tokens.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    pub input_ids: Vec<u32>,
    pub visual: Vec<Tensor>,
    /// Tokens the request already produced (it moved here from a decoder that died):
    /// generation continues after them, as it would have.
    pub resume: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// The request left the queue: its blocks are taken and its prefill starts, the
    /// first `cached_tokens` of the prompt from the prefix cache. Sent once, before any
    /// token (a preempted request's later admissions are not announced).
    Admitted {
        cached_tokens: usize,
    },
    /// A token, its logprob (and the top-N when asked) and the text it adds. Text that
    /// could still turn into a stop string, or an incomplete character, is held back
    /// until it cannot.
    Token {
        id: u32,
        logprob: f32,
        top_logprobs: Vec<(u32, f32)>,
        text: String,
    },
    /// The last event of a request that ran: the whole text (cut before a stop string).
    Finished {
        reason: FinishReason,
        text: String,
        prompt_token_ids: Vec<u32>,
        /// Prompt tokens whose K/V came from the prefix cache.
        cached_tokens: usize,
    },
    Error(RequestError),
}

/// Why a request failed: its message, and what kind of failure it is (the request's
/// fault, the server's, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub message: String,
    pub kind: ErrorKind,
}

impl From<&Error> for RequestError {
    fn from(e: &Error) -> Self {
        RequestError {
            message: e.to_string(),
            kind: e.kind(),
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
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
    /// Cached prefix blocks evicted to make room.
    pub prefix_evictions: u64,
    /// Admissions that computed cross-attention K/V from their images (or, for an
    /// encoder-decoder, ran its encoder): once per sequence, again only after it was
    /// preempted.
    pub cross_kv_computed: u64,
    /// Requests running (prefilling or decoding) and waiting, after the last step.
    pub running: usize,
    pub waiting: usize,
    /// Prompt tokens prefilled and tokens decoded, in all.
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    /// Steps that prefilled prompt tokens while other requests were decoding: a long
    /// prompt prefilled in chunks takes one such step a chunk instead of stalling them.
    pub mixed_steps: u64,
    /// Steps that panicked (their requests failed; the engine went on).
    pub failed_steps: u64,
    /// Admissions put off because a running request was prefilling the prompt block
    /// the request needed next (counted at each attempt).
    pub deferred_admissions: u64,
    /// Structured outputs: draws whose token mask was ready when sampling began
    /// (computed beside the forward pass), and draws that computed it then (a
    /// request's first token, after its prefill).
    pub masks_overlapped: u64,
    pub masks_inline: u64,
    /// KV blocks in all, and bytes: the arena, reserved at start, never grows.
    pub total_blocks: usize,
    pub kv_bytes: usize,
    /// Bytes of one block across the layers.
    pub block_bytes: usize,
}

/// A request's events, as an async stream (`futures_core::Stream`, or `next().await`)
/// or blocking (`blocking_next`, iteration). Dropping it, or `cancel`, ends the request
/// at the engine's next step and frees its blocks.
pub struct TokenStream {
    rx: mpsc::Receiver<TokenEvent>,
    cancel: Arc<AtomicBool>,
}

impl TokenStream {
    pub async fn next(&mut self) -> Option<TokenEvent> {
        self.rx.recv().await
    }

    /// The next event if one is there already.
    pub fn try_next(&mut self) -> Option<TokenEvent> {
        self.rx.try_recv().ok()
    }

    /// The next event, waiting for it; not for use inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<TokenEvent> {
        self.rx.blocking_recv()
    }

    /// Asks the engine to stop this request: it ends with `FinishReason::Cancelled`.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Collects the whole generation, blocking.
    pub fn collect_blocking(mut self) -> Result<Generation> {
        let (mut ids, mut logprobs, mut top) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(ev) = self.blocking_next() {
            match ev {
                TokenEvent::Token {
                    id,
                    logprob,
                    top_logprobs,
                    ..
                } => {
                    ids.push(id);
                    logprobs.push(logprob);
                    if !top_logprobs.is_empty() {
                        top.push(top_logprobs);
                    }
                }
                TokenEvent::Finished {
                    reason,
                    text,
                    prompt_token_ids,
                    ..
                } => {
                    return Ok(Generation {
                        prompt_token_ids,
                        token_ids: ids,
                        text,
                        logprobs,
                        top_logprobs: top,
                        finish_reason: reason,
                    })
                }
                TokenEvent::Error(e) => return Err(Error::Failed(e)),
                TokenEvent::Admitted { .. } => {}
            }
        }
        Err(Error::Unavailable(
            "the engine stopped before the request ended".into(),
        ))
    }
}

impl Iterator for TokenStream {
    type Item = TokenEvent;
    fn next(&mut self) -> Option<TokenEvent> {
        self.blocking_next()
    }
}

impl futures_core::Stream for TokenStream {
    type Item = TokenEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TokenEvent>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

struct Submission {
    request: EngineRequest,
    events: mpsc::Sender<TokenEvent>,
    cancel: Arc<AtomicBool>,
}

/// Incremental detokenisation and stop strings for one request (as vLLM's: decode a
/// short window of tokens, emit what it adds once no character is incomplete).
#[derive(Default)]
struct TextState {
    text: String,
    /// Bytes of `text` already streamed.
    sent: usize,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextState {
    /// The state after `output` was produced and streamed (a resumed request).
    fn resumed(p: &crate::processor::Processor, output: &[u32]) -> TextState {
        let text = p.decode(output).unwrap_or_default();
        TextState {
            sent: text.len(),
            text,
            // A few tokens of context, so the next piece decodes as it would in place.
            prefix_offset: output.len().saturating_sub(4),
            read_offset: output.len(),
        }
    }
}

/// A request's ids, images' visual tokens and image hashes, made by the caller before
/// it is queued (never on the engine's thread), sent beside its `Submission`.
struct Prepared {
    prompt: PreparedPrompt,
    visual: Vec<Tensor>,
    image_hashes: Vec<[u8; 32]>,
    /// The request's constraint, compiled (and advanced over tokens it resumes from).
    guide: Option<Guide>,
}

struct Sequence {
    /// Unique within the engine: which requests a failed step had.
    id: u64,
    submission: Submission,
    /// Each image's `visual_hash`: part of every block hash (for an encoder-decoder
    /// model, then the hash of the encoder's ids, which its decoder's blocks depend on).
    image_hashes: Vec<[u8; 32]>,
    prepared: PreparedPrompt,
    /// What the language model decodes from: the prompt's ids, or an encoder-decoder's
    /// start token (`VisionLanguageModel::decoder_prompt`).
    decoder: Vec<u32>,
    visual: Vec<Tensor>,
    output: Vec<u32>,
    cache: KvCache,
    /// Whether `cache` holds this admission's cross-attention K/V.
    conditioned: bool,
    /// Self-attention blocks (the block table), then blocks accounting cross K/V.
    blocks: Vec<BlockId>,
    cross_blocks: Vec<BlockId>,
    /// Input embeddings of the tokens still to prefill from `prefilled` on.
    embeds: Option<Tensor>,
    prefilled: usize,
    cached_tokens: usize,
    /// Whether `TokenEvent::Admitted` was sent.
    announced: bool,
    /// Set once the sequence's last position is computed: it picks the next token.
    last_hidden: Option<Tensor>,
    text: TextState,
    /// Structured outputs: the constraint's matcher and the next token's mask.
    guide: Option<Guide>,
    /// Hashes of the full prompt blocks its prefill is computing (registered in the
    /// prefix cache when it ends): a request that needs them waits for them.
    pending: Vec<u64>,
}

impl Sequence {
    fn tokens(&self) -> Vec<u32> {
        self.decoder.iter().chain(&self.output).copied().collect()
    }

    fn cancelled(&self) -> bool {
        self.submission.cancel.load(Ordering::Relaxed) || self.submission.events.is_closed()
    }

    /// Back to waiting: no blocks, no cache; it restarts from its prompt and output.
    fn reset(&mut self) {
        self.cache = KvCache::default();
        self.conditioned = false;
        self.embeds = None;
        self.prefilled = 0;
        self.last_hidden = None;
        self.pending.clear();
    }
}

pub struct Engine {
    tx: Option<SyncSender<(Submission, Prepared)>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<EngineStats>>,
    pipeline: Arc<Pipeline>,
    budget: usize,
    /// False once the worker thread has ended for any reason but a clean stop.
    alive: Arc<AtomicBool>,
    prefixes: Arc<PrefixIndex>,
    /// The tokenizer's bytes for structured outputs, built at the first constrained
    /// request (an error kept as its message).
    grammars: std::sync::OnceLock<std::result::Result<Grammars, String>>,
}

/// Marks the engine dead if its thread ends by unwinding.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(false, Ordering::SeqCst);
        }
    }
}

/// The K/V dtype an engine stores: `asked`, else the model's (a bf16 model's K/V are
/// bf16 values, so bf16 storage loses nothing; f32 models keep f32).
pub fn kv_dtype(pipeline: &Pipeline, asked: Option<KvDtype>) -> KvDtype {
    asked.unwrap_or(match pipeline.model.dtype() {
        iris_tensor::DType::BF16 => KvDtype::Bf16,
        _ => KvDtype::F32,
    })
}

/// Bytes one KV block of `block_size` tokens takes across the language model's layers.
pub fn kv_block_bytes(pipeline: &Pipeline, block_size: usize, dtype: KvDtype) -> Result<usize> {
    let lm = pipeline.model.language_model()?;
    Ok(KvArena::block_bytes(
        lm.new_cache().n_layers(),
        block_size,
        lm.kv_width(),
        dtype,
    ))
}

/// The KV blocks a budget of `bytes` holds; an error when they cannot hold one
/// sequence of the model's whole context (`context` positions).
pub fn kv_blocks_for_budget(
    pipeline: &Pipeline,
    block_size: usize,
    dtype: KvDtype,
    bytes: usize,
    context: usize,
) -> Result<usize> {
    let per = kv_block_bytes(pipeline, block_size, dtype)?;
    let blocks = bytes / per.max(1);
    let need = context.div_ceil(block_size.max(1));
    if blocks < need {
        return Err(Error::Input(format!(
            "a KV cache of {bytes} bytes holds {blocks} blocks of {block_size} tokens \
             ({per} bytes each); one sequence of the model's {context}-token context \
             needs {need} ({} bytes): raise --kv-cache-bytes",
            need * per
        )));
    }
    Ok(blocks)
}

/// The language model of an engine's pipeline (checked when the engine starts).
fn lm(pipeline: &Pipeline) -> &dyn CausalLm {
    pipeline
        .model
        .language_model()
        .expect("an engine runs only on a pipeline with its language model")
}

impl Engine {
    /// Starts the engine's thread. Without the language model (a pipeline loaded for
    /// another tier) the engine is dead from the start: every request is refused as
    /// unavailable.
    pub fn start(pipeline: Arc<Pipeline>, config: EngineConfig) -> Engine {
        match Engine::start_with(pipeline.clone(), config.clone(), Vec::new()) {
            Ok((engine, _)) => engine,
            Err(e) => {
                tracing::error!("the engine cannot start: {e}");
                Engine {
                    tx: None,
                    thread: None,
                    stats: Arc::default(),
                    pipeline,
                    budget: 0,
                    alive: Arc::new(AtomicBool::new(false)),
                    prefixes: Arc::new(PrefixIndex::new(config.block_size)),
                    grammars: std::sync::OnceLock::new(),
                }
            }
        }
    }

    /// Starts with `initial` requests already queued, so the first step sees them all
    /// (a batch job; also what makes scheduling deterministic in tests).
    pub fn start_with(
        pipeline: Arc<Pipeline>,
        config: EngineConfig,
        initial: Vec<EngineRequest>,
    ) -> Result<(Engine, Vec<TokenStream>)> {
        let (tx, rx) = sync_channel(config.queue.max(initial.len()).max(1));
        // The whole KV budget, committed now: serving never grows memory.
        let lm = pipeline.model.language_model()?;
        let dtype = kv_dtype(&pipeline, config.kv_dtype);
        pipeline
            .model
            .prepare_kv(config.kv_blocks, config.block_size, dtype)?;
        let (n_layers, width) = (lm.new_cache().n_layers(), lm.kv_width());
        let arena = Arc::new(KvArena::reserved_on(
            n_layers,
            config.kv_blocks,
            config.block_size,
            width,
            dtype,
            pipeline.device(),
        )?);
        let stats = Arc::new(Mutex::new(EngineStats {
            free_blocks: config.kv_blocks,
            total_blocks: config.kv_blocks,
            block_bytes: KvArena::block_bytes(n_layers, config.block_size, width, dtype),
            kv_bytes: arena.bytes(),
            ..Default::default()
        }));
        let alive = Arc::new(AtomicBool::new(true));
        let mut engine = Engine {
            tx: Some(tx),
            thread: None,
            stats: stats.clone(),
            pipeline: pipeline.clone(),
            budget: config.kv_blocks * config.block_size,
            alive: alive.clone(),
            prefixes: Arc::new(PrefixIndex::new(config.block_size)),
            grammars: std::sync::OnceLock::new(),
        };
        let prefixes = engine.prefixes.clone();
        let mut streams = Vec::with_capacity(initial.len());
        for request in initial {
            streams.push(engine.submit(request)?);
        }
        let thread = std::thread::Builder::new()
            .name("iris-engine".into())
            .spawn(move || {
                let _guard = AliveGuard(alive);
                Worker::new(pipeline, config, rx, stats, arena, prefixes).run()
            })
            .map_err(|e| Error::Unavailable(format!("spawning the engine thread: {e}")))?;
        engine.thread = Some(thread);
        Ok((engine, streams))
    }

    /// Validates, tokenizes and encodes a request on the caller's thread, then queues
    /// it; its events arrive on the returned stream. Errors when the request is
    /// invalid, the queue is full (`Busy`) or the engine cannot serve (`Unavailable`).
    pub fn submit(&self, request: EngineRequest) -> Result<TokenStream> {
        if let Some(why) = self.pipeline.group().and_then(|g| g.broken()) {
            return Err(Error::Unavailable(format!(
                "the tensor-parallel group is broken: {why}"
            )));
        }
        let tx = match (&self.tx, self.is_alive()) {
            (Some(tx), true) => tx,
            _ => return Err(Error::Unavailable("the engine has stopped".into())),
        };
        request.options.validate()?;
        let mut prepared = prepare(&self.pipeline, &request, self.budget)?;
        prepared.guide = self.guide(&request)?;
        // Room for every event a request can produce: the engine never blocks on a client.
        let (events, rx) = mpsc::channel(request.options.max_new_tokens + 3);
        let cancel = Arc::new(AtomicBool::new(false));
        let submission = Submission {
            request,
            events,
            cancel: cancel.clone(),
        };
        tx.try_send((submission, prepared)).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => {
                Error::Busy("the request queue is full".into())
            }
            std::sync::mpsc::TrySendError::Disconnected(_) => {
                Error::Unavailable("the engine has stopped".into())
            }
        })?;
        Ok(TokenStream { rx, cancel })
    }

    /// A request's constraint compiled for this model, advanced over the tokens it
    /// resumes from; `None` without one.
    fn guide(&self, request: &EngineRequest) -> Result<Option<Guide>> {
        let Some(c) = &request.options.constraint else {
            return Ok(None);
        };
        let grammars = self
            .grammars
            .get_or_init(|| {
                let p = &self.pipeline;
                // llguidance reads the tokenizer's vocabulary with asserts of its own:
                // a tokenizer it does not expect fails structured outputs, not the caller.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Grammars::new(p.processor.tokenizer(), 0, p.eos_token_ids())
                }))
                .map_err(|_| "structured outputs: this model's tokenizer is not supported".into())
                .and_then(|r| r.map_err(|e| e.to_string()))
            })
            .as_ref()
            .map_err(|e| Error::Input(e.clone()))?;
        let mut guide = Guide::new(grammars.compile(c)?);
        if let Some(e) = &request.encoded {
            guide.consume(&e.resume)?;
        }
        Ok(Some(guide))
    }

    /// Runs one request to the end (what `iris generate` does).
    pub fn generate(&self, request: EngineRequest) -> Result<Generation> {
        self.submit(request)?.collect_blocking()
    }

    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().expect("stats lock")
    }

    /// The prefix blocks this engine holds (a snapshot, then changes, to subscribers).
    pub fn prefixes(&self) -> &Arc<PrefixIndex> {
        &self.prefixes
    }

    /// Whether the engine can still serve: false once its thread died or its
    /// tensor-parallel group broke.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
            && self.pipeline.group().is_none_or(|g| g.broken().is_none())
    }
}

/// A request's ids and visual tokens (tokenized and encoded here unless the request
/// came encoded), checked to fit the KV budget.
fn prepare(p: &Pipeline, r: &EngineRequest, budget: usize) -> Result<Prepared> {
    let fits = |ids: &[u32]| {
        let need = ids.len() + r.options.max_new_tokens;
        if ids.is_empty() {
            return Err(Error::Input("the prompt is empty".into()));
        }
        if need > budget {
            return Err(Error::Input(format!(
                "the request needs {need} KV positions, more than the engine's {budget}"
            )));
        }
        Ok(())
    };
    match &r.encoded {
        Some(e) if e.resume.len() >= r.options.max_new_tokens => Err(Error::Input(format!(
            "{} tokens to resume from, max_new_tokens is {}",
            e.resume.len(),
            r.options.max_new_tokens
        ))),
        Some(e) => {
            fits(&e.input_ids)?;
            // Tensors from the network: checked before any kernel sees them. Where the
            // count depends on the image's size (which the decoder is not told), each
            // image's rows only need to sum to the placeholders.
            let tokens = p.model.image_tokens();
            let fixed = p.model.visual_shape(ImageSize::default());
            for (i, t) in e.visual.iter().enumerate() {
                let what = format!("visual tokens of image {}", i + 1);
                let want = match tokens.fixed() {
                    Some(_) => fixed,
                    None => [t.rows().max(1), fixed[1]],
                };
                iris_models::vlm::check_untrusted(t, want, &what)?;
            }
            let slots = e
                .input_ids
                .iter()
                .filter(|&&id| id == p.model.image_token_id())
                .count();
            let given: usize = e.visual.iter().map(Tensor::rows).sum();
            if tokens.fixed() != Some(0) && slots != given {
                return Err(Error::Input(format!(
                    "the prompt has {slots} image placeholders; {} image(s) give {given} visual tokens",
                    e.visual.len(),
                )));
            }
            Ok(Prepared {
                guide: None,
                prompt: PreparedPrompt {
                    input_ids: e.input_ids.clone(),
                    pixel_values: Vec::new(),
                    image_sizes: Vec::new(),
                },
                image_hashes: e.visual.iter().map(visual_hash).collect::<Result<_>>()?,
                visual: e.visual.clone(),
            })
        }
        None => {
            let prompt = p.processor.prepare(&r.prompt, &r.images)?;
            fits(&prompt.input_ids)?;
            let visual = p.encode_images(&prompt)?;
            Ok(Prepared {
                guide: None,
                image_hashes: visual.iter().map(visual_hash).collect::<Result<_>>()?,
                visual,
                prompt,
            })
        }
    }
}

/// An image's part of the prefix-cache keys: BLAKE3 of its visual tokens (shape, then
/// f32 values) — of what the decoder computes with, never of a caller's claim about
/// which image they came from, so no request can store K/V under another's image.
pub fn visual_hash(t: &Tensor) -> Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    for d in t.shape() {
        h.update(&(*d as u64).to_le_bytes());
    }
    // A chunk at a time: no byte copy of the whole tensor (9 MB for LLaVA-1.5's).
    let mut bytes = Vec::with_capacity(4096 * 4);
    t.visit_f32(4096, |chunk| {
        bytes.clear();
        bytes.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
        h.update(&bytes);
    })?;
    Ok(*h.finalize().as_bytes())
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
    rx: Receiver<(Submission, Prepared)>,
    stats: Arc<Mutex<EngineStats>>,
    pool: BlockPool,
    arena: Arc<KvArena>,
    /// Floats of K/V one block holds across layers (cross K/V is accounted in these).
    block_floats: usize,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    closed: bool,
    next_id: u64,
    /// `config.panic_at_step` until it fired.
    planted_panic: Option<usize>,
    /// The prefix blocks held, for subscribers.
    prefixes: Arc<PrefixIndex>,
}

impl Worker {
    fn new(
        pipeline: Arc<Pipeline>,
        config: EngineConfig,
        rx: Receiver<(Submission, Prepared)>,
        stats: Arc<Mutex<EngineStats>>,
        arena: Arc<KvArena>,
        prefixes: Arc<PrefixIndex>,
    ) -> Self {
        let lm = lm(&pipeline);
        let n_layers = lm.new_cache().n_layers();
        let planted_panic = config.panic_at_step;
        Worker {
            pool: BlockPool::new(config.kv_blocks, config.block_size),
            arena,
            block_floats: config.block_size * n_layers * 2 * lm.kv_width(),
            pipeline,
            config,
            rx,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
            closed: false,
            next_id: 0,
            planted_panic,
            prefixes,
        }
    }

    fn stat(&mut self, f: impl FnOnce(&mut EngineStats)) {
        let mut s = self.stats.lock().expect("stats lock");
        f(&mut s);
        s.free_blocks = self.pool.available();
        s.running = self.running.len();
        s.waiting = self.waiting.len();
        s.prefix_hits = self.pool.hits;
        let removed = self.pool.take_evicted();
        s.prefix_evictions += removed.len() as u64;
        self.prefixes.apply(self.pool.take_stored(), removed);
    }

    fn run(mut self) {
        loop {
            self.receive();
            if self.closed && self.waiting.is_empty() && self.running.is_empty() {
                return;
            }
            if let Some(n) = self.config.die_at_step {
                if self.stats.lock().expect("stats lock").steps >= n {
                    panic!("test hook: the engine thread dies");
                }
            }
            self.guarded_step();
            self.stat(|s| s.steps += 1);
            if !self.config.step_delay.is_zero() {
                std::thread::sleep(self.config.step_delay);
            }
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
                Ok((sub, prepared)) => self.prepare(sub, prepared),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    /// A submission (prepared by its caller) joins the waiting line.
    fn prepare(&mut self, mut submission: Submission, prepared: Prepared) {
        let p = &self.pipeline;
        let resume = submission
            .request
            .encoded
            .as_mut()
            .map(|e| std::mem::take(&mut e.resume))
            .unwrap_or_default();
        let text = TextState::resumed(&p.processor, &resume);
        let Prepared {
            prompt,
            visual,
            mut image_hashes,
            guide,
        } = prepared;
        let decoder = p.model.decoder_prompt(&prompt.input_ids);
        if decoder != prompt.input_ids {
            // Decoder blocks depend on what the encoder read: its ids join the chain.
            let mut h = blake3::Hasher::new();
            prompt.input_ids.iter().for_each(|id| {
                h.update(&id.to_le_bytes());
            });
            image_hashes.push(*h.finalize().as_bytes());
        }
        self.next_id += 1;
        self.waiting.push_back(Sequence {
            id: self.next_id,
            image_hashes,
            submission,
            decoder,
            prepared: prompt,
            visual,
            output: resume,
            cache: KvCache::default(),
            conditioned: false,
            blocks: Vec::new(),
            cross_blocks: Vec::new(),
            embeds: None,
            prefilled: 0,
            cached_tokens: 0,
            announced: false,
            last_hidden: None,
            text,
            guide,
            pending: Vec::new(),
        });
        self.stat(|_| {});
    }

    /// Admission and one step, with a panic contained: every request that was running
    /// or being admitted ends with an internal error, the KV pool starts afresh (the
    /// step may have left blocks in any state; the prefix cache goes with it), and the
    /// requests still waiting are served as if nothing happened.
    fn guarded_step(&mut self) {
        // Every request the step could take, waiting ones included: admission may pop
        // any number past cancelled ones, and a sequence in flight when the step
        // unwinds is dropped with its sender (a handful of Arc clones a step).
        let before: Vec<(u64, mpsc::Sender<TokenEvent>)> = self
            .running
            .iter()
            .chain(&self.waiting)
            .map(|s| (s.id, s.submission.events.clone()))
            .collect();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.admit();
            self.step();
        }));
        let Err(panic) = outcome else {
            return;
        };
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        tracing::error!("an engine step panicked ({what}); failing its requests");
        let still_waiting: HashSet<u64> = self.waiting.iter().map(|s| s.id).collect();
        let error = RequestError {
            message: format!("internal error: the engine step failed ({what})"),
            kind: ErrorKind::Internal,
        };
        self.running.clear();
        let mut failed = 0;
        for (id, events) in before {
            if !still_waiting.contains(&id) {
                let _ = events.try_send(TokenEvent::Error(error.clone()));
                failed += 1;
            }
        }
        self.pool = BlockPool::new(self.config.kv_blocks, self.config.block_size);
        self.prefixes.reset();
        self.stat(|s| s.failed_steps += 1);
        tracing::warn!(failed, "the engine goes on with a fresh KV pool");
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.config.block_size)
    }

    /// FIFO admission while the batch has room and the prompt's blocks are available;
    /// a preempted request resumes from its prompt plus its output so far. A request
    /// whose next uncached prompt block a running request is prefilling waits for it
    /// (then takes it from the prefix cache): the samples of one prompt (`n` > 1), or
    /// concurrent requests with one prompt, compute it once.
    fn admit(&mut self) {
        let mut deferred = Vec::new();
        self.admit_from(&mut deferred);
        for seq in deferred.into_iter().rev() {
            self.waiting.push_front(seq);
        }
    }

    fn admit_from(&mut self, deferred: &mut Vec<Sequence>) {
        while self.running.len() < self.config.max_batch {
            let Some(mut seq) = self.waiting.pop_front() else {
                return;
            };
            if seq.cancelled() {
                self.cancel(seq);
                continue;
            }
            if self.awaits_prefill(&seq) {
                self.stat(|s| s.deferred_admissions += 1);
                deferred.push(seq);
                continue;
            }
            match self.start(&mut seq) {
                Ok(true) => {
                    if !seq.announced {
                        seq.announced = true;
                        let cached_tokens = seq.cached_tokens;
                        let _ = seq
                            .submission
                            .events
                            .try_send(TokenEvent::Admitted { cached_tokens });
                    }
                    self.running.push(seq)
                }
                Ok(false) => {
                    // Not enough blocks yet: it stays first in line.
                    self.waiting.push_front(seq);
                    return;
                }
                Err(e) => self.finish_with_error(seq, &e),
            }
        }
    }

    /// Whether the first prompt block `seq` would compute is one a running request is
    /// computing now.
    fn awaits_prefill(&self, seq: &Sequence) -> bool {
        if !self.running.iter().any(|r| !r.pending.is_empty()) {
            return false;
        }
        let tokens = seq.tokens();
        let full = (tokens.len() - 1) / self.config.block_size;
        let hashes = self.block_hashes(seq, &tokens, full);
        match hashes.iter().find(|&&h| !self.pool.contains(h)) {
            Some(h) => self.running.iter().any(|r| r.pending.contains(h)),
            None => false,
        }
    }

    /// Block hashes of a sequence's first `blocks` full blocks. The chain starts from
    /// the images' content hashes, so a block is shared only between sequences with the
    /// same images and the same tokens up to and including it.
    fn block_hashes(&self, seq: &Sequence, tokens: &[u32], blocks: usize) -> Vec<u64> {
        crate::blocks::chain_hashes(&seq.image_hashes, tokens, self.config.block_size, blocks)
    }

    /// Takes blocks for a sequence: cached prefix blocks go straight into its block
    /// table, fresh ones follow, and blocks to account its cross-attention K/V. The
    /// rest of the prompt is prefilled by `step`, in chunks. `Ok(false)` when its blocks
    /// are not available yet.
    fn start(&mut self, seq: &mut Sequence) -> Result<bool> {
        let model = &self.pipeline.model;
        let lm = lm(&self.pipeline);
        if !seq.conditioned {
            seq.cache = lm.new_cache();
            model.condition(&mut seq.cache, &seq.prepared.input_ids, &seq.visual)?;
            seq.conditioned = true;
            if seq.cache.cross_floats() > 0 {
                self.stats.lock().expect("stats lock").cross_kv_computed += 1;
            }
        }
        let tokens = seq.tokens();
        let total = tokens.len();
        let bs = self.config.block_size;
        // Every full block's hash: the last token is always computed (its hidden state
        // picks the next token), so a prompt's last full block is looked up only when a
        // token follows it; the blocks not found are registered when the prefill ends.
        let mut hashes = self.block_hashes(seq, &tokens, total / bs);
        let mut hits = Vec::new();
        for h in &hashes[..(total - 1) / bs] {
            match self.pool.lookup(*h) {
                Some(id) => hits.push(id),
                None => break,
            }
        }
        // Cross-attention K/V moves into blocks of the pool when its rows are as wide as
        // the self-attention's (every model here); otherwise it stays in the sequence
        // and is accounted in blocks by its size.
        let kv_width = lm.kv_width();
        let cross = match seq.cache.cross_rows_max(kv_width) {
            Some(rows) => rows.div_ceil(bs),
            None => seq.cache.cross_floats().div_ceil(self.block_floats.max(1)),
        };
        let fresh = self.blocks_for(total) - hits.len();
        if fresh + cross > self.pool.available() {
            for id in hits {
                self.pool.release(id).expect("just looked up");
            }
            return Ok(false);
        }
        seq.blocks = hits;
        for _ in 0..fresh {
            let b = self.pool.allocate().expect("availability checked");
            seq.blocks.push(b);
        }
        for _ in 0..cross {
            let b = self.pool.allocate().expect("availability checked");
            seq.cross_blocks.push(b);
        }
        let cache = std::mem::take(&mut seq.cache);
        seq.cache = cache.paged(
            self.arena.clone(),
            seq.blocks.clone(),
            seq.cross_blocks.clone(),
            kv_width,
        );
        let cached = (seq.blocks.len() - fresh) * bs;
        seq.pending = hashes.split_off(cached / bs);
        seq.cache.advance(cached);
        seq.prefilled = cached;
        if seq.output.is_empty() {
            seq.cached_tokens = cached;
        }
        let mut embeds = model.input_embeds(&seq.prepared.input_ids, &seq.visual)?;
        if !seq.output.is_empty() {
            embeds = Tensor::cat_rows(&[&embeds, &lm.embed(&seq.output)?])?;
        }
        seq.embeds = Some(embeds);
        self.stat(|_| {});
        Ok(true)
    }

    /// Prefills up to `prefill_chunk` tokens, oldest request first; a request whose
    /// prompt is done gets its last hidden state and registers its full blocks in the
    /// prefix cache. Returns the prompt tokens it prefilled.
    fn prefill(&mut self) -> usize {
        let mut budget = self.config.prefill_chunk.max(1);
        let pipeline = self.pipeline.clone();
        let lm = lm(&pipeline);
        let bs = self.config.block_size;
        let mut failed = Vec::new();
        for i in 0..self.running.len() {
            if budget == 0 {
                break;
            }
            let seq = &mut self.running[i];
            let Some(embeds) = &seq.embeds else {
                continue;
            };
            let total = embeds.rows();
            let n = (total - seq.prefilled).min(budget);
            let chunk = embeds.narrow_rows(seq.prefilled, n);
            match chunk
                .map_err(Error::from)
                .and_then(|c| Ok(lm.forward(&c, &mut seq.cache)?))
            {
                Ok(h) => {
                    budget -= n;
                    seq.prefilled += n;
                    if seq.prefilled == total {
                        seq.last_hidden = Some(h.narrow_rows(h.rows() - 1, 1).expect("rows"));
                        seq.embeds = None;
                    }
                }
                Err(e) => {
                    failed.push((i, e));
                    continue;
                }
            }
            self.stat(|s| s.prefill_tokens += n as u64);
            if self.running[i].embeds.is_none() {
                // Newly computed full blocks (the hashes `start` found no block for)
                // become cached prefix blocks.
                let seq = &mut self.running[i];
                let pending = std::mem::take(&mut seq.pending);
                let from = (seq.decoder.len() + seq.output.len()) / bs - pending.len();
                for (&b, h) in seq.blocks[from..].iter().zip(pending) {
                    // A block already cached under this hash (another request's) stays.
                    let _ = self.pool.register(b, h);
                }
            }
        }
        for (i, e) in failed.into_iter().rev() {
            let seq = self.running.remove(i);
            self.finish_with_error(seq, &e);
        }
        self.config.prefill_chunk.max(1) - budget
    }

    /// Frees a sequence's blocks; the stats show it before any event is sent, so a
    /// client that saw its stream end sees the blocks back.
    fn release(&mut self, seq: &mut Sequence) {
        for b in seq.blocks.drain(..).chain(seq.cross_blocks.drain(..)) {
            self.pool.release(b).expect("the sequence owns its blocks");
        }
        seq.reset();
        self.stat(|_| {});
    }

    /// A batched step failed: every request in it ends with the error.
    fn fail_all(&mut self, seqs: Vec<Sequence>, e: &Error) {
        for seq in seqs {
            self.finish_with_error(seq, e);
        }
    }

    fn finish_with_error(&mut self, mut seq: Sequence, e: &Error) {
        self.release(&mut seq);
        let _ = seq.submission.events.try_send(TokenEvent::Error(e.into()));
    }

    fn cancel(&mut self, mut seq: Sequence) {
        self.release(&mut seq);
        let text = seq.text.text.clone();
        self.finish(seq, FinishReason::Cancelled, text);
        self.stat(|s| s.cancelled += 1);
    }

    /// A request that ran to its end: its blocks back, its text in the last event.
    fn retire(&mut self, mut seq: Sequence, reason: FinishReason) {
        self.release(&mut seq);
        let text = std::mem::take(&mut seq.text.text);
        self.finish(seq, reason, text);
        self.stat(|s| s.finished += 1);
    }

    fn finish(&mut self, seq: Sequence, reason: FinishReason, text: String) {
        let _ = seq.submission.events.try_send(TokenEvent::Finished {
            reason,
            text,
            prompt_token_ids: seq.prepared.input_ids,
            cached_tokens: seq.cached_tokens,
        });
    }

    /// One iteration: drop cancelled requests, prefill a chunk, sample every request
    /// whose last position is computed and stream its token, retire finished ones, then
    /// run one batched decode pass over the rest.
    fn step(&mut self) {
        let (cancelled, live): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(Sequence::cancelled);
        self.running = live;
        for seq in cancelled {
            self.cancel(seq);
        }
        let decoding = self.running.iter().any(|s| s.last_hidden.is_some());
        if self.prefill() > 0 && decoding {
            self.stat(|s| s.mixed_steps += 1);
        }
        let pipeline = self.pipeline.clone();
        let lm = lm(&pipeline);
        let (mut ready, prefilling): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|s| s.last_hidden.is_some());
        self.running = prefilling;
        if ready.is_empty() {
            return;
        }
        let rows: Vec<&Tensor> = ready
            .iter()
            .filter_map(|s| s.last_hidden.as_ref())
            .collect();
        let logits = match Tensor::cat_rows(&rows)
            .map_err(Error::from)
            .and_then(|h| Ok(lm.logits(&h)?))
        {
            Ok(l) => l,
            Err(e) => return self.fail_all(ready, &e),
        };
        // A constrained request whose constraint allows none of the model's tokens ends
        // here (its row is drawn from and the token dropped): its output is whole, or
        // nothing can continue it.
        let vocab = logits.last_dim();
        let mut dead = Vec::with_capacity(ready.len());
        for seq in &mut ready {
            dead.push(match seq.guide.as_mut() {
                Some(g) => {
                    if g.has_mask() {
                        self.stat(|s| s.masks_overlapped += 1);
                    } else {
                        self.stat(|s| s.masks_inline += 1);
                    }
                    g.allowed(vocab).err()
                }
                None => None,
            });
        }
        // One draw a row on the logits' device: only ids and log-probabilities come back.
        let samplers: Vec<Sampler> = ready
            .iter()
            .map(|s| Sampler::new(s.submission.request.options.sampling))
            .collect();
        let drawn = {
            let draws: Vec<Draw> = ready
                .iter_mut()
                .zip(&samplers)
                .map(|(seq, sampler)| Draw {
                    sampler,
                    position: seq.decoder.len() + seq.output.len(),
                    prompt: &seq.decoder,
                    output: &seq.output,
                    top_logprobs: seq.submission.request.options.top_logprobs,
                    allowed: seq.guide.as_mut().and_then(|g| g.allowed(vocab).ok()),
                    bias: &seq.submission.request.options.logit_bias,
                })
                .collect();
            logits.sample_rows(&draws)
        };
        let drawn = match drawn {
            Ok(d) => d,
            Err(e) => return self.fail_all(ready, &Error::from(e)),
        };
        let mut decoding = Vec::with_capacity(ready.len());
        for ((mut seq, drawn), dead) in ready.into_iter().zip(drawn).zip(dead) {
            if let Some(dead) = dead {
                if let Dead::Stuck(why) = &dead {
                    tracing::info!("a constrained request ends: {why}");
                }
                let _ = self.advance_text(&mut seq, true);
                let reason = match dead {
                    Dead::Complete => FinishReason::Stop,
                    Dead::Stuck(_) => FinishReason::Constraint,
                };
                self.retire(seq, reason);
                continue;
            }
            seq.last_hidden = None;
            let opts = seq.submission.request.options.clone();
            let next = drawn.id;
            seq.output.push(next);
            self.stat(|s| s.decode_tokens += 1);
            let mut reason = if !opts.stop.ignore_eos && pipeline.eos_token_ids().contains(&next) {
                Some(FinishReason::Eos)
            } else if opts.stop.token_ids.contains(&next) {
                Some(FinishReason::Stop)
            } else if seq.output.len() >= opts.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(g) = seq.guide.as_mut() {
                // The drawn token was allowed: the matcher takes it. A complete output
                // ends here (the stop the grammar reached).
                if let Err(Dead::Stuck(why)) = g.advance(next) {
                    tracing::info!("a constrained request ends: {why}");
                    reason = reason.or(Some(FinishReason::Constraint));
                } else if g.is_stopped() {
                    reason = reason.or(Some(FinishReason::Stop));
                }
            }
            let (delta, stopped) = self.advance_text(&mut seq, reason.is_some());
            if stopped {
                reason = Some(FinishReason::Stop);
            }
            let event = TokenEvent::Token {
                id: next,
                logprob: drawn.logprob,
                top_logprobs: drawn.top_logprobs,
                text: delta,
            };
            if seq.submission.events.try_send(event).is_err() {
                self.cancel(seq);
                continue;
            }
            if let Some(reason) = reason {
                self.retire(seq, reason);
                continue;
            }
            decoding.push(seq);
        }
        // Room for each decoding request's next position; when blocks run out, the
        // newest running request (decoding or prefilling) is preempted.
        let mut i = 0;
        while i < decoding.len() {
            let need = self.blocks_for(decoding[i].cache.len() + 1);
            if decoding[i].blocks.len() < need {
                match self.pool.allocate() {
                    Ok(b) => {
                        decoding[i].blocks.push(b);
                        decoding[i].cache.push_block(b);
                    }
                    Err(_) => {
                        let mut victim = match self.running.pop() {
                            Some(v) => v,
                            None => decoding.pop().expect("non-empty"),
                        };
                        self.release(&mut victim);
                        self.waiting.push_front(victim);
                        self.stat(|s| s.preemptions += 1);
                        continue;
                    }
                }
            }
            i += 1;
        }
        if !decoding.is_empty() {
            if let Some(n) = self.planted_panic {
                if self.stats.lock().expect("stats lock").steps >= n {
                    self.planted_panic = None;
                    panic!("test hook: a panic planted in the batched decode");
                }
            }
            let embeds: Result<Vec<Tensor>> = decoding
                .iter()
                .map(|s| Ok(lm.embed(&s.output[s.output.len() - 1..])?))
                .collect();
            // The constrained requests' next masks are computed on another thread
            // while the forward pass runs: they depend on the tokens drawn, not on it.
            let mut guides: Vec<(usize, Guide)> = decoding
                .iter_mut()
                .enumerate()
                .filter_map(|(i, s)| s.guide.take().map(|g| (i, g)))
                .collect();
            let result = std::thread::scope(|scope| {
                let masks = (!guides.is_empty())
                    .then(|| scope.spawn(|| guides.iter_mut().for_each(|(_, g)| g.prepare())));
                let result = embeds.and_then(|embeds| {
                    let mut caches: Vec<&mut KvCache> =
                        decoding.iter_mut().map(|s| &mut s.cache).collect();
                    Ok(lm.forward_batch(&embeds.iter().collect::<Vec<_>>(), &mut caches)?)
                });
                // A matcher that panicked leaves its mask unset: computed again (and
                // failed as a step) when the request is sampled.
                if let Some(h) = masks {
                    let _ = h.join();
                }
                result
            });
            for (i, g) in guides {
                decoding[i].guide = Some(g);
            }
            match result {
                Ok(hidden) => {
                    for (seq, h) in decoding.iter_mut().zip(hidden) {
                        seq.last_hidden = Some(h);
                    }
                }
                Err(e) => return self.fail_all(decoding, &e),
            }
        }
        // Decoding requests stay ahead of prefilling ones: they were admitted first.
        decoding.append(&mut self.running);
        self.running = decoding;
    }

    /// Extends a request's text with its newest token; returns the text now safe to
    /// stream and whether a stop string ended it. At the end (`last`), everything left.
    fn advance_text(&self, seq: &mut Sequence, last: bool) -> (String, bool) {
        let p = &self.pipeline.processor;
        let stops = &seq.submission.request.options.stop.strings;
        let t = &mut seq.text;
        let decode = |ids: &[u32]| p.decode(ids).unwrap_or_default();
        let before = decode(&seq.output[t.prefix_offset..t.read_offset]);
        let now = decode(&seq.output[t.prefix_offset..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let from = t.text.len();
            t.text.push_str(&now[before.len()..]);
            t.prefix_offset = t.read_offset;
            t.read_offset = seq.output.len();
            // A stop string can only be new if it ends in what was just added.
            let longest = stops.iter().map(String::len).max().unwrap_or(0);
            let mut search = from.saturating_sub(longest);
            while !t.text.is_char_boundary(search) {
                search -= 1;
            }
            if let Some(cut) = stops
                .iter()
                .filter_map(|s| t.text[search..].find(s.as_str()).map(|i| search + i))
                .min()
            {
                t.text.truncate(cut);
                let delta = t.text.get(t.sent..).unwrap_or_default().to_string();
                t.sent = t.text.len();
                return (delta, true);
            }
        }
        if last {
            // The whole output decoded at once is the final text (as `generate_from`).
            let full = decode(&seq.output);
            if full.starts_with(&t.text[..t.sent]) {
                t.text = full;
            }
        }
        // Hold back what could be the start of a stop string.
        let hold = if last {
            0
        } else {
            stops.iter().map(|s| s.len() - 1).max().unwrap_or(0)
        };
        let mut upto = t.text.len().saturating_sub(hold).max(t.sent);
        while !t.text.is_char_boundary(upto) {
            upto -= 1;
        }
        let delta = t.text[t.sent..upto].to_string();
        t.sent = upto;
        (delta, false)
    }
}
