//! BLIP (v1) against HF transformers: captioning (vision features, first-step logits,
//! greedy ids and logprobs, with and without a text prefix) and retrieval (text ids, ITM
//! logits / probability, ITC similarity), f32 within 1e-4.

use iris_e2e::{errors, fixture, fixtures, Golden};
use iris_engine::{Pipeline, RetrievalPipeline, SamplingParams};

#[test]
fn captioning_matches_hf() {
    let name = "blip-tiny-caption-f32";
    let g = Golden::load(name);
    let p = Pipeline::load(&fixture(name), &iris_e2e::options()).unwrap();
    let image = std::fs::read(
        fixtures()
            .join("images")
            .join(g.json["image"].as_str().unwrap()),
    )
    .unwrap();
    for (i, case) in g.json["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = case["prompt"].as_str().unwrap();
        let prepared = p
            .processor
            .prepare(prompt, std::slice::from_ref(&image))
            .unwrap();
        let visual = p.encode_images(&prepared).unwrap();
        if i == 0 {
            let (rel, max) = errors(
                &visual[0].to_f32_vec(),
                &g.tensor("vision_features").to_f32_vec(),
            );
            assert!(rel <= 1e-4, "vision features rel {rel} max {max}");
        }
        let lm = p.model.language_model().unwrap();
        let mut cache = lm.new_cache();
        p.model
            .condition(&mut cache, &prepared.input_ids, &visual)
            .unwrap();
        let embeds = p.model.input_embeds(&prepared.input_ids, &visual).unwrap();
        let hidden = lm.forward(&embeds, &mut cache).unwrap();
        let logits = lm
            .logits(&hidden.narrow_rows(hidden.rows() - 1, 1).unwrap())
            .unwrap();
        let (rel, max) = errors(
            &logits.to_f32_vec(),
            &g.tensor(&format!("first_logits_{i}")).to_f32_vec(),
        );
        assert!(
            rel <= 1e-4,
            "case {i}: first-step logits rel {rel} max {max}"
        );

        let want: Vec<u32> = case["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let out = p
            .generate(
                prompt,
                std::slice::from_ref(&image),
                want.len(),
                SamplingParams::default(),
            )
            .unwrap();
        assert_eq!(out.token_ids, want, "case {i}: greedy ids");
        // HF's sequence is the caption prefix followed by the new tokens.
        let seq: Vec<u32> = case["sequence"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            &seq[..seq.len() - want.len()],
            &out.prompt_token_ids[..],
            "case {i}: prefix ids"
        );
        for (a, b) in out
            .logprobs
            .iter()
            .zip(case["logprobs"].as_array().unwrap())
        {
            assert!(
                (*a as f64 - b.as_f64().unwrap()).abs() <= 1e-4,
                "case {i}: logprob {a} vs {b}"
            );
        }
    }
}

#[test]
fn retrieval_matches_hf() {
    let name = "blip-tiny-retrieval-f32";
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap())
            .unwrap();
    let p = RetrievalPipeline::load(&fixture(name), &iris_e2e::options()).unwrap();
    for (i, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let image = std::fs::read(
            fixtures()
                .join("images")
                .join(case["image"].as_str().unwrap()),
        )
        .unwrap();
        let text = case["text"].as_str().unwrap();
        let ids = p.processor.prepare(text, &[]).unwrap().input_ids;
        let want: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want, "case {i}: text ids");
        let s = p.match_pair(&image, text).unwrap();
        let close = |a: f32, b: &serde_json::Value, what: &str| {
            let b = b.as_f64().unwrap();
            assert!(
                (a as f64 - b).abs() <= 1e-4,
                "case {i}: {what} {a} vs HF {b}"
            );
        };
        close(
            s.itm_probability,
            &case["itm_probability"],
            "itm probability",
        );
        close(s.itc_similarity, &case["itc_similarity"], "itc");
        close(s.itm_logits[0], &case["itm_logits"][0], "itm logit 0");
        close(s.itm_logits[1], &case["itm_logits"][1], "itm logit 1");
    }
}
