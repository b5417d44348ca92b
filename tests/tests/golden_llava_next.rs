//! Iris against HF transformers on the tiny LLaVA-NeXT fixtures (tools/gen_llava_fixtures.py):
//! each image tiled to the best of `image_grid_pinpoints` (pixel values within one uint8
//! step, the tile count exact), the placeholder count HF's processor gives for every size
//! (from the image's header alone, as the gateway counts), vision features per tile,
//! the packed visual tokens (projected, unpadded, `image_newline` rows) and logits within
//! 1e-4 relative (f32) or 1e-2 (bf16), identical greedy ids.

use iris_e2e::{assert_close, fixture, Golden};
use iris_engine::{Pipeline, SamplingParams};
use iris_models::config::{ImageSize, LlavaConfig};
use iris_models::llava::Llava;
use iris_models::vlm::VisionLanguageModel;

const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// (fixture, relative tolerance, logprob tolerance)
const CASES: [(&str, f64, f32); 2] = [
    ("llava-next-tiny-f32", 1e-4, 1e-4),
    ("llava-next-tiny-bf16", 1e-2, 3e-2),
];

fn images(g: &Golden) -> Vec<Vec<u8>> {
    g.image_paths()
        .iter()
        .map(|p| std::fs::read(p).expect("image"))
        .collect()
}

fn sizes(g: &Golden) -> Vec<ImageSize> {
    g.json["image_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| ImageSize {
            height: s[0].as_u64().unwrap() as usize,
            width: s[1].as_u64().unwrap() as usize,
        })
        .collect()
}

#[test]
fn tiles_and_placeholders_match_hf() {
    for (name, _, _) in CASES {
        let g = Golden::load(name);
        let p = Pipeline::load(&fixture(name), &iris_e2e::options()).unwrap();
        let files = images(&g);
        let prompt = g.json["prompt"].as_str().unwrap();
        let prepared = p.processor.prepare(prompt, &files).unwrap();
        assert_eq!(prepared.image_sizes, sizes(&g), "{name}: sizes");
        assert_eq!(
            prepared.input_ids,
            g.ids("prompt_token_ids"),
            "{name}: input_ids"
        );
        // The gateway's count: sizes from the headers, no pixel decoded.
        let headers: Vec<ImageSize> = files
            .iter()
            .map(|f| p.processor.image_size(f).unwrap())
            .collect();
        assert_eq!(
            p.processor.tokenize(prompt, &headers).unwrap(),
            g.ids("prompt_token_ids"),
            "{name}: input_ids from the headers"
        );
        for (i, got) in prepared.pixel_values.iter().enumerate() {
            let want = g.tensor(&format!("pixel_values_{i}"));
            assert_eq!(got.shape(), want.shape(), "{name}: image {i}'s tiles");
            let plane = want.shape()[2] * want.shape()[3];
            let (got, want) = (got.to_f32_vec(), want.to_f32_vec());
            let worst = got
                .iter()
                .zip(&want)
                .enumerate()
                .map(|(j, (a, b))| (a - b).abs() * CLIP_STD[(j / plane) % 3] * 255.0)
                .fold(0f32, f32::max);
            eprintln!("{name}: image {i}: pixel values worst {worst:.3} uint8 steps");
            assert!(
                worst <= 1.001,
                "{name}: image {i} off by {worst} uint8 steps"
            );
        }
        // HF's processor's count for a spread of sizes, thin to huge.
        let tokens = LlavaConfig::from_value(
            &iris_models::config::read_json(&fixture(name).join("config.json")).unwrap(),
        )
        .unwrap()
        .image_tokens()
        .unwrap();
        for c in g.json["token_counts"].as_array().unwrap() {
            let size = ImageSize {
                height: c[0].as_u64().unwrap() as usize,
                width: c[1].as_u64().unwrap() as usize,
            };
            assert_eq!(
                tokens.count(size) as u64,
                c[2].as_u64().unwrap(),
                "{name}: {size:?}"
            );
        }
    }
}

/// Vision features of each image's tiles, its packed visual tokens and the prefill
/// logits, each from the golden inputs of its stage.
#[test]
fn model_stages_match_hf() {
    for (name, tol, _) in CASES {
        let g = Golden::load(name);
        let m = Llava::load(&fixture(name), None, iris_comm::single()).unwrap();
        let mut visual = Vec::new();
        for (i, size) in sizes(&g).into_iter().enumerate() {
            let pv = g.tensor(&format!("pixel_values_{i}"));
            let feats = m.image_features(&pv).unwrap();
            let want = g.tensor(&format!("vision_features_{i}"));
            let what = format!("image {i}: vision features");
            assert_close(name, &what, tol, &feats.to_f32_vec(), &want.to_f32_vec());
            let want_rows = want.reshape(&[want.elem_count() / want.last_dim(), want.last_dim()]);
            let tokens = m.connect(&want_rows.unwrap(), size).unwrap();
            let want = g.tensor(&format!("image_features_{i}"));
            assert_eq!(tokens.shape(), want.shape(), "{name}: image {i} tokens");
            assert_eq!(m.visual_shape(size), [want.shape()[0], want.shape()[1]]);
            let what = format!("image {i}: visual tokens");
            assert_close(name, &what, tol, &tokens.to_f32_vec(), &want.to_f32_vec());
            visual.push(want);
        }
        let ids = g.ids("prompt_token_ids");
        let embeds = m.input_embeds(&ids, &visual).unwrap();
        let lm = m.llama().unwrap();
        let hidden = lm.forward(&embeds, &mut lm.new_cache()).unwrap();
        let logits = lm.logits(&hidden).unwrap();
        let want = g.tensor("logits").to_f32_vec();
        assert_close(name, "logits", tol, &logits.to_f32_vec(), &want);
    }
}

#[test]
fn greedy_generation_matches_hf() {
    for (name, _, logprob_tol) in CASES {
        let g = Golden::load(name);
        let p = Pipeline::load(&fixture(name), &iris_e2e::options()).unwrap();
        let max_new = g.json["max_new_tokens"].as_u64().unwrap() as usize;
        let prompt = g.json["prompt"].as_str().unwrap();
        let out = p
            .generate(prompt, &images(&g), max_new, SamplingParams::default())
            .unwrap();
        assert_eq!(out.token_ids, g.ids("token_ids"), "{name}: greedy ids");
        let worst = out
            .logprobs
            .iter()
            .zip(&g.floats("logprobs"))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{name}: logprobs max abs diff {worst:.2e}");
        assert!(worst <= logprob_tol, "{name}: logprobs off by {worst}");
        assert_eq!(out.text, g.json["text"].as_str().unwrap(), "{name}: text");
    }
}

/// A config whose tiles' tokens cannot form a grid (the class token kept) is refused
/// at load with the reason, as are pinpoints that are not whole tiles.
#[test]
fn configs_that_cannot_tile_are_refused() {
    let dir = fixture("llava-next-tiny-f32");
    let base = iris_models::config::read_json(&dir.join("config.json")).unwrap();
    let mut full = base.clone();
    full["vision_feature_select_strategy"] = "full".into();
    let e = LlavaConfig::from_value(&full)
        .unwrap()
        .image_tokens()
        .unwrap_err()
        .to_string();
    assert!(e.contains("5x5"), "{e}");
    let mut odd = base.clone();
    odd["image_grid_pinpoints"] = serde_json::json!([[30, 45]]);
    let e = LlavaConfig::from_value(&odd)
        .unwrap()
        .image_tokens()
        .unwrap_err()
        .to_string();
    assert!(e.contains("[30, 45]"), "{e}");
    let mut bad = base;
    bad["image_grid_pinpoints"] = serde_json::json!([[30]]);
    assert!(LlavaConfig::from_value(&bad).is_err());
}
