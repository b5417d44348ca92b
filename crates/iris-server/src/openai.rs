//! The OpenAI-compatible HTTP API: `POST /v1/chat/completions` (text and `image_url`
//! parts; `data:` URLs, and remote URLs only for hosts on the allow-list, fetched with a
//! timeout and a size cap), `POST /v1/completions` (a raw prompt with the model's image
//! markers, images in Iris' `images` list), `n` choices, `response_format` (structured
//! outputs), `stream: true` as server-sent events, `usage`, `POST /v1/embeddings`
//! (retrieval models), `GET /v1/models`, errors in OpenAI's JSON shape; plus `/metrics`
//! and `/health`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::ServeError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures::StreamExt;
use iris_engine::{Constraint, GenerateOptions, SamplingParams, StopRules};
use iris_proto::v1 as pb;
use serde_json::{json, Value};

use crate::auth::Keys;
use crate::gateway::{Gateway, GenerateInput, Message, ModelKind, Part};

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Hosts whose `http(s)://` image URLs may be fetched.
    pub allowed_image_hosts: Vec<String>,
    pub fetch_timeout: Duration,
    /// `max_tokens` when a request sets none.
    pub default_max_tokens: usize,
    /// API keys every route but `/health` asks for (none: open).
    pub keys: Keys,
    /// `/metrics` without a key.
    pub open_metrics: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            allowed_image_hosts: Vec::new(),
            fetch_timeout: Duration::from_secs(10),
            default_max_tokens: 256,
            keys: Keys::default(),
            open_metrics: false,
        }
    }
}

struct AppState {
    gateway: Arc<Gateway>,
    config: HttpConfig,
    http: reqwest::Client,
}

pub fn router(gateway: Arc<Gateway>, config: HttpConfig) -> Router {
    let http = reqwest::Client::builder()
        .timeout(config.fetch_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client");
    let state = Arc::new(AppState {
        gateway,
        config,
        http,
    });
    let body_limit = state.gateway.limits.http_body_bytes();
    let (keys, open_metrics) = (state.config.keys.clone(), state.config.open_metrics);
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(text_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models));
    let api = if open_metrics {
        guarded(api, keys).route("/metrics", get(metrics))
    } else {
        guarded(api.route("/metrics", get(metrics)), keys)
    };
    api.route("/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(crate::trace::http_layer))
        .with_state(state)
}

/// `routes` behind `keys` (when there are any).
fn guarded<S: Clone + Send + Sync + 'static>(routes: Router<S>, keys: Keys) -> Router<S> {
    if keys.is_open() {
        return routes;
    }
    routes.route_layer(axum::middleware::from_fn_with_state(keys, Keys::require))
}

/// Whether `--allow-image-host` entries allow `url`'s host: an entry `host` allows it
/// on any port, `host:port` on that port only.
fn host_allowed(allowed: &[String], url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default();
    allowed.iter().any(|entry| match entry.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
            h.trim_matches(['[', ']']) == host.trim_matches(['[', ']']) && p.parse().ok() == port
        }
        _ => entry == host,
    })
}

/// A router with only `/metrics` and `/health` (the tier processes): `/metrics` behind
/// `keys` (the cluster token) unless `open_metrics`.
pub fn metrics_router(
    metrics: Arc<crate::metrics::Metrics>,
    keys: Keys,
    open_metrics: bool,
) -> Router {
    let m = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { metrics_text(&m) }
        }),
    );
    let m = if open_metrics { m } else { guarded(m, keys) };
    m.route("/health", get(|| async { "ok" }))
}

fn metrics_text(m: &crate::metrics::Metrics) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    metrics_text(&s.gateway.metrics)
}

/// The HTTP mapping of `ServeError`: a status and an error body in OpenAI's shape
/// (429 carries `Retry-After`).
impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        let (status, kind, code) = match &self {
            ServeError::BadInput(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            ServeError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            ServeError::Overloaded(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            ServeError::Deadline(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout_error", None),
            ServeError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", None),
            ServeError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        let body = json!({"error": {
            "message": self.message(),
            "type": kind,
            "param": null,
            "code": code,
        }});
        let mut r = (status, Json(body)).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

fn bad(msg: impl Into<String>) -> ServeError {
    ServeError::bad_input(msg)
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let mut ids: Vec<&String> = s.gateway.models.keys().collect();
    ids.sort();
    Json(json!({
        "object": "list",
        "data": ids.iter().map(|id| json!({
            "id": id, "object": "model", "created": 0, "owned_by": "iris",
        })).collect::<Vec<_>>(),
    }))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request's images, fetched or decoded from `data:` URLs.
async fn image_bytes(s: &AppState, url: &str) -> Result<Vec<u8>, ServeError> {
    let max = s.gateway.limits.image.max_bytes;
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("a data: URL without a comma"))?;
        if !meta.ends_with(";base64") {
            return Err(bad("data: URLs must be base64"));
        }
        if data.len() / 4 * 3 > max + 3 {
            return Err(bad(format!("an image of more than {max} bytes")));
        }
        return base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| bad(format!("a data: URL that is not base64: {e}")));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(format!("image URL `{url}`: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(format!(
            "image URL scheme `{}` is not allowed",
            parsed.scheme()
        )));
    }
    if !host_allowed(&s.config.allowed_image_hosts, &parsed) {
        let host = parsed.host_str().unwrap_or_default();
        return Err(bad(format!(
            "image URLs from host `{host}` are not allowed (send the image as a data: URL)"
        )));
    }
    // One answer for every way a fetch fails (refused, timed out, HTTP error), so the
    // API cannot be used to tell a closed port from an open one.
    let failed = || bad(format!("the image at `{url}` could not be fetched"));
    let mut resp = s.http.get(parsed).send().await.map_err(|e| {
        tracing::info!(%url, "image fetch failed: {e}");
        failed()
    })?;
    if !resp.status().is_success() {
        tracing::info!(%url, status = %resp.status(), "image fetch failed");
        return Err(failed());
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|_| failed())? {
        out.extend_from_slice(&chunk);
        if out.len() > max {
            return Err(bad(format!("the image at `{url}` is over {max} bytes")));
        }
    }
    Ok(out)
}

/// Which endpoint a generation came through: the shapes of its answer differ.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Api {
    /// `/v1/chat/completions`: messages in, `message` / `delta` out.
    Chat,
    /// `/v1/completions`: a raw prompt (no chat template; images by the model's marker,
    /// from Iris' `images` list of URLs) in, `text` out.
    Completions,
}

struct Parsed {
    input: GenerateInput,
    /// Choices to return (OpenAI's `n`): sample i draws with `seed_stream(seed, i)`.
    n: usize,
    stream: bool,
    include_usage: bool,
    logprobs: bool,
}

/// `v[key]` as a number: absent or null is `None`; any other type is a 400 naming the
/// parameter (OpenAI answers so; a wrong-typed field is never silently the default).
fn number(v: &Value, key: &str) -> Result<Option<f64>, ServeError> {
    match &v[key] {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(n.as_f64()),
        other => Err(bad(format!("{key}: expected a number, got {other}"))),
    }
}

/// `v[key]` as a non-negative integer (absent or null: `None`).
fn count(v: &Value, key: &str) -> Result<Option<u64>, ServeError> {
    match &v[key] {
        Value::Null => Ok(None),
        Value::Number(n) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(format!("{key}: expected a non-negative integer, got {n}"))),
        other => Err(bad(format!("{key}: expected an integer, got {other}"))),
    }
}

/// `v[key]` as a boolean (absent or null: `None`).
fn flag(v: &Value, key: &str) -> Result<Option<bool>, ServeError> {
    match &v[key] {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        other => Err(bad(format!("{key}: expected true or false, got {other}"))),
    }
}

async fn parse(s: &AppState, body: &[u8], api: Api) -> Result<Parsed, ServeError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
    let model = v["model"]
        .as_str()
        .ok_or_else(|| bad("`model` is required"))?
        .to_string();
    let gw = &s.gateway;
    let m = gw.model(&model)?;
    if let ModelKind::Retrieval(_) = m.kind {
        return Err(bad(format!("model `{model}` is a retrieval model")));
    }
    let mut images = Vec::new();
    let mut messages = Vec::new();
    let prompt = match api {
        Api::Chat => None,
        Api::Completions => {
            let prompt = match &v["prompt"] {
                Value::String(p) => p.clone(),
                Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                    a[0].as_str().unwrap_or_default().to_string()
                }
                _ => return Err(bad("`prompt` must be a string (or an array of one)")),
            };
            let urls = match &v["images"] {
                Value::Null => Vec::new(),
                Value::Array(a) => a
                    .iter()
                    .map(|u| u.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("`images` must be an array of URLs"))?,
                _ => return Err(bad("`images` must be an array of URLs")),
            };
            if urls.len() > gw.limits.max_images {
                return Err(bad(format!(
                    "{} images: at most {} per request",
                    urls.len(),
                    gw.limits.max_images
                )));
            }
            for u in &urls {
                images.push(image_bytes(s, u).await?);
            }
            Some(prompt)
        }
    };
    let no_messages = Vec::new();
    let msgs = match api {
        Api::Chat => v["messages"]
            .as_array()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| bad("`messages` must be a non-empty array"))?,
        Api::Completions => &no_messages,
    };
    for (i, msg) in msgs.iter().enumerate() {
        let role = msg["role"]
            .as_str()
            .ok_or_else(|| bad(format!("messages[{i}].role is required")))?;
        let mut content = Vec::new();
        match &msg["content"] {
            Value::String(t) => content.push(Part::Text(t.clone())),
            Value::Array(parts) => {
                for p in parts {
                    match p["type"].as_str() {
                        Some("text") => content.push(Part::Text(
                            p["text"].as_str().unwrap_or_default().to_string(),
                        )),
                        Some("image_url") => {
                            let url = p["image_url"]["url"]
                                .as_str()
                                .or(p["image_url"].as_str())
                                .ok_or_else(|| bad("an image_url part without a url"))?;
                            if images.len() >= gw.limits.max_images {
                                return Err(bad(format!(
                                    "more than {} images: at most {} per request",
                                    gw.limits.max_images, gw.limits.max_images
                                )));
                            }
                            images.push(image_bytes(s, url).await?);
                            content.push(Part::Image);
                        }
                        other => {
                            return Err(bad(format!("unsupported content part type {other:?}")))
                        }
                    }
                }
            }
            Value::Null => {}
            _ => {
                return Err(bad(format!(
                    "messages[{i}].content must be a string or an array"
                )))
            }
        }
        messages.push(Message {
            role: role.to_string(),
            content,
        });
    }
    let f = |k: &str, d: f64| -> Result<f32, ServeError> { Ok(number(&v, k)?.unwrap_or(d) as f32) };
    let max_tokens = count(&v, "max_completion_tokens")?
        .or(count(&v, "max_tokens")?)
        .map_or(s.config.default_max_tokens, |n| n as usize);
    let stop = match &v["stop"] {
        Value::String(x) => vec![x.clone()],
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`stop` must be a string or an array of strings"))?,
        Value::Null => vec![],
        _ => return Err(bad("`stop` must be a string or an array of strings")),
    };
    // Chat: `logprobs` a flag and `top_logprobs` a count; completions: `logprobs` the
    // count.
    let (logprobs, top) = match api {
        Api::Chat => (
            flag(&v, "logprobs")?.unwrap_or(false),
            count(&v, "top_logprobs")?.unwrap_or(0) as usize,
        ),
        Api::Completions => match count(&v, "logprobs")? {
            Some(k) => (true, k as usize),
            None => (false, 0),
        },
    };
    if top > crate::gateway::MAX_TOP_LOGPROBS {
        return Err(bad(format!(
            "top_logprobs: {top} is more than {}",
            crate::gateway::MAX_TOP_LOGPROBS
        )));
    }
    let seed = match &v["seed"] {
        Value::Null => rand_seed(),
        // OpenAI's seeds are 64-bit signed integers: a negative one keeps its bits.
        Value::Number(n) => n
            .as_u64()
            .or(n.as_i64().map(|i| i as u64))
            .ok_or_else(|| bad(format!("seed: expected an integer, got {n}")))?,
        other => return Err(bad(format!("seed: expected an integer, got {other}"))),
    };
    let options = GenerateOptions {
        max_new_tokens: max_tokens,
        sampling: SamplingParams {
            temperature: f("temperature", 1.0)?,
            top_p: f("top_p", 1.0)?,
            presence_penalty: f("presence_penalty", 0.0)?,
            frequency_penalty: f("frequency_penalty", 0.0)?,
            seed,
            ..SamplingParams::default()
        },
        stop: StopRules {
            token_ids: vec![],
            strings: stop,
            ignore_eos: flag(&v, "ignore_eos")?.unwrap_or(false),
        },
        top_logprobs: if logprobs { top.max(1) } else { 0 },
        constraint: response_format(&v["response_format"])?,
        logit_bias: logit_bias(&v["logit_bias"])?,
    };
    Ok(Parsed {
        input: GenerateInput {
            model,
            messages: prompt.is_none().then_some(messages),
            prompt,
            images,
            options,
        },
        n: match count(&v, "n")?.unwrap_or(1) {
            n @ 1..=MAX_N => n as usize,
            n => return Err(bad(format!("n: {n} is not in 1..={MAX_N}"))),
        },
        stream: flag(&v, "stream")?.unwrap_or(false),
        include_usage: flag(&v["stream_options"], "include_usage")?.unwrap_or(false),
        logprobs,
    })
}

/// OpenAI's `logit_bias`: token ids (as strings) to biases in [-100, 100].
fn logit_bias(v: &Value) -> Result<Vec<(u32, f32)>, ServeError> {
    let o = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Object(o) => o,
        _ => return Err(bad("logit_bias must be an object of token ids to numbers")),
    };
    let mut out = Vec::with_capacity(o.len());
    for (k, b) in o {
        let t: u32 = k
            .parse()
            .map_err(|_| bad(format!("logit_bias: {k:?} is not a token id")))?;
        let b = b
            .as_f64()
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                bad(format!(
                    "logit_bias of {k}: {b} is not a number in [-100, 100]"
                ))
            })?;
        out.push((t, b as f32));
    }
    out.sort_by_key(|&(t, _)| t);
    Ok(out)
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` (its `schema`;
/// decoding is always strict), and Iris' `regex` (`{"type": "regex", "regex": …}`) and
/// `grammar` (`{"type": "grammar", "grammar": …}`, llguidance's Lark dialect).
fn response_format(v: &Value) -> Result<Option<Constraint>, ServeError> {
    let text = |key: &str| -> Result<String, ServeError> {
        v[key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| bad(format!("response_format.{key} must be a string")))
    };
    match v {
        Value::Null => return Ok(None),
        Value::Object(_) => {}
        _ => return Err(bad("response_format must be an object")),
    }
    Ok(match v["type"].as_str() {
        Some("text") => None,
        Some("json_object") => Some(Constraint::JsonObject),
        Some("json_schema") => match &v["json_schema"]["schema"] {
            s @ (Value::Object(_) | Value::Bool(_)) => Some(Constraint::JsonSchema(s.clone())),
            Value::Null => return Err(bad("response_format.json_schema.schema is required")),
            _ => return Err(bad("response_format.json_schema.schema must be an object")),
        },
        Some("regex") => Some(Constraint::Regex(text("regex")?)),
        Some("grammar") => Some(Constraint::Lark(text("grammar")?)),
        Some(other) => {
            return Err(bad(format!(
                "response_format.type: unknown {other:?} (text, json_object, json_schema, regex or grammar)"
            )))
        }
        None => return Err(bad("response_format.type is required")),
    })
}

/// Most choices one request may ask for (OpenAI allows 128; each is a sequence in the
/// decoder's batch).
const MAX_N: u64 = 16;

/// A seed for a request that sets none (different every request, as OpenAI's).
fn rand_seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (std::process::id() as u64).rotate_left(32)
}

fn finish_name(r: i32) -> &'static str {
    match pb::FinishReason::try_from(r) {
        Ok(pb::FinishReason::Length) => "length",
        // Not one of OpenAI's: the output could not be finished within the request's
        // constraint (structured outputs).
        Ok(pb::FinishReason::Constraint) => "constraint",
        _ => "stop",
    }
}

fn token_logprob(gw: &Gateway, model: &str, t: &pb::Token, top_n: usize) -> Value {
    let text = |id: u32| -> String {
        match gw.models.get(model).map(|m| &m.kind) {
            Some(ModelKind::Generate(s)) => s.processor.decode(&[id]).unwrap_or_default(),
            _ => String::new(),
        }
    };
    let entry = |id: u32, lp: f32| {
        let s = text(id);
        json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
    };
    let mut e = entry(t.id, t.logprob);
    e["top_logprobs"] = t
        .top_logprobs
        .iter()
        .take(top_n)
        .map(|x| entry(x.token_id, x.logprob))
        .collect::<Vec<_>>()
        .into();
    e
}

/// The request body; one over the limit (or unreadable) gets an error in OpenAI's
/// shape too.
fn read_body(s: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Bytes, ServeError> {
    body.map_err(|e| {
        let limit = s.gateway.limits.http_body_bytes();
        bad(format!(
            "the request body could not be read ({e}; at most {limit} bytes)"
        ))
    })
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    completions(s, body, Api::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn text_completions(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    completions(s, body, Api::Completions)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// Chat logprobs entries (`token_logprob`) in the completions API's shape.
fn legacy_logprobs(entries: &[Value]) -> Value {
    let mut offset = 0;
    let mut text_offset = Vec::new();
    for e in entries {
        text_offset.push(offset);
        offset += e["token"].as_str().map_or(0, str::len);
    }
    json!({
        "tokens": entries.iter().map(|e| e["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": entries.iter().map(|e| {
            e["top_logprobs"].as_array().map_or(json!({}), |t| {
                Value::Object(t.iter().map(|x| (
                    x["token"].as_str().unwrap_or_default().to_string(),
                    x["logprob"].clone(),
                )).collect())
            })
        }).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

async fn completions(
    s: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    api: Api,
) -> Result<Response, ServeError> {
    let body = read_body(&s, body)?;
    let p = parse(&s, &body, api).await?;
    let gw = s.gateway.clone();
    let model = p.input.model.clone();
    let top_n = p.input.options.top_logprobs;
    let deadline = gw.deadline(None);
    // One generation a choice, each with its seed stream; the decoder computes their
    // shared prompt once (a sample waits for the first's prompt blocks).
    let seed = p.input.options.sampling.seed;
    let mut generations = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let mut input = p.input.clone();
        input.options.sampling.seed = iris_engine::seed_stream(seed, i);
        generations.push(gw.generate(input, deadline).await?);
    }
    let id = match api {
        Api::Chat => format!("chatcmpl-{:016x}", rand_seed()),
        Api::Completions => format!("cmpl-{:016x}", rand_seed()),
    };
    let created = unix_now();
    let prompt_tokens = generations[0].prompt_tokens;
    if !p.stream {
        let choices =
            futures::future::join_all(generations.into_iter().enumerate().map(|(index, g)| {
                let gw = gw.clone();
                let model = model.clone();
                async move {
                    let mut events = g.events;
                    let mut logprobs = Vec::new();
                    while let Some(ev) = events.next().await {
                        match ev.map_err(ServeError::from)?.event {
                            Some(pb::generate_event::Event::Token(t)) if p.logprobs => {
                                logprobs.push(token_logprob(&gw, &model, &t, top_n));
                            }
                            Some(pb::generate_event::Event::Finished(f)) => {
                                let mut choice = json!({
                                    "index": index,
                                    "finish_reason": finish_name(f.reason),
                                    "logprobs": null,
                                });
                                match api {
                                    Api::Chat => {
                                        choice["message"] =
                                            json!({"role": "assistant", "content": f.text});
                                        if p.logprobs {
                                            choice["logprobs"] = json!({ "content": logprobs });
                                        }
                                    }
                                    Api::Completions => {
                                        choice["text"] = json!(f.text);
                                        if p.logprobs {
                                            choice["logprobs"] = legacy_logprobs(&logprobs);
                                        }
                                    }
                                }
                                return Ok((choice, f.completion_tokens as usize, f.cached_tokens));
                            }
                            _ => {}
                        }
                    }
                    Err(ServeError::internal(
                        "the decoder ended the stream without finishing",
                    ))
                }
            }))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, ServeError>>()?;
        let completion: usize = choices.iter().map(|c| c.1).sum();
        let cached = choices[0].2;
        return Ok(Json(json!({
            "id": id,
            "object": match api {
                Api::Chat => "chat.completion",
                Api::Completions => "text_completion",
            },
            "created": created,
            "model": model,
            "choices": choices.into_iter().map(|c| c.0).collect::<Vec<_>>(),
            "usage": usage(prompt_tokens, completion, cached),
        }))
        .into_response());
    }
    let model_name = model.clone();
    // A chunk of choice `index`: `delta` the chat shape (`{"content": …}`), turned
    // into the completions API's `text` there.
    let chunk = move |index: usize, delta: Value, finish: Option<&str>, logprobs: Value| match api {
        Api::Chat => json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
        }),
        Api::Completions => {
            let logprobs = match logprobs["content"].as_array() {
                Some(e) => legacy_logprobs(e),
                None => Value::Null,
            };
            json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": delta["content"].as_str().unwrap_or_default(),
                             "finish_reason": finish, "logprobs": logprobs}],
            })
        }
    };
    let n = generations.len();
    // The choices' events interleaved as they come, each tagged with its index.
    let mut events = futures::stream::select_all(
        generations
            .into_iter()
            .enumerate()
            .map(|(i, g)| g.events.map(move |ev| (i, ev)).boxed()),
    );
    let stream = async_stream::stream! {
        for index in 0..n {
            if api == Api::Chat {
                yield Ok::<_, Infallible>(Event::default().data(
                    chunk(index, json!({"role": "assistant", "content": ""}), None, Value::Null).to_string(),
                ));
            }
        }
        let (mut open, mut completion, mut cached) = (n, 0usize, None);
        while let Some((index, ev)) = events.next().await {
            match ev {
                Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Token(t)) }) => {
                    let lp = if p.logprobs {
                        json!({"content": [token_logprob(&gw, &model_name, &t, top_n)]})
                    } else {
                        Value::Null
                    };
                    if !t.text.is_empty() || p.logprobs {
                        yield Ok(Event::default().data(
                            chunk(index, json!({"content": t.text}), None, lp).to_string(),
                        ));
                    }
                }
                Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Finished(f)) }) => {
                    yield Ok(Event::default().data(
                        chunk(index, json!({}), Some(finish_name(f.reason)), Value::Null).to_string(),
                    ));
                    completion += f.completion_tokens as usize;
                    if index == 0 {
                        cached = Some(f.cached_tokens);
                    }
                    open -= 1;
                    if open == 0 {
                        if p.include_usage {
                            let mut u = chunk(0, json!({}), None, Value::Null);
                            u["choices"] = json!([]);
                            u["usage"] = usage(prompt_tokens, completion, cached.unwrap_or(0));
                            yield Ok(Event::default().data(u.to_string()));
                        }
                        break;
                    }
                }
                Ok(_) => {}
                Err(status) => {
                    // Headers are gone: the error travels as an event in OpenAI's shape.
                    let body = json!({"error": {"message": status.message(), "type": "server_error"}});
                    yield Ok(Event::default().data(body.to_string()));
                    break;
                }
            }
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Ok(Sse::new(stream).into_response())
}

/// `POST /v1/embeddings` for retrieval models (BLIP, BLIP-2 ITC): `input` a string or
/// an array of strings, each a text or an image as a `data:` URL (or an allowed
/// `http(s)://` one); each embedding L2-normalised, as `iris embed` prints it. An image
/// of BLIP-2 has one embedding per query token: its rows are concatenated (`rows` says
/// how many, an Iris extension). `encoding_format` `float` or `base64` (little-endian
/// f32, as OpenAI's).
async fn embeddings(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let body = read_body(&s, body)?;
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| bad(format!("the body is not JSON: {e}")))?;
        let model = v["model"]
            .as_str()
            .ok_or_else(|| bad("`model` is required"))?
            .to_string();
        let p = s.gateway.retrieval(&model)?;
        let inputs: Vec<String> = match &v["input"] {
            Value::String(x) => vec![x.clone()],
            Value::Array(a) if !a.is_empty() => a
                .iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("`input` must be a string or an array of strings"))?,
            _ => {
                return Err(bad(
                    "`input` must be a string or a non-empty array of strings",
                ))
            }
        };
        let base64 = match v["encoding_format"].as_str() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => return Err(bad(format!("encoding_format: unknown {other:?}"))),
        };
        // Images fetched first (async), then every embedding on a blocking thread.
        let mut items = Vec::with_capacity(inputs.len());
        for x in inputs {
            items.push(
                if x.starts_with("data:") || x.starts_with("http://") || x.starts_with("https://") {
                    Err(image_bytes(&s, &x).await?)
                } else {
                    Ok(x)
                },
            );
        }
        let out = tokio::task::spawn_blocking(move || {
            items
                .iter()
                .map(|item| -> Result<(Vec<f32>, usize, usize), ServeError> {
                    Ok(match item {
                        Ok(text) => (p.embed_text(text)?.to_f32_vec(), 1, p.text_tokens(text)?),
                        Err(image) => {
                            let e = p.embed_image(image)?;
                            (e.to_f32_vec(), e.rows(), 0)
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ServeError::internal(e.to_string()))??;
        let tokens: usize = out.iter().map(|o| o.2).sum();
        let data: Vec<Value> = out
            .into_iter()
            .enumerate()
            .map(|(index, (e, rows, _))| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(e)
                };
                json!({"object": "embedding", "index": index, "embedding": embedding, "rows": rows})
            })
            .collect();
        Ok::<_, ServeError>(Json(json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })))
    };
    match run.await {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

fn usage(prompt: usize, completion: usize, cached: u32) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}
