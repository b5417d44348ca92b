//! The three tiers behind the gateway, as traits with a local (in-process) and a remote
//! (gRPC client) implementation each. The gateway sees only the traits, so `iris serve`
//! (everything in one process) and a cluster (a process per tier) run the same code.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use iris_engine::blocks::PrefixIndex;
use iris_engine::{EncodedPrompt, Engine, EngineRequest, Pipeline};
use iris_models::config::ImageSize;
use iris_proto::v1 as pb;
use iris_proto::v1::connector_client::ConnectorClient;
use iris_proto::v1::decoder_client::DecoderClient;
use iris_proto::v1::vision_encoder_client::VisionEncoderClient;
use iris_tensor::Tensor;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::cache::{Key, VisualCache};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::wire::{self, MAX_MESSAGE_BYTES};

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;

/// Images to vision features.
#[async_trait::async_trait]
pub trait VisionTier: Send + Sync {
    async fn encode(
        &self,
        model: &str,
        image: Vec<u8>,
        deadline: Instant,
    ) -> Result<Tensor, ServeError>;

    /// `encode` as part of the cluster-wide cache: `image_key` is BLAKE3 of `image`. A
    /// caching member keeps the features under it (with its tower's digest); a remote
    /// tier sends the call to the key's owner among its members.
    async fn encode_keyed(
        &self,
        model: &str,
        image: Vec<u8>,
        _image_key: Key,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        self.encode(model, image, deadline).await
    }
}

/// Vision features to visual tokens. `size` is the image's as decoded (LLaVA-NeXT's
/// packing depends on it; other models ignore it).
#[async_trait::async_trait]
pub trait ConnectorTier: Send + Sync {
    async fn project(
        &self,
        model: &str,
        features: Tensor,
        size: ImageSize,
        deadline: Instant,
    ) -> Result<Tensor, ServeError>;

    /// The visual tokens held under `key` (the cluster-wide cache), if any.
    async fn cached(
        &self,
        _model: &str,
        _key: Key,
        _deadline: Instant,
    ) -> Result<Option<Tensor>, ServeError> {
        Ok(None)
    }

    /// `project`, keeping the tokens under `key` (the cluster-wide cache).
    async fn project_keyed(
        &self,
        model: &str,
        features: Tensor,
        size: ImageSize,
        _key: Key,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        self.project(model, features, size, deadline).await
    }
}

/// Prompt ids and visual tokens to a stream of tokens. Dropping the stream cancels the
/// request (and frees its KV blocks).
#[async_trait::async_trait]
pub trait DecoderTier: Send + Sync {
    async fn generate(
        &self,
        req: pb::DecodeRequest,
        deadline: Instant,
    ) -> Result<EventStream, ServeError>;

    /// Each model's index of the prefix blocks held here (a decoder in this process).
    fn prefix_indexes(&self) -> Vec<(String, Arc<PrefixIndex>)> {
        Vec::new()
    }
}

fn model_of<'a, T>(models: &'a HashMap<String, T>, model: &str) -> Result<&'a T, ServeError> {
    models
        .get(model)
        .ok_or_else(|| ServeError::NotFound(format!("model `{model}` is not served here")))
}

fn remaining(deadline: Instant) -> Result<Duration, ServeError> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ServeError::Deadline("the request's deadline passed".into()))
}

// ---------------------------------------------------------------- local

struct Job {
    model: String,
    /// The image, decoded and preprocessed.
    pixel_values: Tensor,
    reply: oneshot::Sender<Result<Tensor, ServeError>>,
    /// The request's span, and its wait for a batch (closed when the batch takes it).
    span: tracing::Span,
    queued: tracing::Span,
}

/// Image decoding off the batch loop, on `threads` threads of its own, smallest image
/// (by header pixels) first: a request with a small new image is not queued behind
/// another's 40-megapixel ones, and a decode whose caller left is skipped.
pub struct DecodePool {
    shared: Arc<PoolShared>,
}

struct PoolShared {
    queue: std::sync::Mutex<DecodeQueue>,
    ready: std::sync::Condvar,
    max_queued: usize,
    /// Images waiting to be decoded (`iris_image_decode_queue`).
    queued: prometheus_client::metrics::gauge::Gauge,
}

#[derive(Default)]
struct DecodeQueue {
    tasks: std::collections::BinaryHeap<DecodeTask>,
    /// Tasks ever queued: the next one's place among equals.
    queued: u64,
}

struct DecodeTask {
    pixels: u64,
    seq: u64,
    run: Box<dyn FnOnce() + Send>,
}

impl PartialEq for DecodeTask {
    fn eq(&self, o: &Self) -> bool {
        (self.pixels, self.seq) == (o.pixels, o.seq)
    }
}
impl Eq for DecodeTask {}
impl PartialOrd for DecodeTask {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for DecodeTask {
    /// The max-heap's top is the fewest pixels, then the earliest.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.pixels, o.seq).cmp(&(self.pixels, self.seq))
    }
}

impl DecodePool {
    pub fn new(
        threads: usize,
        max_queued: usize,
        queued: prometheus_client::metrics::gauge::Gauge,
    ) -> DecodePool {
        let shared = Arc::new(PoolShared {
            queue: std::sync::Mutex::new(DecodeQueue::default()),
            ready: std::sync::Condvar::new(),
            max_queued: max_queued.max(1),
            queued,
        });
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("iris-decode-{i}"))
                .spawn(move || loop {
                    let task = {
                        let mut q = shared.queue.lock().expect("decode queue");
                        loop {
                            match q.tasks.pop() {
                                Some(t) => {
                                    shared.queued.dec();
                                    break t;
                                }
                                None => q = shared.ready.wait(q).expect("decode queue"),
                            }
                        }
                    };
                    (task.run)();
                })
                .expect("a decode thread");
        }
        DecodePool { shared }
    }

    /// Runs `f` on the pool, ahead of larger images; OVERLOADED when the queue is full.
    pub async fn run<T: Send + 'static>(
        &self,
        pixels: u64,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ServeError> {
        let (tx, rx) = oneshot::channel();
        let run = Box::new(move || {
            if !tx.is_closed() {
                let _ = tx.send(f());
            }
        });
        {
            let mut q = self.shared.queue.lock().expect("decode queue");
            if q.tasks.len() >= self.shared.max_queued {
                return Err(ServeError::Overloaded(
                    "the image decoder's queue is full; retry later".into(),
                ));
            }
            q.queued += 1;
            let seq = q.queued;
            q.tasks.push(DecodeTask { pixels, seq, run });
            self.shared.queued.inc();
        }
        self.shared.ready.notify_one();
        rx.await
            .map_err(|_| ServeError::internal("an image decode failed"))
    }
}

/// The vision tier in process: a queue that batches images across requests (up to
/// `max_batch`, waiting at most `max_wait` for a batch to fill) and encodes each batch
/// on a blocking thread (the ViT's matrix products use every core). A job whose caller
/// went away before its batch ran is dropped unencoded.
pub struct LocalVision {
    tx: mpsc::Sender<Job>,
    models: Arc<HashMap<String, Arc<Pipeline>>>,
    decode: DecodePool,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_wait: Duration,
    pub queue: usize,
    /// Threads that decode and preprocess images.
    pub decode_threads: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(5),
            queue: 1024,
            decode_threads: 2,
        }
    }
}

impl LocalVision {
    pub fn start(
        models: HashMap<String, Arc<Pipeline>>,
        config: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> LocalVision {
        let (tx, mut rx) = mpsc::channel::<Job>(config.queue.max(1));
        let m = metrics.clone();
        let models = Arc::new(models);
        let pool_models = models.clone();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let until = tokio::time::Instant::now() + config.max_wait;
                while batch.len() < config.max_batch.max(1) {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(job)) => batch.push(job),
                        _ => break,
                    }
                }
                m.encoder_queue.dec_by(batch.len() as i64);
                batch.retain(|j| !j.reply.is_closed());
                if batch.is_empty() {
                    continue;
                }
                m.encoder_batch.observe(batch.len() as f64);
                let models = models.clone();
                let m = m.clone();
                let done = tokio::task::spawn_blocking(move || encode_batch(&models, batch, &m));
                if let Err(e) = done.await {
                    tracing::error!("vision batch panicked: {e}");
                }
            }
        });
        LocalVision {
            tx,
            models: pool_models,
            decode: DecodePool::new(
                config.decode_threads,
                config.queue,
                metrics.decode_queue.clone(),
            ),
            metrics,
        }
    }
}

/// One batch of the vision tier (images decoded already): each model's images through
/// its vision tower in one stacked pass.
fn encode_batch(models: &HashMap<String, Arc<Pipeline>>, batch: Vec<Job>, m: &Metrics) {
    type Reply = oneshot::Sender<Result<Tensor, ServeError>>;
    type Group = (Arc<Pipeline>, Vec<(Reply, Tensor, tracing::Span)>);
    // Replies with their pixel values, grouped by model.
    let mut by_model: Vec<Group> = Vec::new();
    let size = batch.len();
    for Job {
        model,
        pixel_values,
        reply,
        span,
        queued,
    } in batch
    {
        drop(queued);
        if reply.is_closed() {
            continue;
        }
        m.encoder_requests.inc();
        match model_of(models, &model) {
            Ok(p) => match by_model.iter_mut().find(|(q, _)| Arc::ptr_eq(q, p)) {
                Some((_, jobs)) => jobs.push((reply, pixel_values, span)),
                None => by_model.push((p.clone(), vec![(reply, pixel_values, span)])),
            },
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }
    for (p, jobs) in by_model {
        let pvs: Vec<&Tensor> = jobs.iter().map(|(_, pv, _)| pv).collect();
        m.encoder_passes.inc();
        // The pass, in each request's trace (one batch serves them all).
        let _vit: Vec<tracing::Span> = jobs
            .iter()
            .map(|(_, _, span)| {
                crate::trace::span(|| {
                    tracing::info_span!(parent: span, "encoder.vit", batch = size, images = pvs.len())
                })
            })
            .collect();
        match p.model.image_features_batch(&pvs) {
            Ok(features) => {
                for ((reply, _, _), f) in jobs.into_iter().zip(features) {
                    let _ = reply.send(Ok(f));
                }
            }
            Err(e) => {
                let e = ServeError::from(iris_engine::Error::from(e));
                for (reply, _, _) in jobs {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl VisionTier for LocalVision {
    async fn encode(
        &self,
        model: &str,
        image: Vec<u8>,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        // Decoded on the pool first (its header read here: a bad one costs nothing).
        let p = model_of(&self.models, model)?.clone();
        let (w, h) = iris_image::dimensions(&image, p.processor.limits())
            .map_err(|e| ServeError::bad_input(format!("image: {e}")))?;
        let decoding =
            crate::trace::span(|| tracing::info_span!("encoder.decode", width = w, height = h));
        let decoded = self.decode.run(u64::from(w) * u64::from(h), move || {
            let _in = decoding.enter();
            p.processor.pixel_values(&image).map(|(pixels, _)| pixels)
        });
        let pixel_values = match tokio::time::timeout(remaining(deadline)?, decoded).await {
            Ok(r) => r?.map_err(|e| ServeError::bad_input(format!("image: {e}")))?,
            Err(_) => {
                return Err(ServeError::Deadline(
                    "decoding the image took too long".into(),
                ))
            }
        };
        let (reply, rx) = oneshot::channel();
        let span = tracing::Span::current();
        let queued = crate::trace::span(|| tracing::info_span!("encoder.queue"));
        let job = Job {
            model: model.to_string(),
            pixel_values,
            reply,
            span,
            queued,
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ServeError::Overloaded("the vision tier's queue is full; retry later".into())
            }
            mpsc::error::TrySendError::Closed(_) => {
                ServeError::Unavailable("the vision tier stopped".into())
            }
        })?;
        self.metrics.encoder_queue.inc();
        match tokio::time::timeout(remaining(deadline)?, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ServeError::internal("the vision tier dropped the image")),
            Err(_) => Err(ServeError::Deadline(
                "encoding the image took too long".into(),
            )),
        }
    }
}

/// The connector tier in process.
pub struct LocalConnector {
    models: Arc<HashMap<String, Arc<Pipeline>>>,
    metrics: Arc<Metrics>,
}

impl LocalConnector {
    pub fn new(models: HashMap<String, Arc<Pipeline>>, metrics: Arc<Metrics>) -> Self {
        LocalConnector {
            models: Arc::new(models),
            metrics,
        }
    }
}

#[async_trait::async_trait]
impl ConnectorTier for LocalConnector {
    async fn project(
        &self,
        model: &str,
        features: Tensor,
        size: ImageSize,
        _deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        let p = model_of(&self.models, model)?.clone();
        if p.model.image_tokens().fixed().is_none() && (size.height == 0 || size.width == 0) {
            return Err(ServeError::bad_input(
                "this model's visual tokens depend on the image's size, and none was given",
            ));
        }
        let metrics = self.metrics.clone();
        let span = crate::trace::span(|| tracing::info_span!("connector.project", model));
        // The check reads every value: off the async runtime, with the projection.
        tokio::task::spawn_blocking(move || {
            let _in = span.enter();
            let want = p.model.feature_shape(size);
            iris_models::vlm::check_untrusted(&features, want, "features")?;
            metrics.connector_requests.inc();
            p.model.connect(&features, size)
        })
        .await
        .map_err(|e| ServeError::internal(format!("connector: {e}")))?
        .map_err(|e| iris_engine::Error::from(e).into())
    }
}

/// A vision member's share of the cluster-wide cache: the features of the images it
/// owns, keyed by the image's content and the tower's digest (so models on one tower
/// share them), bounded by bytes, least recently used out first, one encode for all
/// concurrent callers of a key.
pub struct CachingVision {
    inner: Arc<dyn VisionTier>,
    cache: VisualCache,
    /// Each model's vision-tower digest ([`crate::gateway::tower_digest`]).
    towers: HashMap<String, [u8; 32]>,
}

impl CachingVision {
    pub fn new(
        inner: Arc<dyn VisionTier>,
        towers: HashMap<String, [u8; 32]>,
        capacity_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> CachingVision {
        CachingVision {
            inner,
            cache: VisualCache::new(capacity_bytes, metrics),
            towers,
        }
    }
}

#[async_trait::async_trait]
impl VisionTier for CachingVision {
    async fn encode(
        &self,
        model: &str,
        image: Vec<u8>,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        self.inner.encode(model, image, deadline).await
    }

    async fn encode_keyed(
        &self,
        model: &str,
        image: Vec<u8>,
        image_key: Key,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        let tower = model_of(&self.towers, model)?;
        // The key says which image; the bytes are what is encoded, so they must agree.
        if *blake3::hash(&image).as_bytes() != image_key {
            return Err(ServeError::bad_input("image_key is not the image's BLAKE3"));
        }
        let key = VisualCache::key_of(tower, &image_key);
        let (inner, model) = (self.inner.clone(), model.to_string());
        let (features, _) = self
            .cache
            .get_or_compute(
                key,
                async move { inner.encode(&model, image, deadline).await },
            )
            .await?;
        Ok((*features).clone())
    }
}

/// A connector member's share of the cluster-wide cache: the visual tokens of the
/// keys it owns (the gateway's keys: image and model digest).
pub struct CachingConnector {
    inner: Arc<dyn ConnectorTier>,
    cache: VisualCache,
}

impl CachingConnector {
    pub fn new(
        inner: Arc<dyn ConnectorTier>,
        capacity_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> CachingConnector {
        CachingConnector {
            inner,
            cache: VisualCache::new(capacity_bytes, metrics),
        }
    }
}

#[async_trait::async_trait]
impl ConnectorTier for CachingConnector {
    async fn project(
        &self,
        model: &str,
        features: Tensor,
        size: ImageSize,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        self.inner.project(model, features, size, deadline).await
    }

    async fn cached(
        &self,
        _model: &str,
        key: Key,
        _deadline: Instant,
    ) -> Result<Option<Tensor>, ServeError> {
        Ok(self.cache.get(&key).map(|t| (*t).clone()))
    }

    async fn project_keyed(
        &self,
        model: &str,
        features: Tensor,
        size: ImageSize,
        key: Key,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        let (inner, model) = (self.inner.clone(), model.to_string());
        let (tokens, _) = self
            .cache
            .get_or_compute(key, async move {
                inner.project(&model, features, size, deadline).await
            })
            .await?;
        Ok((*tokens).clone())
    }
}

/// The decoder tier in process: one engine per model.
pub struct LocalDecoder {
    engines: HashMap<String, Arc<Engine>>,
    metrics: Arc<Metrics>,
}

impl LocalDecoder {
    pub fn new(engines: HashMap<String, Arc<Engine>>, metrics: Arc<Metrics>) -> Self {
        for (m, e) in &engines {
            metrics.watch_engine(m, e.clone());
        }
        LocalDecoder { engines, metrics }
    }
}

#[async_trait::async_trait]
impl DecoderTier for LocalDecoder {
    async fn generate(
        &self,
        req: pb::DecodeRequest,
        _deadline: Instant,
    ) -> Result<EventStream, ServeError> {
        let engine = model_of(&self.engines, &req.model)?;
        let visual = req
            .visual_tokens
            .iter()
            .map(wire::tensor_from_wire)
            .collect::<Result<Vec<_>, _>>()?;
        let options = wire::options(
            req.sampling.as_ref(),
            req.max_tokens,
            &req.stop,
            &req.stop_token_ids,
            req.top_logprobs,
            req.constraint.as_ref(),
            &req.logit_bias,
        )?;
        let mut request = EngineRequest::new(String::new(), Vec::new(), options);
        let span = crate::trace::span(|| {
            tracing::info_span!(
                "decoder.generate",
                model = %req.model,
                prompt_tokens = req.prompt_token_ids.len(),
                images = visual.len(),
                resumed = req.resume_token_ids.len(),
                completion_tokens = tracing::field::Empty,
            )
        });
        request.encoded = Some(EncodedPrompt {
            input_ids: req.prompt_token_ids,
            visual,
            resume: req.resume_token_ids,
        });
        // `submit` checks and hashes every visual token: off the async runtime.
        let engine = engine.clone();
        let stream = tokio::task::spawn_blocking(move || engine.submit(request))
            .await
            .map_err(|e| ServeError::internal(format!("decoder: {e}")))??;
        self.metrics.decoder_requests.inc();
        let mut produced = 0u32;
        // In the queue until the engine admits it, prefilling until the first token,
        // then decoding until the last.
        let mut queued = Some(crate::trace::span(
            || tracing::info_span!(parent: &span, "decoder.queue"),
        ));
        let mut prefilling = None::<tracing::Span>;
        let mut decoding = None::<tracing::Span>;
        Ok(Box::pin(StreamExt::filter_map(stream, move |ev| {
            match &ev {
                iris_engine::TokenEvent::Admitted { cached_tokens } => {
                    queued.take();
                    prefilling = Some(crate::trace::span(|| {
                        tracing::info_span!(
                            parent: &span,
                            "decoder.prefill",
                            cached_tokens = *cached_tokens
                        )
                    }));
                }
                iris_engine::TokenEvent::Token { .. } => {
                    produced += 1;
                    if produced == 1 {
                        queued.take();
                        prefilling.take();
                        decoding = Some(crate::trace::span(
                            || tracing::info_span!(parent: &span, "decoder.decode"),
                        ));
                    }
                }
                _ => {
                    span.record("completion_tokens", produced);
                    queued.take();
                    prefilling.take();
                    decoding.take();
                }
            }
            std::future::ready(wire::event_to_wire(ev, produced))
        })))
    }

    fn prefix_indexes(&self) -> Vec<(String, Arc<PrefixIndex>)> {
        self.engines
            .iter()
            .map(|(m, e)| (m.clone(), e.prefixes().clone()))
            .collect()
    }
}

// ---------------------------------------------------------------- remote

/// Replicas of one tier, picked by fewest outstanding calls (ties in turn).
pub struct Replicas<C> {
    members: RwLock<Vec<Arc<Member<C>>>>,
    turn: AtomicUsize,
    connect: fn(Channel) -> C,
    access: TierAccess,
    retries: prometheus_client::metrics::counter::Counter,
}

/// How the gateway reaches the tiers: over TLS (verifying them against the cluster CA,
/// presenting its own certificate) and with the cluster token, when configured; and how
/// it finds a member gone silent (a partition sends no reset): every connection is
/// pinged after `keepalive` without a frame from the member and closed when the ping
/// is not answered within `keepalive_timeout` — its calls and streams fail then
/// (UNAVAILABLE: retried elsewhere, a stream migrated) —, and a call waits at most
/// `attempt_timeout` for its answer (a decoder stream: for its start) before it is
/// tried on another member.
#[derive(Clone)]
pub struct TierAccess {
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    pub token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    pub keepalive: Duration,
    pub keepalive_timeout: Duration,
    pub attempt_timeout: Duration,
}

impl Default for TierAccess {
    fn default() -> Self {
        TierAccess {
            tls: None,
            token: None,
            keepalive: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(4),
            attempt_timeout: Duration::from_secs(30),
        }
    }
}

pub struct Member<C> {
    pub addr: String,
    client: C,
    outstanding: AtomicUsize,
    /// Until when (ms since `EPOCH`) the member is skipped after it was unreachable.
    down_until: AtomicU64,
    /// Times in a row it was unreachable: each doubles how long it is skipped.
    failures: AtomicU32,
    /// The load it last reported in the registry (work from every gateway).
    reported: AtomicU64,
}

/// A process-wide clock origin for `down_until`.
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How long an unreachable member is passed over (while others are up), the first
/// time; doubled each time again, up to `MAX_DOWN_MS`, until it answers.
const DOWN_FOR_MS: u64 = 1000;
const MAX_DOWN_MS: u64 = 16_000;

/// The pause before a call tries every member a second time.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

impl<C> Member<C> {
    /// It did not answer (or its connection broke): pass it over for a while.
    fn failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(4);
        let ms = (DOWN_FOR_MS << n).min(MAX_DOWN_MS);
        self.down_until.store(now_ms() + ms, Ordering::Relaxed);
    }

    fn answered(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }
}

/// A status's message and the errors under it (a broken connection's message is
/// only "http2 error"; the cause says which).
pub(crate) fn causes(s: &Status) -> String {
    let mut out = s.message().to_string();
    let mut e: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(x) = e {
        out.push_str(&format!(": {x}"));
        e = x.source();
    }
    out
}

/// An answer that means the member is gone or unreachable (down, going away, its
/// connection broken or silent): the call may go to another.
pub(crate) fn unreachable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

/// Counts a call against its member while it lasts.
struct Outstanding<C>(Arc<Member<C>>);

impl<C> Drop for Outstanding<C> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

fn channel(addr: &str, access: &TierAccess) -> Result<Channel, ServeError> {
    let scheme = if access.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{scheme}://{addr}")
    };
    let bad = |e: tonic::transport::Error| ServeError::bad_input(format!("address `{addr}`: {e}"));
    let mut ep = Endpoint::from_shared(uri)
        .map_err(bad)?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(access.keepalive)
        .keep_alive_timeout(access.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(tls) = &access.tls {
        ep = ep.tls_config(tls.clone()).map_err(bad)?;
    }
    Ok(ep.connect_lazy())
}

impl<C: Clone> Replicas<C> {
    pub fn new(addrs: &[String], connect: fn(Channel) -> C) -> Result<Self, ServeError> {
        Replicas::with_access(addrs, connect, TierAccess::default())
    }

    pub fn with_access(
        addrs: &[String],
        connect: fn(Channel) -> C,
        access: TierAccess,
    ) -> Result<Self, ServeError> {
        let r = Replicas {
            members: RwLock::new(Vec::new()),
            turn: AtomicUsize::new(0),
            connect,
            access,
            retries: Default::default(),
        };
        r.set(addrs)?;
        Ok(r)
    }

    /// Replaces the member list, keeping the connections of members that stay.
    pub fn set(&self, addrs: &[String]) -> Result<(), ServeError> {
        let old = self.members.read().expect("replicas lock").clone();
        let mut new = Vec::with_capacity(addrs.len());
        for a in addrs {
            match old.iter().find(|m| &m.addr == a) {
                Some(m) => new.push(m.clone()),
                None => new.push(Arc::new(Member {
                    addr: a.clone(),
                    client: (self.connect)(channel(a, &self.access)?),
                    outstanding: AtomicUsize::new(0),
                    down_until: AtomicU64::new(0),
                    failures: AtomicU32::new(0),
                    reported: AtomicU64::new(0),
                })),
            }
        }
        *self.members.write().expect("replicas lock") = new;
        Ok(())
    }

    /// Loads the members reported (routing weighs them with this gateway's own calls).
    pub fn set_loads(&self, loads: &[(String, u32)]) {
        for m in self.members.read().expect("replicas lock").iter() {
            let l = loads
                .iter()
                .find(|(a, _)| *a == m.addr)
                .map_or(0, |(_, l)| *l);
            m.reported.store(l as u64, Ordering::Relaxed);
        }
    }

    fn pick(&self, tried: &[String], how: &Pick) -> Option<(C, Outstanding<C>)> {
        let members = self.members.read().expect("replicas lock");
        let n = members.len();
        let now = now_ms();
        let load = |m: &Member<C>| {
            let mine = m.outstanding.load(Ordering::Relaxed) as u64;
            mine.max(m.reported.load(Ordering::Relaxed))
        };
        let down = |m: &Member<C>| m.down_until.load(Ordering::Relaxed) > now;
        let ring: &[Arc<Member<C>>] = &members;
        let in_turn = || {
            let start = self.turn.fetch_add(1, Ordering::Relaxed);
            (0..n)
                .map(move |i| &ring[(start + i) % n.max(1)])
                .filter(|m| !tried.contains(&m.addr))
        };
        let m = match how {
            // Least loaded, ties in turn; members that were unreachable a moment ago
            // go last.
            Pick::Load => in_turn().min_by_key(|m| (down(m), load(m)))?.clone(),
            // Least cost (members down a moment ago last), ties in turn.
            Pick::Cost(cost) => in_turn()
                .min_by_key(|m| (down(m), cost(&m.addr, load(m))))?
                .clone(),
            // The key's owner: rendezvous hashing over the members (every gateway
            // with the same membership picks the same one; a member joining or leaving
            // moves only its own keys), with bounded load — an owner above 1.25× the
            // mean load (plus one) hands the key to the next in its order.
            Pick::Owner(key) => {
                let mut order: Vec<&Arc<Member<C>>> = members
                    .iter()
                    .filter(|m| !tried.contains(&m.addr))
                    .collect();
                order.sort_by_key(|m| std::cmp::Reverse(owner_score(key, &m.addr)));
                let total: u64 = members.iter().map(|m| load(m)).sum();
                let bound = (5 * (total + 1)).div_ceil(4 * n.max(1) as u64);
                order
                    .iter()
                    .find(|m| !down(m) && load(m) <= bound)
                    .or_else(|| order.iter().find(|m| !down(m)))
                    .or(order.first())
                    .map(|m| (*m).clone())?
            }
        };
        m.outstanding.fetch_add(1, Ordering::Relaxed);
        Some((m.client.clone(), Outstanding(m)))
    }

    /// `call_by`, first at `key`'s owner when a key is given (then its next members),
    /// else at the least loaded.
    async fn call_for<T, F, Fut>(
        &self,
        tier: &str,
        key: Option<&Key>,
        deadline: Instant,
        f: F,
    ) -> Result<T, Status>
    where
        F: FnMut(C) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let how = key.map_or(Pick::Load, Pick::Owner);
        Ok(self.call_by(tier, &how, deadline, f).await?.0)
    }

    /// Runs an idempotent call on the replica `how` picks (the least loaded, a key's
    /// owner, the least costly), again on another while the answer is UNAVAILABLE,
    /// UNKNOWN or CANCELLED (the member is down, going away, or its connection broke),
    /// none came within the attempt timeout (a silent member), or RESOURCE_EXHAUSTED
    /// (another may have room); when none answered, every member once more after a
    /// pause. When every member is full the answer is RESOURCE_EXHAUSTED. Returns the
    /// answer and the member that gave it.
    async fn call_by<T, F, Fut>(
        &self,
        tier: &str,
        how: &Pick<'_>,
        deadline: Instant,
        mut f: F,
    ) -> Result<(T, Arc<Member<C>>), Status>
    where
        F: FnMut(C) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut tried = Vec::new();
        let (mut last, mut full) = (None, None);
        let mut again = true;
        loop {
            let Some((client, guard)) = self.pick(&tried, how) else {
                // Every member failed to answer: once more after a pause, in case
                // the failures were passing (a connection torn down under a lossy
                // link, a member restarting). Not when some are full: that answer is
                // to be given at once.
                if !again || full.is_some() || last.is_none() {
                    break;
                }
                again = false;
                tried.clear();
                tokio::time::sleep(RETRY_PAUSE.min(remaining(deadline)?)).await;
                continue;
            };
            let member = guard.0.clone();
            tried.push(member.addr.clone());
            let wait = remaining(deadline)?.min(self.access.attempt_timeout);
            let answer = match tokio::time::timeout(wait, f(client)).await {
                Ok(a) => a,
                Err(_) if Instant::now() >= deadline => {
                    return Err(Status::deadline_exceeded(format!(
                        "the request's deadline passed waiting for a {tier} member"
                    )))
                }
                Err(_) => Err(Status::unavailable(format!("no answer in {wait:?}"))),
            };
            match answer {
                Err(s) if unreachable(&s) => {
                    tracing::warn!(tier, member = %member.addr, "unavailable, retrying: {}", causes(&s));
                    member.failed();
                    self.retries.inc();
                    last = last.or(Some(s));
                }
                Err(s) if s.code() == Code::ResourceExhausted => {
                    tracing::info!(tier, member = %member.addr, "full, trying another");
                    member.answered();
                    self.retries.inc();
                    full = Some(s);
                }
                r => {
                    member.answered();
                    return r.map(|t| (t, member));
                }
            }
        }
        Err(full.unwrap_or_else(|| match last {
            Some(s) => Status::unavailable(format!("no {tier} member answered: {}", s.message())),
            None => Status::unavailable(format!("no {tier} member is available")),
        }))
    }

    /// Counts every call tried again on another member (`iris_tier_retries`).
    pub fn count_retries(mut self, c: prometheus_client::metrics::counter::Counter) -> Self {
        self.retries = c;
        self
    }

    /// The members, by address.
    pub fn len(&self) -> usize {
        self.members.read().expect("replicas lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a call picks its member.
enum Pick<'a> {
    /// The least loaded.
    Load,
    /// The key's owner (rendezvous hashing, bounded load).
    Owner(&'a Key),
    /// The least costly by a cost of the member's address and load.
    Cost(&'a (dyn Fn(&str, u64) -> u64 + Sync)),
}

/// A member's rendezvous-hashing score for `key`: the highest scoring member owns it.
fn owner_score(key: &Key, addr: &str) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(key);
    h.update(addr.as_bytes());
    let b = h.finalize();
    u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"))
}

impl<C> Replicas<C> {
    /// A call's request: its deadline, and the cluster token when there is one.
    fn request<T>(&self, msg: T, deadline: Instant) -> Result<tonic::Request<T>, Status> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(remaining(deadline).map_err(Status::from)?);
        if let Some(t) = &self.access.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        crate::trace::inject(r.metadata_mut());
        Ok(r)
    }
}

pub fn vision_client(c: Channel) -> VisionEncoderClient<Channel> {
    VisionEncoderClient::new(c)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn connector_client(c: Channel) -> ConnectorClient<Channel> {
    ConnectorClient::new(c)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn decoder_client(c: Channel) -> DecoderClient<Channel> {
    DecoderClient::new(c)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub struct RemoteVision(pub Replicas<VisionEncoderClient<Channel>>);
pub struct RemoteConnector(pub Replicas<ConnectorClient<Channel>>);
/// The decoders, picked by KV-aware routing (the decoder holding the longest cached
/// prefix of the request, weighed against its load) or by load alone.
pub struct RemoteDecoder {
    pub replicas: Replicas<DecoderClient<Channel>>,
    /// What each decoder holds, from its prefix events (none: load-only routing).
    routes: Option<KvRoutes>,
}

impl RemoteVision {
    async fn encode_at(
        &self,
        model: &str,
        image: Vec<u8>,
        image_key: Option<Key>,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        let features = self
            .0
            .call_for("vision", image_key.as_ref(), deadline, |mut c| {
                let msg = pb::EncodeRequest {
                    model: model.to_string(),
                    image: image.clone(),
                    image_key: image_key.map(|k| k.to_vec()).unwrap_or_default(),
                };
                let req = self.0.request(msg, deadline);
                async move { Ok(c.encode(req?).await?.into_inner()) }
            })
            .await?
            .features
            .ok_or_else(|| ServeError::internal("the vision tier returned no features"))?;
        wire::tensor_from_wire(&features)
            .map_err(|e| ServeError::internal(format!("the vision tier's features: {e}")))
    }
}

#[async_trait::async_trait]
impl VisionTier for RemoteVision {
    async fn encode(
        &self,
        model: &str,
        image: Vec<u8>,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        self.encode_at(model, image, None, deadline).await
    }

    async fn encode_keyed(
        &self,
        model: &str,
        image: Vec<u8>,
        image_key: Key,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        self.encode_at(model, image, Some(image_key), deadline)
            .await
    }
}

impl RemoteConnector {
    /// A Project call (at `key`'s owner when keyed); `features` absent: a lookup.
    async fn project_at(
        &self,
        model: &str,
        features: Option<(Tensor, ImageSize)>,
        key: Option<Key>,
        deadline: Instant,
    ) -> Result<Option<Tensor>, ServeError> {
        let size = features.as_ref().map(|f| f.1);
        let features = features
            .as_ref()
            .map(|f| wire::tensor_to_wire(&f.0))
            .transpose()?;
        let tokens = self
            .0
            .call_for("connector", key.as_ref(), deadline, |mut c| {
                let msg = pb::ProjectRequest {
                    model: model.to_string(),
                    features: features.clone(),
                    key: key.map(|k| k.to_vec()).unwrap_or_default(),
                    image_height: size.map_or(0, |s| s.height as u32),
                    image_width: size.map_or(0, |s| s.width as u32),
                };
                let req = self.0.request(msg, deadline);
                async move { Ok(c.project(req?).await?.into_inner()) }
            })
            .await?
            .visual_tokens;
        tokens
            .map(|t| {
                wire::tensor_from_wire(&t).map_err(|e| {
                    ServeError::internal(format!("the connector's visual tokens: {e}"))
                })
            })
            .transpose()
    }
}

fn no_tokens() -> ServeError {
    ServeError::internal("the connector returned no visual tokens")
}

#[async_trait::async_trait]
impl ConnectorTier for RemoteConnector {
    async fn project(
        &self,
        model: &str,
        features: Tensor,
        size: ImageSize,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        self.project_at(model, Some((features, size)), None, deadline)
            .await?
            .ok_or_else(no_tokens)
    }

    async fn cached(
        &self,
        model: &str,
        key: Key,
        deadline: Instant,
    ) -> Result<Option<Tensor>, ServeError> {
        self.project_at(model, None, Some(key), deadline).await
    }

    async fn project_keyed(
        &self,
        model: &str,
        features: Tensor,
        size: ImageSize,
        key: Key,
        deadline: Instant,
    ) -> Result<Tensor, ServeError> {
        self.project_at(model, Some((features, size)), Some(key), deadline)
            .await?
            .ok_or_else(no_tokens)
    }
}

/// The prefix blocks each decoder holds, per model, kept from its WatchPrefixes
/// stream (a snapshot, then changes; emptied while the stream is down, so a restarted
/// decoder holds nothing until it says so).
struct KvRoutes {
    views: std::sync::Mutex<HashMap<String, (Arc<PrefixView>, tokio::task::AbortHandle)>>,
}

#[derive(Default)]
struct PrefixView {
    /// Model → (block size, hashes held).
    models: RwLock<HashMap<String, (usize, std::collections::HashSet<u64>)>>,
}

impl PrefixView {
    fn apply(&self, ev: pb::PrefixEvent) {
        let mut g = self.models.write().expect("prefix view lock");
        let e = g
            .entry(ev.model)
            .or_insert_with(|| (ev.block_size as usize, Default::default()));
        e.0 = ev.block_size as usize;
        if ev.snapshot {
            e.1.clear();
        }
        ev.removed.iter().for_each(|h| {
            e.1.remove(h);
        });
        e.1.extend(ev.stored);
    }

    fn clear(&self) {
        self.models.write().expect("prefix view lock").clear();
    }

    /// Prompt tokens of `model`'s request (its images' hashes, its ids) in blocks this
    /// decoder holds, counted from the start; `chains` keeps each block size's chain.
    fn cached_tokens(
        &self,
        model: &str,
        images: &[[u8; 32]],
        ids: &[u32],
        chains: &std::sync::Mutex<HashMap<usize, Vec<u64>>>,
    ) -> usize {
        let g = self.models.read().expect("prefix view lock");
        let Some((bs, held)) = g.get(model) else {
            return 0;
        };
        let mut chains = chains.lock().expect("chains lock");
        let chain = chains.entry(*bs).or_insert_with(|| {
            // The last prompt token is always computed: blocks before it can hit.
            let full = ids.len().saturating_sub(1) / (*bs).max(1);
            iris_engine::blocks::chain_hashes(images, ids, *bs, full)
        });
        chain.iter().take_while(|h| held.contains(h)).count() * bs
    }
}

impl KvRoutes {
    /// Starts watching the members not watched yet and stops those gone.
    fn follow(&self, replicas: &Replicas<DecoderClient<Channel>>) {
        let members = replicas.members.read().expect("replicas lock").clone();
        let mut views = self.views.lock().expect("routes lock");
        views.retain(|addr, (_, task)| {
            let keep = members.iter().any(|m| &m.addr == addr);
            if !keep {
                task.abort();
            }
            keep
        });
        for m in members {
            if views.contains_key(&m.addr) {
                continue;
            }
            let view = Arc::new(PrefixView::default());
            let (v, mut client, token) = (
                view.clone(),
                m.client.clone(),
                replicas.access.token.clone(),
            );
            let addr = m.addr.clone();
            let task = tokio::spawn(async move {
                loop {
                    let mut req = tonic::Request::new(pb::WatchPrefixesRequest {});
                    if let Some(t) = &token {
                        req.metadata_mut().insert("authorization", t.clone());
                    }
                    match client.watch_prefixes(req).await {
                        Ok(stream) => {
                            let mut stream = stream.into_inner();
                            while let Ok(Some(ev)) = stream.message().await {
                                v.apply(ev);
                            }
                        }
                        Err(s) if s.code() == Code::Unimplemented => {
                            tracing::info!(member = %addr, "no prefix events: load-only routing to it");
                            return;
                        }
                        Err(_) => {}
                    }
                    v.clear();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
            views.insert(m.addr.clone(), (view, task.abort_handle()));
        }
    }

    fn view(&self, addr: &str) -> Option<Arc<PrefixView>> {
        self.views
            .lock()
            .expect("routes lock")
            .get(addr)
            .map(|(v, _)| v.clone())
    }
}

impl RemoteDecoder {
    /// Decoders at `addrs` (more from the membership), routed by prefix when
    /// `kv_routing`.
    pub fn new(replicas: Replicas<DecoderClient<Channel>>, kv_routing: bool) -> RemoteDecoder {
        let routes = kv_routing.then(|| KvRoutes {
            views: Default::default(),
        });
        if let Some(r) = &routes {
            r.follow(&replicas);
        }
        RemoteDecoder { replicas, routes }
    }

    /// Replaces the member list (and the prefix streams followed).
    pub fn set(&self, addrs: &[String]) -> Result<(), ServeError> {
        self.replicas.set(addrs)?;
        if let Some(r) = &self.routes {
            r.follow(&self.replicas);
        }
        Ok(())
    }
}

/// The request's image hashes, when it carries one per image.
fn image_hashes(req: &pb::DecodeRequest) -> Option<Vec<[u8; 32]>> {
    if req.image_hashes.len() != req.visual_tokens.len() {
        return None;
    }
    req.image_hashes
        .iter()
        .map(|h| h.as_slice().try_into().ok())
        .collect()
}

#[async_trait::async_trait]
impl DecoderTier for RemoteDecoder {
    /// Starting the stream is retried on another decoder while UNAVAILABLE; once it
    /// runs, its events are the decoder's. With KV-aware routing the decoder is the
    /// one whose cost is least: the prompt tokens it would have to compute (those not
    /// in its cached prefix) plus a quarter of the prompt for every request it already
    /// has (continuous batching admits a new request beside them; each slows the steps
    /// a little, and a full batch makes it wait) — so a held prefix wins unless its
    /// decoder is busier by more than four requests per prompt's worth it saves.
    async fn generate(
        &self,
        req: pb::DecodeRequest,
        deadline: Instant,
    ) -> Result<EventStream, ServeError> {
        let images = image_hashes(&req);
        let chains = std::sync::Mutex::new(HashMap::new());
        let prompt = req.prompt_token_ids.len() as u64;
        let cost = |addr: &str, load: u64| -> u64 {
            let cached = match (&self.routes, &images) {
                (Some(r), Some(images)) => r.view(addr).map_or(0, |v| {
                    v.cached_tokens(&req.model, images, &req.prompt_token_ids, &chains)
                }),
                _ => 0,
            };
            (prompt - (cached as u64).min(prompt)) + load * prompt.div_ceil(4)
        };
        let how = if self.routes.is_some() && images.is_some() {
            Pick::Cost(&cost)
        } else {
            Pick::Load
        };
        let (stream, member) = self
            .replicas
            .call_by("decoder", &how, deadline, |mut c| {
                let msg = req.clone();
                let req = self.replicas.request(msg, deadline);
                async move { Ok(c.generate(req?).await?.into_inner()) }
            })
            .await?;
        // A stream that breaks (its decoder died, went silent, or its connection
        // broke) passes its decoder over for a while: the gateway moves the stream,
        // and the move should not go back to it.
        Ok(Box::pin(stream.inspect(move |ev| {
            if ev.as_ref().is_err_and(unreachable) {
                member.failed();
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::gauge::Gauge;

    /// Occupies the pool's one thread until the returned gate is opened.
    async fn hold(
        pool: &Arc<DecodePool>,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<(), ServeError>>,
    ) {
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let p = pool.clone();
        let held = tokio::spawn(async move {
            p.run(0, move || {
                let _ = started_tx.send(());
                gate_rx.recv().unwrap();
            })
            .await
        });
        started_rx.await.unwrap();
        (gate_tx, held)
    }

    #[tokio::test]
    async fn equal_members_take_turns_and_a_key_keeps_its_owner() {
        let addrs: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", 1000 + i)).collect();
        let r = Replicas::new(&addrs, vision_client).unwrap();
        let picked = |how: &Pick| r.pick(&[], how).map(|(_, g)| g.0.addr.clone()).unwrap();
        let turns: Vec<String> = (0..6).map(|_| picked(&Pick::Load)).collect();
        assert_eq!(
            turns[..3]
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len(),
            3,
            "{turns:?}"
        );
        assert_eq!(turns[..3], turns[3..]);
        let key = [7u8; 32];
        let owner = picked(&Pick::Owner(&key));
        assert!((0..5).all(|_| picked(&Pick::Owner(&key)) == owner));
        // The owner's other keys stay when another member leaves.
        let other = addrs.iter().find(|a| **a != owner).unwrap().clone();
        let rest: Vec<String> = addrs.iter().filter(|a| **a != other).cloned().collect();
        r.set(&rest).unwrap();
        assert_eq!(picked(&Pick::Owner(&key)), owner);
    }

    #[tokio::test]
    async fn the_decode_pool_takes_the_smallest_image_first() {
        let queued = Gauge::default();
        let pool = Arc::new(DecodePool::new(1, 16, queued.clone()));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        // Hold the one thread until the others are queued.
        let (gate_tx, held) = hold(&pool).await;
        let mut tasks = Vec::new();
        for (name, pixels) in [
            ("big-1", 40_000_000),
            ("big-2", 40_000_000),
            ("small", 300_000),
        ] {
            let (p, order) = (pool.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                p.run(pixels, move || order.lock().unwrap().push(name))
                    .await
            }));
            while queued.get() < tasks.len() as i64 {
                tokio::task::yield_now().await;
            }
        }
        gate_tx.send(()).unwrap();
        held.await.unwrap().unwrap();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["small", "big-1", "big-2"]);
        assert_eq!(queued.get(), 0);
        // A full queue refuses rather than grows.
        let queued = Gauge::default();
        let tiny = Arc::new(DecodePool::new(1, 1, queued.clone()));
        let (gate_tx, blocker) = hold(&tiny).await;
        let t = tiny.clone();
        let waiting = tokio::spawn(async move { t.run(1, || ()).await });
        while queued.get() < 1 {
            tokio::task::yield_now().await;
        }
        let full = tiny.run(1, || ()).await;
        assert!(matches!(full, Err(ServeError::Overloaded(_))), "{full:?}");
        gate_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        waiting.await.unwrap().unwrap();
    }
}
