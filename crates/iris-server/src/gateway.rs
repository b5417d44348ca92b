//! The gateway: validates a request (model, image count, bytes and pixels from the
//! headers, prompt and output length against the context), renders the model's chat
//! template, tokenizes, gets each image's visual tokens from the cache or from the
//! vision and connector tiers (once per image content, however many ask), and streams
//! the decoder tier's tokens back, recording latency metrics on the way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument as _;

use futures::StreamExt;
use iris_engine::{
    Escapes, Family, GenerateOptions, ModelSpec, PipelineOptions, PromptStyle, RetrievalPipeline,
    Task,
};
use iris_image::ImageLimits;
use iris_models::config::{architecture, read_json, ImageSize};
use iris_proto::v1 as pb;
use tonic::Status;

use crate::error::ServeError;

use crate::cache::{Lookup, VisualCache};
use crate::metrics::Metrics;
use crate::tiers::{ConnectorTier, DecoderTier, EventStream, VisionTier};
use crate::wire;

/// One part of a chat message's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Image,
}

#[derive(Debug, Clone)]
pub struct Message {
    pub role: String,
    pub content: Vec<Part>,
}

/// A generation request as the gateway takes it from gRPC or HTTP.
#[derive(Debug, Clone)]
pub struct GenerateInput {
    pub model: String,
    /// Exactly one of a raw prompt (with image markers) and chat messages.
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    pub images: Vec<Vec<u8>>,
    pub options: GenerateOptions,
}

#[derive(Debug, Clone)]
pub struct GatewayLimits {
    pub max_images: usize,
    /// Pixels (from the headers) all of a request's images may have together.
    pub max_request_pixels: u64,
    /// Upper bound on `max_tokens` whatever the context allows.
    pub max_tokens: usize,
    pub image: ImageLimits,
    /// Deadline of a request that sets none.
    pub request_timeout: Duration,
    /// Bytes of visual tokens the cache keeps.
    pub cache_bytes: usize,
    /// Times a stream may move to another decoder when its decoder dies.
    pub max_migrations: usize,
}

/// Room for the prompt, the other fields and the encoding around a request's images.
const REQUEST_ROOM: usize = 1 << 20;

impl GatewayLimits {
    /// The largest HTTP request body: as many images as a request may carry, each at the
    /// largest size accepted and base64-encoded (4/3) in a `data:` URL, plus the room. So
    /// any request within the image limits fits, and nothing much larger.
    pub fn http_body_bytes(&self) -> usize {
        let per_image = self.image.max_bytes.div_ceil(3) * 4 + 256;
        self.max_images.max(1) * per_image + REQUEST_ROOM
    }

    /// The largest gRPC request: the same images as raw bytes, plus the room.
    pub fn grpc_request_bytes(&self) -> usize {
        self.max_images.max(1) * self.image.max_bytes + REQUEST_ROOM
    }
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits {
            max_images: 8,
            max_request_pixels: 40_000_000,
            max_tokens: 4096,
            image: ImageLimits::default(),
            request_timeout: Duration::from_secs(300),
            cache_bytes: 1 << 30,
            max_migrations: 3,
        }
    }
}

pub enum ModelKind {
    Generate(Box<ModelSpec>),
    Retrieval(Arc<RetrievalPipeline>),
}

pub struct GatewayModel {
    pub id: String,
    pub dir: PathBuf,
    pub architecture: String,
    pub kind: ModelKind,
    /// BLAKE3 over the model's weights and configs: part of every visual-cache key.
    pub digest: [u8; 32],
    pub chat_template: String,
}

impl GatewayModel {
    /// Reads what the gateway needs of a model folder: its processor and configs (and,
    /// for a retrieval model, which the gateway serves itself, its weights).
    pub fn load(id: &str, dir: &Path, limits: ImageLimits) -> iris_engine::Result<GatewayModel> {
        GatewayModel::load_on(id, dir, limits, iris_tensor::Device::Cpu)
    }

    /// [`GatewayModel::load`] with a retrieval model's weights on `device`.
    pub fn load_on(
        id: &str,
        dir: &Path,
        limits: ImageLimits,
        device: iris_tensor::Device,
    ) -> iris_engine::Result<GatewayModel> {
        let gguf = iris_models::registry::is_gguf(dir);
        let cfg = if gguf {
            iris_models::gguf::read(dir)?.llama()?.config
        } else {
            read_json(&dir.join("config.json"))?
        };
        let arch = architecture(&cfg).unwrap_or_default();
        let kind = if Family::of(&cfg)?.task() == Task::Retrieval {
            let opts = PipelineOptions {
                dtype: None,
                limits,
                device,
                quantize: None,
            };
            ModelKind::Retrieval(Arc::new(RetrievalPipeline::load(dir, &opts)?))
        } else {
            ModelKind::Generate(Box::new(ModelSpec::from_config(dir, &cfg, limits)?))
        };
        let style = match &kind {
            ModelKind::Generate(s) => s.processor.style(),
            ModelKind::Retrieval(_) => PromptStyle::Plain,
        };
        Ok(GatewayModel {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            architecture: arch,
            kind,
            digest: model_digest(dir).map_err(|source| iris_models::Error::Io {
                path: dir.to_path_buf(),
                source,
            })?,
            chat_template: chat_template(dir, style)?,
        })
    }

    fn spec(&self) -> Result<&ModelSpec, ServeError> {
        match &self.kind {
            ModelKind::Generate(s) => Ok(s),
            ModelKind::Retrieval(_) => Err(ServeError::bad_input(format!(
                "model `{}` is a retrieval model: use Embed / Match",
                self.id
            ))),
        }
    }
}

/// BLAKE3 of a model folder's configs and weight files (names, then bytes), so cached
/// visual tokens never outlive the weights or preprocessing that made them.
pub fn model_digest(dir: &Path) -> std::io::Result<[u8; 32]> {
    if dir.is_file() {
        let mut h = blake3::Hasher::new();
        h.update_mmap_rayon(dir)?;
        return Ok(*h.finalize().as_bytes());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.ends_with(".safetensors") || name.ends_with(".json")
        })
        .filter(|p| !p.ends_with("tokenizer.json") && !p.ends_with("tokenizer_config.json"))
        .collect();
    files.sort();
    let mut h = blake3::Hasher::new();
    for f in files {
        h.update(f.file_name().map(|n| n.as_encoded_bytes()).unwrap_or(b""));
        h.update_mmap_rayon(&f)?;
    }
    Ok(*h.finalize().as_bytes())
}

/// BLAKE3 of what a vision tower's features depend on: the tensors it read from the
/// checkpoint (`tensors`, by name and f32 value, so a bf16 and an f32 copy of one tower
/// agree), the compute dtype, the image processor's config and the vision settings of
/// `config.json` (`vision_config`, `vision_feature_*`). Two models with the same
/// tower share its encodes in the cluster-wide cache.
pub fn tower_digest(
    dir: &Path,
    tensors: &[String],
    dtype: Option<iris_tensor::DType>,
) -> Result<[u8; 32], ServeError> {
    let bad = |e: String| ServeError::internal(format!("{}: {e}", dir.display()));
    let w = iris_models::weights::Weights::open(dir, iris_tensor::DType::F32)
        .map_err(|e| bad(e.to_string()))?;
    let mut h = blake3::Hasher::new();
    let mut names = tensors.to_vec();
    names.sort();
    names.dedup();
    for n in &names {
        let shape = w.shape(n).ok_or_else(|| bad(format!("no tensor {n}")))?;
        let t = w.get(n, &shape).map_err(|e| bad(e.to_string()))?;
        h.update(n.as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        shape.iter().for_each(|d| {
            h.update(&(*d as u64).to_le_bytes());
        });
        h.update(&t.to_le_bytes().map_err(|e| bad(e.to_string()))?);
    }
    h.update(format!("dtype={dtype:?}").as_bytes());
    for f in ["preprocessor_config.json", "processor_config.json"] {
        if let Ok(b) = std::fs::read(dir.join(f)) {
            h.update(f.as_bytes());
            h.update(&b);
        }
    }
    let config: serde_json::Value = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(o) = config.as_object() {
        for (k, v) in o {
            if k == "vision_config" || k.starts_with("vision_feature") {
                h.update(k.as_bytes());
                h.update(v.to_string().as_bytes());
            }
        }
    }
    Ok(*h.finalize().as_bytes())
}

/// The model's chat template (`chat_template.json`, `chat_template.jinja` or
/// `tokenizer_config.json`; a GGUF file's `tokenizer.chat_template`), else a plain one
/// in the model family's prompt format.
fn chat_template(dir: &Path, style: PromptStyle) -> iris_engine::Result<String> {
    if iris_models::registry::is_gguf(dir) {
        let h = iris_models::gguf::read(dir)?;
        return Ok(iris_engine::gguf_tokenizer::chat_template(&h)
            .unwrap_or_else(|| default_template(style).to_string()));
    }
    let from_json = |file: &str| -> Option<String> {
        read_json(&dir.join(file))
            .ok()?
            .get("chat_template")?
            .as_str()
            .map(str::to_string)
    };
    Ok(from_json("chat_template.json")
        .or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok())
        .or_else(|| from_json("tokenizer_config.json"))
        .unwrap_or_else(|| default_template(style).to_string()))
}

fn default_template(style: PromptStyle) -> &'static str {
    match style {
        // LLaVA-1.5's conversation format.
        PromptStyle::Inline => {
            "{% for m in messages %}{% if m.role != 'system' %}{{ m.role | upper }}: {% endif %}\
             {% for c in m.content %}{% if c.type == 'image' %}{{ image_token }}\n{% endif %}{% endfor %}\
             {% for c in m.content %}{% if c.type == 'text' %}{{ c.text }} {% endif %}{% endfor %}\
             {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
        }
        // BLIP-2's VQA format: the image goes first.
        PromptStyle::Prefix => {
            "{% for m in messages %}{% for c in m.content %}{% if c.type == 'image' %}{{ image_token }}{% endif %}{% endfor %}{% endfor %}\
             {% for m in messages %}{% for c in m.content %}{% if c.type == 'text' %}\
             {% if m.role == 'user' %}Question: {{ c.text }} {% else %}Answer: {{ c.text }} {% endif %}\
             {% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}"
        }
        // IDEFICS' dialogue format.
        PromptStyle::Interleaved => {
            "{% for m in messages %}{{ m.role | capitalize }}:\
             {% for c in m.content %}{% if c.type == 'image' %}{{ image_token }}{% else %}{{ c.text }}{% endif %}{% endfor %}\
             <end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
        }
        // Captioners and text models: the text as it is, the image marker first.
        PromptStyle::Decoder { .. } | PromptStyle::Plain => {
            "{% for m in messages %}{% for c in m.content %}{% if c.type == 'image' %}{{ image_token }}{% endif %}{% endfor %}\
             {% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endfor %}"
        }
    }
}

/// Renders chat messages with a (HF, Jinja) chat template.
pub fn render_chat(
    template: &str,
    messages: &[Message],
    image_token: &str,
    bos: &str,
    eos: &str,
) -> Result<String, ServeError> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| ServeError::internal(format!("the model's chat template: {e}")))?;
    // Without images, a message's content is its text (as OpenAI clients send it, and
    // text models' templates concatenate it); with images, a list of typed parts.
    let text_only = messages
        .iter()
        .all(|m| m.content.iter().all(|p| matches!(p, Part::Text(_))));
    let msgs: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            if text_only && template_takes_text(template) {
                let text: String = m
                    .content
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => t.as_str(),
                        Part::Image => "",
                    })
                    .collect();
                return serde_json::json!({"role": m.role, "content": text});
            }
            let content: Vec<serde_json::Value> = m
                .content
                .iter()
                .map(|p| match p {
                    Part::Text(t) => serde_json::json!({"type": "text", "text": t}),
                    Part::Image => serde_json::json!({"type": "image"}),
                })
                .collect();
            serde_json::json!({"role": m.role, "content": content})
        })
        .collect();
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => msgs,
                add_generation_prompt => true,
                image_token => image_token,
                bos_token => bos,
                eos_token => eos,
            })
        })
        .map_err(|e| ServeError::bad_input(format!("rendering the chat template: {e}")))
}

/// Whether a template reads a message's content as one string (a text model's), not
/// as a list of typed parts (`c.type`, `['type']`: a vision-language model's).
fn template_takes_text(template: &str) -> bool {
    !(template.contains(".type")
        || template.contains("['type']")
        || template.contains("[\"type\"]"))
}

/// Splits text with image markers into parts.
pub fn parts_of(text: &str, marker: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    for (i, piece) in text.split(marker).enumerate() {
        if i > 0 {
            parts.push(Part::Image);
        }
        if !piece.is_empty() {
            parts.push(Part::Text(piece.to_string()));
        }
    }
    parts
}

pub struct Gateway {
    pub models: HashMap<String, GatewayModel>,
    vision: Arc<dyn VisionTier>,
    connector: Arc<dyn ConnectorTier>,
    decoder: Arc<dyn DecoderTier>,
    cache: VisualCache,
    pub metrics: Arc<Metrics>,
    pub limits: GatewayLimits,
}

/// A running generation: its events and its prompt's length.
pub struct Generation {
    pub events: EventStream,
    pub prompt_tokens: usize,
    /// How many of the images' visual tokens came from the cache.
    pub cached_images: usize,
}

impl Gateway {
    pub fn new(
        models: Vec<GatewayModel>,
        vision: Arc<dyn VisionTier>,
        connector: Arc<dyn ConnectorTier>,
        decoder: Arc<dyn DecoderTier>,
        limits: GatewayLimits,
        metrics: Arc<Metrics>,
    ) -> Gateway {
        Gateway {
            models: models.into_iter().map(|m| (m.id.clone(), m)).collect(),
            vision,
            connector,
            decoder,
            cache: VisualCache::new(limits.cache_bytes, metrics.clone()),
            metrics,
            limits,
        }
    }

    pub fn model(&self, id: &str) -> Result<&GatewayModel, ServeError> {
        self.models.get(id).ok_or_else(|| {
            let mut known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            known.sort();
            ServeError::NotFound(format!(
                "model `{id}` is not served (served: {})",
                known.join(", ")
            ))
        })
    }

    pub fn deadline(&self, timeout: Option<Duration>) -> Instant {
        Instant::now() + timeout.unwrap_or(self.limits.request_timeout)
    }

    /// Everything that can be checked before any image is decoded or encoded.
    /// The model, the prompt's ids and each image's size (where its token count needs
    /// it; zero elsewhere).
    #[allow(clippy::type_complexity)]
    fn validate(
        &self,
        input: &GenerateInput,
    ) -> Result<(&GatewayModel, Vec<u32>, Vec<ImageSize>), ServeError> {
        let model = self.model(&input.model)?;
        let spec = model.spec()?;
        let o = &input.options;
        check_request_limits(input)?;
        if o.max_new_tokens == 0 {
            return Err(ServeError::bad_input("max_tokens must be at least 1"));
        }
        if o.max_new_tokens > self.limits.max_tokens {
            return Err(ServeError::bad_input(format!(
                "max_tokens {} is more than this server allows ({})",
                o.max_new_tokens, self.limits.max_tokens
            )));
        }
        o.validate()
            .map_err(|e| ServeError::bad_input(e.to_string()))?;
        let image_parts = input
            .messages
            .iter()
            .flatten()
            .any(|m| m.content.iter().any(|p| matches!(p, Part::Image)));
        if model.architecture == iris_models::text::ARCHITECTURE
            && (image_parts || !input.images.is_empty())
        {
            return Err(ServeError::bad_input(format!(
                "model `{}` is a text-only model: it takes no images",
                model.id
            )));
        }
        if input.images.len() > self.limits.max_images {
            return Err(ServeError::bad_input(format!(
                "{} images: at most {} per request",
                input.images.len(),
                self.limits.max_images
            )));
        }
        let mut pixels = 0u64;
        for (i, img) in input.images.iter().enumerate() {
            let (w, h) = iris_image::dimensions(img, self.limits.image)
                .map_err(|e| ServeError::bad_input(format!("image {}: {e}", i + 1)))?;
            pixels += u64::from(w) * u64::from(h);
        }
        // Bounded work: decoding is paid per pixel, and one request may not take it all.
        if pixels > self.limits.max_request_pixels {
            return Err(ServeError::bad_input(format!(
                "the request's images have {pixels} pixels: at most {} in all per request",
                self.limits.max_request_pixels
            )));
        }
        let marker = spec.processor.image_token();
        let mut esc = Escapes::default();
        let prompt = match (&input.prompt, &input.messages) {
            (Some(p), None) => p.clone(),
            (None, Some(m)) if !m.is_empty() => {
                // User text is only text: its special-token strings and markers are
                // escaped, so only the template's own count.
                let escaped: Vec<Message> = m
                    .iter()
                    .map(|m| Message {
                        role: m.role.clone(),
                        content: m
                            .content
                            .iter()
                            .map(|p| match p {
                                Part::Text(t) => Part::Text(spec.processor.escape(t, &mut esc)),
                                Part::Image => Part::Image,
                            })
                            .collect(),
                    })
                    .collect();
                let tok = spec.processor.tokenizer();
                let name =
                    |id: Option<&u32>| id.and_then(|&i| tok.id_to_token(i)).unwrap_or_default();
                render_chat(
                    &model.chat_template,
                    &escaped,
                    marker,
                    &name(tok.token_to_id("<s>").as_ref()),
                    &name(spec.eos_token_ids.first()),
                )?
            }
            _ => {
                return Err(ServeError::bad_input(
                    "give exactly one of a prompt and (non-empty) messages",
                ))
            }
        };
        // Bounded work: text that cannot fit the context is refused before tokenizing.
        let most = spec.processor.max_text_bytes(spec.context_length);
        let bytes = prompt.len() - esc.overhead().min(prompt.len());
        if bytes > most {
            return Err(ServeError::bad_input(format!(
                "the prompt's {bytes} bytes cannot fit the model's context of {} tokens (at most {most} bytes)",
                spec.context_length
            )));
        }
        // Where an image's placeholder count depends on its size (LLaVA-NeXT), the size
        // is read from its header here, before anything is decoded or encoded.
        let sizes = input
            .images
            .iter()
            .enumerate()
            .map(|(i, img)| match spec.processor.image_tokens().fixed() {
                Some(_) => Ok(ImageSize::default()),
                None => spec
                    .processor
                    .image_size(img)
                    .map_err(|e| ServeError::bad_input(format!("image {}: {e}", i + 1))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ids = spec
            .processor
            .tokenize_escaped(&prompt, &sizes, &esc)
            .map_err(|e| ServeError::bad_input(e.to_string()))?;
        let need = ids.len() + o.max_new_tokens;
        if need > spec.context_length {
            return Err(ServeError::bad_input(format!(
                "the prompt's {} tokens plus max_tokens {} exceed the model's context of {}",
                ids.len(),
                o.max_new_tokens,
                spec.context_length
            )));
        }
        Ok((model, ids, sizes))
    }

    /// Visual tokens of one image: from the cache, or encoded once by the vision and
    /// connector tiers.
    pub async fn visual_tokens(
        &self,
        model: &GatewayModel,
        image: &[u8],
        size: ImageSize,
        deadline: Instant,
    ) -> Result<(Arc<iris_tensor::Tensor>, Lookup), ServeError> {
        let span = crate::trace::span(|| {
            tracing::info_span!(
                "gateway.image",
                bytes = image.len(),
                cache = tracing::field::Empty
            )
        });
        let looked = self
            .visual_tokens_untraced(model, image, size, deadline)
            .instrument(span.clone())
            .await;
        if let Ok((_, lookup)) = &looked {
            span.record(
                "cache",
                if *lookup == Lookup::Hit {
                    "hit"
                } else {
                    "miss"
                },
            );
        }
        looked
    }

    async fn visual_tokens_untraced(
        &self,
        model: &GatewayModel,
        image: &[u8],
        size: ImageSize,
        deadline: Instant,
    ) -> Result<(Arc<iris_tensor::Tensor>, Lookup), ServeError> {
        let image_key = *blake3::hash(image).as_bytes();
        let key = VisualCache::key_of(&model.digest, &image_key);
        let (vision, connector) = (self.vision.clone(), self.connector.clone());
        let (id, bytes) = (model.id.clone(), image.to_vec());
        // This gateway's cache first, then the cluster's: the key's owner among the
        // connectors, then the image's owner among the encoders (which keeps the
        // features for every model on its tower). In one process both are this cache.
        self.cache
            .get_or_compute(key, async move {
                match connector.cached(&id, key, deadline).await {
                    Ok(Some(tokens)) => return Ok(tokens),
                    Ok(None) => {}
                    Err(e) => tracing::debug!("the connectors' cache did not answer: {e}"),
                }
                let features = vision.encode_keyed(&id, bytes, image_key, deadline).await?;
                connector
                    .project_keyed(&id, features, size, key, deadline)
                    .await
            })
            .await
    }

    pub async fn generate(
        &self,
        input: GenerateInput,
        deadline: Instant,
    ) -> Result<Generation, ServeError> {
        let start = Instant::now();
        let model = input.model.clone();
        let images = input.images.len();
        let span = crate::trace::span(|| {
            tracing::info_span!(
                "gateway.generate",
                %model,
                images,
                prompt_tokens = tracing::field::Empty,
                cached_images = tracing::field::Empty,
            )
        });
        let result = self.start(input, deadline).instrument(span.clone()).await;
        if let Ok(g) = &result {
            span.record("prompt_tokens", g.prompt_tokens);
            span.record("cached_images", g.cached_images);
        }
        let generation = match result {
            Ok(g) => g,
            Err(e) => {
                tracing::info!(%model, images, status = e.label(), error = e.message(), "refused");
                self.metrics.count_request(e.label());
                return Err(e);
            }
        };
        let (prompt_tokens, cached_images) = (generation.prompt_tokens, generation.cached_images);
        let metrics = self.metrics.clone();
        let mut last = None::<Instant>;
        // Counts the request once, however it ends: finished, failed, or dropped by a
        // client that went away (`cancelled`).
        let mut outcome = Outcome {
            metrics: metrics.clone(),
            counted: false,
        };
        let events = generation.events.map(move |ev| {
            let now = Instant::now();
            match &ev {
                Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Token(_)),
                }) => {
                    match last {
                        None => metrics.ttft.observe((now - start).as_secs_f64()),
                        Some(t) => metrics.inter_token.observe((now - t).as_secs_f64()),
                    }
                    last = Some(now);
                    metrics.completion_tokens.inc();
                }
                Ok(pb::GenerateEvent {
                    event: Some(pb::generate_event::Event::Finished(f)),
                }) if !outcome.counted => {
                    outcome.count("ok");
                    metrics.prompt_tokens.inc_by(f.prompt_tokens as u64);
                    tracing::info!(
                        %model,
                        images,
                        cached_images,
                        prompt_tokens,
                        completion_tokens = f.completion_tokens,
                        cached_prompt_tokens = f.cached_tokens,
                        ms = start.elapsed().as_millis() as u64,
                        "generated"
                    );
                }
                Err(s) if !outcome.counted => {
                    let e = ServeError::from(s.clone());
                    outcome.count(e.label());
                    tracing::warn!(%model, status = e.label(), error = e.message(), "failed");
                }
                _ => {}
            }
            ev
        });
        Ok(Generation {
            events: Box::pin(events),
            ..generation
        })
    }

    async fn start(
        &self,
        input: GenerateInput,
        deadline: Instant,
    ) -> Result<Generation, ServeError> {
        let checked = crate::trace::span(|| tracing::info_span!("gateway.validate"));
        let (model, ids, sizes) = checked.in_scope(|| self.validate(&input))?;
        drop(checked);
        let mut visual = Vec::with_capacity(input.images.len());
        let mut image_hashes = Vec::with_capacity(input.images.len());
        let mut cached_images = 0;
        // All images at once: misses go to the tiers concurrently.
        let lookups = futures::future::join_all(
            input
                .images
                .iter()
                .zip(sizes)
                .map(|(img, size)| self.visual_tokens(model, img, size, deadline)),
        )
        .await;
        for r in lookups {
            let (tokens, lookup) = r?;
            cached_images += usize::from(lookup == Lookup::Hit);
            // What the decoder keys its prefix cache by: routing finds the decoder
            // holding the longest prefix with it.
            image_hashes.push(iris_engine::visual_hash(&tokens)?.to_vec());
            visual.push(wire::tensor_to_wire_compact(&tokens)?);
        }
        let o = &input.options;
        let req = pb::DecodeRequest {
            model: model.id.clone(),
            prompt_token_ids: ids.clone(),
            visual_tokens: visual,
            image_hashes,
            sampling: Some(wire::sampling_to_wire(&o.sampling)),
            max_tokens: o.max_new_tokens as u32,
            stop: o.stop.strings.clone(),
            stop_token_ids: o.stop.token_ids.clone(),
            top_logprobs: o.top_logprobs as u32,
            resume_token_ids: vec![],
            constraint: wire::constraint_to_wire(o.constraint.as_ref()),
            logit_bias: o.logit_bias.iter().copied().collect(),
        };
        // Routing (the decoder holding the longest prefix, weighed by load) and the
        // call, until the decoder's stream is open.
        let route =
            crate::trace::span(|| tracing::info_span!("gateway.route", prompt_tokens = ids.len()));
        let first = self
            .decoder
            .generate(req.clone(), deadline)
            .instrument(route)
            .await?;
        Ok(Generation {
            events: migrating(
                first,
                self.decoder.clone(),
                req,
                deadline,
                self.limits.max_migrations,
                self.metrics.migrations.clone(),
            ),
            prompt_tokens: ids.len(),
            cached_images,
        })
    }

    pub fn retrieval(&self, id: &str) -> Result<Arc<RetrievalPipeline>, ServeError> {
        match &self.model(id)?.kind {
            ModelKind::Retrieval(p) => Ok(p.clone()),
            ModelKind::Generate(_) => Err(ServeError::bad_input(format!(
                "model `{id}` generates text: Embed and Match take a retrieval model"
            ))),
        }
    }
}

/// A request's count in `iris_requests_total`, made once: at its end, or as
/// `cancelled` when its stream is dropped before it ended.
struct Outcome {
    metrics: Arc<Metrics>,
    counted: bool,
}

impl Outcome {
    fn count(&mut self, status: &str) {
        if !self.counted {
            self.counted = true;
            self.metrics.count_request(status);
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        self.count("cancelled");
    }
}

/// Chat roles a request may use (OpenAI's, less tools).
pub const ROLES: &[&str] = &["system", "developer", "user", "assistant"];
/// OpenAI's limits, the same for gRPC and HTTP.
pub const MAX_TEMPERATURE: f32 = 2.0;
pub const MAX_TOP_LOGPROBS: usize = 20;
pub const MAX_STOP_STRINGS: usize = 4;
pub const MAX_STOP_BYTES: usize = 256;

/// The limits every protocol shares, each error naming its parameter.
fn check_request_limits(input: &GenerateInput) -> Result<(), ServeError> {
    let o = &input.options;
    let t = o.sampling.temperature;
    if !(0.0..=MAX_TEMPERATURE).contains(&t) {
        return Err(ServeError::bad_input(format!(
            "temperature: {t} is not in [0, {MAX_TEMPERATURE}]"
        )));
    }
    if o.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(ServeError::bad_input(format!(
            "top_logprobs: {} is more than {MAX_TOP_LOGPROBS}",
            o.top_logprobs
        )));
    }
    if o.stop.strings.len() > MAX_STOP_STRINGS {
        return Err(ServeError::bad_input(format!(
            "stop: {} strings, at most {MAX_STOP_STRINGS}",
            o.stop.strings.len()
        )));
    }
    if let Some(long) = o.stop.strings.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ServeError::bad_input(format!(
            "stop: a string of {} bytes, at most {MAX_STOP_BYTES}",
            long.len()
        )));
    }
    for (i, m) in input.messages.iter().flatten().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ServeError::bad_input(format!(
                "messages[{i}].role: `{}` is not one of {}",
                m.role,
                ROLES.join(", ")
            )));
        }
    }
    Ok(())
}

/// A decoder's stream that survives the decoder: when it breaks before finishing
/// (the process died or its connection broke), the request
/// goes to another decoder with the tokens already streamed, and the stream simply
/// continues — nothing lost or repeated, and the same tokens it would have produced,
/// sampling depending only on (seed, position). At most `max` moves; when none is
/// possible, the stream ends with the decoder tier's error (UNAVAILABLE).
fn migrating(
    first: EventStream,
    decoder: Arc<dyn DecoderTier>,
    req: pb::DecodeRequest,
    deadline: Instant,
    max: usize,
    moved: prometheus_client::metrics::counter::Counter,
) -> EventStream {
    use pb::generate_event::Event;
    Box::pin(async_stream::stream! {
        let mut stream = first;
        let mut produced: Vec<u32> = Vec::new();
        let mut moves = 0;
        loop {
            // The deadline ends the stream whatever its decoder does (a silent one
            // never says so).
            let Ok(next) = tokio::time::timeout_at(deadline.into(), stream.next()).await else {
                yield Err(Status::deadline_exceeded("the request's deadline passed"));
                break;
            };
            let broke = match next {
                Some(Ok(mut ev)) => {
                    match &mut ev.event {
                        Some(Event::Token(t)) => produced.push(t.id),
                        Some(Event::Finished(f)) => {
                            f.completion_tokens = produced.len() as u32;
                            yield Ok(ev);
                            break;
                        }
                        None => {}
                    }
                    yield Ok(ev);
                    continue;
                }
                // A decoder that dies mid-stream shows as UNAVAILABLE, UNKNOWN (a broken
                // connection) or CANCELLED (its end reset the stream; the client's own
                // cancel never reaches here, it drops this stream).
                Some(Err(s)) if crate::tiers::unreachable(&s) => s,
                Some(Err(s)) => {
                    yield Err(s);
                    break;
                }
                None => Status::unavailable("the decoder ended the stream early"),
            };
            if moves == max {
                yield Err(Status::unavailable(format!(
                    "the decoder failed {} times: {}", moves + 1, broke.message()
                )));
                break;
            }
            moves += 1;
            moved.inc();
            tracing::warn!(model = %req.model, produced = produced.len(), "decoder lost mid-stream, migrating: {}", crate::tiers::causes(&broke));
            let mut again = req.clone();
            again.resume_token_ids = produced.clone();
            match decoder.generate(again, deadline).await {
                Ok(s) => stream = s,
                Err(e) => {
                    yield Err(e.into());
                    break;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_llava_template_renders_the_conversation_format() {
        let msgs = vec![Message {
            role: "user".into(),
            content: vec![Part::Image, Part::Text("What is this?".into())],
        }];
        let out = render_chat(
            default_template(PromptStyle::Inline),
            &msgs,
            "<image>",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(out, "USER: <image>\nWhat is this? ASSISTANT:");
        assert_eq!(
            parts_of("a<image>b<image>", "<image>"),
            vec![
                Part::Text("a".into()),
                Part::Image,
                Part::Text("b".into()),
                Part::Image
            ]
        );
    }
}
