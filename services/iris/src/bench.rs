//! `iris bench decode`: batch-1 decode tokens/s of a LLaMA-shaped model with random
//! weights (TinyLlama-1.1B dimensions by default), against the memory-bandwidth
//! roofline: measured bandwidth / bytes of weights read per token. Decode at batch 1
//! reads every weight once per token, so no kernel can beat that ratio.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Subcommand};
use iris_models::config::LlamaConfig;
use iris_models::llama::Llama;
use iris_models::vlm::CausalLm;
use iris_models::weights::Weights;
use iris_tensor::quant::QuantType;
use iris_tensor::{DType, Device, Tensor};
use rayon::prelude::*;

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Batch-1 decode tokens/s vs the memory-bandwidth roofline.
    Decode(DecodeArgs),
    /// Decode tokens/s through the engine, free and held to JSON schemas: what
    /// structured outputs cost.
    Structured(crate::bench_structured::StructuredArgs),
    /// Time to encode one image with a CLIP ViT (LLaVA-1.5's ViT-L/14-336 by default),
    /// random weights.
    Vit(VitArgs),
    /// Decode step time of a cross-attention model (IDEFICS, BLIP) with 1 and N images:
    /// the images' K/V are computed once, so a step should cost the same.
    DecodeImages(DecodeImagesArgs),
    /// The decode benchmark's bandwidth probe alone (its passes' median and best, GB/s):
    /// tools/bench_vs_llamacpp.py reads it around each llama.cpp run, so a peer's run
    /// is set against the bandwidth of its own minute.
    Bandwidth(BandwidthArgs),
    /// All-reduce latency of the CPU transports between rank processes.
    Allreduce(AllreduceArgs),
    /// Load against an OpenAI-compatible chat endpoint: throughput, TTFT / TPOT /
    /// ITL percentiles and goodput, images from a pool with a reuse ratio, multi-turn.
    Serve(crate::bench_serve::ServeBenchArgs),
    #[command(hide = true)]
    AllreduceRank(AllreduceRankArgs),
}

#[derive(Args)]
pub struct VitArgs {
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 336)]
    image_size: usize,
    #[arg(long, default_value_t = 14)]
    patch_size: usize,
    #[arg(long, default_value_t = 24)]
    layers: usize,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    #[arg(long, default_value_t = 4096)]
    intermediate: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Images per stacked pass (comma-separated: one measurement each).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize])]
    batch: Vec<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn vit(a: VitArgs) -> anyhow::Result<()> {
    use iris_models::config::VisionConfig;
    use iris_models::vit::VisionTransformer;
    let dtype =
        DType::parse(&a.dtype).ok_or_else(|| anyhow::anyhow!("unknown dtype {}", a.dtype))?;
    let cfg = VisionConfig::from_value(Some(&serde_json::json!({
        "hidden_size": a.hidden, "intermediate_size": a.intermediate, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "image_size": a.image_size, "patch_size": a.patch_size,
    })))?;
    let (d, p, i) = (a.hidden, a.patch_size, a.intermediate);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.patch_embedding.weight".into(), vec![d, 3, p, p]),
        ("embeddings.class_embedding".into(), vec![d]),
        (
            "embeddings.position_embedding.weight".into(),
            vec![cfg.num_patches() + 1, d],
        ),
        ("pre_layrnorm.weight".into(), vec![d]),
        ("pre_layrnorm.bias".into(), vec![d]),
    ];
    for l in 0..a.layers {
        let pre = format!("encoder.layers.{l}");
        for (n, s) in [
            ("layer_norm1.weight", vec![d]),
            ("layer_norm1.bias", vec![d]),
            ("layer_norm2.weight", vec![d]),
            ("layer_norm2.bias", vec![d]),
            ("self_attn.q_proj.weight", vec![d, d]),
            ("self_attn.q_proj.bias", vec![d]),
            ("self_attn.k_proj.weight", vec![d, d]),
            ("self_attn.k_proj.bias", vec![d]),
            ("self_attn.v_proj.weight", vec![d, d]),
            ("self_attn.v_proj.bias", vec![d]),
            ("self_attn.out_proj.weight", vec![d, d]),
            ("self_attn.out_proj.bias", vec![d]),
            ("mlp.fc1.weight", vec![i, d]),
            ("mlp.fc1.bias", vec![i]),
            ("mlp.fc2.weight", vec![d, i]),
            ("mlp.fc2.bias", vec![d]),
        ] {
            shapes.push((format!("{pre}.{n}"), s));
        }
    }
    let mut params = 0usize;
    let mut map = HashMap::new();
    for (k, (name, shape)) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        params += n;
        let mut data = random(n, k as u64 + 7);
        if name.contains("norm") && name.ends_with("weight") {
            data.iter_mut().for_each(|x| *x += 1.0);
        }
        map.insert(name, Tensor::from_f32(data, &shape)?.to_dtype(dtype)?);
    }
    let device = Device::parse(&a.device)?;
    let w = Arc::new(Weights::from_tensors(map, dtype).on(device));
    let model = VisionTransformer::load(&w.pp(""), &cfg, a.layers)?;
    let s = a.image_size;
    let tokens = cfg.num_patches() + 1;
    for &n in &a.batch {
        let n = n.max(1);
        let pixels = (0..n)
            .map(|i| Tensor::from_f32(random(3 * s * s, 3 + i as u64), &[3, s, s]))
            .collect::<Result<Vec<_>, _>>()?;
        let batch: Vec<&Tensor> = pixels.iter().collect();
        let mut times = Vec::new();
        for _ in 0..a.runs.max(1) {
            let t = Instant::now();
            model.hidden_states_batch(&batch, &[a.layers])?;
            device.synchronize()?;
            times.push(t.elapsed().as_secs_f64() / n as f64);
        }
        let median = median(times);
        println!(
            "ViT {}x{} patch {} ({} layers, hidden {d}, {:.0}M params) {dtype} batch {n} on {device}: {:.4} s per image, {:.2} images/s ({:.0} GFLOP/s on the weights)",
            s,
            s,
            p,
            a.layers,
            params as f64 / 1e6,
            median,
            1.0 / median,
            2.0 * params as f64 * tokens as f64 / median / 1e9
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct DecodeImagesArgs {
    /// Model folder (e.g. IdeficsForVisionText2Text).
    #[arg(long)]
    model: std::path::PathBuf,
    /// An image file used for every image of the prompt.
    #[arg(long)]
    image: std::path::PathBuf,
    /// Image counts to compare.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    images: Vec<usize>,
    /// Decode steps timed per count.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
}

#[derive(Args, Clone)]
pub struct DecodeArgs {
    /// A LLaMA `.gguf` file to measure instead of random weights of the shape below
    /// (its own shape and formats; `--dtypes` is ignored).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Weight dtypes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [String::from("f32"), String::from("bf16")])]
    dtypes: Vec<String>,
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    #[arg(long, default_value_t = 22)]
    layers: usize,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    #[arg(long, default_value_t = 5632)]
    intermediate: usize,
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Prompt tokens before decoding starts.
    #[arg(long, default_value_t = 16)]
    prompt: usize,
    /// Decode steps timed.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Batch sizes to decode at (aggregate tokens/s).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize])]
    batch: Vec<usize>,
    /// Also time a prefill of this many tokens (LLaVA-1.5: 576 visual + 32 text = 608).
    #[arg(long, default_value_t = 0)]
    prefill: usize,
    /// Print one JSON object per dtype and batch.
    #[arg(long)]
    json: bool,
    /// Where K/V live: `own` (each sequence's f32 buffers), `f32` or `bf16` (the paged
    /// arena the engine serves from, reserved up front). Comma-separated: each measured.
    #[arg(long, value_delimiter = ',', default_values_t = [String::from("own")])]
    kv: Vec<String>,
    /// Positions already in each sequence's cache when decoding starts, filled with
    /// random K/V (no prefill, so long contexts cost nothing to set up); 0: prefill
    /// `--prompt` tokens instead.
    #[arg(long, default_value_t = 0)]
    context: usize,
    /// cpu, cuda or cuda:N. On a GPU the bandwidth pass is a device-to-device copy of
    /// 1 GiB (read and write counted) and every step ends synchronized.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Tensor-parallel ranks: N rank processes (one rayon thread each), the model split
    /// over them; rank 0 prints, with the time its collectives took per step.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// How the ranks talk: shm (one host) or tcp (loopback here); nccl (a CUDA build,
    /// `--tp 1` on one GPU: the NCCL path with one rank).
    #[arg(long, default_value = "shm")]
    tp_transport: String,
    /// Set in the rank processes `--tp` starts.
    #[arg(long, hide = true)]
    tp_rank: Option<usize>,
    #[arg(long, hide = true)]
    tp_group: Option<String>,
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Decode(a) => decode(a),
        BenchCmd::DecodeImages(a) => decode_images(a),
        BenchCmd::Vit(a) => vit(a),
        BenchCmd::Bandwidth(a) => bandwidth(a),
        BenchCmd::Allreduce(a) => allreduce(a),
        BenchCmd::AllreduceRank(a) => allreduce_rank(a),
        BenchCmd::Serve(a) => crate::bench_serve::run(a),
        BenchCmd::Structured(a) => crate::bench_structured::run(a),
    }
}

fn decode_images(a: DecodeImagesArgs) -> anyhow::Result<()> {
    let p = iris_engine::Pipeline::load(&a.model, &Default::default())?;
    let bytes =
        std::fs::read(&a.image).map_err(|e| anyhow::anyhow!("{}: {e}", a.image.display()))?;
    let mut base = None;
    for &n in &a.images {
        let prompt = (0..n)
            .map(|i| format!("<image> picture {i}."))
            .collect::<Vec<_>>()
            .join(" ")
            + " Describe:";
        let images = vec![bytes.clone(); n];
        let prepared = p.processor.prepare(&prompt, &images)?;
        let visual = p.encode_images(&prepared)?;
        let lm = p.model.language_model()?;
        let mut cache = lm.new_cache();
        let t0 = Instant::now();
        p.model
            .condition(&mut cache, &prepared.input_ids, &visual)?;
        let condition_s = t0.elapsed().as_secs_f64();
        let mut hidden = lm.forward(
            &p.model.input_embeds(&prepared.input_ids, &visual)?,
            &mut cache,
        )?;
        let mut times = Vec::with_capacity(a.tokens);
        for _ in 0..a.tokens {
            let t = Instant::now();
            let last = hidden.narrow_rows(hidden.rows() - 1, 1)?;
            let next = lm.logits(&last)?.argmax_rows()?[0];
            hidden = lm.forward(&lm.embed(&[next])?, &mut cache)?;
            times.push(t.elapsed().as_secs_f64());
        }
        let median = median(times);
        let ratio = *base.get_or_insert(median);
        println!(
            "{n:>3} image(s): prompt {} tokens, image K/V once {:.3} ms, decode step median {:.3} ms ({:.2}x the first count)",
            prepared.input_ids.len(),
            condition_s * 1e3,
            median * 1e3,
            median / ratio
        );
    }
    Ok(())
}

/// A fast deterministic generator: uniform values in [-0.05, 0.05).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; n];
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = seed ^ (c as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for x in chunk {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *x = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
            }
        });
    out
}

fn random_weights(
    cfg: &LlamaConfig,
    dtype: DType,
) -> anyhow::Result<(HashMap<String, Tensor>, usize)> {
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, d]),
        ("model.norm.weight".into(), vec![d]),
        ("lm_head.weight".into(), vec![cfg.vocab_size, d]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![d]),
            ("post_attention_layernorm.weight", vec![d]),
            (
                "self_attn.q_proj.weight",
                vec![cfg.num_attention_heads * hd, d],
            ),
            (
                "self_attn.k_proj.weight",
                vec![cfg.num_key_value_heads * hd, d],
            ),
            (
                "self_attn.v_proj.weight",
                vec![cfg.num_key_value_heads * hd, d],
            ),
            (
                "self_attn.o_proj.weight",
                vec![d, cfg.num_attention_heads * hd],
            ),
            ("mlp.gate_proj.weight", vec![i, d]),
            ("mlp.up_proj.weight", vec![i, d]),
            ("mlp.down_proj.weight", vec![d, i]),
        ] {
            shapes.push((format!("{p}.{n}"), s));
        }
    }
    let mut read_per_token = 0;
    let mut map = HashMap::new();
    for (k, (name, shape)) in shapes.into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut data = random(n, k as u64 + 1);
        if name.contains("norm") {
            data.iter_mut().for_each(|x| *x += 1.0);
        }
        // Decode reads every weight but the embedding table (one row of it).
        read_per_token += if name.contains("embed_tokens") {
            shape[1]
        } else {
            n
        } * dtype.size_in_bytes();
        map.insert(name, Tensor::from_f32(data, &shape)?.to_dtype(dtype)?);
    }
    Ok((map, read_per_token))
}

/// The `[n, k]` of every linear layer (each layer's q, k, v, o, gate, up, down) and of
/// the head.
fn linear_shapes(cfg: &LlamaConfig) -> Vec<(usize, usize)> {
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let layer = [(q, d), (kv, d), (kv, d), (d, q), (i, d), (i, d), (d, i)];
    let mut shapes: Vec<(usize, usize)> = (0..cfg.num_hidden_layers).flat_map(|_| layer).collect();
    shapes.push((cfg.vocab_size, d));
    shapes
}

/// Bytes a decode step reads with the linear layers (and the head) in `ty`'s blocks and
/// the norms in f32 (the embedding: one row).
fn quantized_read(cfg: &LlamaConfig, ty: QuantType) -> usize {
    let d = cfg.hidden_size;
    let linear: usize = linear_shapes(cfg)
        .iter()
        .map(|&(n, k)| ty.bytes(n, k))
        .sum();
    // Two norms a layer, the final norm, the embedding row.
    linear + cfg.num_hidden_layers * 2 * d * 4 + d * 4 + d * 4
}

/// Each sequence's cache for `kv` (`own`, or the paged arena in `f32` / `bf16`), with
/// blocks for the context or prompt and every timed step.
fn decode_caches(
    model: &Llama,
    kv: &str,
    batch: usize,
    a: &DecodeArgs,
    device: Device,
) -> anyhow::Result<Vec<iris_models::layers::KvCache>> {
    use iris_tensor::kv::{KvArena, KvDtype};
    let dtype = match kv {
        "own" => return Ok((0..batch).map(|_| model.new_cache()).collect()),
        "f32" => KvDtype::F32,
        "bf16" => KvDtype::Bf16,
        other => anyhow::bail!("--kv {other}: expected own, f32 or bf16"),
    };
    let bs = 16;
    let per = (a.context.max(a.prompt) + a.tokens + 1).div_ceil(bs);
    let n_layers = model.new_cache().n_layers();
    let arena = Arc::new(KvArena::reserved_on(
        n_layers,
        per * batch,
        bs,
        model.kv_width(),
        dtype,
        device,
    )?);
    Ok((0..batch)
        .map(|s| {
            let table = (s * per..(s + 1) * per).map(|b| b as u32).collect();
            model
                .new_cache()
                .paged(arena.clone(), table, Vec::new(), model.kv_width())
        })
        .collect())
}

/// Memory bandwidth, measured next to every timed step.
enum Bandwidth {
    /// One read pass of both cores summing a host buffer.
    Host(Vec<f32>),
    /// A device-to-device copy (read and written: twice its bytes move).
    Device(Tensor),
}

impl Bandwidth {
    fn new(device: Device) -> anyhow::Result<Bandwidth> {
        Ok(match device {
            Device::Cpu => Bandwidth::Host(random(256 << 20, 99)),
            d => Bandwidth::Device(Tensor::zeros_on(&[256, 1 << 20], d)?),
        })
    }

    /// Bytes per second of one pass.
    fn pass(&self) -> anyhow::Result<f64> {
        Ok(match self {
            Bandwidth::Host(buf) => {
                let t = Instant::now();
                let s: f32 = buf
                    .par_chunks(1 << 20)
                    .map(iris_tensor::kernels::sum_f32)
                    .sum();
                std::hint::black_box(s);
                (buf.len() * 4) as f64 / t.elapsed().as_secs_f64()
            }
            Bandwidth::Device(x) => {
                x.device().synchronize()?;
                let t = Instant::now();
                let copy = x.narrow_rows(0, x.rows())?;
                x.device().synchronize()?;
                let secs = t.elapsed().as_secs_f64();
                drop(copy);
                (2 * x.elem_count() * 4) as f64 / secs
            }
        })
    }
}

#[derive(Args)]
pub struct BandwidthArgs {
    /// Passes over the 1 GiB buffer.
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn bandwidth(a: BandwidthArgs) -> anyhow::Result<()> {
    let bw = Bandwidth::new(Device::parse(&a.device)?)?;
    let passes = (0..a.passes.max(1))
        .map(|_| bw.pass())
        .collect::<anyhow::Result<Vec<f64>>>()?;
    let best = passes.iter().copied().fold(0.0, f64::max);
    println!(
        "{}",
        serde_json::json!({
            "passes": passes.len(), "median_bytes_per_s": median(passes), "best_bytes_per_s": best,
        })
    );
    Ok(())
}

/// The middle value (the upper of the two middle ones for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `--tp N`: N rank processes running the same benchmark on their shards.
fn decode_tp(a: &DecodeArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let group = iris_comm::cpu::local_group(&a.tp_transport, a.tp, "tp")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let children = (0..a.tp)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args(&args)
                .args(["--tp-rank", &rank.to_string(), "--tp-group", &group])
                // One core a rank.
                .env("RAYON_NUM_THREADS", "1")
                .spawn()
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    for c in children {
        let status = c.wait_with_output()?.status;
        anyhow::ensure!(status.success(), "a rank failed: {status}");
    }
    Ok(())
}

/// Collectives run and seconds spent in them so far.
type CollectiveTime = Box<dyn Fn() -> (u64, f64)>;

/// This process's communicator: a rank of `--tp`'s group, or alone.
fn decode_comm(
    a: &DecodeArgs,
) -> anyhow::Result<(Arc<dyn iris_comm::Communicator>, CollectiveTime)> {
    #[cfg(feature = "cuda")]
    if a.tp_transport == "nccl" {
        // One rank over NCCL (a one-GPU machine's check of the NCCL path).
        anyhow::ensure!(a.tp == 1, "--tp-transport nccl runs one rank (--tp 1) here");
        let device = Device::parse(&a.device)?;
        let id = iris_comm::nccl::unique_id()?;
        let c = iris_comm::nccl::Nccl::join(device, 0, 1, &id)?;
        return Ok((Arc::new(c), Box::new(|| (0, 0.0))));
    }
    let (Some(rank), Some(group)) = (a.tp_rank, &a.tp_group) else {
        return Ok((iris_comm::single(), Box::new(|| (0, 0.0))));
    };
    let c = Arc::new(iris_comm::cpu::CpuComm::join(
        &a.tp_transport,
        group,
        rank,
        a.tp,
    )?);
    let stats = c.clone();
    Ok((c, Box::new(move || stats.time_in_collectives())))
}

fn decode(mut a: DecodeArgs) -> anyhow::Result<()> {
    if a.tp > 1 && a.tp_rank.is_none() {
        return decode_tp(&a);
    }
    let (comm, collectives) = decode_comm(&a)?;
    // Only rank 0 of a group prints.
    let quiet = comm.rank() != 0;
    let device = Device::parse(&a.device)?;
    let file = match &a.model {
        Some(path) => {
            anyhow::ensure!(comm.world_size() == 1, "--model runs on one rank");
            let ck = iris_models::registry::Checkpoint::open_on(path, None, device, None)?;
            anyhow::ensure!(
                ck.family == iris_models::registry::Family::Llama,
                "{}: --model takes a LLaMA (a .gguf file or a LlamaForCausalLM folder)",
                path.display()
            );
            Some(ck)
        }
        None => None,
    };
    let cfg_json = match &file {
        Some(ck) => ck.config.clone(),
        None => serde_json::json!({
            "hidden_size": a.hidden, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "intermediate_size": a.intermediate, "vocab_size": a.vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        }),
    };
    let cfg = LlamaConfig::from_value(&cfg_json, false)?;
    if file.is_some() {
        a.hidden = cfg.hidden_size;
        a.layers = cfg.num_hidden_layers;
        a.heads = cfg.num_attention_heads;
        a.kv_heads = cfg.num_key_value_heads;
        a.intermediate = cfg.intermediate_size;
        a.vocab = cfg.vocab_size;
    }
    // 1 GiB, well past the 32 MiB of last-level cache (and a GPU's L2): every pass
    // reads from memory.
    let bw = Bandwidth::new(device)?;
    if !a.json && !quiet {
        println!(
            "decode benchmark: hidden {} layers {} heads {}/{} mlp {} vocab {}; {} threads",
            a.hidden,
            a.layers,
            a.heads,
            a.kv_heads,
            a.intermediate,
            a.vocab,
            rayon::current_num_threads()
        );
        println!(
            "read bandwidth: one pass of both cores over 1 GiB before every timed step; \
             a step's share of the weight-read bound is taken against the pass just before it"
        );
    }
    if let (Some(ck), Some(path)) = (&file, &a.model) {
        // The file's tensors as stored; a step reads all but the embedding table (one
        // row of it), and the table again when the head is tied to it.
        let w = ck.weights.clone();
        let embed = "model.embed_tokens.weight";
        let total: usize = w.names().iter().map(|n| w.stored_bytes(n)).sum();
        let mut bytes = total - w.stored_bytes(embed);
        if !w.contains("lm_head.weight") {
            bytes += w.stored_bytes(embed);
        }
        let model = Llama::load(&w.lm("model"), &w.lm("lm_head"), &cfg, comm.clone())?;
        drop(w);
        let name = path
            .file_name()
            .map_or("model".into(), |f| f.to_string_lossy().into_owned());
        let run = Run {
            name: &name,
            model: &model,
            bytes,
            // Parameters a token meets: the linear layers and the head.
            params: linear_shapes(&cfg)
                .iter()
                .map(|&(n, k)| n * k)
                .sum::<usize>() as f64,
            bw: &bw,
            device,
        };
        return decode_runs(&a, &run, &comm, &collectives, quiet);
    }
    for name in &a.dtypes {
        // A block format: f32 random weights, the linear layers quantized as they load.
        let quant = match name.as_str() {
            "q8_0" => Some(QuantType::Q8_0),
            "q4_0" => Some(QuantType::Q4_0),
            "q4_1" => Some(QuantType::Q4_1),
            _ => None,
        };
        let dtype = match quant {
            Some(_) => DType::F32,
            None => DType::parse(name).ok_or_else(|| anyhow::anyhow!("unknown dtype {name}"))?,
        };
        let (tensors, dense_bytes) = random_weights(&cfg, dtype)?;
        let total: usize = tensors
            .values()
            .map(|t| t.elem_count() * dtype.size_in_bytes())
            .sum();
        let mut w = Weights::from_tensors(tensors, dtype).on(device);
        if let Some(ty) = quant {
            w = w.quantize_linear(ty);
        }
        let w = Arc::new(w);
        let model = Llama::load(&w.lm("model"), &w.lm("lm_head"), &cfg, comm.clone())?;
        // The bytes a step reads: a block format's linear weights in their blocks.
        let bytes = match quant {
            Some(ty) => quantized_read(&cfg, ty),
            None => dense_bytes,
        };
        let held = w.bytes_read();
        drop(w);
        if !a.json && comm.world_size() > 1 {
            // Every rank says what it holds.
            println!(
                "{name} rank {} of {}: {:.3} GB of weights ({:.1}% of the model's {:.3} GB), {} threads",
                comm.rank(),
                comm.world_size(),
                held as f64 / 1e9,
                100.0 * held as f64 / total as f64,
                total as f64 / 1e9,
                rayon::current_num_threads()
            );
        }
        let params = (dense_bytes / dtype.size_in_bytes()) as f64;
        let run = Run {
            name,
            model: &model,
            bytes,
            params,
            bw: &bw,
            device,
        };
        decode_runs(&a, &run, &comm, &collectives, quiet)?;
    }
    Ok(())
}

#[derive(Args)]
pub struct AllreduceArgs {
    /// Transports to measure: shm (one host), tcp (loopback here).
    #[arg(long, value_delimiter = ',', default_values_t = [String::from("shm"), String::from("tcp")])]
    transports: Vec<String>,
    /// Ranks (processes).
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// f32 values per all-reduce (default: a decode step's hidden state, TinyLlama's
    /// 2048 and LLaMA-7B's 4096 wide, at batch 1, 8 and 32).
    #[arg(long, value_delimiter = ',', default_values_t = [2048usize, 4096, 16384, 32768, 65536, 131072])]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 2000)]
    iters: usize,
}

#[derive(Args)]
pub struct AllreduceRankArgs {
    #[arg(long)]
    transport: String,
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world: usize,
    #[arg(long)]
    group: String,
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    #[arg(long)]
    iters: usize,
}

/// Starts `world` rank processes per transport; rank 0 prints each size's latency.
fn allreduce(a: AllreduceArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let sizes = a
        .sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    println!(
        "all-reduce (sum, f32) between {} rank processes on {} cores; median and p90 of {} calls after 100 warm-up",
        a.world,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.iters
    );
    for t in &a.transports {
        let group = iris_comm::cpu::local_group(t, a.world, "allreduce")?;
        let children = (0..a.world)
            .map(|rank| {
                std::process::Command::new(&exe)
                    .args(["bench", "allreduce-rank", "--transport", t])
                    .args(["--group", &group, "--rank", &rank.to_string()])
                    .args(["--world", &a.world.to_string(), "--sizes", &sizes])
                    .args(["--iters", &a.iters.to_string()])
                    .spawn()
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        for c in children {
            let status = c.wait_with_output()?.status;
            anyhow::ensure!(status.success(), "a {t} rank failed: {status}");
        }
    }
    Ok(())
}

fn allreduce_rank(a: AllreduceRankArgs) -> anyhow::Result<()> {
    use iris_comm::Communicator;
    let comm = iris_comm::cpu::CpuComm::join(&a.transport, &a.group, a.rank, a.world)?;
    for &n in &a.sizes {
        let x = Tensor::from_f32(random(n, a.rank as u64 + 1), &[n])?;
        let mut times = Vec::with_capacity(a.iters);
        for i in 0..a.iters + 100 {
            comm.barrier()?;
            let t = Instant::now();
            std::hint::black_box(comm.all_reduce_sum(x.clone())?);
            if i >= 100 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times.sort_by(f64::total_cmp);
        if a.rank == 0 {
            println!(
                "{:>4} {n:>7} values ({:>4} KiB): median {:7.1} us, p90 {:7.1} us",
                a.transport,
                n * 4 / 1024,
                times[times.len() / 2] * 1e6,
                times[times.len() * 9 / 10] * 1e6
            );
        }
    }
    Ok(())
}

/// What one measured model is: its name in the output, the bytes a decode step reads, its
/// parameters (for prefill GFLOP/s), the bandwidth probe and the device.
struct Run<'a> {
    name: &'a str,
    model: &'a Llama,
    bytes: usize,
    params: f64,
    bw: &'a Bandwidth,
    device: Device,
}

/// The timed decode steps at each `--kv` and `--batch`, then the prefill, of one model.
fn decode_runs(
    a: &DecodeArgs,
    run: &Run,
    comm: &Arc<dyn iris_comm::Communicator>,
    collectives: &CollectiveTime,
    quiet: bool,
) -> anyhow::Result<()> {
    let Run {
        name,
        model,
        bytes,
        params,
        bw,
        device,
    } = *run;
    comm.barrier()?;
    for kv in &a.kv {
        for &batch in &a.batch {
            let mut caches = decode_caches(model, kv, batch, a, device)?;
            let mut last: Vec<Tensor> = Vec::with_capacity(batch);
            for (s, cache) in caches.iter_mut().enumerate() {
                if a.context > 0 {
                    // Random K/V for `context` positions, then one token's embedding.
                    let w = model.kv_width();
                    for layer in 0..cache.n_layers() {
                        let k = random(a.context * w, (s * 1000 + layer) as u64);
                        let v = random(a.context * w, (s * 1000 + layer) as u64 + 500);
                        let rows = |x| Tensor::from_f32(x, &[a.context, w])?.to_device(device);
                        cache.write(layer, &rows(k)?, &rows(v)?)?;
                    }
                    cache.advance(a.context);
                    last.push(model.embed(&[(s as u32 * 31) % a.vocab as u32])?);
                    continue;
                }
                let ids: Vec<u32> = (0..a.prompt as u32)
                    .map(|i| (i * 7919 + s as u32 * 31) % a.vocab as u32)
                    .collect();
                let h = model.forward(&model.embed(&ids)?, cache)?;
                last.push(h.narrow_rows(h.rows() - 1, 1)?);
            }
            // The machine is shared: its bandwidth drifts by a third within a minute. So
            // each step is paired with a bandwidth pass right before it, and the
            // roofline ratio is the median of the pairs' ratios.
            let (mut times, mut bws) = (Vec::new(), Vec::new());
            let (mut coll_calls, mut coll_secs) = (0u64, 0f64);
            for _ in 0..a.tokens {
                comm.barrier()?;
                bws.push(bw.pass()?);
                comm.barrier()?;
                let (calls0, secs0) = collectives();
                let t = Instant::now();
                // One head call and one forward for the whole batch: weights read once.
                let logits = model.logits(&Tensor::cat_rows(&last.iter().collect::<Vec<_>>())?)?;
                let next = logits.argmax_rows()?;
                let embeds: Vec<Tensor> = next
                    .iter()
                    .map(|&t| model.embed(&[t]))
                    .collect::<Result<_, _>>()?;
                let mut refs: Vec<_> = caches.iter_mut().collect();
                last = model.forward_batch(&embeds.iter().collect::<Vec<_>>(), &mut refs)?;
                device.synchronize()?;
                times.push(t.elapsed().as_secs_f64());
                let (calls1, secs1) = collectives();
                coll_calls += calls1 - calls0;
                coll_secs += secs1 - secs0;
            }
            let ratio = median(
                times
                    .iter()
                    .zip(&bws)
                    .map(|(t, bw)| bytes as f64 / bw / t)
                    .collect(),
            );
            let (step, bw) = (median(times), median(bws));
            let roofline = bw / bytes as f64;
            let tps = batch as f64 / step;
            // Collectives of the timed steps (the barriers around each pass excluded).
            let steps = a.tokens.max(1) as f64;
            let coll_calls = coll_calls as f64 / steps;
            let coll_ms = coll_secs / steps * 1e3;
            if quiet {
                continue;
            }
            if comm.world_size() > 1 && !a.json {
                println!(
                    "  TP {} over {}: {coll_calls:.0} collectives a step, {coll_ms:.2} ms a step in them (waiting for the other ranks included)",
                    comm.world_size(),
                    a.tp_transport
                );
            }
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "dtype": name, "kv": kv, "context": a.context,
                        "batch": batch, "tokens_per_s": tps,
                        "roofline_tokens_per_s": roofline, "ratio": ratio,
                        "bytes_per_token": bytes, "bandwidth_bytes_per_s": bw,
                    })
                );
            } else {
                let kv_note = match (kv.as_str(), a.context) {
                    ("own", 0) => String::new(),
                    (kv, c) => format!(" [kv {kv}, context {c}]"),
                };
                println!(
                "{name:>5}{kv_note} batch {batch:>2}: {tps:7.2} tok/s aggregate ({:.1} ms/step, median of {}); batch-1 roofline {roofline:.2} tok/s ({:.2} GB/step at {:.1} GB/s, medians) -> step at {:.1}% of the weight-read bound (median of step / pass pairs)",
                step * 1e3,
                a.tokens,
                bytes as f64 / 1e9,
                bw / 1e9,
                100.0 * ratio
            );
            }
        }
    }
    if a.prefill > 0 {
        comm.barrier()?;
        // A LLaVA-1.5 prompt: 576 visual tokens + text, as embeddings.
        let ids: Vec<u32> = (0..a.prefill as u32)
            .map(|i| (i * 7919) % a.vocab as u32)
            .collect();
        let embeds = model.embed(&ids)?;
        // The fastest of three (each into a fresh cache): a shared machine's noise
        // only ever adds time. tools/bench_torch_decode.py does the same.
        let mut secs = f64::INFINITY;
        let prefill_args = DecodeArgs {
            prompt: a.prefill,
            tokens: 0,
            context: 0,
            ..a.clone()
        };
        let kv = if device == Device::Cpu { "own" } else { "bf16" };
        for _ in 0..3 {
            let mut cache = decode_caches(model, kv, 1, &prefill_args, device)?.remove(0);
            let t = Instant::now();
            let h = model.forward(&embeds, &mut cache)?;
            model.logits(&h.narrow_rows(h.rows() - 1, 1)?)?;
            device.synchronize()?;
            secs = secs.min(t.elapsed().as_secs_f64());
        }
        if quiet {
            return Ok(());
        }
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "dtype": name, "prefill": a.prefill, "seconds": secs,
                    "prefill_tokens_per_s": a.prefill as f64 / secs,
                })
            );
            return Ok(());
        }
        println!(
            "{name:>5} prefill {} tokens: {:.2} s, best of 3 ({:.0} GFLOP/s on the weights)",
            a.prefill,
            secs,
            2.0 * params * a.prefill as f64 / secs / 1e9
        );
    }
    Ok(())
}
