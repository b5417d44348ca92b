//! BLIP-2 with a T5 language model against HF transformers on the tiny fixtures
//! (tools/gen_blip2_fixtures.py): FlanT5's recipe (gated-GELU, its own head) at f32,
//! classic T5's (ReLU, the head tied to the embedding, the output scaled) at bf16. Each
//! stage fed HF's input to it: vision features, Q-Former output, projected visual
//! tokens, the T5 encoder's output over them and the prompt, the decoder's first
//! logits from `decoder_start_token_id`; then greedy ids through the pipeline and the
//! engine (continuous batching, the encoder's output held as cross-attention K/V).

use iris_e2e::{assert_close, errors, fixture, Golden};
use iris_engine::{Engine, EngineConfig, EngineRequest, GenerateOptions, Pipeline, SamplingParams};
use iris_models::blip2::Blip2;
use iris_models::vlm::VisionLanguageModel;

/// (fixture, relative tolerance, logprob tolerance). T5's attention scores are not
/// scaled by 1/√d: large in the f32 fixture (its weights boosted for a lively golden),
/// they carry f32 rounding into the logits of later positions (up to 6e-5 rel against
/// HF's teacher-forced logits, 3e-4 in a logprob; the first position, whose softmax
/// has one key, at 4e-6).
const CASES: [(&str, f64, f32); 2] = [
    ("blip2-tiny-t5-f32", 1e-4, 5e-4),
    ("blip2-tiny-t5-bf16", 1e-2, 3e-2),
];

#[test]
fn stages_match_hf() {
    for (name, tol, _) in CASES {
        let g = Golden::load(name);
        let m = Blip2::load(&fixture(name), None).unwrap();
        let pv = g.tensor("pixel_values");
        let pv = pv.reshape(&pv.shape()[1..]).unwrap();
        let feats = m.image_features(&pv).unwrap();
        let want = g.tensor("vision_features").to_f32_vec();
        assert_close(name, "vision features", tol, &feats.to_f32_vec(), &want);
        let q = m.query_output(&g.tensor("vision_features")).unwrap();
        let want = g.tensor("qformer_output").to_f32_vec();
        assert_close(name, "qformer output", tol, &q.to_f32_vec(), &want);
        let projected = m.project(&g.tensor("qformer_output")).unwrap();
        let want = g.tensor("projected").to_f32_vec();
        assert_close(name, "projected", tol, &projected.to_f32_vec(), &want);
        let ids = g.ids("prompt_token_ids");
        let t5 = m.t5().unwrap();
        let embeds =
            iris_models::vlm::placeholder_embeds(&m, &ids, &[g.tensor("projected")]).unwrap();
        let encoded = t5.encode(&embeds).unwrap();
        let want = g.tensor("encoder_hidden").to_f32_vec();
        assert_close(name, "encoder output", tol, &encoded.to_f32_vec(), &want);
        // The decoder from its start token, cross-attending to HF's encoder output.
        let lm = m.language_model().unwrap();
        let mut cache = lm.new_cache();
        m.condition(&mut cache, &ids, &[g.tensor("projected")])
            .unwrap();
        let start = g.json["decoder_start_token_id"].as_u64().unwrap() as u32;
        assert_eq!(m.decoder_prompt(&ids), vec![start]);
        let embeds = m.input_embeds(&ids, &[g.tensor("projected")]).unwrap();
        let hidden = lm.forward(&embeds, &mut cache).unwrap();
        let logits = lm.logits(&hidden).unwrap();
        let want = g.tensor("logits").to_f32_vec();
        assert_close(name, "first logits", tol, &logits.to_f32_vec(), &want);
    }
}

#[test]
fn processor_and_greedy_generation_match_hf() {
    for (name, _, logprob_tol) in CASES {
        let g = Golden::load(name);
        let p = Pipeline::load(&fixture(name), &iris_e2e::options()).unwrap();
        let image = std::fs::read(&g.image_paths()[0]).unwrap();
        let prompt = g.json["prompt"].as_str().unwrap();
        let prepared = p
            .processor
            .prepare(prompt, std::slice::from_ref(&image))
            .unwrap();
        assert_eq!(prepared.input_ids, g.ids("prompt_token_ids"), "{name}");
        // The bf16 golden holds the processor's values as the model took them, rounded
        // to bf16: within half a bf16 step of ours (2⁻⁷ for normalized pixels, |v| < 4).
        let (rel, max) = errors(
            &prepared.pixel_values[0].to_f32_vec(),
            &g.tensor("pixel_values").to_f32_vec(),
        );
        let bound = if name.ends_with("bf16") {
            2f64.powi(-7)
        } else {
            1e-5
        };
        assert!(max < bound, "{name}: pixel values rel {rel} max {max}");
        let max_new = g.json["max_new_tokens"].as_u64().unwrap() as usize;
        let out = p
            .generate(prompt, &[image], max_new, SamplingParams::default())
            .unwrap();
        assert_eq!(out.token_ids, g.ids("token_ids"), "{name}: greedy ids");
        let worst = out
            .logprobs
            .iter()
            .zip(g.floats("logprobs"))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: logprobs max abs diff {worst:.2e}");
        assert!(worst <= logprob_tol, "{name}: logprobs off by {worst}");
        assert_eq!(out.text, g.json["text"].as_str().unwrap(), "{name}");
    }
}

/// The engine: requests about two images, greedy and seeded, together in one batch
/// (the encoder's output as cross K/V in the paged arena) give what each gives alone
/// through the pipeline — also when the arena is too small for all of them and
/// sequences are preempted (their encoder runs again on readmission, and only then).
#[test]
fn the_engine_batches_t5_requests_as_the_pipeline_runs_them_alone() {
    let name = "blip2-tiny-t5-f32";
    let p = std::sync::Arc::new(Pipeline::load(&fixture(name), &iris_e2e::options()).unwrap());
    let images: Vec<Vec<u8>> = ["scene.png", "tall.jpg"]
        .iter()
        .map(|f| std::fs::read(fixture("images").join(f)).unwrap())
        .collect();
    let prompts = ["Question: what is in the picture? Answer:", "Describe it."];
    let requests: Vec<EngineRequest> = (0..6)
        .map(|i| {
            let sampling = match i % 3 {
                0 => SamplingParams::default(),
                _ => SamplingParams {
                    temperature: 0.9,
                    top_p: 0.95,
                    seed: i as u64,
                    ..Default::default()
                },
            };
            EngineRequest::new(
                prompts[(i / 2) % 2],
                vec![images[i % 2].clone()],
                GenerateOptions::new(24, sampling),
            )
        })
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            p.generate_with(&r.prompt, &r.images, &r.options)
                .unwrap()
                .token_ids
        })
        .collect();
    for (blocks, expect_preemption) in [(4096, false), (40, true)] {
        let engine = Engine::start(
            p.clone(),
            EngineConfig {
                max_batch: 8,
                kv_blocks: blocks,
                block_size: 4,
                ..Default::default()
            },
        );
        let streams: Vec<_> = requests
            .iter()
            .map(|r| engine.submit(r.clone()).unwrap())
            .collect();
        for (i, s) in streams.into_iter().enumerate() {
            let got = s.collect_blocking().unwrap().token_ids;
            assert_eq!(got, alone[i], "request {i} with {blocks} blocks");
        }
        let stats = engine.stats();
        assert_eq!(stats.preemptions > 0, expect_preemption, "{stats:?}");
        assert_eq!(stats.free_blocks, blocks, "all blocks back: {stats:?}");
        // The encoder ran once per sequence, and once more after each preemption.
        let runs = requests.len() as u64 + stats.preemptions as u64;
        assert_eq!(stats.cross_kv_computed, runs, "{stats:?}");
    }
}

/// The decoder one token at a time over its cache gives what it gives for the same
/// tokens at once (the relative-position bias offset by the cached length).
#[test]
fn decoding_step_by_step_equals_the_tokens_at_once() {
    let name = "blip2-tiny-t5-f32";
    let g = Golden::load(name);
    let m = Blip2::load(&fixture(name), None).unwrap();
    let ids = g.ids("prompt_token_ids");
    let lm = m.language_model().unwrap();
    let mut dec = m.decoder_prompt(&ids);
    dec.extend(g.ids("token_ids"));
    let visual = [g.tensor("projected")];
    let mut whole = lm.new_cache();
    m.condition(&mut whole, &ids, &visual).unwrap();
    let at_once = lm.forward(&lm.embed(&dec).unwrap(), &mut whole).unwrap();
    let mut steps = lm.new_cache();
    m.condition(&mut steps, &ids, &visual).unwrap();
    for (i, &t) in dec.iter().enumerate() {
        let h = lm.forward(&lm.embed(&[t]).unwrap(), &mut steps).unwrap();
        let want = at_once.narrow_rows(i, 1).unwrap().to_f32_vec();
        let (rel, _) = errors(&h.to_f32_vec(), &want);
        assert!(rel < 1e-5, "position {i}: rel {rel:.2e}");
    }
}

/// Prefix caching for an encoder-decoder: a request resumed with tokens it had already
/// produced (as a migrated stream is) prefills its decoder blocks; the same request
/// again reuses them, and continues exactly as the first did, while the same resumed
/// tokens under another image — another encoder input — share nothing (the decoder's
/// block chain starts from the encoder's ids and the image's hash).
#[test]
fn t5_decoder_blocks_are_reused_only_for_the_same_encoder_input() {
    use iris_engine::EncodedPrompt;
    let name = "blip2-tiny-t5-f32";
    let p = std::sync::Arc::new(Pipeline::load(&fixture(name), &iris_e2e::options()).unwrap());
    let prompt = "Question: what is in the picture? Answer:";
    let encoded = |image: &str| {
        let bytes = std::fs::read(fixture("images").join(image)).unwrap();
        let prepared = p
            .processor
            .prepare(prompt, std::slice::from_ref(&bytes))
            .unwrap();
        let visual = p.encode_images(&prepared).unwrap();
        let alone = p
            .generate(prompt, &[bytes], 16, SamplingParams::default())
            .unwrap()
            .token_ids;
        (prepared.input_ids, visual, alone)
    };
    let engine = Engine::start(
        p.clone(),
        EngineConfig {
            kv_blocks: 256,
            block_size: 4,
            ..Default::default()
        },
    );
    let run = |(ids, visual, alone): &(Vec<u32>, Vec<iris_tensor::Tensor>, Vec<u32>)| {
        let mut r = EngineRequest::new(
            String::new(),
            Vec::new(),
            // max_new_tokens counts the resumed tokens too.
            GenerateOptions::new(16, SamplingParams::default()),
        );
        assert!(alone.len() > 8, "the greedy answer runs past 8 tokens");
        r.encoded = Some(EncodedPrompt {
            input_ids: ids.clone(),
            visual: visual.clone(),
            resume: alone[..8].to_vec(),
        });
        let before = engine.stats().prefix_hits;
        let out = engine.submit(r).unwrap().collect_blocking().unwrap();
        (out.token_ids, engine.stats().prefix_hits - before)
    };
    let scene = encoded("scene.png");
    let tall = encoded("tall.jpg");
    // Start token + 8 resumed = 9 decoder tokens: two full blocks of 4 before the last.
    let (first, hits) = run(&scene);
    assert_eq!(hits, 0, "nothing cached yet");
    assert_eq!(
        first,
        scene.2[8..],
        "the resumed request continues as alone"
    );
    let (again, hits) = run(&scene);
    assert_eq!(
        hits, 2,
        "the same encoder input reuses the decoder's two full blocks"
    );
    assert_eq!(again, first);
    let (other, hits) = run(&tall);
    assert_eq!(hits, 0, "another image shares no decoder block");
    assert_eq!(other, tall.2[8..]);
    assert_eq!(
        engine.stats().cross_kv_computed,
        3,
        "the encoder ran once a request"
    );
}
