//! The engine: concurrent requests give what each gives alone (greedy and seeded
//! sampling), under a KV budget small enough to force preemption, and cancelled streams
//! give all their blocks back.

use std::sync::Arc;

use iris_e2e::{fixture, fixtures};
use iris_engine::{
    Engine, EngineConfig, EngineRequest, ErrorKind, FinishReason, GenerateOptions, Parts, Pipeline,
    PipelineOptions, RequestError, SamplingParams, StopRules, TokenEvent, TokenStream,
};

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).unwrap()
}

fn drain(rx: TokenStream) -> (Vec<u32>, FinishReason) {
    let mut ids = Vec::new();
    let mut admitted = false;
    for ev in rx {
        match ev {
            TokenEvent::Admitted { .. } => {
                assert!(
                    !admitted && ids.is_empty(),
                    "one admission, before any token"
                );
                admitted = true;
            }
            TokenEvent::Token { id, .. } => ids.push(id),
            TokenEvent::Finished { reason, .. } => return (ids, reason),
            TokenEvent::Error(e) => panic!("request failed: {e}"),
        }
    }
    panic!("stream ended without a finish event")
}

/// A request's first token, after its admission.
fn first_token(rx: &mut TokenStream) -> TokenEvent {
    match rx.blocking_next() {
        Some(TokenEvent::Admitted { .. }) => {}
        e => panic!("the admission comes first: {e:?}"),
    }
    rx.blocking_next().expect("a token")
}

/// 16 LLaVA requests: different images, prompt lengths, lengths, greedy and seeded.
fn requests() -> Vec<EngineRequest> {
    let images = ["scene.png", "tall.jpg"];
    (0..16)
        .map(|i| {
            let sampling = if i % 4 == 3 {
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.9,
                    seed: i as u64,
                    ..Default::default()
                }
            } else {
                SamplingParams::default()
            };
            EngineRequest {
                prompt: format!(
                    "USER: <image>\n{} ASSISTANT:",
                    "What is in the picture? ".repeat(1 + i % 3)
                ),
                images: vec![image(images[i % 2])],
                options: GenerateOptions::new(4 + i % 5, sampling),
                encoded: None,
            }
        })
        .collect()
}

fn alone(p: &Pipeline, r: &EngineRequest) -> Vec<u32> {
    p.generate_with(&r.prompt, &r.images, &r.options)
        .unwrap()
        .token_ids
}

#[test]
fn concurrent_requests_equal_alone_even_when_preempted() {
    let p = Arc::new(
        Pipeline::load(&fixture("llava-tiny-hub-f32"), &PipelineOptions::default()).unwrap(),
    );
    let reqs = requests();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&p, r)).collect();
    for (blocks, expect_preemption) in [(4096, false), (23, true)] {
        let engine = Engine::start(
            p.clone(),
            EngineConfig {
                max_batch: 16,
                kv_blocks: blocks,
                block_size: 4,
                queue: 64,
                ..Default::default()
            },
        );
        let rxs: Vec<_> = reqs
            .iter()
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            let (ids, _) = drain(rx);
            assert_eq!(ids, want[i], "request {i} with {blocks} blocks");
        }
        let stats = engine.stats();
        assert_eq!(stats.preemptions > 0, expect_preemption, "{stats:?}");
        assert_eq!(stats.free_blocks, blocks, "all blocks back: {stats:?}");
    }
}

#[test]
fn cancelled_streams_free_their_blocks() {
    let p = Arc::new(
        Pipeline::load(&fixture("llava-tiny-hub-f32"), &PipelineOptions::default()).unwrap(),
    );
    let engine = Engine::start(
        p,
        EngineConfig {
            max_batch: 8,
            kv_blocks: 256,
            block_size: 4,
            queue: 128,
            ..Default::default()
        },
    );
    let req = requests().remove(0);
    let long = EngineRequest {
        options: GenerateOptions::new(40, SamplingParams::default()),
        ..req
    };
    for i in 0..100 {
        let mut rx = engine.submit(long.clone()).unwrap();
        if i % 2 == 0 {
            // Read one token first, then hang up.
            assert!(matches!(first_token(&mut rx), TokenEvent::Token { .. }));
        }
        drop(rx);
    }
    // A last request runs to the end once the cancelled ones are gone.
    let (ids, reason) = drain(engine.submit(long).unwrap());
    assert_eq!((ids.len(), reason), (40, FinishReason::Length));
    let stats = engine.stats();
    // The hung-up requests ended cancelled — but for the rare one that finished its 40
    // tokens before the drop reached the engine (the client thread can be descheduled
    // right after its first token) — and every block is back.
    assert!(stats.cancelled >= 90, "{stats:?}");
    assert_eq!(stats.free_blocks, 256, "{stats:?}");
}

#[test]
fn other_families_run_through_the_engine() {
    for name in ["blip2-tiny-opt-f32", "idefics-tiny-f32"] {
        let p = Arc::new(Pipeline::load(&fixture(name), &PipelineOptions::default()).unwrap());
        let reqs: Vec<EngineRequest> = ["scene.png", "tall.jpg", "scene.png"]
            .iter()
            .enumerate()
            .map(|(i, img)| EngineRequest {
                prompt: format!("<image> Question {i}: what is it? Answer:"),
                images: vec![image(img)],
                options: GenerateOptions::new(3 + i, SamplingParams::default()),
                encoded: None,
            })
            .collect();
        let engine = Engine::start(p.clone(), EngineConfig::default());
        let rxs: Vec<_> = reqs
            .iter()
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        for (r, rx) in reqs.iter().zip(rxs) {
            assert_eq!(drain(rx).0, alone(&p, r), "{name}");
        }
    }
}

#[test]
fn bad_requests_are_refused_cleanly() {
    let p = Arc::new(
        Pipeline::load(&fixture("llava-tiny-hub-f32"), &PipelineOptions::default()).unwrap(),
    );
    let engine = Engine::start(
        p,
        EngineConfig {
            kv_blocks: 4,
            block_size: 4,
            ..Default::default()
        },
    );
    let mut req = requests().remove(0);
    // More KV than the whole budget: refused at once (the caller's thread tokenizes
    // and checks it), not a hang.
    let e = engine.submit(req.clone()).err().unwrap();
    assert!(
        e.is_bad_input() && e.to_string().contains("KV positions"),
        "{e}"
    );
    req.images.clear();
    let e = engine.submit(req).err().unwrap();
    assert!(e.is_bad_input() && e.to_string().contains("marker"), "{e}");
    assert_eq!(engine.stats().free_blocks, 4);
}

#[test]
fn same_image_and_prefix_hit_the_prefix_cache() {
    let p = Arc::new(
        Pipeline::load(&fixture("llava-tiny-hub-f32"), &PipelineOptions::default()).unwrap(),
    );
    let engine = Engine::start(
        p.clone(),
        EngineConfig {
            max_batch: 4,
            kv_blocks: 64,
            block_size: 4,
            queue: 8,
            ..Default::default()
        },
    );
    let req = requests().remove(0);
    let first = drain(engine.submit(req.clone()).unwrap()).0;
    assert_eq!(engine.stats().prefix_hits, 0);
    // The same image and prompt: the prompt's full blocks come from the cache.
    let mut stream = engine.submit(req.clone()).unwrap();
    let admitted = stream.blocking_next();
    let second = drain(stream).0;
    let hits = engine.stats().prefix_hits;
    // Its admission says how much of the prompt the cache held.
    assert_eq!(
        admitted,
        Some(TokenEvent::Admitted {
            cached_tokens: hits as usize * 4
        })
    );
    let prompt_len = p
        .processor
        .prepare(&req.prompt, &req.images)
        .unwrap()
        .input_ids
        .len();
    assert_eq!(
        hits as usize,
        (prompt_len - 1) / 4,
        "every full prompt block but the last token's"
    );
    assert_eq!(second, first);
    assert_eq!(second, alone(&p, &req));
    // A different image never hits: blocks are keyed by the visual tokens computed
    // (an image whose pixel values, hence tokens, were the same would rightly share).
    let other = image("tall.jpg");
    assert_ne!(
        p.encode_images(
            &p.processor
                .prepare(&req.prompt, std::slice::from_ref(&other))
                .unwrap()
        )
        .unwrap()[0]
            .to_f32_vec(),
        p.encode_images(&p.processor.prepare(&req.prompt, &req.images).unwrap())
            .unwrap()[0]
            .to_f32_vec()
    );
    let changed = EngineRequest {
        images: vec![other],
        ..req
    };
    let out = drain(engine.submit(changed.clone()).unwrap()).0;
    assert_eq!(
        engine.stats().prefix_hits,
        hits,
        "no new hits for a different image"
    );
    assert_eq!(out, alone(&p, &changed));
}

fn llava() -> Arc<Pipeline> {
    Arc::new(Pipeline::load(&fixture("llava-tiny-hub-f32"), &PipelineOptions::default()).unwrap())
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_between_decode_steps() {
    let p = llava();
    let long = EngineRequest {
        prompt: format!(
            "USER: <image>\n{} ASSISTANT:",
            "Describe every detail. ".repeat(20)
        ),
        images: vec![image("tall.jpg")],
        options: GenerateOptions::new(3, SamplingParams::default()),
        encoded: None,
    };
    let prompt_len = p
        .processor
        .prepare(&long.prompt, &long.images)
        .unwrap()
        .input_ids
        .len();
    let want = alone(&p, &long);
    // `a` decodes through all of `b`'s life (cancelled after), slowed by a step delay
    // so that `b`, tokenized and its image encoded on this thread, surely arrives first.
    let running = EngineRequest {
        options: GenerateOptions::new(400, SamplingParams::default()),
        ..requests().remove(0)
    };
    for chunk in [8, 100_000] {
        let engine = Engine::start(
            p.clone(),
            EngineConfig {
                prefill_chunk: chunk,
                step_delay: std::time::Duration::from_millis(1),
                ..Default::default()
            },
        );
        let mut a = engine.submit(running.clone()).unwrap();
        assert!(matches!(first_token(&mut a), TokenEvent::Token { .. }));
        let before = engine.stats().mixed_steps;
        let b = engine.submit(long.clone()).unwrap();
        let (mut ids, mut cached) = (Vec::new(), None);
        for ev in b {
            match ev {
                TokenEvent::Token { id, .. } => ids.push(id),
                TokenEvent::Finished { cached_tokens, .. } => cached = Some(cached_tokens),
                _ => {}
            }
        }
        assert_eq!(ids, want, "chunk {chunk}");
        let cached = cached.expect("`b` finished");
        while let Some(e) = a.try_next() {
            assert!(
                !matches!(e, TokenEvent::Finished { .. }),
                "`a` finished before `b`: {e:?}"
            );
        }
        // Every step that prefilled `b` also decoded `a`: one step a chunk.
        let mixed = engine.stats().mixed_steps - before;
        assert_eq!(
            mixed as usize,
            (prompt_len - cached).div_ceil(chunk),
            "chunk {chunk}: {mixed} prefill steps beside a decode"
        );
        a.cancel();
    }
}

#[test]
fn events_carry_text_stop_strings_and_top_logprobs() {
    let p = llava();
    let engine = Engine::start(p.clone(), EngineConfig::default());
    let base = EngineRequest {
        options: GenerateOptions::new(12, SamplingParams::default()),
        ..requests().remove(1)
    };
    let whole = alone(&p, &base);
    let full_text = p.processor.decode(&whole).unwrap();
    // Streamed text deltas add up to the final text, which is `generate`'s.
    let mut opts = base.options.clone();
    opts.top_logprobs = 3;
    let mut text = String::new();
    let mut stream = engine
        .submit(EngineRequest {
            options: opts,
            ..base.clone()
        })
        .unwrap();
    loop {
        match stream.blocking_next().unwrap() {
            TokenEvent::Token {
                id,
                logprob,
                top_logprobs,
                text: delta,
            } => {
                assert_eq!(top_logprobs.len(), 3);
                assert_eq!(
                    (top_logprobs[0].0, top_logprobs[0].1),
                    (id, logprob),
                    "greedy"
                );
                text.push_str(&delta);
            }
            TokenEvent::Finished {
                text: t, reason, ..
            } => {
                assert_eq!(reason, FinishReason::Length);
                assert_eq!(t, full_text);
                assert_eq!(text, full_text);
                break;
            }
            TokenEvent::Admitted { .. } => {}
            e => panic!("{e:?}"),
        }
    }
    // A stop string from the middle of that text ends it there, and is not streamed.
    let chars: Vec<char> = full_text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full_text.find(&stop).unwrap();
    let mut opts = base.options.clone();
    opts.stop = StopRules {
        strings: vec![stop.clone()],
        ..Default::default()
    };
    let mut streamed = String::new();
    let mut stream = engine
        .submit(EngineRequest {
            options: opts.clone(),
            ..base.clone()
        })
        .unwrap();
    let (text, reason) = loop {
        match stream.blocking_next().unwrap() {
            TokenEvent::Token { text, .. } => streamed.push_str(&text),
            TokenEvent::Finished { text, reason, .. } => break (text, reason),
            TokenEvent::Admitted { .. } => {}
            e => panic!("{e:?}"),
        }
    };
    assert_eq!(reason, FinishReason::Stop, "stop {stop:?} in {full_text:?}");
    assert_eq!(text, full_text[..cut]);
    assert_eq!(streamed, text);
    let g = p.generate_with(&base.prompt, &base.images, &opts).unwrap();
    assert_eq!((g.text, g.finish_reason), (text, FinishReason::Stop));
}

#[test]
fn streams_are_async_and_cancel_with_a_reason() {
    let p = llava();
    let engine = Engine::start(p.clone(), EngineConfig::default());
    let req = EngineRequest {
        options: GenerateOptions::new(6, SamplingParams::default()),
        ..requests().remove(0)
    };
    let want = alone(&p, &req);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut stream = engine.submit(req.clone()).unwrap();
    let ids = rt.block_on(async {
        let mut ids = Vec::new();
        while let Some(ev) = stream.next().await {
            match ev {
                TokenEvent::Token { id, .. } => ids.push(id),
                TokenEvent::Finished { .. } => break,
                TokenEvent::Admitted { .. } => {}
                e => panic!("{e:?}"),
            }
        }
        ids
    });
    assert_eq!(ids, want);
    let long = EngineRequest {
        options: GenerateOptions::new(500, SamplingParams::default()),
        ..req
    };
    let mut stream = engine.submit(long).unwrap();
    assert!(matches!(first_token(&mut stream), TokenEvent::Token { .. }));
    stream.cancel();
    let last = stream.find(|e| !matches!(e, TokenEvent::Token { .. }));
    assert!(
        matches!(
            last,
            Some(TokenEvent::Finished {
                reason: FinishReason::Cancelled,
                ..
            })
        ),
        "{last:?}"
    );
    assert_eq!(
        engine.stats().free_blocks,
        EngineConfig::default().kv_blocks
    );
}

/// The events of a request that may fail: its tokens, then how it ended.
fn outcome(rx: TokenStream) -> (Vec<u32>, Result<FinishReason, RequestError>) {
    let mut ids = Vec::new();
    for ev in rx {
        match ev {
            TokenEvent::Token { id, .. } => ids.push(id),
            TokenEvent::Finished { reason, .. } => return (ids, Ok(reason)),
            TokenEvent::Error(e) => return (ids, Err(e)),
            TokenEvent::Admitted { .. } => {}
        }
    }
    panic!("stream ended without a finish or error event")
}

/// A panic planted in a decode step fails exactly the requests of that step with an
/// internal error; the requests still waiting, and the next one submitted, give what
/// they give alone, and every KV block is back.
#[test]
fn a_panic_in_a_step_fails_that_steps_requests_and_the_engine_goes_on() {
    let p = llava();
    let reqs: Vec<EngineRequest> = requests().into_iter().take(4).collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&p, r)).collect();
    let config = EngineConfig {
        max_batch: 2,
        kv_blocks: 64,
        block_size: 16,
        panic_at_step: Some(0),
        ..Default::default()
    };
    let (engine, rxs) = Engine::start_with(p.clone(), config, reqs.clone()).unwrap();
    let outcomes: Vec<_> = rxs.into_iter().map(outcome).collect();
    // The first two ran in step 0 (max_batch 2): each streamed its first token, then
    // the step panicked. The other two were waiting and never saw it.
    for (i, (ids, end)) in outcomes.iter().enumerate() {
        if i < 2 {
            let e = end.as_ref().unwrap_err();
            assert_eq!(e.kind, ErrorKind::Internal, "{e}");
            assert!(e.message.contains("planted"), "{e}");
            assert_eq!(
                ids[..],
                want[i][..1],
                "request {i} streamed its first token"
            );
        } else {
            assert!(end.is_ok(), "request {i}: {end:?}");
            assert_eq!(ids, &want[i], "request {i}");
        }
    }
    let (ids, end) = outcome(engine.submit(reqs[0].clone()).unwrap());
    assert_eq!((ids, end.is_ok()), (want[0].clone(), true));
    let stats = engine.stats();
    assert_eq!(stats.failed_steps, 1, "{stats:?}");
    assert_eq!(stats.free_blocks, 64, "every block back: {stats:?}");
    assert!(engine.is_alive());
}

/// An engine over a pipeline without its language model (loaded for another tier)
/// refuses every request as unavailable instead of panicking.
#[test]
fn an_engine_without_a_language_model_is_unavailable() {
    let p = Pipeline::load_parts(
        &fixture("llava-tiny-hub-f32"),
        &PipelineOptions::default(),
        Parts::VISION,
    )
    .unwrap();
    let engine = Engine::start(Arc::new(p), EngineConfig::default());
    assert!(!engine.is_alive());
    let e = engine.submit(requests().remove(0)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}

/// Under a KV budget that holds four full-context sequences, 32 concurrent long
/// requests all complete — queued or preempted — with the same tokens as each alone;
/// the arena reserved at start never grows and every block comes back.
#[test]
fn thirty_two_requests_complete_under_a_budget_of_four_sequences() {
    let p = llava();
    let bs = 16;
    let dtype = iris_engine::kv_dtype(&p, None);
    let per_block = iris_engine::kv_block_bytes(&p, bs, dtype).unwrap();
    let context = p.context_length();
    let budget = 4 * context.div_ceil(bs) * per_block;
    let blocks = iris_engine::kv_blocks_for_budget(&p, bs, dtype, budget, context).unwrap();
    assert_eq!(blocks, 4 * context.div_ceil(bs));
    // Below one full-context sequence: refused, with what it would take.
    let e = iris_engine::kv_blocks_for_budget(&p, bs, dtype, per_block, context).unwrap_err();
    assert!(e.to_string().contains("raise --kv-cache-bytes"), "{e}");
    let reqs: Vec<EngineRequest> = (0..32)
        .map(|i| {
            let mut r = requests().remove(i % 16);
            // ~400-token prompts: a budget of four full contexts holds about five.
            let text = format!("Describe the picture in detail, part {i}. ").repeat(25);
            r.prompt = format!("USER: <image>\n{text} ASSISTANT:");
            r
        })
        .collect();
    let want: Vec<Vec<u32>> = reqs.iter().map(|r| alone(&p, r)).collect();
    let config = EngineConfig {
        max_batch: 32,
        kv_blocks: blocks,
        block_size: bs,
        queue: 64,
        ..Default::default()
    };
    let (engine, rxs) = Engine::start_with(p.clone(), config, reqs).unwrap();
    let reserved = engine.stats().kv_bytes;
    assert_eq!(reserved, blocks * per_block);
    for (i, rx) in rxs.into_iter().enumerate() {
        assert_eq!(drain(rx).0, want[i], "request {i}");
    }
    let stats = engine.stats();
    assert_eq!(stats.free_blocks, blocks, "{stats:?}");
    assert_eq!(stats.kv_bytes, reserved, "the arena never grows");
}

/// A bf16 model's K/V are bf16 values: stored as bf16 (half the bytes, the default
/// for a bf16 model) the engine gives the same tokens and logprobs, bit for bit, as
/// with f32 storage and as the single-sequence path (f32 buffers). Each prompt starts
/// with its own letters, so no request takes another's blocks from the prefix cache (a
/// bf16 model's prefill of a prompt's tail over cached blocks rounds differently from
/// one pass over the whole prompt).
#[test]
fn bf16_kv_storage_changes_nothing_for_a_bf16_model() {
    use iris_engine::KvDtype;
    let p = Arc::new(
        Pipeline::load(&fixture("llava-tiny-gqa-bf16"), &PipelineOptions::default()).unwrap(),
    );
    assert_eq!(iris_engine::kv_dtype(&p, None), KvDtype::Bf16);
    let reqs: Vec<EngineRequest> = requests()
        .into_iter()
        .take(6)
        .zip(["A", "D", "E", "H", "AD", "DE"])
        .map(|(mut r, tag)| {
            r.prompt = format!("{tag} {}", r.prompt);
            r
        })
        .collect();
    let alone: Vec<_> = reqs
        .iter()
        .map(|r| p.generate_with(&r.prompt, &r.images, &r.options).unwrap())
        .collect();
    let mut bytes = Vec::new();
    for dtype in [KvDtype::Bf16, KvDtype::F32] {
        let config = EngineConfig {
            kv_blocks: 64,
            block_size: 8,
            kv_dtype: Some(dtype),
            ..Default::default()
        };
        let (engine, rxs) = Engine::start_with(p.clone(), config, reqs.clone()).unwrap();
        for (rx, want) in rxs.into_iter().zip(&alone) {
            let g = rx.collect_blocking().unwrap();
            assert_eq!(g.token_ids, want.token_ids, "{dtype}");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&g.logprobs), bits(&want.logprobs), "{dtype}");
        }
        bytes.push(engine.stats().kv_bytes);
    }
    assert_eq!(2 * bytes[0], bytes[1], "bf16 K/V take half the bytes");
}

/// What the engine publishes of its prefix cache (the gateways route by it) follows
/// the cache: a request's full prompt blocks appear under the chain a gateway computes
/// from the visual tokens and ids, and blocks evicted for another request disappear.
#[test]
fn the_prefix_index_follows_the_cache_through_evictions() {
    use iris_engine::blocks::{chain_hashes, PrefixDelta};
    let p = Arc::new(
        Pipeline::load(&fixture("llava-tiny-hub-f32"), &PipelineOptions::default()).unwrap(),
    );
    let bs = 4;
    let engine = Engine::start(
        p.clone(),
        EngineConfig {
            max_batch: 1,
            kv_blocks: 16,
            block_size: bs,
            queue: 4,
            ..Default::default()
        },
    );
    let mut events = engine.prefixes().subscribe();
    let chain = |r: &EngineRequest| {
        let prompt = p.processor.prepare(&r.prompt, &r.images).unwrap();
        let hashes: Vec<[u8; 32]> = p
            .encode_images(&prompt)
            .unwrap()
            .iter()
            .map(|t| iris_engine::visual_hash(t).unwrap())
            .collect();
        let ids = &prompt.input_ids;
        chain_hashes(&hashes, ids, bs, (ids.len() - 1) / bs)
    };
    let a = requests().remove(0);
    let mut b = requests().remove(1);
    b.options.max_new_tokens = 4;
    let (ca, cb) = (chain(&a), chain(&b));
    assert!(ca.len() > 4 && cb.len() > 4);
    drain(engine.submit(a).unwrap());
    assert!(
        ca.iter().all(|h| engine.prefixes().holds(*h)),
        "a's blocks are held"
    );
    // b needs more blocks than are free: some of a's cached blocks go.
    drain(engine.submit(b).unwrap());
    assert!(engine.stats().prefix_evictions > 0);
    assert!(
        cb.iter().all(|h| engine.prefixes().holds(*h)),
        "b's blocks are held"
    );
    let gone = ca.iter().filter(|h| !engine.prefixes().holds(**h)).count();
    assert!(gone > 0, "no block of a was evicted");
    // The events, replayed, give the same set.
    let mut seen = std::collections::HashSet::new();
    while let Ok(d) = events.try_recv() {
        match d {
            PrefixDelta::Snapshot(all) => seen = all.into_iter().collect(),
            PrefixDelta::Changed { stored, removed } => {
                removed.iter().for_each(|h| {
                    seen.remove(h);
                });
                seen.extend(stored);
            }
        }
    }
    for h in ca.iter().chain(&cb) {
        assert_eq!(seen.contains(h), engine.prefixes().holds(*h));
    }
    println!(
        "a's {} blocks: {gone} evicted for b's {}",
        ca.len(),
        cb.len()
    );
}

/// The samples of one prompt (OpenAI's `n`: one request a seed stream) submitted
/// together: the first prefills the prompt, the others wait for its blocks and take
/// them from the prefix cache (each prefills only the partial last block), and each
/// gives what it gives alone.
#[test]
fn samples_of_one_prompt_share_its_blocks() {
    let p = Arc::new(
        Pipeline::load(&fixture("llava-tiny-hub-f32"), &PipelineOptions::default()).unwrap(),
    );
    let block_size = 4;
    let n = 4;
    let samples: Vec<EngineRequest> = (0..n)
        .map(|i| {
            let mut r = requests().remove(3);
            r.options.sampling.seed = iris_engine::seed_stream(11, i);
            r.options.max_new_tokens = 8;
            r
        })
        .collect();
    // Queued before the engine's first step, all at once; the prompt prefilled in
    // chunks of 8 tokens, over several steps.
    let (engine, streams) = Engine::start_with(
        p.clone(),
        EngineConfig {
            max_batch: 8,
            kv_blocks: 512,
            block_size,
            prefill_chunk: 8,
            ..Default::default()
        },
        samples.clone(),
    )
    .unwrap();
    let before = iris_engine::EngineStats::default();
    let mut prompt = 0;
    let mut outs = Vec::new();
    for s in streams {
        let mut ids = Vec::new();
        for ev in s {
            match ev {
                TokenEvent::Token { id, .. } => ids.push(id),
                TokenEvent::Finished {
                    prompt_token_ids, ..
                } => prompt = prompt_token_ids.len(),
                TokenEvent::Error(e) => panic!("{e}"),
                TokenEvent::Admitted { .. } => {}
            }
        }
        outs.push(ids);
    }
    let after = engine.stats();
    for (i, r) in samples.iter().enumerate() {
        assert_eq!(
            outs[i],
            alone(&p, r),
            "sample {i} equals its seed stream alone"
        );
    }
    assert!(
        outs.iter().skip(1).any(|o| o != &outs[0]),
        "the samples differ"
    );
    let full = (prompt - 1) / block_size;
    assert!(full >= 4, "a prompt of several blocks: {prompt} tokens");
    assert_eq!(
        after.prefix_hits - before.prefix_hits,
        ((n - 1) * full) as u64,
        "every later sample takes every full prompt block from the first: {after:?}"
    );
    assert_eq!(
        after.prefill_tokens - before.prefill_tokens,
        (prompt + (n - 1) * (prompt - full * block_size)) as u64,
        "the prompt prefilled once, plus each later sample's partial block"
    );
    assert!(after.deferred_admissions > before.deferred_admissions);
    assert_eq!(after.free_blocks, 512, "all blocks back");
}
