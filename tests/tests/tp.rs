//! Tensor-parallel LLaMA (the LLaVA fixtures' language models) over the CPU
//! communicator: ranks as threads sharing a group over shared memory, each loading only
//! its shards (heads split, or KV heads replicated when fewer than the ranks; the
//! vocabulary split with padding), give TP = 1's greedy tokens and log-probabilities
//! within 1e-4 at TP = 2 and 4, for MHA (4/4 heads), GQA (4/2) and MQA (4/1) with a
//! vocabulary of 302 (not a multiple of 4) and tied or untied heads.

use std::sync::Arc;

use iris_comm::cpu::CpuComm;
use iris_comm::shm::Shm;
use iris_comm::Communicator;
use iris_e2e::fixture;
use iris_models::llava::Llava;
use iris_models::vlm::VisionLanguageModel;
use iris_tensor::sample::log_softmax;

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

/// Greedy tokens and each one's log-probability, from `comm`'s rank of the model.
fn greedy(name: &str, comm: Arc<dyn Communicator>) -> (Vec<u32>, Vec<f32>) {
    let model = Llava::load(&fixture(name), None, comm).unwrap();
    let lm = model.language_model().unwrap();
    let mut cache = lm.new_cache();
    let mut hidden = lm.forward(&lm.embed(&PROMPT).unwrap(), &mut cache).unwrap();
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    for _ in 0..STEPS {
        let last = hidden.narrow_rows(hidden.rows() - 1, 1).unwrap();
        let logits = lm.logits(&last).unwrap().to_f32_vec();
        assert_eq!(logits.len(), 302, "gathered logits cover the vocabulary");
        let lp = log_softmax(&logits);
        let next = iris_tensor::sample::argmax(&logits);
        ids.push(next);
        lps.push(lp[next as usize]);
        hidden = lm.forward(&lm.embed(&[next]).unwrap(), &mut cache).unwrap();
    }
    (ids, lps)
}

#[test]
fn tensor_parallel_llama_matches_one_rank() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "llava-tiny-hub-f32",
        "llava-tiny-gqa-bf16",
        "llava-tiny-model-f32",
    ] {
        let (want_ids, want_lps) = greedy(name, iris_comm::single());
        // bf16 rounds each rank's partial sums before the all-reduce: a looser bound.
        let tol = if name.contains("bf16") { 3e-2 } else { 1e-4 };
        for world in [2usize, 4] {
            let path = dir.path().join(format!("{name}-{world}"));
            let results: Vec<(Vec<u32>, Vec<f32>)> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..world)
                    .map(|rank| {
                        let path = path.clone();
                        s.spawn(move || {
                            let shm = Shm::join(&path, rank, world, 1 << 20).unwrap();
                            greedy_alone(name, Arc::new(CpuComm::new(shm)))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (rank, (ids, lps)) in results.iter().enumerate() {
                assert_eq!(
                    ids, &want_ids,
                    "{name} TP={world} rank {rank}: greedy tokens"
                );
                for (g, w) in lps.iter().zip(&want_lps) {
                    assert!(
                        (g - w).abs() <= tol,
                        "{name} TP={world} rank {rank}: logprob {g} vs {w}"
                    );
                }
            }
        }
    }
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
