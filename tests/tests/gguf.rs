//! A real GGUF checkpoint: SmolLM2-135M-Instruct in Q4_1 (LLaMA architecture;
//! `scripts/models.sh` fetches it and the test script sets `IRIS_SMOLLM2_GGUF`). Every
//! tensor is where its type and shape say, inside the file; served from its quantized
//! blocks, it gives HF transformers' greedy tokens (transformers' own GGUF loader, run on
//! the weights it dequantizes: `tools/gen_gguf_golden.py`).

use iris_models::gguf;

#[test]
fn smollm2s_gguf_header_reads_whole() {
    let Some(path) = iris_e2e::smollm2_gguf() else {
        return;
    };
    let h = gguf::read(std::path::Path::new(&path)).unwrap();
    let meta = |k: &str| h.get(k).unwrap_or_else(|| panic!("no `{k}`"));
    assert_eq!(meta("general.architecture").as_str(), Some("llama"));
    assert_eq!(meta("llama.block_count").as_u64(), Some(30));
    assert_eq!(meta("llama.embedding_length").as_u64(), Some(576));
    assert_eq!(meta("llama.attention.head_count").as_u64(), Some(9));
    assert_eq!(meta("llama.attention.head_count_kv").as_u64(), Some(3));
    match meta("tokenizer.ggml.tokens") {
        gguf::Value::Array(t) => assert_eq!(t.len(), 49152),
        other => panic!("tokens: {other:?}"),
    }
    // The embedding, nine tensors per layer and the final norm (the output layer is tied).
    assert_eq!(h.tensors.len(), 1 + 30 * 9 + 1);
    let q = |name: &str| h.tensors.iter().find(|t| t.name == name).unwrap();
    assert_eq!(q("token_embd.weight").dims, [576, 49152]);
    assert_eq!(q("blk.0.attn_k.weight").dims, [576, 192]);
    assert_eq!(q("blk.0.ffn_gate.weight").dims, [576, 1536]);
    assert!(h.tensors.iter().any(|t| t.ggml_type.name == "Q4_1"));
    let end = h
        .tensors
        .iter()
        .map(|t| h.data_start + t.offset + t.bytes)
        .max()
        .unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(end <= size && size - end < h.alignment, "{end} vs {size}");
}

/// Greedy generation from the Q4_1 blocks (activations in int16 blocks) against HF's
/// from the dequantized weights in f32: the same prompt ids (the tokenizer rebuilt from
/// the metadata), the same tokens, and log-probs within 2e-3. Measured: at most 6e-4
/// over these prompts; an activation block's int16 rounding is 2⁻¹⁶ of its largest
/// value, against int8's 2⁻⁸ (llama.cpp's), which moved them by up to 0.18 and flipped
/// the chat answer.
#[test]
fn smollm2_from_its_quantized_blocks_gives_hfs_greedy_tokens() {
    let Some(path) = iris_e2e::smollm2_gguf() else {
        return;
    };
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(iris_e2e::fixtures().join("gguf/smollm2-q4_1.json")).unwrap(),
    )
    .unwrap();
    let p = iris_engine::Pipeline::load(&path, &iris_e2e::options()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for case in golden["prompts"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let want = ids(&case["output_ids"]);
        let opts = iris_engine::GenerateOptions::new(24, Default::default());
        let g = p
            .generate_with(case["text"].as_str().unwrap(), &[], &opts)
            .unwrap();
        assert_eq!(
            g.prompt_token_ids,
            ids(&case["input_ids"]),
            "{name}: prompt ids"
        );
        assert_eq!(g.token_ids, want, "{name}: {:?}", g.text);
        assert_eq!(g.text, case["output_text"].as_str().unwrap(), "{name}");
        let worst = g
            .logprobs
            .iter()
            .zip(case["output_logprobs"].as_array().unwrap())
            .map(|(a, b)| (f64::from(*a) - b.as_f64().unwrap()).abs())
            .fold(0f64, f64::max);
        println!("{name}: {:?}, log-probs within {worst:.1e} of HF's", g.text);
        assert!(worst < 2e-3, "{name}: log-probs {worst} from HF's");
    }
    // Its weights stay in their blocks: the bytes read are the file's tensors', each
    // once (the tied embedding's blocks are both the table a lookup dequantizes rows of
    // and the head's weight), not 4 bytes a weight (540 MB).
    let file = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(
        p.bytes_read() <= file,
        "{} of a {file}-byte file",
        p.bytes_read()
    );
}

/// A prompt of more than `quant::GEMM_ROWS` tokens prefilled at once runs its products
/// on the bf16 GEMM (weights dequantized a panel at a time, activations rounded to
/// bf16) and its attention on the bf16 kernel; prefilled 32 tokens a step it stays in
/// integers and f32. Both give the same greedy tokens, and log-probs within bf16's
/// rounding of a 135M model's (measured: 1.4e-2 with f32 attention, 1.8e-2 with bf16).
#[test]
fn smollm2_prefilled_at_once_or_in_small_chunks_agrees() {
    use iris_engine::{Engine, EngineConfig, EngineRequest, TokenEvent};
    let Some(path) = iris_e2e::smollm2_gguf() else {
        return;
    };
    let p = std::sync::Arc::new(iris_engine::Pipeline::load(&path, &iris_e2e::options()).unwrap());
    let text = "The history of the city begins with a small settlement on the river, where \
                traders met to exchange salt, grain and wool. Over the centuries it grew \
                into a market town, then a port, and finally the capital of the region. \
                Its old quarter still keeps the narrow streets of those days. In summary, \
                the city is known for";
    let run = |chunk: usize| -> (Vec<u32>, Vec<f32>, usize) {
        let engine = Engine::start(
            p.clone(),
            EngineConfig {
                prefill_chunk: chunk,
                ..Default::default()
            },
        );
        let stream = engine
            .submit(EngineRequest {
                prompt: text.into(),
                images: vec![],
                options: iris_engine::GenerateOptions::new(16, Default::default()),
                encoded: None,
            })
            .unwrap();
        let (mut ids, mut lps, mut prompt) = (Vec::new(), Vec::new(), 0);
        for ev in stream {
            match ev {
                TokenEvent::Token { id, logprob, .. } => {
                    ids.push(id);
                    lps.push(logprob);
                }
                TokenEvent::Finished {
                    prompt_token_ids, ..
                } => prompt = prompt_token_ids.len(),
                TokenEvent::Error(e) => panic!("{e}"),
                TokenEvent::Admitted { .. } => {}
            }
        }
        (ids, lps, prompt)
    };
    let (gemm, gemm_lps, prompt) = run(4096);
    assert!(
        prompt >= iris_tensor::quant::GEMM_ROWS,
        "{prompt} prompt tokens: the GEMM path needs {}",
        iris_tensor::quant::GEMM_ROWS
    );
    let (ints, int_lps, _) = run(32);
    assert_eq!(gemm, ints, "greedy tokens");
    let worst = gemm_lps
        .iter()
        .zip(&int_lps)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("{prompt} prompt tokens: log-probs within {worst:.1e}");
    assert!(worst < 0.05, "log-probs {worst} apart");
}
