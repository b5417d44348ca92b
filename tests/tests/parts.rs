//! Each tier loads only its part: an encoder reads the vision tower's tensors, a
//! connector the projector's / Q-Former's / resampler's, a decoder the language
//! model's — never a tensor of another part (counted from what each load read) — and
//! a part computes what the whole model computes.

use std::collections::BTreeSet;

use iris_e2e::{fixture, fixtures};
use iris_engine::{Family, Parts, Pipeline, PipelineOptions};

const GENERATION: &[&str] = &[
    "llava-tiny-hub-f32",
    "llava-tiny-gqa-bf16",
    "llava-tiny-model-f32",
    "llava-tiny-qwen2-f32",
    "llava-next-tiny-f32",
    "llava-next-tiny-bf16",
    "blip2-tiny-opt-f32",
    "blip2-tiny-t5-f32",
    "blip2-tiny-t5-bf16",
    "idefics-tiny-f32",
    "idefics-tiny-qknorm-f32",
    "blip-tiny-caption-f32",
];

fn read(name: &str, parts: Parts) -> (Pipeline, BTreeSet<String>) {
    let p = Pipeline::load_parts(&fixture(name), &PipelineOptions::default(), parts)
        .unwrap_or_else(|e| panic!("{name} {parts:?}: {e}"));
    let names: BTreeSet<String> = p.tensors_read().iter().cloned().collect();
    assert_eq!(
        names.len(),
        p.tensors_read().len(),
        "{name} {parts:?}: a tensor read twice"
    );
    (p, names)
}

#[test]
fn each_part_reads_only_its_own_tensors() {
    for &name in GENERATION {
        let (_, all) = read(name, Parts::ALL);
        let (_, vision) = read(name, Parts::VISION);
        let (_, connector) = read(name, Parts::CONNECTOR);
        let (_, language) = read(name, Parts::LANGUAGE);
        let family = Family::of_dir(&fixture(name)).unwrap();
        assert!(!vision.is_empty() && !language.is_empty(), "{name}");
        // BLIP's captioner has no connector (its decoder reads the features); IDEFICS
        // fixtures use a Perceiver Resampler.
        assert_eq!(connector.is_empty(), !family.parts().connector, "{name}");
        for (a, b, what) in [
            (&vision, &connector, "vision and connector"),
            (&vision, &language, "vision and language"),
            (&connector, &language, "connector and language"),
        ] {
            let both: Vec<_> = a.intersection(b).collect();
            assert!(both.is_empty(), "{name}: {what} both read {both:?}");
        }
        let union: BTreeSet<String> = vision
            .iter()
            .chain(&connector)
            .chain(&language)
            .cloned()
            .collect();
        assert_eq!(union, all, "{name}: the parts together are the whole model");
        if name.starts_with("llava") {
            let under = |set: &BTreeSet<String>, prefixes: &[&str]| {
                set.iter()
                    .find(|n| !prefixes.iter().any(|p| n.starts_with(p)))
                    .cloned()
            };
            assert_eq!(
                under(&vision, &["vision_tower.", "model.vision_tower."]),
                None
            );
            assert_eq!(
                under(
                    &connector,
                    &[
                        "multi_modal_projector.",
                        "model.multi_modal_projector.",
                        "image_newline",
                        "model.image_newline",
                    ]
                ),
                None
            );
            assert_eq!(
                under(
                    &language,
                    &["language_model.", "model.language_model.", "lm_head."]
                ),
                None
            );
        }
    }
}

#[test]
fn a_part_computes_what_the_whole_model_computes_and_refuses_the_rest() {
    let scene = std::fs::read(fixtures().join("images/scene.png")).unwrap();
    for &name in &[
        "llava-tiny-hub-f32",
        "llava-next-tiny-f32",
        "blip2-tiny-opt-f32",
        "blip2-tiny-t5-f32",
        "idefics-tiny-f32",
    ] {
        let (whole, _) = read(name, Parts::ALL);
        let (encoder, _) = read(name, Parts::VISION);
        let (connector, _) = read(name, Parts::CONNECTOR);
        let (decoder, _) = read(name, Parts::LANGUAGE);
        let (pv, size) = whole.processor.pixel_values(&scene).unwrap();
        let features = encoder.model.image_features(&pv).unwrap();
        assert_eq!(
            features.to_f32_vec(),
            whole.model.image_features(&pv).unwrap().to_f32_vec(),
            "{name}"
        );
        let tokens = connector.model.connect(&features, size).unwrap();
        assert_eq!(
            tokens.to_f32_vec(),
            whole.model.connect(&features, size).unwrap().to_f32_vec(),
            "{name}"
        );
        assert!(decoder.model.language_model().is_ok());
        // Another part's call is an error that says which part is missing.
        let e = encoder
            .model
            .connect(&features, size)
            .unwrap_err()
            .to_string();
        assert!(e.contains("connector") && e.contains("not loaded"), "{e}");
        let e = connector.model.image_features(&pv).unwrap_err().to_string();
        assert!(e.contains("vision encoder"), "{e}");
        let e = encoder.model.language_model().unwrap_err().to_string();
        assert!(e.contains("language model"), "{e}");
        assert!(decoder.model.image_features(&pv).is_err());
    }
}

/// ‖a − b‖ / ‖b‖.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn a_batch_through_the_vit_equals_each_image_alone() {
    let images: Vec<Vec<u8>> = ["scene.png", "tall.jpg", "scene.webp"]
        .iter()
        .map(|n| std::fs::read(fixtures().join("images").join(n)).unwrap())
        .collect();
    for &name in GENERATION {
        let (p, _) = read(name, Parts::VISION);
        let pvs: Vec<_> = images
            .iter()
            .map(|b| p.processor.pixel_values(b).unwrap().0)
            .collect();
        let batch = p
            .model
            .image_features_batch(&pvs.iter().collect::<Vec<_>>())
            .unwrap();
        assert_eq!(batch.len(), pvs.len());
        for (i, (pv, got)) in pvs.iter().zip(&batch).enumerate() {
            let alone = p.model.image_features(pv).unwrap();
            assert_eq!(got.shape(), alone.shape(), "{name} image {i}");
            let (g, a) = (got.to_f32_vec(), alone.to_f32_vec());
            // bf16 models run the packed GEMM (AVX-512 BF16), whose rows do not depend
            // on the batch: bit for bit. f32 matrix products, and bf16 ones without
            // that instruction, may take another kernel for more rows.
            if name.contains("bf16") && iris_tensor::kernels::has_avx512_bf16() {
                assert_eq!(g, a, "{name} image {i}");
            } else {
                let r = rel(&g, &a);
                assert!(r < 1e-6, "{name} image {i}: relative error {r:e}");
            }
        }
    }
}
