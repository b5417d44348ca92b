//! IDEFICS (Flamingo) against HF transformers on the tiny fixture: for one image, a
//! three-image few-shot prompt and text only — input ids, which image each token reads,
//! prefill logits within 1e-4 relative, greedy ids and logprobs; vision features and
//! Perceiver output. And the two properties that make it Flamingo: the image changes the
//! output (the gates are open), and a token reads only the latest image before it.

use iris_e2e::{errors, fixture, fixtures, Golden};
use iris_engine::{Pipeline, SamplingParams};
use iris_models::idefics::Idefics;
use iris_tensor::Tensor;

const NAME: &str = "idefics-tiny-f32";

fn image(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join("images").join(name)).unwrap()
}

/// The golden's processor pieces as an Iris prompt (`<image>` markers) and images.
fn prompt_of(case: &serde_json::Value) -> (String, Vec<Vec<u8>>) {
    let mut text = Vec::new();
    let mut images = Vec::new();
    for p in case["pieces"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        if p.ends_with(".png") || p.ends_with(".jpg") {
            text.push("<image>".to_string());
            images.push(image(p));
        } else {
            text.push(p.to_string());
        }
    }
    (text.join(" "), images)
}

/// Prefill logits of a prompt.
fn logits(p: &Pipeline, prompt: &str, images: &[Vec<u8>]) -> (Vec<u32>, Tensor) {
    let prepared = p.processor.prepare(prompt, images).unwrap();
    let visual = p.encode_images(&prepared).unwrap();
    let lm = p.model.language_model().unwrap();
    let mut cache = lm.new_cache();
    p.model
        .condition(&mut cache, &prepared.input_ids, &visual)
        .unwrap();
    let embeds = p.model.input_embeds(&prepared.input_ids, &visual).unwrap();
    let hidden = lm.forward(&embeds, &mut cache).unwrap();
    (prepared.input_ids, lm.logits(&hidden).unwrap())
}

#[test]
fn three_prompts_match_hf() {
    check_prompts(NAME, &["one_image", "few_shot", "text_only"]);
}

/// Per-head q/k norms (cross-attention and resampler), vector gates, a gated layer
/// before every layer: IDEFICS-80B's options.
#[test]
fn qk_norm_variant_matches_hf() {
    check_prompts("idefics-tiny-qknorm-f32", &["one_image", "few_shot"]);
}

fn check_prompts(fixture_name: &str, names: &[&str]) {
    let g = Golden::load(fixture_name);
    let p = Pipeline::load(&fixture(fixture_name), &iris_e2e::options()).unwrap();
    let m = Idefics::load(&fixture(fixture_name), None).unwrap();
    for &name in names {
        let case = &g.json[name];
        let (prompt, images) = prompt_of(case);
        let (ids, got) = logits(&p, &prompt, &images);
        assert_eq!(ids, g.ids_at(name, "input_ids"), "{name}: input ids");
        // Which image each token reads, against HF's image_attention_mask.
        let want: Vec<Option<usize>> = case["image_attention_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .position(|x| x.as_u64() == Some(1) || x.as_bool() == Some(true))
            })
            .collect();
        assert_eq!(m.image_of(&ids), want, "{name}: image per token");
        let (rel, max) = errors(
            &got.to_f32_vec(),
            &g.tensor(&format!("{name}/logits")).to_f32_vec(),
        );
        eprintln!("{name}: logits rel {rel:.2e} max {max:.2e}");
        assert!(rel <= 1e-4, "{name}: logits rel {rel} max {max}");

        let want_ids = g.ids_at(name, "token_ids");
        let out = p
            .generate(&prompt, &images, want_ids.len(), SamplingParams::default())
            .unwrap();
        assert_eq!(out.token_ids, want_ids, "{name}: greedy ids");
        for (a, b) in out
            .logprobs
            .iter()
            .zip(case["logprobs"].as_array().unwrap())
        {
            assert!(
                (*a as f64 - b.as_f64().unwrap()).abs() <= 1e-4,
                "{name}: logprob {a} vs {b}"
            );
        }
    }
}

#[test]
fn vision_and_perceiver_match_hf() {
    let g = Golden::load(NAME);
    let m = Idefics::load(&fixture(NAME), None).unwrap();
    let pv = g.tensor("one_image/pixel_values");
    let pv = pv.reshape(&pv.shape()[1..]).unwrap();
    let feats = m.image_features(&pv).unwrap();
    let (rel, _) = errors(
        &feats.to_f32_vec(),
        &g.tensor("one_image/vision_features").to_f32_vec(),
    );
    assert!(rel <= 1e-4, "vision features rel {rel}");
    let lat = m
        .resample(
            &g.tensor("one_image/vision_features")
                .reshape(feats.shape())
                .unwrap(),
        )
        .unwrap();
    let (rel, _) = errors(
        &lat.to_f32_vec(),
        &g.tensor("one_image/perceiver_output").to_f32_vec(),
    );
    assert!(rel <= 1e-4, "perceiver output rel {rel}");
}

#[test]
fn the_image_matters() {
    let p = Pipeline::load(&fixture(NAME), &iris_e2e::options()).unwrap();
    let prompt = "User: <image> What is in the picture? <image> And here? Assistant:";
    let (ids, a) = logits(&p, prompt, &[image("scene.png"), image("tall.jpg")]);
    let (_, b) = logits(&p, prompt, &[image("tall.jpg"), image("tall.jpg")]);
    let v = a.last_dim();
    let (a, b) = (a.to_f32_vec(), b.to_f32_vec());
    let image_token = p.model.image_token_id();
    let first = ids.iter().position(|&i| i == image_token).unwrap();
    // Before the first image nothing reads an image: identical logits.
    assert_eq!(&a[..first * v], &b[..first * v]);
    // From the first image on, a different first image changes the output (gates open).
    let diff = a[first * v..]
        .iter()
        .zip(&b[first * v..])
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        diff > 1e-3,
        "changing the image changed the logits by only {diff}"
    );
    // Markers and images must match.
    assert!(p
        .processor
        .prepare(prompt, &[image("scene.png")])
        .unwrap_err()
        .is_bad_input());
}

#[test]
fn a_token_reads_only_its_latest_image() {
    let m = Idefics::load(&fixture(NAME), None).unwrap();
    let p = Pipeline::load(&fixture(NAME), &iris_e2e::options()).unwrap();
    let prompt = "A <image> B <image> C </s> D";
    let ids = p
        .processor
        .prepare(prompt, &[image("scene.png"), image("tall.jpg")])
        .unwrap()
        .input_ids;
    let img = p.model.image_token_id();
    let of = m.image_of(&ids);
    let pos: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, &i)| i == img)
        .map(|(k, _)| k)
        .collect();
    assert!(
        of[..pos[0]].iter().all(Option::is_none),
        "nothing before the first image"
    );
    assert!(
        of[pos[0]..pos[1]].iter().all(|&x| x == Some(0)),
        "the first image until the second"
    );
    // The fake token just before the second image still reads the first.
    assert_eq!(of[pos[1] - 1], Some(0));
    let eos = ids.iter().position(|&i| i == 2).unwrap();
    assert!(of[pos[1]..=eos].iter().all(|&x| x == Some(1)));
    assert!(
        of[eos + 1..].iter().all(Option::is_none),
        "nothing after end of sequence"
    );
}
