//! BLIP-2 (OPT) against HF transformers on the tiny fixture: pixel values, vision
//! features, Q-Former output, projected visual tokens and prefill logits within 1e-4
//! relative (f32), each stage fed HF's input to it; identical greedy ids.

use iris_e2e::{errors, fixture, Golden};
use iris_engine::{Pipeline, SamplingParams};
use iris_models::blip2::Blip2;
use iris_models::vlm::VisionLanguageModel;

const NAME: &str = "blip2-tiny-opt-f32";

fn check(what: &str, got: &[f32], want: &[f32]) {
    let (rel, max) = errors(got, want);
    eprintln!("{NAME}: {what}: rel {rel:.2e} max abs {max:.2e}");
    assert!(
        rel <= 1e-4,
        "{what}: rel error {rel:.3e} (max abs {max:.3e})"
    );
}

#[test]
fn stages_match_hf() {
    let g = Golden::load(NAME);
    let m = Blip2::load(&fixture(NAME), None).unwrap();
    let pv = g.tensor("pixel_values");
    let pv = pv.reshape(&pv.shape()[1..]).unwrap();
    check(
        "vision features",
        &m.image_features(&pv).unwrap().to_f32_vec(),
        &g.tensor("vision_features").to_f32_vec(),
    );
    let q = m.query_output(&g.tensor("vision_features")).unwrap();
    check(
        "qformer output",
        &q.to_f32_vec(),
        &g.tensor("qformer_output").to_f32_vec(),
    );
    let projected = m.project(&g.tensor("qformer_output")).unwrap();
    check(
        "projected",
        &projected.to_f32_vec(),
        &g.tensor("projected").to_f32_vec(),
    );
    let embeds = m
        .input_embeds(&g.ids("prompt_token_ids"), &[g.tensor("projected")])
        .unwrap();
    let lm = m.language_model().unwrap();
    let hidden = lm.forward(&embeds, &mut lm.new_cache()).unwrap();
    check(
        "logits",
        &lm.logits(&hidden).unwrap().to_f32_vec(),
        &g.tensor("logits").to_f32_vec(),
    );
}

#[test]
fn processor_and_greedy_generation_match_hf() {
    let g = Golden::load(NAME);
    let p = Pipeline::load(&fixture(NAME), &iris_e2e::options()).unwrap();
    let image = std::fs::read(&g.image_paths()[0]).unwrap();
    let prompt = g.json["prompt"].as_str().unwrap();
    let prepared = p
        .processor
        .prepare(prompt, std::slice::from_ref(&image))
        .unwrap();
    assert_eq!(prepared.input_ids, g.ids("prompt_token_ids"));
    let (rel, max) = errors(
        &prepared.pixel_values[0].to_f32_vec(),
        &g.tensor("pixel_values").to_f32_vec(),
    );
    assert!(max < 1e-5, "pixel values rel {rel} max {max}");
    // A leading marker means the same thing as none.
    let marked = p
        .processor
        .prepare(&format!("<image>{prompt}"), std::slice::from_ref(&image))
        .unwrap();
    assert_eq!(marked.input_ids, prepared.input_ids);

    let max_new = g.json["max_new_tokens"].as_u64().unwrap() as usize;
    let out = p
        .generate(prompt, &[image], max_new, SamplingParams::default())
        .unwrap();
    assert_eq!(out.token_ids, g.ids("token_ids"));
    let worst = out
        .logprobs
        .iter()
        .zip(g.floats("logprobs"))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "logprobs off by {worst}");
    assert_eq!(out.text, g.json["text"].as_str().unwrap());
}

#[test]
fn one_image_before_the_text() {
    let p = Pipeline::load(&fixture(NAME), &iris_e2e::options()).unwrap();
    let img = std::fs::read(fixture("images").join("scene.png")).unwrap();
    let two = p
        .processor
        .prepare("Compare", &[img.clone(), img.clone()])
        .unwrap_err();
    assert!(
        two.is_bad_input() && two.to_string().contains("one image"),
        "{two}"
    );
    let mid = p
        .processor
        .prepare("a <image> b", std::slice::from_ref(&img))
        .unwrap_err();
    assert!(mid.is_bad_input(), "{mid}");
    let none = p.processor.prepare("<image> a", &[]).unwrap_err();
    assert!(none.is_bad_input(), "{none}");
    // Text only: no placeholders, just the text.
    let text = p.processor.prepare("hello", &[]).unwrap();
    assert!(!text.input_ids.contains(&p.model.image_token_id()));
}
