//! The engine: concurrent requests give what each gives alone (greedy and seeded
//! sampling), under a KV budget small enough to force preemption, and cancelled streams
//! give all their blocks back.

use std::sync::mpsc::Receiver;
use std::sync::Arc;

use iris_e2e::{fixture, fixtures};
use iris_engine::{
    Engine, EngineConfig, EngineRequest, FinishReason, GenerateOptions, Pipeline, PipelineOptions,
    SamplingParams, TokenEvent,
};

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).unwrap()
}

fn drain(rx: Receiver<TokenEvent>) -> (Vec<u32>, FinishReason) {
    let mut ids = Vec::new();
    for ev in rx {
        match ev {
            TokenEvent::Token { id, .. } => ids.push(id),
            TokenEvent::Finished { reason, .. } => return (ids, reason),
            TokenEvent::Error(e) => panic!("request failed: {e}"),
        }
    }
    panic!("stream ended without a finish event")
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
        },
    );
    let req = requests().remove(0);
    let long = EngineRequest {
        options: GenerateOptions::new(40, SamplingParams::default()),
        ..req
    };
    for i in 0..100 {
        let rx = engine.submit(long.clone()).unwrap();
        if i % 2 == 0 {
            // Read one token first, then hang up.
            assert!(matches!(rx.recv().unwrap(), TokenEvent::Token { .. }));
        }
        drop(rx);
    }
    // A last request runs to the end once the cancelled ones are gone.
    let (ids, reason) = drain(engine.submit(long).unwrap());
    assert_eq!((ids.len(), reason), (40, FinishReason::Length));
    let stats = engine.stats();
    assert_eq!(stats.cancelled, 100, "{stats:?}");
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
    // More KV than the whole budget: an error event, not a hang.
    let rx = engine.submit(req.clone()).unwrap();
    assert!(matches!(rx.recv().unwrap(), TokenEvent::Error(e) if e.contains("KV positions")));
    req.images.clear();
    let rx = engine.submit(req).unwrap();
    assert!(matches!(rx.recv().unwrap(), TokenEvent::Error(e) if e.contains("marker")));
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
        },
    );
    let req = requests().remove(0);
    let first = drain(engine.submit(req.clone()).unwrap()).0;
    assert_eq!(engine.stats().prefix_hits, 0);
    // The same image and prompt: the prompt's full blocks come from the cache.
    let second = drain(engine.submit(req.clone()).unwrap()).0;
    let hits = engine.stats().prefix_hits;
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
    // A different image of the same size never hits.
    let mut other = image("scene.png");
    let png = image::load_from_memory(&other).unwrap().to_rgb8();
    let mut flipped = png.clone();
    flipped.put_pixel(0, 0, image::Rgb([255 - png.get_pixel(0, 0)[0], 0, 0]));
    other.clear();
    flipped
        .write_to(
            &mut std::io::Cursor::new(&mut other),
            image::ImageFormat::Png,
        )
        .unwrap();
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
