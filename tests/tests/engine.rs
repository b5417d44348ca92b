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
