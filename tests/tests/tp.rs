//! Tensor-parallel language models over the CPU communicator: ranks as threads sharing
//! a group over shared memory, each loading only its shards (heads split, or KV heads
//! replicated when fewer than the ranks; MLPs split; the vocabulary split with
//! padding), give TP = 1's greedy tokens and log-probabilities within 1e-4 at TP = 2
//! and 4 — LLaMA (LLaVA's fixtures: MHA 4/4, GQA 4/2, MQA 4/1, vocabulary 302, tied and
//! untied heads), OPT (BLIP-2, vocabulary 321) and IDEFICS (its gated cross-attention
//! reading an image, decoupled embeddings, vocabulary 301 + 2).

use std::sync::Arc;

use iris_comm::cpu::CpuComm;
use iris_comm::shm::Shm;
use iris_comm::Communicator;
use iris_e2e::fixture;
use iris_models::blip2::Blip2;
use iris_models::idefics::Idefics;
use iris_models::llava::Llava;
use iris_models::registry::{Checkpoint, Parts};
use iris_models::text::TextModel;
use iris_models::vlm::VisionLanguageModel;
use iris_tensor::sample::log_softmax;
use iris_tensor::Tensor;

const PROMPT: [u32; 9] = [1, 15, 200, 7, 31, 99, 5, 250, 42];
const STEPS: usize = 8;

/// [`greedy`] on a thread pool of the rank's own (as a rank process has): ranks sharing
/// one pool could run one rank's work nested inside another's wait at a collective.
fn greedy_alone(name: &str, comm: Arc<dyn Communicator>) -> (Vec<u32>, Vec<f32>) {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| greedy(name, comm))
}

/// `comm`'s rank of the fixture `name` (or of the GGUF file at the path `name`).
fn load(name: &str, comm: Arc<dyn Communicator>) -> Box<dyn VisionLanguageModel> {
    if name.ends_with(".gguf") {
        let ck = Checkpoint::open(std::path::Path::new(name), None).unwrap();
        return Box::new(TextModel::from_checkpoint(&ck, Parts::ALL, comm).unwrap());
    }
    let dir = fixture(name);
    if name.starts_with("llava") {
        return Box::new(Llava::load(&dir, None, comm).unwrap());
    }
    let ck = Checkpoint::open(&dir, None).unwrap();
    if name.starts_with("blip2") {
        Box::new(Blip2::from_checkpoint_tp(&ck, Parts::ALL, comm).unwrap())
    } else {
        Box::new(Idefics::from_checkpoint_tp(&ck, &dir, Parts::ALL, comm).unwrap())
    }
}

/// Greedy tokens and each one's log-probability, from `comm`'s rank of the model: a
/// text prompt, and for IDEFICS one image (fixed visual tokens) its cross-attention
/// reads.
fn greedy(name: &str, comm: Arc<dyn Communicator>) -> (Vec<u32>, Vec<f32>) {
    let model = load(name, comm);
    let lm = model.language_model().unwrap();
    let (mut ids, mut visual) = (PROMPT.to_vec(), Vec::new());
    if name.starts_with("idefics") {
        ids.insert(1, model.image_token_id());
        let [r, c] = model.visual_shape(Default::default());
        let v: Vec<f32> = (0..r * c)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
            .collect();
        visual.push(Tensor::from_f32(v, &[r, c]).unwrap());
    }
    let mut cache = lm.new_cache();
    model.condition(&mut cache, &ids, &visual).unwrap();
    let embeds = model.input_embeds(&ids, &visual).unwrap();
    let mut hidden = lm.forward(&embeds, &mut cache).unwrap();
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    for _ in 0..STEPS {
        let last = hidden.narrow_rows(hidden.rows() - 1, 1).unwrap();
        let logits = lm.logits(&last).unwrap().to_f32_vec();
        assert!(logits.len() > 300, "gathered logits cover the vocabulary");
        let lp = log_softmax(&logits);
        let next = iris_tensor::sample::argmax(&logits);
        ids.push(next);
        lps.push(lp[next as usize]);
        hidden = lm.forward(&lm.embed(&[next]).unwrap(), &mut cache).unwrap();
    }
    (ids, lps)
}

#[test]
fn tensor_parallel_models_match_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "llava-tiny-hub-f32",
        "llava-tiny-gqa-bf16",
        "llava-tiny-model-f32",
        "blip2-tiny-opt-f32",
        "idefics-tiny-f32",
        "idefics-tiny-qknorm-f32",
    ] {
        let want = greedy(name, iris_comm::single());
        // bf16 rounds each rank's partial sums before the all-reduce: a looser bound.
        let tol = if name.contains("bf16") { 3e-2 } else { 1e-4 };
        for world in [2usize, 4] {
            let path = dir.path().join(format!("{name}-{world}"));
            assert_ranks_agree(name, &path, world, &want, tol);
        }
    }
}

/// `world` ranks of `name` (threads over shared memory at `path`) each give `want`'s
/// greedy tokens, and its log-probabilities within `tol`.
fn assert_ranks_agree(
    name: &str,
    path: &std::path::Path,
    world: usize,
    (want_ids, want_lps): &(Vec<u32>, Vec<f32>),
    tol: f32,
) {
    let results: Vec<(Vec<u32>, Vec<f32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                s.spawn(move || {
                    let shm = Shm::join(path, rank, world, 1 << 20).unwrap();
                    greedy_alone(name, Arc::new(CpuComm::new(shm)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (ids, lps)) in results.iter().enumerate() {
        assert_eq!(
            ids, want_ids,
            "{name} TP={world} rank {rank}: greedy tokens"
        );
        for (g, w) in lps.iter().zip(want_lps) {
            assert!(
                (g - w).abs() <= tol,
                "{name} TP={world} rank {rank}: logprob {g} vs {w}"
            );
        }
    }
}

/// A real GGUF (SmolLM2-135M, Q4_1 with a Q8_0 token table kept in its blocks) over
/// three ranks (9 / 3 heads): each rank dequantizes its third of the vocabulary's rows
/// for a lookup and multiplies the same blocks as the tied head — one rank's tokens.
#[test]
fn a_gguf_models_block_table_splits_over_three_ranks() {
    let Some(path) = iris_e2e::smollm2_gguf() else {
        return;
    };
    let name = path.to_str().unwrap();
    let want = greedy(name, iris_comm::single());
    let dir = tempfile::tempdir().unwrap();
    assert_ranks_agree(name, &dir.path().join("smollm2"), 3, &want, 1e-3);
}

#[test]
fn heads_that_do_not_split_are_a_load_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    // 4 query heads over 3 ranks.
    let errs: Vec<String> = std::thread::scope(|s| {
        (0..3)
            .map(|rank| {
                let path = dir.path().join("three");
                s.spawn(move || {
                    let shm = Shm::join(&path, rank, 3, 1024).unwrap();
                    Llava::load(
                        &fixture("llava-tiny-hub-f32"),
                        None,
                        Arc::new(CpuComm::new(shm)),
                    )
                    .unwrap_err()
                    .to_string()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    });
    for e in errs {
        assert!(
            e.contains("q_proj.weight") && e.contains("4 attention heads") && e.contains("3 ranks"),
            "{e}"
        );
    }
}

/// The engine over a group of N ranks (ranks 1..N following, each on its own thread and
/// pool): concurrent requests (batched steps), two with the same prompt and image
/// (prefix-cache hits), give the tokens of the engine over one rank and log-probabilities
/// within 1e-4, at N = 2 and 4, for LLaVA, BLIP-2 and IDEFICS.
#[test]
fn an_engine_over_two_and_four_ranks_gives_one_ranks_tokens() {
    use iris_engine::tp::follow;
    use iris_engine::{Engine, EngineConfig, EngineRequest, GenerateOptions, Pipeline, TokenEvent};
    use iris_models::registry::Parts;
    let image = |n: &str| std::fs::read(iris_e2e::fixtures().join("images").join(n)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, prompt) in [
        (
            "llava-tiny-hub-f32",
            "USER: <image>\nWhat is in the picture? ASSISTANT:",
        ),
        (
            "blip2-tiny-opt-f32",
            "Question: what is in the picture? Answer:",
        ),
        (
            "idefics-tiny-f32",
            "User: What is in the picture? <image> Assistant:",
        ),
    ] {
        let requests: Vec<EngineRequest> = (0..4)
            .map(|i| {
                let img = if i == 3 { "tall.jpg" } else { "scene.png" };
                // Requests 0 and 1 are the same prompt and image: the second reuses the
                // first's prompt blocks.
                let p = if i == 2 {
                    format!("{prompt} A")
                } else {
                    prompt.to_string()
                };
                EngineRequest::new(
                    p,
                    vec![image(img)],
                    GenerateOptions::new(5, Default::default()),
                )
            })
            .collect();
        type Outs = Vec<Vec<(u32, f32)>>;
        let run = |p: Arc<Pipeline>| -> (Outs, usize) {
            let engine = Engine::start(
                p,
                EngineConfig {
                    kv_blocks: 64,
                    block_size: 4,
                    ..Default::default()
                },
            );
            let token = |e: TokenEvent| match e {
                TokenEvent::Token { id, logprob, .. } => Some((id, logprob)),
                TokenEvent::Error(e) => panic!("{e}"),
                _ => None,
            };
            // The first request's prompt blocks are cached when its prefill ends, which
            // its first token marks: the others go in after it, so the repeat hits the
            // cache whatever the scheduler's timing (admitted in one step, neither would).
            let mut first = engine.submit(requests[0].clone()).unwrap();
            let mut first_out: Vec<(u32, f32)> =
                first.by_ref().find_map(token).into_iter().collect();
            let streams: Vec<_> = requests[1..]
                .iter()
                .map(|r| engine.submit(r.clone()).unwrap())
                .collect();
            first_out.extend(first.filter_map(token));
            let outs = std::iter::once(first_out)
                .chain(streams.into_iter().map(|s| s.filter_map(token).collect()))
                .collect();
            (outs, engine.stats().prefix_hits as usize)
        };
        let (want, _) = run(Arc::new(
            Pipeline::load(&fixture(name), &iris_e2e::options()).unwrap(),
        ));
        for world in [2usize, 4] {
            let path = dir.path().join(format!("engine-{name}-{world}"));
            let (got, hits) = std::thread::scope(|s| {
                let followers: Vec<_> = (1..world)
                    .map(|rank| {
                        let path = path.clone();
                        s.spawn(move || {
                            let comm: Arc<dyn Communicator> = Arc::new(CpuComm::new(
                                Shm::join(&path, rank, world, 1 << 20).unwrap(),
                            ));
                            rayon::ThreadPoolBuilder::new()
                                .num_threads(1)
                                .build()
                                .unwrap()
                                .install(|| {
                                    let p = Pipeline::load_tp(
                                        &fixture(name),
                                        &iris_e2e::options(),
                                        Parts::ALL,
                                        comm.clone(),
                                    )
                                    .unwrap();
                                    follow(&*p.model, &*comm, iris_tensor::Device::Cpu).unwrap();
                                })
                        })
                    })
                    .collect();
                let comm: Arc<dyn Communicator> =
                    Arc::new(CpuComm::new(Shm::join(&path, 0, world, 1 << 20).unwrap()));
                let p = Pipeline::load_tp(&fixture(name), &iris_e2e::options(), Parts::ALL, comm)
                    .unwrap();
                let out = run(Arc::new(p));
                for f in followers {
                    f.join().unwrap();
                }
                out
            });
            assert_eq!(got.len(), want.len());
            for (r, (g, w)) in got.iter().zip(&want).enumerate() {
                let ids = |o: &Vec<(u32, f32)>| o.iter().map(|t| t.0).collect::<Vec<_>>();
                assert_eq!(ids(g), ids(w), "{name} TP {world} request {r}: tokens");
                for ((_, gl), (_, wl)) in g.iter().zip(w) {
                    assert!(
                        (gl - wl).abs() <= 1e-4,
                        "{name} TP {world} request {r}: logprob {gl} vs {wl}"
                    );
                }
            }
            assert!(
                hits > 0,
                "{name} TP {world}: the repeated prompt hit the prefix cache"
            );
        }
    }
}
