//! Iris against HF transformers on the tiny LLaVA fixtures: pixel values within one
//! uint8 step, vision features / projector output / logits within 1e-4 relative (f32)
//! or 1e-2 (bf16), identical greedy ids, logprobs within tolerance.

use iris_e2e::{errors, fixture, Golden};
use iris_engine::{Pipeline, PipelineOptions, SamplingParams};
use iris_image::ImageLimits;
use iris_models::llava::Llava;
use iris_models::vlm::VisionLanguageModel;
use iris_tensor::{DType, Tensor};

const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
const SIGLIP_STD: [f32; 3] = [0.5; 3];

struct Case {
    name: &'static str,
    rel_tol: f64,
    logprob_tol: f32,
    /// The image processor's std (a uint8 step in normalized units is 1/255/std).
    std: [f32; 3],
}

const CASES: [Case; 6] = [
    Case {
        name: "llava-tiny-hub-f32",
        rel_tol: 1e-4,
        logprob_tol: 1e-4,
        std: CLIP_STD,
    },
    Case {
        name: "llava-tiny-gqa-bf16",
        rel_tol: 1e-2,
        logprob_tol: 3e-2,
        std: CLIP_STD,
    },
    Case {
        name: "llava-tiny-model-f32",
        rel_tol: 1e-4,
        logprob_tol: 1e-4,
        std: CLIP_STD,
    },
    Case {
        name: "llava-tiny-qwen2-f32",
        rel_tol: 1e-4,
        logprob_tol: 1e-4,
        std: CLIP_STD,
    },
    // SigLIP tower (no class token, exact resize, mean/std 0.5) + Qwen2.
    Case {
        name: "llava-tiny-siglip-qwen2-f32",
        rel_tol: 1e-4,
        logprob_tol: 1e-4,
        std: SIGLIP_STD,
    },
    // The same at bf16, layer -2, strategy "default" (HF drops the first patch).
    Case {
        name: "llava-tiny-siglip-qwen2-bf16",
        rel_tol: 1e-2,
        logprob_tol: 3e-2,
        std: SIGLIP_STD,
    },
];

fn pipeline(name: &str) -> Pipeline {
    Pipeline::load(&fixture(name), &iris_e2e::options()).expect("fixture loads")
}

fn images(g: &Golden) -> Vec<Vec<u8>> {
    g.image_paths()
        .iter()
        .map(|p| std::fs::read(p).expect("image"))
        .collect()
}

fn check(what: &str, case: &Case, got: &[f32], want: &[f32]) {
    let (rel, max) = errors(got, want);
    eprintln!("{}: {what}: rel {rel:.2e} max abs {max:.2e}", case.name);
    assert!(
        rel <= case.rel_tol,
        "{}: {what} rel error {rel:.3e} > {:.0e} (max abs {max:.3e})",
        case.name,
        case.rel_tol
    );
}

#[test]
fn pixel_values_within_one_uint8_step() {
    for case in &CASES {
        let g = Golden::load(case.name);
        let p = pipeline(case.name);
        let prepared = p
            .processor
            .prepare(g.json["prompt"].as_str().unwrap(), &images(&g))
            .unwrap();
        let want = g.tensor("pixel_values");
        let got: Vec<f32> = prepared
            .pixel_values
            .iter()
            .flat_map(|t| t.to_f32_vec())
            .collect();
        let want = want.to_f32_vec();
        assert_eq!(got.len(), want.len(), "{}: pixel value count", case.name);
        let plane = got.len() / (3 * prepared.pixel_values.len());
        let mut worst = 0f32;
        let mut off = 0usize;
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let c = (i / plane) % 3;
            let steps = (a - b).abs() * case.std[c] * 255.0;
            worst = worst.max(steps);
            if steps > 0.01 {
                off += 1;
            }
        }
        eprintln!(
            "{}: pixel values: worst {worst:.3} uint8 steps, {off} of {} values off",
            case.name,
            got.len()
        );
        assert!(
            worst <= 1.001,
            "{}: pixel values off by {worst} uint8 steps",
            case.name
        );
        assert_eq!(
            prepared.input_ids,
            g.ids("prompt_token_ids"),
            "{}: input_ids",
            case.name
        );
    }
}

/// Vision features, projector output and prefill logits, each from the golden inputs
/// of its stage so a difference is attributed to the stage that made it.
#[test]
fn model_stages_match_hf() {
    for case in &CASES {
        let g = Golden::load(case.name);
        let m = Llava::load(&fixture(case.name), None, iris_comm::single()).unwrap();
        let pv = g.tensor("pixel_values");
        let n = pv.shape()[0];
        let per = pv.elem_count() / n;
        let pvs: Vec<Tensor> = (0..n)
            .map(|i| {
                Tensor::from_f32(
                    pv.to_f32_vec()[i * per..(i + 1) * per].to_vec(),
                    &pv.shape()[1..],
                )
                .unwrap()
            })
            .collect();
        let feats: Vec<Tensor> = pvs.iter().map(|t| m.image_features(t).unwrap()).collect();
        let got: Vec<f32> = feats.iter().flat_map(|t| t.to_f32_vec()).collect();
        check(
            "vision features",
            case,
            &got,
            &g.tensor("vision_features").to_f32_vec(),
        );

        let want_feats = g.tensor("vision_features");
        let rows = want_feats.elem_count() / n / want_feats.last_dim();
        let visual: Vec<Tensor> = (0..n)
            .map(|i| {
                let f = want_feats
                    .reshape(&[n * rows, want_feats.last_dim()])
                    .unwrap()
                    .narrow_rows(i * rows, rows)
                    .unwrap();
                m.project(&f).unwrap()
            })
            .collect();
        let got: Vec<f32> = visual.iter().flat_map(|t| t.to_f32_vec()).collect();
        check(
            "projector output",
            case,
            &got,
            &g.tensor("projector_output").to_f32_vec(),
        );

        let ids = g.ids("prompt_token_ids");
        let embeds = m.input_embeds(&ids, &visual).unwrap();
        let lm = m.llama().unwrap();
        let hidden = lm.forward(&embeds, &mut lm.new_cache()).unwrap();
        let logits = lm.logits(&hidden).unwrap();
        check(
            "logits",
            case,
            &logits.to_f32_vec(),
            &g.tensor("logits").to_f32_vec(),
        );
    }
}

#[test]
fn greedy_generation_matches_hf() {
    for case in &CASES {
        let g = Golden::load(case.name);
        let p = pipeline(case.name);
        let max_new = g.json["max_new_tokens"].as_u64().unwrap() as usize;
        let out = p
            .generate(
                g.json["prompt"].as_str().unwrap(),
                &images(&g),
                max_new,
                SamplingParams::default(),
            )
            .unwrap();
        assert_eq!(
            out.token_ids,
            g.ids("token_ids"),
            "{}: greedy ids",
            case.name
        );
        let want = g.floats("logprobs");
        let worst = out
            .logprobs
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{}: logprobs max abs diff {worst:.2e}", case.name);
        assert!(
            worst <= case.logprob_tol,
            "{}: logprobs off by {worst}",
            case.name
        );
        assert_eq!(
            out.text,
            g.json["text"].as_str().unwrap(),
            "{}: text",
            case.name
        );
    }
}

#[test]
fn bf16_checkpoint_runs_in_f32_when_asked() {
    let g = Golden::load("llava-tiny-gqa-bf16");
    let opts = PipelineOptions {
        dtype: Some(DType::F32),
        limits: ImageLimits::default(),
        device: iris_e2e::test_device(),
        quantize: None,
    };
    let p = Pipeline::load(&fixture("llava-tiny-gqa-bf16"), &opts).unwrap();
    assert_eq!(p.model.dtype(), DType::F32);
    let out = p
        .generate(
            g.json["prompt"].as_str().unwrap(),
            &images(&g),
            4,
            SamplingParams::default(),
        )
        .unwrap();
    assert_eq!(out.token_ids.len(), 4);
}
