//! The processes Iris runs as: `serve` (every tier and the gateway in one process, the
//! embedded default), and each tier or the gateway alone (`iris-encoder`,
//! `iris-connector`, `iris-decoder`, `iris-gateway`, also `iris <role>`). Each binds its
//! addresses, prints one `listening grpc=… http=…` line, and stops cleanly on SIGTERM
//! or Ctrl-C.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use iris_engine::{Engine, EngineConfig, Family, KvDtype, Parts, Pipeline, PipelineOptions, Task};
use iris_image::ImageLimits;
use iris_models::config::{ImageSize, ImageTokens};
use iris_proto::v1::connector_server::ConnectorServer;
use iris_proto::v1::decoder_server::DecoderServer;
use iris_proto::v1::gateway_server::GatewayServer;
use iris_proto::v1::vision_encoder_server::VisionEncoderServer;
use iris_tensor::quant::QuantType;
use iris_tensor::{DType, Device};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::transport::server::Router;
use tonic::transport::Server;

use crate::tp_group::{Formed, GroupArgs};
use crate::StartError;
use iris_cluster::{EtcdAccess, EtcdRegistry, Member, Registry, View};
use iris_server::auth::Keys;
use iris_server::gateway::{Gateway, GatewayLimits, GatewayModel};
use iris_server::listen::{self, ConnPolicy, Proto, TlsFiles};
use iris_server::metrics::{Metrics, TierLabel};
use iris_server::openai::{self, HttpConfig};
use iris_server::services::{
    limited, ConnectorService, DecoderService, GatewayService, VisionService,
};
use iris_server::tiers::{
    connector_client, decoder_client, vision_client, BatchConfig, CachingConnector, CachingVision,
    LocalConnector, LocalDecoder, LocalVision, RemoteConnector, RemoteDecoder, RemoteVision,
    Replicas, TierAccess,
};
use std::convert::Infallible;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ClientTlsConfig;

/// A served model: `ID=DIR`, or `DIR` (its id is the folder's name); DIR may be a
/// LLaMA `.gguf` file (its id then the file's stem).
#[derive(Debug, Clone)]
pub struct ModelArg {
    pub id: String,
    pub dir: PathBuf,
}

pub fn parse_model(s: &str) -> Result<ModelArg, String> {
    let (id, dir) = match s.split_once('=') {
        Some((id, dir)) if !id.is_empty() => (id.to_string(), PathBuf::from(dir)),
        _ => {
            let dir = PathBuf::from(s);
            let gguf = iris_models::registry::is_gguf(&dir);
            let id = if gguf {
                dir.file_stem()
            } else {
                dir.file_name()
            }
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("`{s}`: no folder name to use as the model id"))?
            .to_string();
            (id, dir)
        }
    };
    if !dir.join("config.json").exists() && !iris_models::registry::is_gguf(&dir) {
        return Err(format!(
            "`{}` has no config.json (and is not a .gguf file)",
            dir.display()
        ));
    }
    Ok(ModelArg { id, dir })
}

pub(crate) fn parse_dtype(s: &str) -> Result<DType, String> {
    match DType::parse(s) {
        Some(d @ (DType::F32 | DType::BF16)) => Ok(d),
        _ => Err(format!("`{s}`: expected f32 or bf16")),
    }
}

/// `q8_0` (or `int8`), `q4_0` or `q4_1`: the block format `--quantize` asks for.
pub fn parse_quantize(s: &str) -> Result<QuantType, String> {
    QuantType::parse(s).ok_or_else(|| format!("`{s}`: expected q8_0 (int8), q4_0 or q4_1"))
}

/// `cpu`, `cuda` or `cuda:N`: a CUDA device is opened (its kernels compiled) now, so a
/// machine without one fails here with the reason.
pub(crate) fn parse_device(s: &str) -> Result<Device, String> {
    Device::parse(s).map_err(|e| e.to_string())
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model to serve: `[ID=]DIR` (repeatable; the id defaults to the folder's name).
    #[arg(long = "model", required = true, value_parser = parse_model)]
    pub models: Vec<ModelArg>,
    /// Compute dtype (default: each checkpoint's).
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<DType>,
    /// Where the models run: cpu, cuda or cuda:N (the CUDA backend needs a build with
    /// `--features cuda` and a GPU; without either this is a clear error at start-up).
    #[arg(long, env = "IRIS_DEVICE", default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// Quantize the language models' linear layers as they load: q8_0 (or int8: 8-bit
    /// values, a scale per 32), q4_0 or q4_1 (ggml's block formats; the CPU backend).
    /// Vision towers, connectors, embeddings and norms keep the dtype.
    #[arg(long, env = "IRIS_QUANTIZE", value_parser = parse_quantize)]
    pub quantize: Option<QuantType>,
    /// Split each language model over N rank processes on this machine (tensor
    /// parallelism over shared memory; rank 0 is this process; the decoder and
    /// `iris serve`).
    #[arg(long, env = "IRIS_TP", default_value_t = 1)]
    pub tp: usize,
    /// Largest image file accepted, in bytes.
    #[arg(long, env = "IRIS_MAX_IMAGE_BYTES", default_value_t = ImageLimits::default().max_bytes)]
    pub max_image_bytes: usize,
    /// Largest image accepted, in pixels (checked from the header, before decoding).
    #[arg(long, env = "IRIS_MAX_IMAGE_PIXELS", default_value_t = ImageLimits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// Most images in one request (the gateway refuses more; the decoder sizes its
    /// message limit by it).
    #[arg(long, env = "IRIS_MAX_IMAGES", default_value_t = 8)]
    pub max_images: usize,
    /// Pixels a request's images may have in all (from their headers).
    #[arg(long, default_value_t = 40_000_000)]
    pub max_request_pixels: u64,
}

/// The tier a message limit is for.
#[derive(Debug, Clone, Copy)]
enum Tier {
    Encoder,
    Connector,
    Decoder,
}

impl ModelArgs {
    /// The largest message a tier takes, from what the models it serves can use: one
    /// image file (encoder), one image's features (connector), the images of a request
    /// as visual tokens plus a context of ids (decoder), all as f32, plus 1 MiB of room.
    /// A tier never decodes a message larger than its work can be.
    fn message_limit(&self, pipelines: &HashMap<String, Arc<Pipeline>>, tier: Tier) -> usize {
        let room = 1 << 20;
        let f32s = |[r, c]: [usize; 2]| r * c * 4;
        let per_model = |p: &Arc<Pipeline>| {
            // The image with the most features and visual tokens (LLaVA-NeXT's count
            // grows with the size; the others' is fixed).
            let size = match p.model.image_tokens() {
                ImageTokens::AnyRes(g) => g.largest(),
                _ => ImageSize::default(),
            };
            match tier {
                Tier::Encoder => self.max_image_bytes,
                Tier::Connector => f32s(p.model.feature_shape(size)),
                Tier::Decoder => {
                    self.max_images * f32s(p.model.visual_shape(size)) + 8 * p.context_length()
                }
            }
        };
        pipelines.values().map(per_model).max().unwrap_or(0) + room
    }

    fn limits(&self) -> ImageLimits {
        ImageLimits {
            max_bytes: self.max_image_bytes,
            max_pixels: self.max_image_pixels,
        }
    }

    /// The generation models' `parts` (retrieval models are served by the gateway
    /// itself, not the tiers).
    fn options(&self) -> PipelineOptions {
        PipelineOptions {
            dtype: self.dtype,
            limits: self.limits(),
            device: self.device,
            quantize: self.quantize,
        }
    }

    /// The models that generate (those the tiers serve).
    fn generative(&self) -> Result<Vec<&ModelArg>, StartError> {
        let mut out = Vec::new();
        for m in &self.models {
            let family = Family::of_dir(&m.dir).map_err(|e| StartError::load(&m.dir, e))?;
            if family.task() != Task::Retrieval {
                out.push(m);
            }
        }
        Ok(out)
    }

    fn pipelines(&self, parts: Parts) -> Result<HashMap<String, Arc<Pipeline>>, StartError> {
        let opts = self.options();
        let mut out = HashMap::new();
        for m in self.generative()? {
            let p = if self.tp > 1 && parts.language {
                let (p, group) = crate::tp_group::LocalGroup::start(&m.dir, &opts, parts, self.tp)
                    .map_err(|e| {
                        StartError::load(&m.dir, iris_engine::Error::Unavailable(format!("{e:#}")))
                    })?;
                // The ranks live as long as this process (they go with it).
                crate::tp_group::keep(group);
                p
            } else {
                Pipeline::load_parts(&m.dir, &opts, parts)
                    .map_err(|e| StartError::load(&m.dir, e))?
            };
            log_loaded(&m.id, parts, &p);
            out.insert(m.id.clone(), Arc::new(p));
        }
        Ok(out)
    }

    /// Rank `rank` of each model's decoder group (`--rank`): forms the group through
    /// etcd or the static addresses, then loads this rank's shard.
    async fn group_pipelines(
        &self,
        listen: &Listen,
        sec: &Security,
        g: &GroupArgs,
        rank: usize,
    ) -> Result<Vec<(String, Pipeline, Formed)>, StartError> {
        let models = self.generative()?;
        if listen.etcd.is_empty() && models.len() > 1 {
            return Err(StartError::Invalid(
                "--tp-addrs forms one group: serve one model, or meet through --etcd".into(),
            ));
        }
        let ttl = Duration::from_secs(listen.lease_ttl_s.max(1));
        let mut out = Vec::new();
        for m in models {
            let at = crate::tp_group::Place {
                reg: listen.registry(sec),
                cluster: &listen.cluster,
                ttl,
                device: self.device,
            };
            let formed = crate::tp_group::form(at, &m.id, g, rank, self.tp)
                .await
                .map_err(|e| {
                    StartError::load(&m.dir, iris_engine::Error::Unavailable(format!("{e:#}")))
                })?;
            let (dir, opts, comm) = (m.dir.clone(), self.options(), formed.comm.clone());
            let p = tokio::task::spawn_blocking(move || {
                Pipeline::load_tp(&dir, &opts, Parts::LANGUAGE, comm)
            })
            .await?
            .map_err(|e| StartError::load(&m.dir, e))?;
            log_loaded(&m.id, Parts::LANGUAGE, &p);
            out.push((m.id.clone(), p, formed));
        }
        Ok(out)
    }
}

impl ModelArgs {
    /// Each model's vision-tower digest (the cluster-wide cache's feature keys).
    fn tower_digests(
        &self,
        pipelines: &HashMap<String, Arc<Pipeline>>,
    ) -> Result<HashMap<String, [u8; 32]>, StartError> {
        let mut out = HashMap::new();
        for m in &self.models {
            if let Some(p) = pipelines.get(&m.id) {
                let d = iris_server::gateway::tower_digest(&m.dir, p.tensors_read(), self.dtype)?;
                out.insert(m.id.clone(), d);
            }
        }
        Ok(out)
    }
}

fn log_loaded(id: &str, parts: Parts, p: &Pipeline) {
    tracing::info!(
        model = %id,
        ?parts,
        tensors = p.tensors_read().len(),
        mib = p.bytes_read() >> 20,
        "loaded"
    );
}

#[derive(Args, Debug, Clone)]
pub struct EncoderArgs {
    /// Bytes of vision features this encoder keeps for the images it owns in the
    /// cluster-wide cache (least recently used out first; 0: none kept).
    #[arg(long, value_parser = parse_bytes, default_value = "1GiB")]
    pub feature_cache_bytes: usize,
    /// Most images encoded in one batch.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Images waiting before new ones are refused (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 1024)]
    pub encoder_queue: usize,
    /// Threads that decode and preprocess images (smallest image first).
    #[arg(long, default_value_t = 2)]
    pub decode_threads: usize,
}

impl EncoderArgs {
    fn batch(&self) -> BatchConfig {
        BatchConfig {
            max_batch: self.max_batch,
            max_wait: Duration::from_millis(self.max_wait_ms),
            queue: self.encoder_queue,
            decode_threads: self.decode_threads,
        }
    }
}

/// A byte count: `4GiB`, `512MiB`, `64KiB`, `2GB`, `1.5GiB` or plain bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: not a number of bytes"))?;
    Ok((n * scale) as usize)
}

/// Bytes the kernel says could be allocated now without swapping (`MemAvailable`).
fn available_memory() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `--kv-cache-dtype`: a dtype, or `None` for the model's.
#[derive(Debug, Clone, Copy)]
pub struct KvChoice(pub Option<KvDtype>);

fn parse_kv_dtype(s: &str) -> Result<KvChoice, String> {
    match s {
        "auto" => Ok(KvChoice(None)),
        "bf16" => Ok(KvChoice(Some(KvDtype::Bf16))),
        "f32" => Ok(KvChoice(Some(KvDtype::F32))),
        "fp8" | "fp8_e4m3" => Err(format!(
            "`{s}`: fp8 K/V needs a backend with fp8 (the CUDA backend); the CPU backend stores f32 or bf16"
        )),
        _ => Err(format!("`{s}`: expected auto, bf16 or f32")),
    }
}

#[derive(Args, Debug, Clone)]
pub struct DecoderArgs {
    /// KV cache budget per model, e.g. `4GiB` (default: `--kv-cache-share` of the memory
    /// available once the weights are loaded, split over the models, and at most what
    /// twice `--max-running` full-context sequences need). Reserved at start-up, in the
    /// model's K/V dtype; a budget below one full-context sequence is an error.
    #[arg(long, env = "IRIS_KV_CACHE_BYTES", value_parser = parse_bytes, conflicts_with = "kv_blocks")]
    pub kv_cache_bytes: Option<usize>,
    /// Share of the available memory the default KV budget takes.
    #[arg(long, default_value_t = 0.4)]
    pub kv_cache_share: f64,
    /// An exact KV block count instead of a budget.
    #[arg(long)]
    pub kv_blocks: Option<usize>,
    /// How K/V are stored: `auto` (the model's dtype: bf16 for a bf16 model, f32 for
    /// f32), `bf16`, `f32`. (`fp8` needs a backend that has it; the CPU has none.)
    #[arg(long, env = "IRIS_KV_CACHE_DTYPE", default_value = "auto", value_parser = parse_kv_dtype)]
    pub kv_cache_dtype: KvChoice,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Most requests running together.
    #[arg(long, default_value_t = 16)]
    pub max_running: usize,
    /// Requests waiting for the engine before new ones are refused (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Prompt tokens prefilled per engine step.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Test hook: milliseconds to pause after each engine step.
    #[arg(long, hide = true, default_value_t = 0)]
    pub test_step_delay_ms: u64,
    /// Test hook: panic once in the first decoding step from this one on.
    #[arg(long, hide = true)]
    pub test_panic_at_step: Option<usize>,
    /// Test hook: the engine thread dies after this many steps.
    #[arg(long, hide = true)]
    pub test_engine_dies_at_step: Option<usize>,
}

impl DecoderArgs {
    /// The KV blocks of one model's engine: the exact count, the budget's, or the
    /// default share of `available` bytes (split over `models`).
    fn kv_blocks(
        &self,
        id: &str,
        p: &Pipeline,
        available: Option<usize>,
        models: usize,
    ) -> Result<usize, StartError> {
        let bs = self.block_size.max(1);
        if let Some(n) = self.kv_blocks {
            return Ok(n);
        }
        let dtype = iris_engine::kv_dtype(p, self.kv_cache_dtype.0);
        let per_block =
            iris_engine::kv_block_bytes(p, bs, dtype).map_err(|e| StartError::load_id(id, e))?;
        let context = p.context_length();
        let (budget, from) = match self.kv_cache_bytes {
            Some(b) => (b, "--kv-cache-bytes"),
            None => {
                let useful = 2 * self.max_running.max(1) * context.div_ceil(bs) * per_block;
                let share = available
                    .map(|a| (a as f64 * self.kv_cache_share) as usize / models.max(1))
                    .unwrap_or(useful);
                (share.min(useful), "default")
            }
        };
        let blocks = iris_engine::kv_blocks_for_budget(p, bs, dtype, budget, context)
            .map_err(|e| StartError::load_id(id, e))?;
        tracing::info!(
            model = id,
            budget_mib = budget >> 20,
            from,
            blocks,
            block_tokens = bs,
            block_bytes = per_block,
            %dtype,
            reserved_mib = (blocks * per_block) >> 20,
            available_mib = available.map(|a| a >> 20),
            "KV cache"
        );
        Ok(blocks)
    }

    /// One engine per model, each with its KV cache reserved (read the available memory
    /// after every model's weights are loaded).
    fn engines(
        &self,
        pipelines: &HashMap<String, Arc<Pipeline>>,
    ) -> Result<HashMap<String, Arc<Engine>>, StartError> {
        let available = available_memory();
        let mut out = HashMap::new();
        for (id, p) in pipelines {
            let config = EngineConfig {
                max_batch: self.max_running,
                kv_blocks: self.kv_blocks(id, p, available, pipelines.len())?,
                block_size: self.block_size,
                queue: self.max_waiting,
                prefill_chunk: self.prefill_chunk,
                step_delay: Duration::from_millis(self.test_step_delay_ms),
                panic_at_step: self.test_panic_at_step,
                kv_dtype: self.kv_cache_dtype.0,
                die_at_step: self.test_engine_dies_at_step,
            };
            let (engine, _) = Engine::start_with(p.clone(), config, Vec::new())
                .map_err(|e| StartError::load_id(id, e))?;
            out.insert(id.clone(), Arc::new(engine));
        }
        Ok(out)
    }
}

#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Largest `max_tokens` a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens: usize,
    /// Bytes of visual tokens the gateway caches.
    #[arg(long, default_value_t = 1 << 30)]
    pub visual_cache_bytes: usize,
    /// Seconds a request may take when it sets no deadline.
    #[arg(long, default_value_t = 300)]
    pub request_timeout_s: u64,
    /// A host whose http(s) image URLs may be fetched: `host` (any port) or `host:port`
    /// (that port only); repeatable, none by default.
    #[arg(long = "allow-image-host")]
    pub allow_image_hosts: Vec<String>,
    /// Seconds to fetch one image URL.
    #[arg(long, default_value_t = 10)]
    pub image_fetch_timeout_s: u64,
    /// Times a stream may move to another decoder when its decoder dies (0: never).
    #[arg(long, default_value_t = 3)]
    pub max_migrations: usize,
    /// Milliseconds without a frame from a tier member after which its connection is
    /// pinged (HTTP/2 keepalive; idle connections too).
    #[arg(long, default_value_t = 1000)]
    pub tier_keepalive_ms: u64,
    /// Milliseconds a ping may go unanswered before the connection counts as dead: its
    /// calls are retried elsewhere and its streams move. A member cut off by a
    /// partition (no reset ever comes) is found within keepalive + this (5 s by
    /// default; long enough for a ping queued behind data on a slow, lossy link).
    #[arg(long, default_value_t = 4000)]
    pub tier_keepalive_timeout_ms: u64,
    /// Seconds one attempt of a tier call may wait for its answer (a decoder stream:
    /// for its start) before it goes to another member.
    #[arg(long, default_value_t = 30)]
    pub tier_attempt_timeout_s: u64,
    /// `max_tokens` of an HTTP request that sets none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// API keys a client must send (HTTP `Authorization: Bearer KEY`, gRPC
    /// `authorization` metadata); comma-separated or repeated. None: open.
    #[arg(
        long = "api-key",
        env = "IRIS_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line (`#` comments).
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
}

impl GatewayArgs {
    fn limits(&self, models: &ModelArgs) -> GatewayLimits {
        GatewayLimits {
            max_images: models.max_images,
            max_request_pixels: models.max_request_pixels,
            max_tokens: self.max_tokens,
            image: models.limits(),
            request_timeout: Duration::from_secs(self.request_timeout_s),
            cache_bytes: self.visual_cache_bytes,
            max_migrations: self.max_migrations,
        }
    }

    fn keys(&self) -> Result<Keys, StartError> {
        let mut keys = self.api_keys.clone();
        if let Some(f) = &self.api_key_file {
            keys.extend(
                iris_server::auth::read_key_file(f)
                    .map_err(|e| StartError::Invalid(format!("{}: {e}", f.display())))?,
            );
        }
        Ok(Keys::new("API key", keys))
    }

    fn http(&self, keys: &Keys, open_metrics: bool) -> HttpConfig {
        HttpConfig {
            allowed_image_hosts: self.allow_image_hosts.clone(),
            fetch_timeout: Duration::from_secs(self.image_fetch_timeout_s),
            default_max_tokens: self.default_max_tokens,
            keys: keys.clone(),
            open_metrics,
        }
    }
}

/// A role's command line: what its process exports traces as, and where.
pub trait Role: Args + Clone {
    fn telemetry(&self) -> crate::telemetry::Telemetry;
}

macro_rules! role {
    ($t:ty, $service:literal) => {
        impl Role for $t {
            fn telemetry(&self) -> crate::telemetry::Telemetry {
                crate::telemetry::Telemetry {
                    endpoint: self.listen.otlp_endpoint.clone(),
                    service: $service,
                }
            }
        }
    };
}
role!(ServeArgs, "iris");
role!(GatewayRole, "iris-gateway");
role!(EncoderRole, "iris-encoder");
role!(ConnectorRole, "iris-connector");
role!(DecoderRole, "iris-decoder");

#[derive(Args, Debug, Clone)]
pub struct Listen {
    /// gRPC address (port 0: any free port; the line printed at start says which).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// HTTP address: the OpenAI API (gateway) or `/metrics` and `/health` (tiers).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,
    /// etcd endpoints (comma-separated): register this member under a lease there
    /// (the gateway also finds the tiers there).
    #[arg(long, env = "IRIS_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The cluster's name: its keys live under `/iris/<cluster>/`.
    #[arg(long, env = "IRIS_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Export traces over OTLP/HTTP (protobuf) to this collector, e.g.
    /// `http://otel-collector:4318` (`/v1/traces` is added when the URL has no path):
    /// one trace a request across the tiers, a client's `traceparent` its parent. Off
    /// when unset (no span is made).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Seconds a member stays registered after its last keep-alive.
    #[arg(long, default_value_t = 3)]
    pub lease_ttl_s: u64,
    /// The gRPC address others reach this member at (default: the bound address).
    #[arg(long)]
    pub advertise_addr: Option<String>,
    /// Connections each listener keeps open at once; past it a new one is closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a connection may stay silent: a gRPC peer that sends nothing (the
    /// server pings a quiet peer every second, so a live one answers) or any peer that
    /// takes no output.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_s: u64,
    /// Seconds an HTTP client has to send a request head (the wait of an idle
    /// keep-alive connection included) and each piece of a body.
    #[arg(long, default_value_t = 10)]
    pub header_timeout_s: u64,
    /// This process's PEM certificate chain: TLS on both its listeners, and the client
    /// certificate it presents to the members and the etcd it calls.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// gRPC callers must present a certificate this CA signed (mutual TLS; at a tier,
    /// the cluster's CA).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// The CA of the members this process calls: calls go over TLS, verified by it.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The cluster's shared secret: a tier refuses calls (and `/metrics`) without it,
    /// the gateway sends it.
    #[arg(long, env = "IRIS_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,
    /// A file holding the cluster token (its first line).
    #[arg(long, conflicts_with = "cluster_token")]
    pub cluster_token_file: Option<PathBuf>,
    /// `/metrics` answers without an API key or cluster token.
    #[arg(long)]
    pub open_metrics: bool,
    #[command(flatten)]
    pub etcd_auth: EtcdArgs,
}

/// How to reach a secured etcd (every role, and `iris cluster`).
#[derive(Args, Debug, Clone, Default)]
pub struct EtcdArgs {
    /// etcd's CA: talk to etcd over TLS (`https://` endpoints).
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd's `--client-cert-auth` (a role's default: its
    /// `--tls-cert`).
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (etcd's auth), with `--etcd-password` / `IRIS_ETCD_PASSWORD`.
    #[arg(long, env = "IRIS_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,
    #[arg(long, env = "IRIS_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
}

impl EtcdArgs {
    /// The access these flags give; `identity` is the client certificate when no
    /// `--etcd-cert` is given.
    pub fn access(
        &self,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<EtcdAccess, StartError> {
        let id = (self.etcd_cert.as_deref().zip(self.etcd_key.as_deref())).or(identity);
        let tls = self
            .etcd_ca
            .as_deref()
            .map(|ca| client_tls(ca, id))
            .transpose()?;
        Ok(EtcdAccess {
            user: self.etcd_user.clone().zip(self.etcd_password.clone()),
            tls,
        })
    }
}

/// What a process's credentials and certificates make of its listeners and calls.
#[derive(Clone, Default)]
pub struct Security {
    grpc_tls: Option<Arc<rustls::ServerConfig>>,
    http_tls: Option<Arc<rustls::ServerConfig>>,
    /// The cluster token a tier asks for.
    cluster: Keys,
    /// How the gateway calls the tiers.
    tiers: TierAccess,
    etcd: EtcdAccess,
}

fn read_pem(path: &std::path::Path) -> Result<String, StartError> {
    std::fs::read_to_string(path)
        .map_err(|e| StartError::Invalid(format!("{}: {e}", path.display())))
}

/// A TLS client's config: servers verified by `ca`, `identity` (certificate, key) its
/// client certificate when given.
fn client_tls(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<ClientTlsConfig, StartError> {
    let mut t = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read_pem(ca)?));
    if let Some((cert, key)) = identity {
        t = t.identity(tonic::transport::Identity::from_pem(
            read_pem(cert)?,
            read_pem(key)?,
        ));
    }
    Ok(t)
}

impl Listen {
    fn policy(&self) -> ConnPolicy {
        ConnPolicy {
            max_connections: self.max_connections,
            idle: Duration::from_secs(self.idle_timeout_s.max(1)),
            header: Duration::from_secs(self.header_timeout_s.max(1)),
        }
    }

    /// Reads the certificates, keys and tokens the flags name (a bad one is a start-up
    /// error naming the file).
    pub fn security(&self) -> Result<Security, StartError> {
        let bad = |e: std::io::Error| StartError::Invalid(format!("TLS: {e}"));
        let files = |client_ca: Option<PathBuf>| {
            Some(TlsFiles {
                cert: self.tls_cert.clone()?,
                key: self.tls_key.clone()?,
                client_ca,
            })
        };
        let (grpc_tls, http_tls) = match (files(self.tls_client_ca.clone()), files(None)) {
            (Some(g), Some(h)) => (
                Some(listen::server_tls(&g, &[b"h2"]).map_err(bad)?),
                Some(listen::server_tls(&h, &[b"http/1.1"]).map_err(bad)?),
            ),
            _ => (None, None),
        };
        let token = match (&self.cluster_token, &self.cluster_token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(f)) => iris_server::auth::read_key_file(f)
                .map_err(|e| StartError::Invalid(format!("{}: {e}", f.display())))?
                .into_iter()
                .next(),
            (None, None) => None,
        }
        .filter(|t| !t.is_empty());
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        let tiers = TierAccess {
            tls: self
                .tls_ca
                .as_deref()
                .map(|ca| client_tls(ca, identity))
                .transpose()?,
            token: token
                .as_deref()
                .map(iris_server::auth::bearer_metadata)
                .transpose()
                .map_err(|e| StartError::Invalid(format!("--cluster-token: {e}")))?,
            ..Default::default()
        };
        let etcd = self.etcd_auth.access(identity)?;
        Ok(Security {
            grpc_tls,
            http_tls,
            cluster: Keys::new("cluster token", token),
            tiers,
            etcd,
        })
    }

    /// Logs a warning when this process listens beyond loopback and lets anyone in: a
    /// tier (`keys` None) without a cluster token or client certificates, a gateway
    /// without API keys.
    fn warn_if_open(&self, sec: &Security, keys: Option<&Keys>) {
        if self.grpc_addr.ip().is_loopback() {
            return;
        }
        match keys {
            None if sec.cluster.is_open() && self.tls_client_ca.is_none() => tracing::warn!(
                addr = %self.grpc_addr,
                "this tier answers any caller: give it --cluster-token or --tls-client-ca"
            ),
            Some(k) if k.is_open() => tracing::warn!(
                addr = %self.grpc_addr,
                "the gateway answers any client: give it --api-key"
            ),
            _ => {}
        }
    }

    /// A gRPC server that pings a peer after a second without a frame from it (at most
    /// a third of the idle timeout) and closes the connection when a ping goes
    /// unanswered for 4 s: a caller gone silent (a partition) has its calls cancelled —
    /// a decoder stops generating the streams nobody reads and frees their KV blocks.
    fn server(&self) -> Server {
        let third = self.policy().idle / 3;
        let b = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(1).min(third)))
            .http2_keepalive_timeout(Some(Duration::from_secs(4).min(third)));
        if !iris_server::trace::enabled() {
            return b;
        }
        // Each call in a span parented on the caller's `traceparent`.
        b.trace_fn(|req| iris_server::trace::server_span(req.uri().path(), req.headers()))
    }

    fn registry(&self, sec: &Security) -> Option<Arc<dyn Registry>> {
        (!self.etcd.is_empty()).then(|| {
            Arc::new(EtcdRegistry::with_access(&self.etcd, sec.etcd.clone())) as Arc<dyn Registry>
        })
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    Kv,
    Load,
}

/// What a member registers: its tier, models, how to read its load, and whether it
/// can still serve (when it cannot, it deregisters and reports NOT_SERVING).
pub struct Registration {
    pub tier: &'static str,
    pub models: Vec<String>,
    pub load: Box<dyn Fn() -> u32 + Send + Sync>,
    pub alive: Box<dyn Fn() -> bool + Send + Sync>,
}

impl Registration {
    fn new(tier: &'static str, models: Vec<String>) -> Registration {
        Registration {
            tier,
            models,
            load: Box::new(|| 0),
            alive: Box::new(|| true),
        }
    }
}

/// `iris serve`: every tier and the gateway in one process.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub listen: Listen,
    #[command(flatten)]
    pub encoder: EncoderArgs,
    #[command(flatten)]
    pub decoder: DecoderArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Args, Debug, Clone)]
pub struct EncoderRole {
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub listen: Listen,
    #[command(flatten)]
    pub encoder: EncoderArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectorRole {
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub listen: Listen,
    /// Bytes of visual tokens this connector keeps for the keys it owns in the
    /// cluster-wide cache (least recently used out first; 0: none kept).
    #[arg(long, value_parser = parse_bytes, default_value = "1GiB")]
    pub token_cache_bytes: usize,
}

#[derive(Args, Debug, Clone)]
pub struct DecoderRole {
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub listen: Listen,
    #[command(flatten)]
    pub decoder: DecoderArgs,
    #[command(flatten)]
    pub group: GroupArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GatewayRole {
    #[command(flatten)]
    pub models: ModelArgs,
    #[command(flatten)]
    pub listen: Listen,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// A vision encoder's gRPC address (repeatable: requests go to the least loaded).
    /// With `--etcd`, the members registered there are used instead.
    #[arg(long = "encoder", required_unless_present = "etcd")]
    pub encoders: Vec<String>,
    /// How a request's decoder is picked: `kv` (the one holding the longest cached
    /// prefix of the request, from the decoders' prefix events, weighed against load)
    /// or `load` (the least loaded).
    #[arg(long, value_enum, default_value = "kv")]
    pub routing: Routing,
    /// A connector's gRPC address (repeatable).
    #[arg(long = "connector", required_unless_present = "etcd")]
    pub connectors: Vec<String>,
    /// A decoder's gRPC address (repeatable).
    #[arg(long = "decoder", required_unless_present = "etcd")]
    pub decoders: Vec<String>,
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The health service's reporter and the services it reports on.
struct Health {
    reporter: tonic_health::server::HealthReporter,
    names: Vec<String>,
}

impl Health {
    async fn set(&self, status: tonic_health::ServingStatus) {
        for n in &self.names {
            self.reporter.set_service_status(n, status).await;
        }
    }
}

/// Adds health (`grpc.health.v1`, each of `names` serving) and reflection.
fn with_ops(router: Router, names: &[&str]) -> Result<(Router, Health), StartError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let h = Health {
        reporter: reporter.clone(),
        names: names.iter().map(|s| s.to_string()).collect(),
    };
    let names = h.names.clone();
    tokio::spawn(async move {
        for n in names {
            reporter
                .set_service_status(n, tonic_health::ServingStatus::Serving)
                .await;
        }
    });
    // Reflection lists the services this process serves, not every one in the protos.
    let served: Vec<String> = h
        .names
        .iter()
        .filter(|n| !n.is_empty())
        .map(|n| n.to_string())
        .collect();
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(iris_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health");
        for n in &served {
            b = b.with_service_name(n.clone());
        }
        b
    };
    // Both reflection versions: grpcurl and many clients still speak v1alpha.
    let router = router
        .add_service(health)
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?);
    Ok((router, h))
}

/// The gateway's gRPC service (its requests capped as its HTTP bodies are), with health
/// and reflection.
fn gateway_grpc(
    l: &Listen,
    gw: &Arc<Gateway>,
    keys: &Keys,
) -> Result<(Router, Health), StartError> {
    let service = GatewayServer::new(GatewayService(gw.clone()));
    guarded_grpc(
        l,
        limited(service, gw.limits.grpc_request_bytes()),
        keys,
        GATEWAY,
    )
}

/// The gRPC server of a role: its service `name` behind `keys` (API keys at the
/// gateway, the cluster token at a tier), beside health and reflection, which stay open.
fn guarded_grpc<S>(
    l: &Listen,
    service: S,
    keys: &Keys,
    name: &str,
) -> Result<(Router, Health), StartError>
where
    InterceptedService<S, Keys>: Service<http::Request<tonic::body::Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    <InterceptedService<S, Keys> as Service<http::Request<tonic::body::Body>>>::Response:
        axum::response::IntoResponse,
    <InterceptedService<S, Keys> as Service<http::Request<tonic::body::Body>>>::Future:
        Send + 'static,
{
    let router = l
        .server()
        .add_service(InterceptedService::new(service, keys.clone()));
    with_ops(router, &[name, ""])
}

/// Binds both addresses, prints where, registers in etcd when asked, and serves until
/// SIGTERM / Ctrl-C. On the signal the member deregisters first (gateways stop routing
/// to it), then stops taking requests and finishes the ones it has.
async fn run(
    listen: &Listen,
    (grpc, health): (Router, Health),
    http: axum::Router,
    member: Registration,
    metrics: Arc<Metrics>,
    sec: &Security,
) -> Result<(), StartError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })
    };
    let g = bind(listen.grpc_addr).await?;
    let h = bind(listen.http_addr).await?;
    let grpc_addr = g.local_addr()?;
    let alive = member.alive;
    let lease = match listen.registry(sec) {
        Some(reg) => {
            let addr = listen
                .advertise_addr
                .clone()
                .unwrap_or_else(|| grpc_addr.to_string());
            let key = iris_cluster::member_key(&listen.cluster, member.tier, &addr);
            let me = Member {
                tier: member.tier.into(),
                addr,
                models: member.models,
                load: (member.load)(),
            };
            let (tx, rx) = tokio::sync::watch::channel(serde_json::to_vec(&me)?);
            // The load, refreshed twice a second while it changes.
            let load = member.load;
            tokio::spawn(async move {
                let mut me = me;
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let l = load();
                    if l != me.load {
                        me.load = l;
                        let v = serde_json::to_vec(&me).expect("a member serializes");
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            });
            let ttl = Duration::from_secs(listen.lease_ttl_s.max(1));
            Some(reg.register_updating(key, rx, ttl).await?)
        }
        None => None,
    };
    println!("listening grpc={} http={}", grpc_addr, h.local_addr()?);
    use std::io::Write;
    std::io::stdout().flush()?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        // A member that cannot serve any more (its engine died) leaves the cluster and
        // says NOT_SERVING, but keeps answering so callers get UNAVAILABLE, not silence.
        let dead = async {
            while alive() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        };
        tokio::select! {
            _ = shutdown_signal() => {
                if let Some(lease) = lease {
                    lease.close().await;
                }
                let _ = stop_tx.send(true);
            }
            _ = dead => {
                tracing::error!("this member can no longer serve: deregistering");
                health.set(tonic_health::ServingStatus::NotServing).await;
                if let Some(lease) = lease {
                    lease.close().await;
                }
                shutdown_signal().await;
                let _ = stop_tx.send(true);
            }
        }
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let policy = listen.policy();
    let conns = listen::incoming(
        g,
        Proto::Grpc,
        policy,
        sec.grpc_tls.clone(),
        metrics.clone(),
    );
    let grpc = grpc.serve_with_incoming_shutdown(
        ReceiverStream::new(conns).map(Ok::<_, std::io::Error>),
        stopped(stop.clone()),
    );
    let conns = listen::incoming(h, Proto::Http, policy, sec.http_tls.clone(), metrics);
    let http = listen::serve_http(conns, http, policy, stopped(stop));
    let (a, ()) = tokio::join!(grpc, http);
    a?;
    tracing::info!("stopped");
    Ok(())
}

fn model_ids(m: &ModelArgs) -> Vec<String> {
    m.models.iter().map(|a| a.id.clone()).collect()
}

fn gateway_models(m: &ModelArgs) -> Result<Vec<GatewayModel>, StartError> {
    m.models
        .iter()
        .map(|a| {
            GatewayModel::load_on(&a.id, &a.dir, m.limits(), m.device)
                .map_err(|e| StartError::load(&a.dir, e))
        })
        .collect()
}

const GATEWAY: &str = "iris.v1.Gateway";
const VISION: &str = "iris.v1.VisionEncoder";
const CONNECTOR: &str = "iris.v1.Connector";
const DECODER: &str = "iris.v1.Decoder";

pub async fn serve(a: ServeArgs) -> Result<(), StartError> {
    let sec = a.listen.security()?;
    let keys = a.gateway.keys()?;
    a.listen.warn_if_open(&sec, Some(&keys));
    let metrics = Arc::new(Metrics::new());
    let m = a.models.clone();
    // Every part once, shared by the tiers in this process.
    let gen = tokio::task::spawn_blocking(move || m.pipelines(Parts::ALL)).await??;
    let vision = Arc::new(LocalVision::start(
        gen.clone(),
        a.encoder.batch(),
        metrics.clone(),
    ));
    let connector = Arc::new(LocalConnector::new(gen.clone(), metrics.clone()));
    let engines = a.decoder.engines(&gen)?;
    let decoder = Arc::new(LocalDecoder::new(engines.clone(), metrics.clone()));
    let gw = Arc::new(Gateway::new(
        gateway_models(&a.models)?,
        vision.clone(),
        connector.clone(),
        decoder.clone(),
        a.gateway.limits(&a.models),
        metrics,
    ));
    // Only the gateway on the public port: the tiers run in process, and a tier service
    // here would let any caller hand the decoder made-up visual tokens.
    let router = gateway_grpc(&a.listen, &gw, &keys)?;
    let mut me = Registration::new("gateway", model_ids(&a.models));
    me.alive = Box::new(move || engines.values().all(|e| e.is_alive()));
    let metrics = gw.metrics.clone();
    let http = openai::router(gw, a.gateway.http(&keys, a.listen.open_metrics));
    run(&a.listen, router, http, me, metrics, &sec).await
}

pub async fn encoder(a: EncoderRole) -> Result<(), StartError> {
    let sec = a.listen.security()?;
    a.listen.warn_if_open(&sec, None);
    let metrics = Arc::new(Metrics::new());
    let m = a.models.clone();
    let pipelines = tokio::task::spawn_blocking(move || m.pipelines(Parts::VISION)).await??;
    let limit = a.models.message_limit(&pipelines, Tier::Encoder);
    let towers = {
        let (m, p) = (a.models.clone(), pipelines.clone());
        tokio::task::spawn_blocking(move || m.tower_digests(&p)).await??
    };
    let local: Arc<dyn iris_server::tiers::VisionTier> = Arc::new(LocalVision::start(
        pipelines,
        a.encoder.batch(),
        metrics.clone(),
    ));
    let vision = Arc::new(CachingVision::new(
        local,
        towers,
        a.encoder.feature_cache_bytes,
        metrics.clone(),
    ));
    let service = limited(VisionEncoderServer::new(VisionService(vision)), limit);
    let router = guarded_grpc(&a.listen, service, &sec.cluster, VISION)?;
    let m = metrics.clone();
    let mut me = Registration::new("encoder", model_ids(&a.models));
    me.load = Box::new(move || m.encoder_queue.get().max(0) as u32);
    let http = openai::metrics_router(metrics.clone(), sec.cluster.clone(), a.listen.open_metrics);
    run(&a.listen, router, http, me, metrics, &sec).await
}

pub async fn connector(a: ConnectorRole) -> Result<(), StartError> {
    let sec = a.listen.security()?;
    a.listen.warn_if_open(&sec, None);
    let metrics = Arc::new(Metrics::new());
    let m = a.models.clone();
    let pipelines = tokio::task::spawn_blocking(move || m.pipelines(Parts::CONNECTOR)).await??;
    let limit = a.models.message_limit(&pipelines, Tier::Connector);
    let c = Arc::new(CachingConnector::new(
        Arc::new(LocalConnector::new(pipelines, metrics.clone())),
        a.token_cache_bytes,
        metrics.clone(),
    ));
    let service = limited(ConnectorServer::new(ConnectorService(c)), limit);
    let router = guarded_grpc(&a.listen, service, &sec.cluster, CONNECTOR)?;
    let me = Registration::new("connector", model_ids(&a.models));
    let http = openai::metrics_router(metrics.clone(), sec.cluster.clone(), a.listen.open_metrics);
    run(&a.listen, router, http, me, metrics, &sec).await
}

pub async fn decoder(a: DecoderRole) -> Result<(), StartError> {
    let sec = a.listen.security()?;
    if let Some(rank) = a.group.rank.filter(|&r| r > 0) {
        return follow_group(&a, &sec, rank).await;
    }
    a.listen.warn_if_open(&sec, None);
    let metrics = Arc::new(Metrics::new());
    // Rank 0 of a group started rank by rank: the group, then the member. The engines'
    // first call (their KV arena) reaches every rank, so the member registers below
    // only once the whole group is up.
    let (pipelines, _groups) = if a.group.rank == Some(0) {
        let ttl = Duration::from_secs(a.listen.lease_ttl_s.max(1));
        let mut pipelines = HashMap::new();
        let mut groups = Vec::new();
        for (id, p, formed) in a
            .models
            .group_pipelines(&a.listen, &sec, &a.group, 0)
            .await?
        {
            if let (Some(reg), Some(health)) = (a.listen.registry(&sec), p.group()) {
                crate::tp_group::watch_ranks(reg, &formed, health.clone(), ttl);
            }
            pipelines.insert(id, Arc::new(p));
            groups.push(formed);
        }
        (pipelines, groups)
    } else {
        let m = a.models.clone();
        let p = tokio::task::spawn_blocking(move || m.pipelines(Parts::LANGUAGE)).await??;
        (p, Vec::new())
    };
    let engines = a.decoder.engines(&pipelines)?;
    let limit = a.models.message_limit(&pipelines, Tier::Decoder);
    let d = Arc::new(LocalDecoder::new(engines.clone(), metrics.clone()));
    let service = limited(DecoderServer::new(DecoderService(d)), limit);
    let router = guarded_grpc(&a.listen, service, &sec.cluster, DECODER)?;
    let mut me = Registration::new("decoder", model_ids(&a.models));
    let watched = engines.clone();
    me.alive = Box::new(move || watched.values().all(|e| e.is_alive()));
    me.load = Box::new(move || {
        engines
            .values()
            .map(|e| {
                let s = e.stats();
                (s.running + s.waiting) as u32
            })
            .sum()
    });
    let http = openai::metrics_router(metrics.clone(), sec.cluster.clone(), a.listen.open_metrics);
    run(&a.listen, router, http, me, metrics, &sec).await
}

/// A rank above 0 of a decoder group: forms each model's group, loads its shard and
/// follows rank 0 until rank 0 stops (returns) or is gone (an error: the process
/// exits with a failure, and its supervisor restarts it into a new group).
async fn follow_group(a: &DecoderRole, sec: &Security, rank: usize) -> Result<(), StartError> {
    // Probed like any member where asked (a Kubernetes pod a rank): grpc.health.v1
    // serving while this rank follows.
    let probe = match a.group.follower_health_addr {
        None => None,
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })?;
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter
                .set_service_status("", tonic_health::ServingStatus::Serving)
                .await;
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            Some(tokio::spawn(
                Server::builder()
                    .add_service(health)
                    .serve_with_incoming(incoming),
            ))
        }
    };
    let followed = follow_ranks(a, sec, rank).await;
    if let Some(p) = probe {
        p.abort();
    }
    followed
}

async fn follow_ranks(a: &DecoderRole, sec: &Security, rank: usize) -> Result<(), StartError> {
    let device = a.models.device;
    let mut ranks = Vec::new();
    for (id, p, formed) in a
        .models
        .group_pipelines(&a.listen, sec, &a.group, rank)
        .await?
    {
        ranks.push(tokio::task::spawn_blocking(move || {
            let r = iris_engine::tp::follow(&*p.model, &*formed.comm, device);
            drop(formed);
            r.map_err(|e| StartError::Invalid(format!("rank {rank} of {id}'s group: {e}")))
        }));
    }
    tracing::info!(rank, "following rank 0");
    for r in ranks {
        r.await??;
    }
    tracing::info!(rank, "rank 0 stopped the group");
    Ok(())
}

pub async fn gateway(a: GatewayRole) -> Result<(), StartError> {
    let sec = a.listen.security()?;
    let keys = a.gateway.keys()?;
    a.listen.warn_if_open(&sec, Some(&keys));
    let metrics = Arc::new(Metrics::new());
    let access = || TierAccess {
        keepalive: Duration::from_millis(a.gateway.tier_keepalive_ms.max(1)),
        keepalive_timeout: Duration::from_millis(a.gateway.tier_keepalive_timeout_ms.max(1)),
        attempt_timeout: Duration::from_secs(a.gateway.tier_attempt_timeout_s.max(1)),
        ..sec.tiers.clone()
    };
    let retries = |tier: &str| {
        metrics
            .tier_retries
            .get_or_create(&TierLabel::of(tier))
            .clone()
    };
    let vision = Arc::new(RemoteVision(
        Replicas::with_access(&a.encoders, vision_client, access())?
            .count_retries(retries("encoder")),
    ));
    let connector = Arc::new(RemoteConnector(
        Replicas::with_access(&a.connectors, connector_client, access())?
            .count_retries(retries("connector")),
    ));
    let decoder = Arc::new(RemoteDecoder::new(
        Replicas::with_access(&a.decoders, decoder_client, access())?
            .count_retries(retries("decoder")),
        a.routing == Routing::Kv,
    ));
    let count_members = {
        let (m, v, c, d) = (
            metrics.clone(),
            vision.clone(),
            connector.clone(),
            decoder.clone(),
        );
        move || {
            for (tier, n) in [
                ("encoder", v.0.len()),
                ("connector", c.0.len()),
                ("decoder", d.replicas.len()),
            ] {
                m.members.get_or_create(&TierLabel::of(tier)).set(n as i64);
            }
        }
    };
    count_members();
    if let Some(reg) = a.listen.registry(&sec) {
        // Members come from etcd: a snapshot, then every join and leave.
        let (v, c, d) = (vision.clone(), connector.clone(), decoder.clone());
        let mut events = reg.watch(iris_cluster::members_prefix(&a.listen.cluster));
        tokio::spawn(async move {
            let mut view = View::default();
            let mut seen = Vec::new();
            while let Some(ev) = events.recv().await {
                view.apply(ev);
                for (tier, set) in [
                    ("encoder", v.0.set(&view.addrs("encoder"))),
                    ("connector", c.0.set(&view.addrs("connector"))),
                    ("decoder", d.set(&view.addrs("decoder"))),
                ] {
                    if let Err(e) = set {
                        tracing::warn!(tier, "bad member address: {}", e.message());
                    }
                }
                v.0.set_loads(&view.loads("encoder"));
                c.0.set_loads(&view.loads("connector"));
                d.replicas.set_loads(&view.loads("decoder"));
                count_members();
                let now: Vec<Vec<String>> = ["encoder", "connector", "decoder"]
                    .iter()
                    .map(|t| view.addrs(t))
                    .collect();
                if now != seen {
                    tracing::info!(encoders = ?now[0], connectors = ?now[1], decoders = ?now[2], "membership");
                    seen = now;
                }
            }
        });
    }
    let gw = Arc::new(Gateway::new(
        gateway_models(&a.models)?,
        vision,
        connector,
        decoder,
        a.gateway.limits(&a.models),
        metrics,
    ));
    let router = gateway_grpc(&a.listen, &gw, &keys)?;
    let me = Registration::new("gateway", model_ids(&a.models));
    let metrics = gw.metrics.clone();
    let http = openai::router(gw, a.gateway.http(&keys, a.listen.open_metrics));
    run(&a.listen, router, http, me, metrics, &sec).await
}
