#!/usr/bin/env python3
"""A Python reference for a real GGUF model (SmolLM2-135M-Instruct, Q4_1 linears, Q8_0
embedding), made with HF transformers' own GGUF loader (`gguf_file=`), for the Rust
GGUF loader / dequantizer / tokenizer / decoder tests.

It writes one JSON file with:

- "tokenizer": what HF builds from the GGUF vocabulary (class, bos/eos ids, the
  backend's normalizer / pre_tokenizer / decoder / post_processor and model type, the
  added tokens, the chat template) and the GGUF keys `tokenizer.ggml.pre` and
  `tokenizer.ggml.add_bos_token`; plus "digit_runs": texts with multi-digit numbers
  tokenized by HF's GGUF tokenizer and by the same BPE with the original SmolLM2
  pre-tokenizer (Digits(individual_digits) then ByteLevel), which is what llama.cpp's
  `smollm` pre-type does (`\\p{N}` split first) and HF's GGUF converter drops.
- "prompts": a chat case (apply_chat_template, generation prompt) and three raw texts,
  each with `tok(text).input_ids` and `tok(text, add_special_tokens=False).input_ids`,
  HF's greedy `generate` of 24 new tokens from `tok(text).input_ids`, the decoded
  text, each generated token's log-softmax logprob (float64, from one forward pass over
  prompt + output) and the top-5 at the first generated position.
- "weights": for four parameters, the GGUF tensor and ggml type they come from, the
  shape, float64 sum and sum of squares, and rows [0, 1, 2, 32, 33, 63, 64, last] x columns 0..8 of
  HF's tensor (Q/K un-permuted) and of the GGUF tensor as dequantized (not un-permuted).
- "config": the model config entries a decoder needs, and the library versions.

Floats are rounded to 7 significant digits (sums to 10). One torch thread.

    bash scripts/models.sh          # prints the GGUF path
    /work/pyenv/bin/python tools/gen_gguf_golden.py GGUF_PATH tests/fixtures/gguf/smollm2-q4_1.json

The environment: torch (CPU), transformers==5.24.0, gguf, accelerate (transformers
requires it for `gguf_file=`), numpy, sentencepiece, protobuf.
"""
import json
import os
import sys

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

MAX_NEW = 24
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = ["The capital of France is", "Once upon a time, there was a little", "1, 2, 3, 4, 5,"]
DIGIT_TEXTS = ["In 2024, 12345 people paid $3.50 each.", "1234567890", "x=100; y=-2.75e10"]
WEIGHTS = {
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    "model.embed_tokens.weight": "token_embd.weight",
}
COLS = 8


def r7(x):
    return float(f"{float(x):.7g}")


def r10(x):
    return float(f"{float(x):.10g}")


def gguf_value(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.contents()
    return v


def tokenizer_section(tok, reader):
    j = json.loads(tok.backend_tokenizer.to_str())
    added = [{"id": a["id"], "content": a["content"], "special": a["special"]} for a in j.get("added_tokens", [])]
    return {
        "class": type(tok).__name__,
        "bos_token_id": tok.bos_token_id,
        "bos_token": tok.bos_token,
        "eos_token_id": tok.eos_token_id,
        "eos_token": tok.eos_token,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "vocab_size": len(tok),
        "normalizer": j.get("normalizer"),
        "pre_tokenizer": j.get("pre_tokenizer"),
        "decoder": j.get("decoder"),
        "post_processor": j.get("post_processor"),
        "model_type": j["model"]["type"],
        "added_tokens": added,
        "chat_template": tok.chat_template,
        "gguf_tokenizer_ggml_model": gguf_value(reader, "tokenizer.ggml.model"),
        "gguf_tokenizer_ggml_pre": gguf_value(reader, "tokenizer.ggml.pre"),
        "gguf_tokenizer_ggml_add_bos_token": gguf_value(reader, "tokenizer.ggml.add_bos_token"),
        "gguf_tokenizer_ggml_add_space_prefix": gguf_value(reader, "tokenizer.ggml.add_space_prefix"),
    }


def digit_runs(tok):
    from tokenizers import Tokenizer, pre_tokenizers

    split = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    split.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    out = []
    for text in DIGIT_TEXTS:
        out.append({
            "text": text,
            "hf_gguf_ids": tok(text, add_special_tokens=False).input_ids,
            "digits_split_ids": split.encode(text, add_special_tokens=False).ids,
        })
    return {
        "note": "hf_gguf_ids: HF's GGUF tokenizer (ByteLevel regex only). digits_split_ids: the same "
                "vocabulary and merges with Digits(individual_digits=True) before ByteLevel, as the original "
                "SmolLM2 tokenizer.json and llama.cpp's 'smollm' pre-type (\\p{N} split first) do.",
        "cases": out,
    }


@torch.no_grad()
def run_case(model, tok, name, text, chat=None):
    with_special = tok(text).input_ids
    without = tok(text, add_special_tokens=False).input_ids
    ids = torch.tensor([with_special], dtype=torch.long)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    out = gen[0, ids.shape[1]:].tolist()
    logits = model(gen, attention_mask=torch.ones_like(gen)).logits[0].to(torch.float64)
    lp = torch.log_softmax(logits, dim=-1)
    p = ids.shape[1]
    token_lp = [r7(lp[p - 1 + i, t]) for i, t in enumerate(out)]
    argmax = lp[p - 1:p - 1 + len(out)].argmax(-1).tolist()
    top = torch.topk(lp[p - 1], 5)
    case = {
        "name": name,
        "text": text,
        "input_ids": with_special,
        "input_ids_no_special": without,
        "generate_from": "input_ids (tok(text).input_ids)",
        "max_new_tokens": MAX_NEW,
        "output_ids": out,
        "stopped_at_eos": len(out) < MAX_NEW,
        "output_text": tok.decode(out, skip_special_tokens=True),
        "output_logprobs": token_lp,
        "forward_argmax_matches_generate": argmax == out,
        "first_top5_ids": top.indices.tolist(),
        "first_top5_logprobs": [r7(v) for v in top.values.tolist()],
    }
    if chat is not None:
        case = {"messages": chat, "add_generation_prompt": True, **case}
    return case


def rows_of(t):
    # 0, 63, 64 and the last row are fixed points of llama.cpp's Q/K row permutation (per
    # 64-row head: GGUF row 2j+h holds HF row 32h+j); 1, 2, 32 and 33 are not.
    n = t.shape[0]
    return [i for i in (0, 1, 2, 32, 33, 63, 64, n - 1) if i < n]


def unpermute(w, n_head):
    """llama.cpp's convert_hf_to_gguf `permute` undone, as transformers' LlamaTensorProcessor does."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def weights_section(model, reader):
    cfg = model.config
    heads = {"blk.0.attn_q.weight": cfg.num_attention_heads, "blk.0.attn_k.weight": cfg.num_key_value_heads}
    sd = model.state_dict()
    by_name = {t.name: t for t in reader.tensors}
    out = {}
    for hf_name, gguf_name in WEIGHTS.items():
        w = sd[hf_name].detach().to(torch.float64)
        t = by_name[gguf_name]
        raw = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        rows = rows_of(w)
        expect = unpermute(raw, heads[gguf_name]) if gguf_name in heads else raw
        out[hf_name] = {
            "gguf_tensor": gguf_name,
            "ggml_type": GGMLQuantizationType(t.tensor_type).name,
            "gguf_ne": [int(x) for x in t.shape],
            "shape": list(w.shape),
            "sum": r10(w.sum()),
            "sum_sq": r10((w * w).sum()),
            "rows": rows,
            "cols": list(range(COLS)),
            "values": [[r7(v) for v in w[i, :COLS].tolist()] for i in rows],
            "gguf_dequantized_values": [[r7(v) for v in raw[i, :COLS].tolist()] for i in rows],
            "unpermuted": gguf_name in heads,
            "hf_equals_gguf_dequantized_unpermuted": bool(np.array_equal(w.numpy(), expect)),
        }
    return out


def config_section(model):
    c = model.config.to_dict()
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling", "vocab_size",
            "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
            "hidden_act", "model_type"]
    out = {k: c[k] for k in keys if k in c}
    out["lm_head_tied_to_embed_tokens"] = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "gguf": _version("gguf"), "tokenizers": _version("tokenizers"), "numpy": np.__version__}
    return out


def _version(pkg):
    from importlib.metadata import version
    return version(pkg)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, out_path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    d, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    reader = GGUFReader(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=base)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=base, dtype=torch.float32).eval()

    prompts = []
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompts.append(run_case(model, tok, "chat", text, chat=CHAT))
    for i, t in enumerate(TEXTS):
        prompts.append(run_case(model, tok, f"raw{i + 1}", t))

    doc = {
        "model_file": base,
        "loader": "transformers AutoTokenizer/AutoModelForCausalLM.from_pretrained(gguf_file=...), float32, eval",
        "tokenizer": tokenizer_section(tok, reader),
        "digit_runs": digit_runs(tok),
        "prompts": prompts,
        "weights": weights_section(model, reader),
        "config": config_section(model),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    for c in prompts:
        print(c["name"], len(c["input_ids"]), "->", len(c["output_ids"]), repr(c["output_text"]))


if __name__ == "__main__":
    main()
