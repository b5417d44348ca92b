//! CapFilt (Li et al., 2022, "BLIP", §3.3) as a batch job: for each web image-caption
//! pair, a captioner proposes synthetic captions (nucleus sampling, seeded), a filter
//! scores the web caption and each synthetic one with image-text matching, and captions
//! above a threshold are kept.
//!
//! The output is JSON lines, one per input line, in input order, each flushed as it is
//! written. A rerun with the same output file drops a torn last line, skips the lines
//! already recorded and appends the rest, so a crash or Ctrl-C loses nothing written and
//! the finished file is the same as an uninterrupted run's. A bad line or image becomes
//! an `error` record, not a failure of the job.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::pipeline::{GenerateOptions, Pipeline};
use crate::retrieval::RetrievalPipeline;
use crate::{Error, Result};
use iris_tensor::sample::SamplingParams;

#[derive(Debug, Clone)]
pub struct CapFiltOptions {
    /// Synthetic captions per image.
    pub samples: usize,
    pub top_p: f32,
    pub temperature: f32,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// Text the captioner continues (empty: caption from the image alone).
    pub prompt: String,
    /// ITM probability at or above which a caption is kept.
    pub threshold: f32,
    /// Images captioned and scored together (in parallel) between syncs to disk and
    /// progress reports.
    pub batch_size: usize,
    /// Stop after this many new lines (for tests and partial runs).
    pub max_lines: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub caption: String,
    /// `web` (the input caption) or `synthetic`.
    pub source: &'static str,
    pub itm: f32,
    pub keep: bool,
}

#[derive(Debug, Serialize)]
struct Record {
    line: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    candidates: Option<Vec<Candidate>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What a run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CapFiltSummary {
    pub skipped_done: usize,
    pub written: usize,
    pub errors: usize,
    pub kept: usize,
}

/// Line numbers already in `out`, after cutting a torn (unterminated) last line.
fn recover_output(out: &Path) -> Result<HashSet<usize>> {
    let mut done = HashSet::new();
    if !out.exists() {
        return Ok(done);
    }
    let bytes = std::fs::read(out).map_err(|e| Error::Input(format!("{}: {e}", out.display())))?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if complete < bytes.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(out)
            .map_err(|e| Error::Input(format!("{}: {e}", out.display())))?;
        f.set_len(complete as u64)
            .map_err(|e| Error::Input(format!("{}: {e}", out.display())))?;
    }
    for line in bytes[..complete]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
    {
        let v: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| Error::Input(format!("{}: not a CapFilt output ({e})", out.display())))?;
        let n = v["line"]
            .as_u64()
            .ok_or_else(|| Error::Input(format!("{}: a record without `line`", out.display())))?;
        done.insert(n as usize);
    }
    Ok(done)
}

/// A sub-seed per (line, sample): the same line samples the same captions on any run.
fn sample_seed(seed: u64, line: usize, k: usize) -> u64 {
    let mut z = seed ^ ((line as u64) << 20 | k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 31)
}

pub struct CapFilt<'a> {
    pub captioner: &'a Pipeline,
    pub filter: &'a RetrievalPipeline,
    pub opts: CapFiltOptions,
}

impl CapFilt<'_> {
    /// One image: encoded once by each model, then K sampled captions and K + 1 ITM
    /// scores against the same features.
    fn process(&self, line: usize, image_path: &Path, web: &str) -> Result<Vec<Candidate>> {
        let image = std::fs::read(image_path)
            .map_err(|e| Error::Input(format!("{}: {e}", image_path.display())))?;
        let prepared = self
            .captioner
            .processor
            .prepare(&self.opts.prompt, std::slice::from_ref(&image))?;
        let visual = self.captioner.encode_images(&prepared)?;
        let features = self.filter.image_features(&image)?;
        let mut captions = vec![(web.to_string(), "web")];
        for k in 0..self.opts.samples {
            let sampling = SamplingParams {
                temperature: self.opts.temperature,
                top_p: self.opts.top_p,
                seed: sample_seed(self.opts.seed, line, k),
                ..Default::default()
            };
            let opts = GenerateOptions::new(self.opts.max_new_tokens, sampling);
            let g = self.captioner.generate_from(&prepared, &visual, &opts)?;
            captions.push((g.text.trim().to_string(), "synthetic"));
        }
        captions
            .into_iter()
            .map(|(caption, source)| {
                let itm = if caption.is_empty() {
                    0.0
                } else {
                    self.filter.itm_probability(&features, &caption)?
                };
                Ok(Candidate {
                    keep: itm >= self.opts.threshold,
                    caption,
                    source,
                    itm,
                })
            })
            .collect()
    }

    /// Runs over `input` (JSON lines `{"image": path, "caption": text}`, image paths
    /// relative to the input file's folder), appending to `out`.
    pub fn run(
        &self,
        input: &Path,
        out: &Path,
        mut progress: impl FnMut(&CapFiltSummary, usize),
    ) -> Result<CapFiltSummary> {
        let done = recover_output(out)?;
        let base: PathBuf = input.parent().map(Path::to_path_buf).unwrap_or_default();
        let reader = BufReader::new(
            File::open(input).map_err(|e| Error::Input(format!("{}: {e}", input.display())))?,
        );
        let lines: Vec<String> = reader
            .lines()
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::Input(format!("{}: {e}", input.display())))?;
        let total = lines.iter().filter(|l| !l.trim().is_empty()).count();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .map_err(|e| Error::Input(format!("{}: {e}", out.display())))?;
        let mut s = CapFiltSummary::default();
        let mut pending: Vec<(usize, &str)> = Vec::new();
        for (n, text) in lines.iter().enumerate() {
            if text.trim().is_empty() {
                continue;
            }
            if done.contains(&n) {
                s.skipped_done += 1;
            } else {
                pending.push((n, text));
            }
        }
        if let Some(m) = self.opts.max_lines {
            pending.truncate(m);
        }
        // A batch of images is captioned and scored in parallel; its records are then
        // written in input order.
        for batch in pending.chunks(self.opts.batch_size.max(1)) {
            let records: Vec<Record> = batch
                .par_iter()
                .map(|&(n, text)| self.record(n, text, &base))
                .collect::<Result<_>>()?;
            for record in records {
                if record.error.is_some() {
                    s.errors += 1;
                }
                s.kept += record
                    .candidates
                    .iter()
                    .flatten()
                    .filter(|c| c.keep)
                    .count();
                let mut bytes =
                    serde_json::to_vec(&record).map_err(|e| Error::Input(e.to_string()))?;
                bytes.push(b'\n');
                // One write per record, flushed: a crash leaves at most one torn line.
                file.write_all(&bytes)
                    .and_then(|_| file.flush())
                    .map_err(|e| Error::Input(format!("{}: {e}", out.display())))?;
                s.written += 1;
            }
            file.sync_data()
                .map_err(|e| Error::Input(format!("{}: {e}", out.display())))?;
            progress(&s, total);
        }
        if pending.is_empty() {
            progress(&s, total);
        }
        Ok(s)
    }

    /// The record of input line `n`: its candidates, or the error that stopped it.
    fn record(&self, n: usize, text: &str, base: &Path) -> Result<Record> {
        let parsed = serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|v| match (v["image"].as_str(), v["caption"].as_str()) {
                (Some(i), Some(c)) => Ok((i.to_string(), c.to_string())),
                _ => Err("a line needs string fields `image` and `caption`".to_string()),
            });
        let mut record = Record {
            line: n,
            image: None,
            candidates: None,
            error: None,
        };
        match parsed {
            Err(e) => record.error = Some(e),
            Ok((image, caption)) => {
                match self.process(n, &base.join(&image), &caption) {
                    Ok(c) => record.candidates = Some(c),
                    Err(e) if e.is_bad_input() => record.error = Some(e.to_string()),
                    Err(e) => return Err(e),
                }
                record.image = Some(image);
            }
        }
        Ok(record)
    }
}
