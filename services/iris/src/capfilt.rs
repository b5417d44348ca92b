//! `iris capfilt`: caption and filter a web image-text dataset (BLIP's CapFilt).

use std::path::PathBuf;

use clap::Args;
use iris_engine::{CapFilt, CapFiltOptions, Pipeline, PipelineOptions, RetrievalPipeline};

#[derive(Args)]
pub struct CapFiltArgs {
    /// Captioning model folder (e.g. Blip2ForConditionalGeneration).
    #[arg(long)]
    captioner: PathBuf,
    /// Filter model folder (Blip2ForImageTextRetrieval).
    #[arg(long)]
    filter: PathBuf,
    /// JSON lines `{"image": path, "caption": text}`; paths relative to this file.
    #[arg(long)]
    input: PathBuf,
    /// JSON lines out, one per input line; an existing file is resumed.
    #[arg(long)]
    out: PathBuf,
    /// Synthetic captions per image.
    #[arg(long, default_value_t = 3)]
    samples: usize,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 20)]
    max_new_tokens: usize,
    /// Text the captioner continues.
    #[arg(long, default_value = "")]
    prompt: String,
    /// Keep captions whose ITM probability is at least this.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Images captioned and scored together (in parallel) between syncs and progress reports.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Stop after this many new lines.
    #[arg(long)]
    max_lines: Option<usize>,
}

pub fn run(a: CapFiltArgs) -> anyhow::Result<()> {
    if !(0.0..=1.0).contains(&a.threshold) {
        anyhow::bail!("--threshold must be in [0, 1]");
    }
    let opts = PipelineOptions::default();
    let captioner = Pipeline::load(&a.captioner, &opts)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", a.captioner.display()))?;
    let filter = RetrievalPipeline::load(&a.filter, &opts)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", a.filter.display()))?;
    let job = CapFilt {
        captioner: &captioner,
        filter: &filter,
        opts: CapFiltOptions {
            samples: a.samples,
            top_p: a.top_p,
            temperature: a.temperature,
            seed: a.seed,
            max_new_tokens: a.max_new_tokens,
            prompt: a.prompt,
            threshold: a.threshold,
            batch_size: a.batch_size,
            max_lines: a.max_lines,
        },
    };
    let s = job.run(&a.input, &a.out, |s, total| {
        eprintln!(
            "capfilt: {}/{total} lines done ({} this run, {} errors, {} captions kept)",
            s.skipped_done + s.written,
            s.written,
            s.errors,
            s.kept
        );
    })?;
    eprintln!("capfilt: wrote {} lines to {}", s.written, a.out.display());
    Ok(())
}
