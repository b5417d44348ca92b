//! `iris bench serve`: a load generator for any OpenAI-compatible chat endpoint (Iris,
//! vLLM, SGLang, llama.cpp's server). Conversations of one or more turns, each about an
//! image drawn from a pool with a set reuse ratio, sent at a fixed concurrency or as
//! Poisson arrivals, streamed (`stream: true`, usage included); it reports request and
//! token throughput, time to first token (TTFT), time per output token (TPOT) and
//! inter-token latency (ITL) at p50 / p90 / p99, and goodput under latency targets.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Args;
use serde_json::{json, Value};

#[derive(Args, Debug, Clone)]
pub struct ServeBenchArgs {
    /// The endpoint's base URL (`/v1/chat/completions` is appended).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    #[arg(long)]
    pub model: String,
    /// Sent as `Authorization: Bearer …`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests in all (conversations × turns).
    #[arg(long, default_value_t = 64)]
    pub requests: usize,
    /// Conversations in flight at once (ignored with `--rate`).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Conversations started per second, Poisson arrivals, instead of a fixed
    /// concurrency.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Share of conversations whose image is one already sent (0 to 1).
    #[arg(long, default_value_t = 0.8)]
    pub image_reuse: f64,
    /// Images per conversation (0: text only).
    #[arg(long, default_value_t = 1)]
    pub images: usize,
    /// Where a turn's images go in its message: `first` (before the question, as
    /// LLaVA's prompts have them: a reused image's KV blocks are then a shared prefix)
    /// or `last` (after it, as many clients send them).
    #[arg(long, default_value = "first", value_parser = ["first", "last"])]
    pub image_position: String,
    /// Size of the generated images, WIDTHxHEIGHT.
    #[arg(long, default_value = "336x336")]
    pub image_size: String,
    /// Turns per conversation: each turn sends the history (answers included) and a
    /// new question.
    #[arg(long, default_value_t = 1)]
    pub turns: usize,
    /// Words in each question (about a token each).
    #[arg(long, default_value_t = 16)]
    pub prompt_words: usize,
    /// Tokens each answer may have (`max_tokens`).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Seed of the workload (images, questions, arrivals).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Goodput: requests whose TTFT is at most this many milliseconds...
    #[arg(long)]
    pub slo_ttft_ms: Option<f64>,
    /// ...and whose TPOT is at most this many milliseconds.
    #[arg(long)]
    pub slo_tpot_ms: Option<f64>,
    /// Seconds a request may take.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What one conversation sends: its images (indexes into the pool) and questions.
struct Conversation {
    images: Vec<usize>,
    questions: Vec<String>,
    /// Seconds after the start when it begins (`--rate`).
    at: f64,
}

/// A generated image: smooth colour ramps whose slopes depend on `i` (distinct bytes,
/// distinct visual tokens), as a PNG data URL.
fn image_url(i: usize, seed: u64, w: u32, h: u32) -> anyhow::Result<String> {
    let mut r = Rng(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let coef: Vec<u32> = (0..9).map(|_| (r.next() % 7 + 1) as u32).collect();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let c =
            |k: usize| ((x * coef[3 * k] + y * coef[3 * k + 1] + coef[3 * k + 2] * 37) % 256) as u8;
        image::Rgb([c(0), c(1), c(2)])
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

const WORDS: &[&str] = &[
    "what",
    "is",
    "in",
    "the",
    "picture",
    "describe",
    "colour",
    "shape",
    "left",
    "right",
    "top",
    "bottom",
    "count",
    "objects",
    "background",
    "light",
    "detail",
    "pattern",
];

fn workload(a: &ServeBenchArgs) -> (Vec<Conversation>, usize) {
    let mut r = Rng(a.seed);
    let turns = a.turns.max(1);
    let n = a.requests.div_ceil(turns);
    let mut pool = 0usize;
    let mut at = 0.0;
    let convs = (0..n)
        .map(|_| {
            let images = (0..a.images)
                .map(|_| {
                    if pool > 0 && r.unit() < a.image_reuse {
                        (r.next() % pool as u64) as usize
                    } else {
                        pool += 1;
                        pool - 1
                    }
                })
                .collect();
            let questions = (0..turns)
                .map(|_| {
                    let q: Vec<&str> = (0..a.prompt_words.max(1))
                        .map(|_| WORDS[(r.next() % WORDS.len() as u64) as usize])
                        .collect();
                    q.join(" ") + "?"
                })
                .collect();
            if let Some(rate) = a.rate {
                at += -(1.0 - r.unit()).ln() / rate.max(1e-9);
            }
            Conversation {
                images,
                questions,
                at,
            }
        })
        .collect();
    (convs, pool)
}

/// One request's measurements.
#[derive(Debug, Clone, Default)]
struct Record {
    ok: bool,
    error: Option<String>,
    ttft: f64,
    e2e: f64,
    /// Gaps between content chunks after the first, seconds.
    itl: Vec<f64>,
    prompt_tokens: u64,
    output_tokens: u64,
    cached_tokens: u64,
}

impl Record {
    fn tpot(&self) -> Option<f64> {
        (self.output_tokens > 1).then(|| (self.e2e - self.ttft) / (self.output_tokens - 1) as f64)
    }
}

/// Sends one streamed chat request; returns its record and the answer's text.
async fn send(
    client: &reqwest::Client,
    a: &ServeBenchArgs,
    messages: &[Value],
) -> (Record, String) {
    let t0 = Instant::now();
    let body = json!({
        "model": a.model,
        "messages": messages,
        "max_tokens": a.max_tokens,
        "temperature": a.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let url = format!("{}/v1/chat/completions", a.url.trim_end_matches('/'));
    let mut req = client.post(url).json(&body);
    if let Some(k) = &a.api_key {
        req = req.bearer_auth(k);
    }
    let mut rec = Record::default();
    let mut text = String::new();
    let fail = |mut rec: Record, e: String| {
        rec.error = Some(e);
        rec
    };
    let mut resp = match req.send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            return (fail(rec, format!("{status}: {body}")), text);
        }
        Err(e) => return (fail(rec, e.to_string()), text),
    };
    let (mut buf, mut last) = (Vec::<u8>::new(), None::<Instant>);
    loop {
        let chunk = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => return (fail(rec, e.to_string()), text),
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&event);
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                if let Some(e) = v.get("error") {
                    return (fail(rec, e.to_string()), text);
                }
                if let Some(piece) = v["choices"][0]["delta"]["content"].as_str() {
                    if !piece.is_empty() {
                        let now = Instant::now();
                        match last {
                            None => rec.ttft = (now - t0).as_secs_f64(),
                            Some(l) => rec.itl.push((now - l).as_secs_f64()),
                        }
                        last = Some(now);
                        rec.output_tokens += 1;
                        text.push_str(piece);
                    }
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    rec.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                    rec.output_tokens =
                        u["completion_tokens"].as_u64().unwrap_or(rec.output_tokens);
                    rec.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap_or(0);
                }
            }
        }
    }
    rec.e2e = t0.elapsed().as_secs_f64();
    // Ended without an error. No visible text at all: its first token came at the end.
    rec.ok = true;
    if last.is_none() {
        rec.ttft = rec.e2e;
    }
    (rec, text)
}

/// Runs a conversation's turns one after another.
async fn converse(
    client: &reqwest::Client,
    a: &ServeBenchArgs,
    c: &Conversation,
    urls: &[String],
    out: &Mutex<Vec<Record>>,
) {
    let mut messages: Vec<Value> = Vec::new();
    for (t, q) in c.questions.iter().enumerate() {
        let mut content = Vec::new();
        if t == 0 {
            for &i in &c.images {
                content.push(json!({"type": "image_url", "image_url": {"url": urls[i]}}));
            }
        }
        let question = json!({"type": "text", "text": q});
        if a.image_position == "first" {
            content.push(question);
        } else {
            content.insert(0, question);
        }
        messages.push(json!({"role": "user", "content": content}));
        let (rec, answer) = send(client, a, &messages).await;
        let ok = rec.ok;
        out.lock().expect("records lock").push(rec);
        if !ok {
            return;
        }
        messages.push(json!({"role": "assistant", "content": answer}));
    }
}

fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)] * 1e3;
    json!({
        "mean_ms": v.iter().sum::<f64>() / v.len() as f64 * 1e3,
        "p50_ms": at(0.5),
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
    })
}

pub fn run(a: ServeBenchArgs) -> anyhow::Result<()> {
    let (w, h) = a
        .image_size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--image-size {}: expected WIDTHxHEIGHT", a.image_size))?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.image_reuse),
        "--image-reuse is a share, 0 to 1"
    );
    let (convs, pool) = workload(&a);
    let urls = (0..pool)
        .map(|i| image_url(i, a.seed, w, h))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let records = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    rt.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(a.timeout_s))
            .pool_max_idle_per_host(a.concurrency.max(1) * 2)
            .build()?;
        let (a, urls, convs) = (Arc::new(a.clone()), Arc::new(urls), Arc::new(convs));
        let mut tasks = Vec::new();
        if a.rate.is_some() {
            for i in 0..convs.len() {
                let (client, a, urls, convs, out) = (
                    client.clone(),
                    a.clone(),
                    urls.clone(),
                    convs.clone(),
                    records.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let at = started + Duration::from_secs_f64(convs[i].at);
                    tokio::time::sleep_until(at.into()).await;
                    converse(&client, &a, &convs[i], &urls, &out).await;
                }));
            }
        } else {
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            for _ in 0..a.concurrency.max(1) {
                let (client, a, urls, convs, out, next) = (
                    client.clone(),
                    a.clone(),
                    urls.clone(),
                    convs.clone(),
                    records.clone(),
                    next.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(c) = convs.get(i) else { return };
                        converse(&client, &a, c, &urls, &out).await;
                    }
                }));
            }
        }
        for t in tasks {
            t.await?;
        }
        anyhow::Ok(())
    })?;
    let secs = started.elapsed().as_secs_f64();
    let recs = records.lock().expect("records lock").clone();
    let ok: Vec<&Record> = recs.iter().filter(|r| r.ok).collect();
    let good = ok
        .iter()
        .filter(|r| {
            a.slo_ttft_ms.is_none_or(|s| r.ttft * 1e3 <= s)
                && a.slo_tpot_ms
                    .is_none_or(|s| r.tpot().is_none_or(|t| t * 1e3 <= s))
        })
        .count();
    let out_tokens: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let in_tokens: u64 = ok.iter().map(|r| r.prompt_tokens).sum();
    let errors: Vec<&String> = recs.iter().filter_map(|r| r.error.as_ref()).collect();
    let summary = json!({
        "model": a.model,
        "url": a.url,
        "requests": recs.len(),
        "completed": ok.len(),
        "failed": recs.len() - ok.len(),
        "first_error": errors.first(),
        "conversations": convs_len(&a),
        "turns": a.turns.max(1),
        "images_sent": pool_uses(&a),
        "distinct_images": pool,
        "concurrency": if a.rate.is_some() { json!(null) } else { json!(a.concurrency) },
        "rate": a.rate,
        "duration_s": secs,
        "request_throughput": ok.len() as f64 / secs,
        "output_token_throughput": out_tokens as f64 / secs,
        "total_token_throughput": (out_tokens + in_tokens) as f64 / secs,
        "prompt_tokens": in_tokens,
        "cached_prompt_tokens": ok.iter().map(|r| r.cached_tokens).sum::<u64>(),
        "output_tokens": out_tokens,
        "ttft": percentiles(ok.iter().map(|r| r.ttft).collect()),
        "tpot": percentiles(ok.iter().filter_map(|r| r.tpot()).collect()),
        "itl": percentiles(ok.iter().flat_map(|r| r.itl.iter().copied()).collect()),
        "e2e": percentiles(ok.iter().map(|r| r.e2e).collect()),
        "goodput": good as f64 / secs,
        "slo": {"ttft_ms": a.slo_ttft_ms, "tpot_ms": a.slo_tpot_ms},
    });
    let mut stdout = std::io::stdout().lock();
    if a.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&summary)?)?;
        return Ok(());
    }
    let ms = |k: &str, q: &str| {
        summary[k][q]
            .as_f64()
            .map_or("-".into(), |v| format!("{v:.1}"))
    };
    writeln!(
        stdout,
        "{} requests ({} failed) in {secs:.2} s: {:.2} req/s, {:.1} output tok/s, {:.1} total tok/s, goodput {:.2} req/s",
        recs.len(),
        recs.len() - ok.len(),
        ok.len() as f64 / secs,
        out_tokens as f64 / secs,
        (out_tokens + in_tokens) as f64 / secs,
        good as f64 / secs,
    )?;
    writeln!(
        stdout,
        "{:<6} {:>9} {:>9} {:>9} {:>9}",
        "ms", "mean", "p50", "p90", "p99"
    )?;
    for k in ["ttft", "tpot", "itl", "e2e"] {
        writeln!(
            stdout,
            "{k:<6} {:>9} {:>9} {:>9} {:>9}",
            ms(k, "mean_ms"),
            ms(k, "p50_ms"),
            ms(k, "p90_ms"),
            ms(k, "p99_ms")
        )?;
    }
    if let Some(e) = errors.first() {
        writeln!(stdout, "first error: {e}")?;
    }
    Ok(())
}

fn convs_len(a: &ServeBenchArgs) -> usize {
    a.requests.div_ceil(a.turns.max(1))
}

fn pool_uses(a: &ServeBenchArgs) -> usize {
    convs_len(a) * a.images
}
