//! A real GGUF checkpoint's header: SmolLM2-135M-Instruct in Q4_1 (LLaMA architecture;
//! `scripts/models.sh` fetches it and the test script sets `IRIS_SMOLLM2_GGUF`). Every
//! tensor is where its type and shape say, inside the file.

use iris_models::gguf;

#[test]
fn smollm2s_gguf_header_reads_whole() {
    let Some(path) = std::env::var_os("IRIS_SMOLLM2_GGUF") else {
        assert!(
            std::env::var_os("IRIS_REQUIRE_MODELS").is_none(),
            "IRIS_SMOLLM2_GGUF is not set (scripts/models.sh prints the path)"
        );
        eprintln!("skipped: IRIS_SMOLLM2_GGUF is not set (scripts/models.sh fetches the file)");
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
