//! `iris`: the command line. `generate` runs one prompt through a model folder;
//! `bench decode` measures decode against the memory-bandwidth roofline.

mod bench;
mod bench_serve;
mod bench_structured;
mod capfilt;
mod retrieval;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use iris_cli::roles::Role as _;
use iris_engine::{
    Engine, EngineConfig, EngineRequest, GenerateOptions, Parts, Pipeline, PipelineOptions,
    SamplingParams, StopRules,
};
use iris_image::ImageLimits;
use iris_tensor::{DType, Device};

#[derive(Parser)]
#[command(name = "iris", version, about = "Iris: serving vision-language models")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a completion for a raw prompt (no chat template) with images.
    Generate(GenerateArgs),
    /// Normalised image / text embeddings of a retrieval model (ITC).
    Embed(retrieval::EmbedArgs),
    /// Image-text matching probability (ITM) and contrastive similarity (ITC).
    Match(retrieval::MatchArgs),
    /// Caption and filter an image-text dataset (BLIP's CapFilt), resumable.
    Capfilt(capfilt::CapFiltArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Serve models: every tier and the gateway in one process (gRPC + OpenAI HTTP).
    Serve(iris_cli::roles::ServeArgs),
    /// The gateway alone, in front of remote tiers.
    Gateway(iris_cli::roles::GatewayRole),
    /// The vision tier alone.
    Encoder(iris_cli::roles::EncoderRole),
    /// The connector tier alone.
    Connector(iris_cli::roles::ConnectorRole),
    /// The decoder tier alone.
    Decoder(iris_cli::roles::DecoderRole),
    /// Ask a running gateway (gRPC) a question about images; streams the answer.
    Chat(ChatArgs),
    /// The cluster's model registry and members in etcd.
    #[command(subcommand)]
    Cluster(iris_cli::cluster_cli::ClusterCmd),
    /// One rank of a local tensor-parallel group (`--tp`), started by rank 0.
    #[command(hide = true)]
    TpRank(iris_cli::tp_group::RankArgs),
}

#[derive(Args)]
struct ChatArgs {
    /// The gateway's gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: String,
    /// Model id, as `iris serve` lists it.
    #[arg(long)]
    model: String,
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The user's message; the images go before it (the model's chat template decides).
    #[arg(long)]
    message: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
}

async fn chat(a: ChatArgs) -> anyhow::Result<()> {
    use iris_proto::v1 as pb;
    use std::io::Write;
    let images = read_files(&a.images)?;
    let mut client =
        pb::gateway_client::GatewayClient::connect(format!("http://{}", a.addr)).await?;
    let req = pb::GenerateRequest {
        model: a.model,
        // Parts, so the message is only text (a literal `<image>` in it included).
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            parts: std::iter::repeat_n(pb::chat_part::Part::Image(true), images.len())
                .chain([pb::chat_part::Part::Text(a.message)])
                .map(|p| pb::ChatPart { part: Some(p) })
                .collect(),
            ..Default::default()
        }],
        images,
        max_tokens: a.max_tokens,
        ..Default::default()
    };
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = std::io::stdout();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(pb::generate_event::Event::Token(t)) => {
                write!(out, "{}", t.text)?;
                out.flush()?;
            }
            Some(pb::generate_event::Event::Finished(f)) => {
                writeln!(out)?;
                eprintln!(
                    "[{} prompt + {} completion tokens, finish: {:?}]",
                    f.prompt_tokens,
                    f.completion_tokens,
                    pb::FinishReason::try_from(f.reason).unwrap_or_default()
                );
            }
            None => {}
        }
    }
    Ok(())
}

#[derive(Args)]
struct GenerateArgs {
    /// Model folder (HF layout: config.json, safetensors, tokenizer.json, processor config),
    /// or a LLaMA `.gguf` file (a text-only model from its quantized blocks).
    #[arg(long, env = "IRIS_MODEL")]
    model: PathBuf,
    /// Image file, one per `<image>` marker in the prompt, in order.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Drop tokens below this fraction of the best token's probability (0: off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Penalise tokens already in the prompt or output (1: off; HF semantics).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtract from tokens present in the output (OpenAI semantics).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    presence_penalty: f32,
    /// Subtract per occurrence in the output (OpenAI semantics).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    frequency_penalty: f32,
    /// Stop when the text contains this (repeatable); the text is cut before it.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Stop after producing this token id (repeatable).
    #[arg(long = "stop-token-id")]
    stop_token_ids: Vec<u32>,
    /// Also report the N most likely tokens at each step (`top_logprobs` in JSON).
    #[arg(long, default_value_t = 0)]
    top_logprobs: usize,
    /// Structured output: the text is JSON valid against the schema in this file.
    #[arg(long, group = "constraint")]
    json_schema: Option<PathBuf>,
    /// Structured output: the text is a JSON object.
    #[arg(long, group = "constraint")]
    json_object: bool,
    /// Structured output: the whole text matches this regular expression.
    #[arg(long, group = "constraint")]
    regex: Option<String>,
    /// Structured output: the text is a sentence of the Lark grammar in this file.
    #[arg(long, group = "constraint")]
    grammar: Option<PathBuf>,
    /// Where to run: cpu, cuda or cuda:N.
    #[arg(long, env = "IRIS_DEVICE", default_value = "cpu")]
    device: String,
    /// Split the language model over N rank processes on this machine (tensor
    /// parallelism over shared memory; rank 0 is this process).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Compute dtype (default: the checkpoint's).
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// Quantize the language model's linear layers as they load: q8_0 (or int8), q4_0
    /// or q4_1.
    #[arg(long, value_parser = iris_cli::roles::parse_quantize)]
    quantize: Option<iris_tensor::quant::QuantType>,
    /// Print one JSON object: prompt_token_ids, token_ids, text, logprobs.
    #[arg(long)]
    json: bool,
    /// Largest image file accepted, in bytes.
    #[arg(long, env = "IRIS_MAX_IMAGE_BYTES", default_value_t = ImageLimits::default().max_bytes)]
    max_image_bytes: usize,
    /// Largest image accepted, in pixels (checked from the header, before decoding).
    #[arg(long, env = "IRIS_MAX_IMAGE_PIXELS", default_value_t = ImageLimits::default().max_pixels)]
    max_image_pixels: u64,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match DType::parse(s) {
        Some(d @ (DType::F32 | DType::BF16)) => Ok(d),
        _ => Err(format!("`{s}`: expected f32 or bf16")),
    }
}

/// Reads each image file, naming the file in the error.
pub(crate) fn read_files(paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    paths
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
        .collect()
}

/// `iris generate`'s structured-output flags (at most one, clap checks).
fn constraint(a: &GenerateArgs) -> anyhow::Result<Option<iris_engine::Constraint>> {
    use iris_engine::Constraint;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
    };
    Ok(if let Some(p) = &a.json_schema {
        let schema = serde_json::from_str(&read(p)?)
            .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", p.display()))?;
        Some(Constraint::JsonSchema(schema))
    } else if a.json_object {
        Some(Constraint::JsonObject)
    } else if let Some(r) = &a.regex {
        Some(Constraint::Regex(r.clone()))
    } else if let Some(p) = &a.grammar {
        Some(Constraint::Lark(read(p)?))
    } else {
        None
    })
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let device = Device::parse(&a.device)?;
    let images = read_files(&a.images)?;
    let opts = PipelineOptions {
        dtype: a.dtype,
        limits: ImageLimits {
            max_bytes: a.max_image_bytes,
            max_pixels: a.max_image_pixels,
        },
        device,
        quantize: a.quantize,
    };
    let (pipe, _group) = if a.tp > 1 {
        let (p, g) = iris_cli::tp_group::LocalGroup::start(&a.model, &opts, Parts::ALL, a.tp)?;
        (p, Some(g))
    } else {
        let p = Pipeline::load(&a.model, &opts)
            .map_err(|e| anyhow::anyhow!("loading {}: {e}", a.model.display()))?;
        (p, None)
    };
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
    };
    let constraint = constraint(&a)?;
    let gen_opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop: StopRules {
            token_ids: a.stop_token_ids,
            strings: a.stop,
            ignore_eos: false,
        },
        top_logprobs: a.top_logprobs,
        constraint,
        logit_bias: Vec::new(),
    };
    // One request through the serving engine (the same scheduler, paged KV cache and
    // sampler that `iris serve` runs).
    // KV blocks for one sequence of the model's whole context, no more.
    let config = EngineConfig::default();
    let kv_blocks = pipe.context_length().div_ceil(config.block_size) + 1;
    let engine = Engine::start(
        std::sync::Arc::new(pipe),
        EngineConfig {
            kv_blocks,
            ..config
        },
    );
    let g = engine.generate(EngineRequest::new(a.prompt, images, gen_opts))?;
    if a.json {
        let mut out = serde_json::json!({
            "prompt_token_ids": g.prompt_token_ids,
            "token_ids": g.token_ids,
            "text": g.text,
            "logprobs": g.logprobs,
            "finish_reason": g.finish_reason,
        });
        if !g.top_logprobs.is_empty() {
            out["top_logprobs"] = g
                .top_logprobs
                .iter()
                .map(|step| {
                    step.iter()
                        .map(|(t, lp)| serde_json::json!({"token_id": t, "logprob": lp}))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
                .into();
        }
        println!("{out}");
    } else {
        println!("{}", g.text);
    }
    Ok(())
}

fn main() -> ExitCode {
    iris_tensor::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::TpRank(a) => iris_cli::tp_group::rank(a),
        Cmd::Embed(a) => retrieval::embed(a),
        Cmd::Match(a) => retrieval::match_pair(a),
        Cmd::Capfilt(a) => capfilt::run(a),
        Cmd::Bench(b) => bench::run(b),
        Cmd::Serve(a) => iris_cli::run_role(a.telemetry(), iris_cli::roles::serve(a)),
        Cmd::Gateway(a) => iris_cli::run_role(a.telemetry(), iris_cli::roles::gateway(a)),
        Cmd::Encoder(a) => iris_cli::run_role(a.telemetry(), iris_cli::roles::encoder(a)),
        Cmd::Connector(a) => iris_cli::run_role(a.telemetry(), iris_cli::roles::connector(a)),
        Cmd::Decoder(a) => iris_cli::run_role(a.telemetry(), iris_cli::roles::decoder(a)),
        Cmd::Cluster(c) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| Ok(rt.block_on(iris_cli::cluster_cli::run(c))?)),
        Cmd::Chat(a) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(chat(a))),
    };
    iris_cli::exit(result)
}
