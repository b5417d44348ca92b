//! Prometheus metrics, one registry per process (every role registers the same set;
//! a role leaves the others at zero). Served as text at `/metrics`.

use std::sync::{Arc, Mutex};

use iris_engine::Engine;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

pub struct Metrics {
    registry: Registry,
    /// Gateway requests by final status (`ok`, or the gRPC code's name).
    pub requests: Family<StatusLabel, Counter>,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_evictions: Counter,
    pub cache_bytes: Gauge,
    pub encoder_requests: Counter,
    pub encoder_batch: Histogram,
    /// Stacked passes through a vision tower (one per model per batch).
    pub encoder_passes: Counter,
    pub encoder_queue: Gauge,
    /// Images waiting for a decode thread.
    pub decode_queue: Gauge,
    pub connector_requests: Counter,
    pub decoder_requests: Counter,
    /// Engine state per model, read at each scrape.
    pub queue_depth: Family<ModelLabel, Gauge>,
    pub running: Family<ModelLabel, Gauge>,
    /// Requests the engine ended because their caller went away (cancelled, its
    /// stream dropped, its connection closed).
    pub cancelled: Family<ModelLabel, Gauge>,
    pub kv_free_blocks: Family<ModelLabel, Gauge>,
    pub decode_steps: Family<ModelLabel, Gauge>,
    pub decode_tokens: Family<ModelLabel, Gauge>,
    pub prefix_hit_blocks: Family<ModelLabel, Gauge>,
    /// The KV cache: blocks in all, bytes reserved and bytes of blocks in use
    /// (held by requests), prefix blocks evicted to make room.
    pub kv_total_blocks: Family<ModelLabel, Gauge>,
    pub kv_bytes_total: Family<ModelLabel, Gauge>,
    pub kv_bytes_used: Family<ModelLabel, Gauge>,
    pub prefix_evictions: Family<ModelLabel, Gauge>,
    /// Sequences whose cross-attention K/V (an encoder-decoder's encoder output) was
    /// computed: once each, again only after a preemption.
    pub cross_kv_computed: Family<ModelLabel, Gauge>,
    /// Engine steps that panicked (their requests failed; the engine went on).
    pub failed_steps: Family<ModelLabel, Gauge>,
    /// 1 while the engine can serve, 0 once it cannot.
    pub engine_alive: Family<ModelLabel, Gauge>,
    /// Connections open now, and those closed by the server by reason (`read_idle`,
    /// `write_stall`, `limit`, `tls`, `tls_timeout`).
    pub open_connections: Gauge,
    pub connections_closed: Family<ReasonLabel, Counter>,
    /// Connections accepted, by listener (`grpc`, `http`).
    pub connections_accepted: Family<ListenerLabel, Counter>,
    /// Gateway calls tried again on another member of a tier (the first was
    /// unreachable, silent or full).
    pub tier_retries: Family<TierLabel, Counter>,
    /// Gateway streams moved to another decoder mid-stream.
    pub migrations: Counter,
    /// Members of each tier in the gateway's view (from etcd or `--encoders` …).
    pub members: Family<TierLabel, Gauge>,
    engines: Mutex<Vec<(String, Arc<Engine>)>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: String,
}

impl TierLabel {
    pub fn of(tier: &str) -> TierLabel {
        TierLabel { tier: tier.into() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("iris");
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let m = Metrics {
            requests: Family::default(),
            ttft: latency(),
            inter_token: latency(),
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_evictions: Counter::default(),
            cache_bytes: Gauge::default(),
            encoder_requests: Counter::default(),
            encoder_batch: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            encoder_passes: Counter::default(),
            encoder_queue: Gauge::default(),
            decode_queue: Gauge::default(),
            connector_requests: Counter::default(),
            decoder_requests: Counter::default(),
            queue_depth: Family::default(),
            running: Family::default(),
            cancelled: Family::default(),
            kv_free_blocks: Family::default(),
            decode_steps: Family::default(),
            decode_tokens: Family::default(),
            prefix_hit_blocks: Family::default(),
            kv_total_blocks: Family::default(),
            kv_bytes_total: Family::default(),
            kv_bytes_used: Family::default(),
            prefix_evictions: Family::default(),
            cross_kv_computed: Family::default(),
            failed_steps: Family::default(),
            engine_alive: Family::default(),
            open_connections: Gauge::default(),
            connections_closed: Family::default(),
            connections_accepted: Family::default(),
            tier_retries: Family::default(),
            migrations: Counter::default(),
            members: Family::default(),
            engines: Mutex::new(Vec::new()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register("requests", "Gateway requests by status", m.requests.clone());
        r.register(
            "image_decode_queue",
            "Images waiting for a decode thread",
            m.decode_queue.clone(),
        );
        r.register(
            "open_connections",
            "Connections open on this process's listeners",
            m.open_connections.clone(),
        );
        r.register(
            "connections_closed",
            "Connections the server closed, by reason",
            m.connections_closed.clone(),
        );
        r.register(
            "connections_accepted",
            "Connections accepted, by listener",
            m.connections_accepted.clone(),
        );
        r.register(
            "tier_retries",
            "Gateway calls tried again on another member, by tier",
            m.tier_retries.clone(),
        );
        r.register(
            "migrations",
            "Streams moved to another decoder mid-stream",
            m.migrations.clone(),
        );
        r.register(
            "members",
            "Members of each tier in the gateway's view",
            m.members.clone(),
        );
        r.register("ttft_seconds", "Time to first token", m.ttft.clone());
        r.register(
            "inter_token_latency_seconds",
            "Time between streamed tokens",
            m.inter_token.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens served",
            m.prompt_tokens.clone(),
        );
        r.register(
            "completion_tokens",
            "Tokens generated",
            m.completion_tokens.clone(),
        );
        r.register(
            "visual_cache_hits",
            "Visual-token cache hits",
            m.cache_hits.clone(),
        );
        r.register(
            "visual_cache_misses",
            "Visual-token cache misses",
            m.cache_misses.clone(),
        );
        r.register(
            "visual_cache_evictions",
            "Visual-token cache evictions",
            m.cache_evictions.clone(),
        );
        r.register(
            "visual_cache_bytes",
            "Bytes held by the visual-token cache",
            m.cache_bytes.clone(),
        );
        r.register(
            "encoder_requests",
            "Images the vision tier encoded",
            m.encoder_requests.clone(),
        );
        r.register(
            "encoder_batch_size",
            "Images per vision-tier batch",
            m.encoder_batch.clone(),
        );
        r.register(
            "encoder_passes",
            "Stacked vision-tower passes (one per model per batch)",
            m.encoder_passes.clone(),
        );
        r.register(
            "encoder_queue_depth",
            "Images waiting in the vision tier",
            m.encoder_queue.clone(),
        );
        r.register(
            "connector_requests",
            "Feature sets the connector tier projected",
            m.connector_requests.clone(),
        );
        r.register(
            "decoder_requests",
            "Generations the decoder tier ran",
            m.decoder_requests.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for the engine",
            m.queue_depth.clone(),
        );
        r.register(
            "running_requests",
            "Requests in the engine's batch",
            m.running.clone(),
        );
        r.register(
            "cancelled_requests",
            "Requests ended because their caller went away",
            m.cancelled.clone(),
        );
        r.register("kv_free_blocks", "Free KV blocks", m.kv_free_blocks.clone());
        r.register("decode_steps", "Engine steps run", m.decode_steps.clone());
        r.register(
            "decode_tokens",
            "Tokens sampled by the engine (÷ steps = mean batch size)",
            m.decode_tokens.clone(),
        );
        r.register(
            "prefix_cache_hit_blocks",
            "KV blocks reused from the prefix cache",
            m.prefix_hit_blocks.clone(),
        );
        r.register(
            "kv_total_blocks",
            "KV blocks in all (the budget)",
            m.kv_total_blocks.clone(),
        );
        r.register(
            "kv_bytes_total",
            "Bytes reserved for the KV cache at start-up",
            m.kv_bytes_total.clone(),
        );
        r.register(
            "kv_bytes_used",
            "Bytes of KV blocks held by requests (cached prefix blocks no request holds count as free)",
            m.kv_bytes_used.clone(),
        );
        r.register(
            "prefix_cache_evictions",
            "Cached prefix blocks evicted to make room",
            m.prefix_evictions.clone(),
        );
        r.register(
            "cross_kv_computed",
            "Sequences whose cross-attention K/V (an encoder-decoder's encoder output) was computed: once each, again after a preemption",
            m.cross_kv_computed.clone(),
        );
        r.register(
            "engine_failed_steps",
            "Engine steps that panicked; their requests failed, the engine went on",
            m.failed_steps.clone(),
        );
        r.register(
            "engine_alive",
            "1 while the engine can serve",
            m.engine_alive.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Engines whose state each scrape reports.
    pub fn watch_engine(&self, model: &str, engine: Arc<Engine>) {
        self.engines
            .lock()
            .expect("metrics lock")
            .push((model.to_string(), engine));
    }

    pub fn render(&self) -> String {
        for (model, engine) in self.engines.lock().expect("metrics lock").iter() {
            let s = engine.stats();
            let l = ModelLabel {
                model: model.clone(),
            };
            self.queue_depth.get_or_create(&l).set(s.waiting as i64);
            self.running.get_or_create(&l).set(s.running as i64);
            self.cancelled.get_or_create(&l).set(s.cancelled as i64);
            self.kv_free_blocks
                .get_or_create(&l)
                .set(s.free_blocks as i64);
            self.decode_steps.get_or_create(&l).set(s.steps as i64);
            self.decode_tokens
                .get_or_create(&l)
                .set(s.decode_tokens as i64);
            self.prefix_hit_blocks
                .get_or_create(&l)
                .set(s.prefix_hits as i64);
            self.kv_total_blocks
                .get_or_create(&l)
                .set(s.total_blocks as i64);
            self.kv_bytes_total.get_or_create(&l).set(s.kv_bytes as i64);
            self.kv_bytes_used
                .get_or_create(&l)
                .set(((s.total_blocks - s.free_blocks.min(s.total_blocks)) * s.block_bytes) as i64);
            self.prefix_evictions
                .get_or_create(&l)
                .set(s.prefix_evictions as i64);
            self.cross_kv_computed
                .get_or_create(&l)
                .set(s.cross_kv_computed as i64);
            self.failed_steps
                .get_or_create(&l)
                .set(s.failed_steps as i64);
            self.engine_alive
                .get_or_create(&l)
                .set(i64::from(engine.is_alive()));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    pub fn count_request(&self, status: &str) {
        self.requests
            .get_or_create(&StatusLabel {
                status: status.into(),
            })
            .inc();
    }

    pub fn count_conn_closed(&self, reason: &str) {
        self.connections_closed
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }
}
