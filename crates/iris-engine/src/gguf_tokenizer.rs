//! A GGUF file's tokenizer (`tokenizer.ggml.*`) as a HF `tokenizers` one, built the way
//! transformers' GGUF loader converts it: byte-level BPE over the file's tokens and
//! merges (`tokenizer.ggml.model` = `gpt2`), the pre-tokenizer llama.cpp names in
//! `tokenizer.ggml.pre`, control and user-defined tokens as added special tokens, and a
//! BOS prepended when `tokenizer.ggml.add_bos_token` says so.

use iris_models::gguf::{Header, Value};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::{Error, Result};

fn strings<'a>(h: &'a Header, key: &str) -> Result<Vec<&'a str>> {
    match h.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Error::Tokenizer(format!("`{key}` holds a non-string")))
            })
            .collect(),
        _ => Err(Error::Tokenizer(format!(
            "no string array `{key}` in the GGUF"
        ))),
    }
}

/// The GGUF's tokenizer.
pub fn tokenizer(h: &Header) -> Result<Tokenizer> {
    let model = h
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("<none>");
    if model != "gpt2" {
        return Err(Error::Tokenizer(format!(
            "GGUF tokenizer model `{model}`: only byte-level BPE (`gpt2`) is read"
        )));
    }
    let pre = h
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let pre_tokenizer = match pre {
        "default" | "gpt-2" | "gpt2" => byte_level,
        // StarCoder's and SmolLM's: every digit its own piece, then GPT-2's split.
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]
        }),
        other => {
            return Err(Error::Tokenizer(format!(
                "GGUF pre-tokenizer `{other}` is not known here (gpt-2, smollm, starcoder)"
            )))
        }
    };
    let tokens = strings(h, "tokenizer.ggml.tokens")?;
    let merges = strings(h, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match h.get("tokenizer.ggml.token_type") {
        Some(Value::Array(t)) => t.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    // llama.cpp's token types: 3 control, 4 user-defined — the special tokens.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .zip(&types)
        .enumerate()
        .filter(|(_, (_, &ty))| ty == 3 || ty == 4)
        .map(|(i, (t, _))| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let token_id = |k: &str| h.get(k).and_then(Value::as_u64);
    let add_bos = matches!(
        h.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(true))
    );
    let post_processor = match (add_bos, token_id("tokenizer.ggml.bos_token_id")) {
        (true, Some(bos)) => {
            let t = tokens.get(bos as usize).copied().unwrap_or_default();
            json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": t, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {t: {"id": t, "ids": [bos], "tokens": [t]}}
            })
        }
        _ => serde_json::Value::Null,
    };
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    spec.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| Error::Tokenizer(format!("the GGUF's tokenizer: {e}")))
}

/// The GGUF's chat template (`tokenizer.chat_template`).
pub fn chat_template(h: &Header) -> Option<String> {
    h.get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The string of the GGUF's BOS token.
pub fn bos_token(h: &Header) -> Option<String> {
    let id = h.get("tokenizer.ggml.bos_token_id")?.as_u64()? as usize;
    match h.get("tokenizer.ggml.tokens")? {
        Value::Array(t) => t.get(id)?.as_str().map(str::to_string),
        _ => None,
    }
}
