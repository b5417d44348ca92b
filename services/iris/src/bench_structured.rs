//! `iris bench structured`: what constraining costs. Decode tokens/s through the
//! serving engine at each batch size, free and held to JSON schemas that keep the
//! output going to the length limit (so every run decodes the same number of steps):
//! a long string (the lexer inside one token class) and an array of integers (a
//! lexeme change every few tokens). The model's own tokenizer and vocabulary; greedy
//! (the cost of a draw is not what is measured). Also the share of masks that were
//! ready when their step sampled (computed beside the forward pass).

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use iris_engine::{
    Constraint, Engine, EngineConfig, EngineRequest, GenerateOptions, Pipeline, PipelineOptions,
    SamplingParams, TokenEvent,
};

#[derive(Args)]
pub struct StructuredArgs {
    /// A model folder or a `.gguf` file (text models: the prompt has no image).
    #[arg(long)]
    model: std::path::PathBuf,
    /// Batch sizes: this many requests decode together.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch: Vec<usize>,
    /// Tokens each request decodes.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    #[arg(long, default_value = "Write the answer as JSON:")]
    prompt: String,
    /// Runs of each (batch, constraint) pair, alternated; the best is reported.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Compute dtype: f32 or bf16 (default: the checkpoint's).
    #[arg(long, value_parser = crate::parse_dtype)]
    dtype: Option<iris_tensor::DType>,
}

/// Schemas whose output runs to the length limit.
fn schemas(tokens: usize) -> Vec<(&'static str, Option<Constraint>)> {
    let long = tokens * 16;
    vec![
        ("free", None),
        (
            "string",
            Some(Constraint::JsonSchema(serde_json::json!({
                "type": "object",
                "properties": {"text": {"type": "string", "minLength": long}},
                "required": ["text"],
            }))),
        ),
        (
            "integers",
            Some(Constraint::JsonSchema(serde_json::json!({
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 999},
                "minItems": long,
            }))),
        ),
    ]
}

pub fn run(a: StructuredArgs) -> anyhow::Result<()> {
    let pipeline = Arc::new(
        Pipeline::load(
            &a.model,
            &PipelineOptions {
                dtype: a.dtype,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", a.model.display()))?,
    );
    let max_batch = a.batch.iter().copied().max().unwrap_or(1);
    let engine = Engine::start(
        pipeline,
        EngineConfig {
            max_batch,
            queue: max_batch * 2,
            ..Default::default()
        },
    );
    println!(
        "structured outputs: {} , {} tokens a request, greedy, {} threads",
        a.model.display(),
        a.tokens,
        rayon::current_num_threads()
    );
    for &batch in &a.batch {
        let mut best = vec![0f64; schemas(a.tokens).len()];
        let mut overlap = vec![(0u64, 0u64); best.len()];
        for _ in 0..a.runs {
            for (i, (_, constraint)) in schemas(a.tokens).into_iter().enumerate() {
                let before = engine.stats();
                let constrained = constraint.is_some();
                let (rate, finished) = batch_rate(&engine, &a, batch, constraint)?;
                // The schemas keep their output going: none ends early.
                anyhow::ensure!(
                    !constrained || finished == batch,
                    "{finished} of {batch} constrained requests ran to {} tokens",
                    a.tokens
                );
                let after = engine.stats();
                best[i] = best[i].max(rate);
                overlap[i] = (
                    after.masks_overlapped - before.masks_overlapped,
                    after.masks_inline - before.masks_inline,
                );
            }
        }
        for (i, (name, _)) in schemas(a.tokens).into_iter().enumerate() {
            let (o, n) = overlap[i];
            let masks = if o + n > 0 {
                format!(
                    "; masks ready when sampled {o} of {} ({:.0}%)",
                    o + n,
                    100.0 * o as f64 / (o + n) as f64
                )
            } else {
                String::new()
            };
            println!(
                " batch {batch:>3} {name:>8}: {:8.2} tok/s aggregate ({:.3}x free){masks}",
                best[i],
                best[i] / best[0]
            );
        }
    }
    Ok(())
}

/// Decode tokens/s of `batch` requests together (from the first token of all of them
/// to the last, so prefill is not counted), and how many ran to the length limit.
fn batch_rate(
    engine: &Engine,
    a: &StructuredArgs,
    batch: usize,
    constraint: Option<Constraint>,
) -> anyhow::Result<(f64, usize)> {
    let mut options = GenerateOptions::new(a.tokens, SamplingParams::default());
    options.stop.ignore_eos = true;
    options.constraint = constraint;
    let streams: Vec<_> = (0..batch)
        .map(|i| {
            engine.submit(EngineRequest::new(
                format!("{} {i}", a.prompt),
                Vec::new(),
                options.clone(),
            ))
        })
        .collect::<Result<_, _>>()?;
    // Each stream drained on its own thread, so each event is timed when it comes.
    let timed: Vec<anyhow::Result<Vec<Instant>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|s| {
                scope.spawn(move || {
                    let mut times = Vec::new();
                    for ev in s {
                        match ev {
                            TokenEvent::Token { .. } => times.push(Instant::now()),
                            TokenEvent::Finished { .. } => return Ok(times),
                            TokenEvent::Error(e) => anyhow::bail!("a request failed: {e}"),
                            TokenEvent::Admitted { .. } => {}
                        }
                    }
                    anyhow::bail!("a stream ended without finishing")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| anyhow::bail!("a reader panicked"))
            })
            .collect()
    });
    let timed = timed.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    // From the moment every request has its first token (each decodes from then on,
    // until it ends: at the length limit, or at EOS for a free one) to the last token.
    let start = timed
        .iter()
        .filter_map(|t| t.first())
        .max()
        .expect("a token");
    let end = timed
        .iter()
        .filter_map(|t| t.last())
        .max()
        .expect("a token");
    let steps = timed.iter().flatten().filter(|&t| t > start).count();
    let finished = timed.iter().filter(|t| t.len() == a.tokens).count();
    Ok((
        steps as f64 / end.duration_since(*start).as_secs_f64(),
        finished,
    ))
}
