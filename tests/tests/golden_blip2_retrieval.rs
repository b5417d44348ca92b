//! BLIP-2 retrieval against HF transformers: text ids, normalised ITC embeddings of
//! images and texts, ITC similarity and ITM logits / probability within 1e-4.

use iris_e2e::{errors, fixture, fixtures, Golden};
use iris_engine::RetrievalPipeline;

const NAME: &str = "blip2-tiny-retrieval-f32";

#[test]
fn itc_and_itm_match_hf() {
    let g = Golden::load(NAME);
    let p = RetrievalPipeline::load(&fixture(NAME), &iris_e2e::options()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(NAME).join("config.json")).unwrap())
            .unwrap();
    // HF's processor puts the query placeholders first; the model drops them.
    let nq = cfg["num_query_tokens"].as_u64().unwrap() as usize;
    for (i, case) in g.json["cases"].as_array().unwrap().iter().enumerate() {
        let image = std::fs::read(
            fixtures()
                .join("images")
                .join(case["image"].as_str().unwrap()),
        )
        .unwrap();
        let text = case["text"].as_str().unwrap();
        let ids = p.processor.prepare(text, &[]).unwrap().input_ids;
        let want_ids: Vec<u32> = case["input_ids"].as_array().unwrap()[nq..]
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ids, want_ids, "case {i}: text ids");

        let (rel, max) = errors(
            &p.embed_image(&image).unwrap().to_f32_vec(),
            &g.tensor(&format!("image_embeds_{i}")).to_f32_vec(),
        );
        assert!(rel <= 1e-4, "case {i}: image embeds rel {rel} max {max}");
        let (rel, max) = errors(
            &p.embed_text(text).unwrap().to_f32_vec(),
            &g.tensor(&format!("text_embeds_{i}")).to_f32_vec(),
        );
        assert!(rel <= 1e-4, "case {i}: text embeds rel {rel} max {max}");

        let s = p.match_pair(&image, text).unwrap();
        let close = |a: f32, b: f64, what: &str| {
            assert!(
                (a as f64 - b).abs() <= 1e-4,
                "case {i}: {what} {a} vs HF {b}"
            )
        };
        close(
            s.itc_similarity,
            case["itc_similarity"].as_f64().unwrap(),
            "itc",
        );
        close(
            s.itm_probability,
            case["itm_probability"].as_f64().unwrap(),
            "itm probability",
        );
        for (c, want) in case["itm_logits"].as_array().unwrap().iter().enumerate() {
            close(s.itm_logits[c], want.as_f64().unwrap(), "itm logit");
        }
        eprintln!(
            "case {i}: itm {:.6} itc {:.6}",
            s.itm_probability, s.itc_similarity
        );
    }
}

#[test]
fn bad_retrieval_input_is_an_error() {
    let p = RetrievalPipeline::load(&fixture(NAME), &iris_e2e::options()).unwrap();
    assert!(p.embed_text("   ").unwrap_err().is_bad_input());
    assert!(p.embed_image(b"not an image").unwrap_err().is_bad_input());
    let long = "cat ".repeat(500);
    assert!(p.embed_text(&long).unwrap_err().is_bad_input());
}
