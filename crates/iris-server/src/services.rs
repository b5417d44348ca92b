//! The gRPC handlers: each service wraps a tier (or the gateway) and does only wire
//! work, so every handler is usable without the network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iris_proto::v1 as pb;
use iris_proto::v1::connector_server::Connector;
use iris_proto::v1::decoder_server::Decoder;
use iris_proto::v1::gateway_server::Gateway as GatewayApi;
use iris_proto::v1::vision_encoder_server::VisionEncoder;
use tonic::{Request, Response, Status};

use crate::error::ServeError;
use crate::gateway::{parts_of, Gateway, GenerateInput, Message, ModelKind, Part};
use crate::tiers::{ConnectorTier, DecoderTier, EventStream, VisionTier};
use crate::wire::{self, MAX_MESSAGE_BYTES};
use iris_proto::v1::connector_server::ConnectorServer;
use iris_proto::v1::decoder_server::DecoderServer;
use iris_proto::v1::gateway_server::GatewayServer;
use iris_proto::v1::vision_encoder_server::VisionEncoderServer;

/// The caller's deadline (`grpc-timeout`), if it set one.
pub fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn deadline<T>(req: &Request<T>, default: Duration) -> Instant {
    Instant::now() + grpc_timeout(req).unwrap_or(default)
}

/// Tier calls without a deadline of their own get this long.
const TIER_TIMEOUT: Duration = Duration::from_secs(600);

/// A cache key from the wire: absent (empty) or 32 bytes.
fn key(b: &[u8]) -> Result<Option<crate::cache::Key>, Status> {
    match b.len() {
        0 => Ok(None),
        32 => Ok(Some(b.try_into().expect("32 bytes"))),
        n => Err(Status::invalid_argument(format!(
            "a cache key is 32 bytes, not {n}"
        ))),
    }
}

pub struct VisionService(pub Arc<dyn VisionTier>);

#[tonic::async_trait]
impl VisionEncoder for VisionService {
    async fn encode(
        &self,
        req: Request<pb::EncodeRequest>,
    ) -> Result<Response<pb::EncodeResponse>, Status> {
        let d = deadline(&req, TIER_TIMEOUT);
        let r = req.into_inner();
        let features = match key(&r.image_key)? {
            Some(k) => self.0.encode_keyed(&r.model, r.image, k, d).await?,
            None => self.0.encode(&r.model, r.image, d).await?,
        };
        Ok(Response::new(pb::EncodeResponse {
            features: Some(wire::tensor_to_wire_compact(&features)?),
        }))
    }
}

pub struct ConnectorService(pub Arc<dyn ConnectorTier>);

#[tonic::async_trait]
impl Connector for ConnectorService {
    async fn project(
        &self,
        req: Request<pb::ProjectRequest>,
    ) -> Result<Response<pb::ProjectResponse>, Status> {
        let d = deadline(&req, TIER_TIMEOUT);
        let r = req.into_inner();
        let key = key(&r.key)?;
        let Some(features) = r.features.as_ref() else {
            // A lookup in the cluster-wide cache: the tokens, or none.
            let k = key.ok_or_else(|| Status::invalid_argument("no features"))?;
            let tokens = self.0.cached(&r.model, k, d).await?;
            return Ok(Response::new(pb::ProjectResponse {
                visual_tokens: tokens
                    .map(|t| wire::tensor_to_wire_compact(&t))
                    .transpose()?,
            }));
        };
        let features = wire::tensor_from_wire(features)?;
        let size = iris_models::config::ImageSize {
            height: r.image_height as usize,
            width: r.image_width as usize,
        };
        let tokens = match key {
            Some(k) => self.0.project_keyed(&r.model, features, size, k, d).await?,
            None => self.0.project(&r.model, features, size, d).await?,
        };
        Ok(Response::new(pb::ProjectResponse {
            visual_tokens: Some(wire::tensor_to_wire_compact(&tokens)?),
        }))
    }
}

pub struct DecoderService(pub Arc<dyn DecoderTier>);

#[tonic::async_trait]
impl Decoder for DecoderService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        req: Request<pb::DecodeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let d = deadline(&req, TIER_TIMEOUT);
        Ok(Response::new(self.0.generate(req.into_inner(), d).await?))
    }

    type WatchPrefixesStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::PrefixEvent, Status>> + Send>>;

    /// Every model's prefix blocks: a snapshot each, then the changes, merged.
    async fn watch_prefixes(
        &self,
        _req: Request<pb::WatchPrefixesRequest>,
    ) -> Result<Response<Self::WatchPrefixesStream>, Status> {
        use futures::StreamExt;
        let streams = self.0.prefix_indexes().into_iter().map(|(model, index)| {
            let block_size = index.block_size() as u32;
            let rx = index.subscribe();
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |d| {
                let (snapshot, stored, removed) = match d {
                    iris_engine::blocks::PrefixDelta::Snapshot(all) => (true, all, Vec::new()),
                    iris_engine::blocks::PrefixDelta::Changed { stored, removed } => {
                        (false, stored, removed)
                    }
                };
                Ok(pb::PrefixEvent {
                    model: model.clone(),
                    block_size,
                    snapshot,
                    stored,
                    removed,
                })
            })
        });
        let merged = futures::stream::select_all(streams.map(|s| s.boxed()));
        Ok(Response::new(Box::pin(merged)))
    }
}

pub struct GatewayService(pub Arc<Gateway>);

impl GatewayService {
    fn input(&self, r: pb::GenerateRequest) -> Result<GenerateInput, Status> {
        let marker = match &self.0.model(&r.model)?.kind {
            ModelKind::Generate(s) => s.processor.image_token().to_string(),
            ModelKind::Retrieval(_) => "<image>".to_string(),
        };
        let messages = if r.messages.is_empty() {
            None
        } else {
            let each = |m: &pb::ChatMessage| -> Result<Message, Status> {
                let content = match (m.content.is_empty(), m.parts.is_empty()) {
                    (_, true) => parts_of(&m.content, &marker),
                    (true, false) => m
                        .parts
                        .iter()
                        .map(|p| match &p.part {
                            Some(pb::chat_part::Part::Text(t)) => Ok(Part::Text(t.clone())),
                            Some(pb::chat_part::Part::Image(_)) => Ok(Part::Image),
                            None => Err(Status::invalid_argument(
                                "a chat part with neither text nor image",
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                    (false, false) => {
                        return Err(Status::invalid_argument(
                            "a chat message has content or parts, not both",
                        ))
                    }
                };
                Ok(Message {
                    role: m.role.clone(),
                    content,
                })
            };
            Some(r.messages.iter().map(each).collect::<Result<_, _>>()?)
        };
        Ok(GenerateInput {
            model: r.model,
            prompt: (!r.prompt.is_empty()).then_some(r.prompt),
            messages,
            images: r.images,
            options: wire::options(
                r.sampling.as_ref(),
                r.max_tokens,
                &r.stop,
                &r.stop_token_ids,
                r.top_logprobs,
                r.constraint.as_ref(),
                &r.logit_bias,
            )?,
        })
    }
}

#[tonic::async_trait]
impl GatewayApi for GatewayService {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let d = self.0.deadline(grpc_timeout(&req));
        let input = self.input(req.into_inner())?;
        Ok(Response::new(self.0.generate(input, d).await?.events))
    }

    async fn embed(
        &self,
        req: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let r = req.into_inner();
        let p = self.0.retrieval(&r.model)?;
        let out = tokio::task::spawn_blocking(move || -> Result<_, Status> {
            let images = r
                .images
                .iter()
                .map(|b| wire::tensor_to_wire(&p.embed_image(b)?))
                .collect::<Result<Vec<_>, ServeError>>()?;
            let texts = r
                .texts
                .iter()
                .map(|t| wire::tensor_to_wire(&p.embed_text(t)?))
                .collect::<Result<Vec<_>, ServeError>>()?;
            Ok(pb::EmbedResponse {
                image_embeds: images,
                text_embeds: texts,
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(out))
    }

    async fn r#match(
        &self,
        req: Request<pb::MatchRequest>,
    ) -> Result<Response<pb::MatchResponse>, Status> {
        let r = req.into_inner();
        let p = self.0.retrieval(&r.model)?;
        let scores = tokio::task::spawn_blocking(move || p.match_pair(&r.image, &r.text))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(ServeError::from)?;
        Ok(Response::new(pb::MatchResponse {
            itm_probability: scores.itm_probability,
            similarity: scores.itc_similarity,
        }))
    }

    async fn list_models(
        &self,
        _req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let mut models: Vec<pb::Model> = self
            .0
            .models
            .values()
            .map(|m| {
                let (kind, ctx) = match &m.kind {
                    ModelKind::Generate(s) => ("generate", s.context_length as u32),
                    ModelKind::Retrieval(_) => ("retrieval", 0),
                };
                pb::Model {
                    id: m.id.clone(),
                    architecture: m.architecture.clone(),
                    context_length: ctx,
                    max_images: self.0.limits.max_images as u32,
                    kind: kind.into(),
                }
            })
            .collect();
        models.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(pb::ListModelsResponse { models }))
    }
}

/// Raises a generated server's message limits to Iris's.
pub fn max<S: MaxSize>(s: S) -> S {
    s.limit(MAX_MESSAGE_BYTES)
}

/// A server that decodes messages of at most `bytes` (what its work can use; larger
/// ones are refused before they are read whole) and sends up to Iris's limit.
pub fn limited<S: MaxSize>(s: S, bytes: usize) -> S {
    s.limit(bytes.min(MAX_MESSAGE_BYTES))
}

pub trait MaxSize {
    fn limit(self, decode: usize) -> Self;
}

macro_rules! impl_max {
    ($($t:ident),*) => {$(
        impl<T> MaxSize for $t<T> {
            fn limit(self, decode: usize) -> Self {
                self.max_decoding_message_size(decode)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
            }
        }
    )*};
}
impl_max!(
    GatewayServer,
    VisionEncoderServer,
    ConnectorServer,
    DecoderServer
);
