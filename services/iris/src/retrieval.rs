//! `iris embed` and `iris match`: a retrieval checkpoint's ITC embeddings and ITM
//! scores, as JSON.

use std::path::PathBuf;

use clap::Args;
use iris_engine::{PipelineOptions, RetrievalPipeline};

use crate::read_files;

#[derive(Args)]
pub struct EmbedArgs {
    /// Retrieval model folder (Blip2ForImageTextRetrieval).
    #[arg(long, env = "IRIS_MODEL")]
    model: PathBuf,
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    #[arg(long = "text")]
    texts: Vec<String>,
    /// Print JSON (the only output format; accepted for symmetry with `generate`).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct MatchArgs {
    #[arg(long, env = "IRIS_MODEL")]
    model: PathBuf,
    #[arg(long)]
    image: PathBuf,
    #[arg(long)]
    text: String,
    #[arg(long)]
    json: bool,
}

fn load(model: &std::path::Path) -> anyhow::Result<RetrievalPipeline> {
    RetrievalPipeline::load(model, &PipelineOptions::default())
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", model.display()))
}

fn rows(t: &iris_tensor::Tensor) -> Vec<Vec<f32>> {
    t.to_f32_vec()
        .chunks(t.last_dim())
        .map(<[f32]>::to_vec)
        .collect()
}

pub fn embed(a: EmbedArgs) -> anyhow::Result<()> {
    if a.images.is_empty() && a.texts.is_empty() {
        anyhow::bail!("give at least one --image or --text");
    }
    let p = load(&a.model)?;
    let mut out = Vec::new();
    for (path, bytes) in a.images.iter().zip(read_files(&a.images)?) {
        let e = p
            .embed_image(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // One normalised embedding per query token; ITC takes the best of them.
        out.push(serde_json::json!({"image": path, "embedding": rows(&e)}));
    }
    for text in &a.texts {
        let e = p.embed_text(text)?;
        out.push(serde_json::json!({"text": text, "embedding": e.to_f32_vec()}));
    }
    println!("{}", serde_json::json!({ "embeddings": out }));
    Ok(())
}

pub fn match_pair(a: MatchArgs) -> anyhow::Result<()> {
    let p = load(&a.model)?;
    let image = read_files(std::slice::from_ref(&a.image))?.remove(0);
    let s = p.match_pair(&image, &a.text)?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}
