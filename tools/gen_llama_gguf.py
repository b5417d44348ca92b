#!/usr/bin/env python3
"""A LLaMA-architecture GGUF with random weights in a given shape (by default
TinyLlama-1.1B's: hidden 2048, 22 layers, 32 heads / 4 KV heads, FFN 5632, vocabulary
32000), f16, for llama.cpp's llama-bench and llama-quantize (Q8_0, Q4_0, BF16 from it)
in the decode comparisons of tools/bench_vs_llamacpp.sh. A SentencePiece-style
vocabulary of byte tokens and fillers, so llama.cpp loads it; the weights are noise
(speed does not depend on them).

`--type q8_0` (or `q4_0`) writes every matrix (embedding and head included) in that
block format instead of f16, quantized by gguf-py (ggml's rounding), for what needs a
quantized file without llama.cpp's tools (a block-format embedding).

`--tokenizer-from FILE.gguf` takes a byte-level BPE (`gpt2`) tokenizer from another
GGUF instead (SmolLM2's, from scripts/models.sh), cut to the first `--vocab` tokens
and the merges that make them: a real tokenizer Iris loads, for what depends on one
(structured outputs: `iris bench structured`).

Needs numpy and the gguf-py package from the llama.cpp sources (tools/llamacpp.sh
unpacks them: PYTHONPATH=$IRIS_CACHE/llama.cpp-src/gguf-py).
    python3 tools/gen_llama_gguf.py OUT.gguf [--layers 22 --hidden 2048 ...]
"""
import argparse

import numpy as np
import gguf


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokenizer-from", help="a GGUF whose gpt2 tokenizer to take")
    ap.add_argument("--type", choices=["f16", "q8_0", "q4_0"], default="f16")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_context_length(2048)
    w.add_embedding_length(a.hidden)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ffn)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(a.hidden // a.heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    qtype = {
        "f16": None,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[a.type]
    w.add_file_type(
        {
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[a.type]
    )
    if a.tokenizer_from:
        copy_gpt2_tokenizer(w, a.tokenizer_from, a.vocab)
    else:
        tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
        tokens += [f"\u2581t{i}".encode() for i in range(a.vocab - len(tokens))]
        types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (a.vocab - 259)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(a.vocab)])
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

    def mat(n, k):
        m = rng.standard_normal((n, k), dtype=np.float32) * 0.02
        return m.astype(np.float16) if qtype is None else m

    def add(name, m):
        if qtype is None or m.ndim != 2:
            w.add_tensor(name, m)
        else:
            w.add_tensor(name, gguf.quants.quantize(m, qtype), raw_dtype=qtype)

    def norm(n):
        return np.ones(n, dtype=np.float32)

    hd = a.hidden // a.heads
    add("token_embd.weight", mat(a.vocab, a.hidden))
    for l in range(a.layers):
        p = f"blk.{l}."
        w.add_tensor(p + "attn_norm.weight", norm(a.hidden))
        add(p + "attn_q.weight", mat(a.hidden, a.hidden))
        add(p + "attn_k.weight", mat(a.kv_heads * hd, a.hidden))
        add(p + "attn_v.weight", mat(a.kv_heads * hd, a.hidden))
        add(p + "attn_output.weight", mat(a.hidden, a.hidden))
        w.add_tensor(p + "ffn_norm.weight", norm(a.hidden))
        add(p + "ffn_gate.weight", mat(a.ffn, a.hidden))
        add(p + "ffn_up.weight", mat(a.ffn, a.hidden))
        add(p + "ffn_down.weight", mat(a.hidden, a.ffn))
    w.add_tensor("output_norm.weight", norm(a.hidden))
    add("output.weight", mat(a.vocab, a.hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def copy_gpt2_tokenizer(w, path, vocab):
    """The byte-level BPE of `path` cut to its first `vocab` tokens: the merges kept
    are those whose parts and result are all among them."""
    r = gguf.GGUFReader(path)

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key):
        f = r.fields[key]
        return int(f.parts[f.data[0]][0])

    if bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode() != "gpt2":
        raise SystemExit(f"{path}: not a gpt2 (byte-level BPE) tokenizer")
    tokens = strings("tokenizer.ggml.tokens")[:vocab]
    if len(tokens) < vocab:
        raise SystemExit(f"{path} has {len(tokens)} tokens, fewer than {vocab}")
    kept = set(tokens)
    merges = [m for m in strings("tokenizer.ggml.merges")
              if all(p in kept for p in m.split(" ")) and m.replace(" ", "") in kept]
    types = r.fields["tokenizer.ggml.token_type"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode())
    w.add_token_list(tokens)
    w.add_token_types([int(types.parts[i][0]) for i in types.data][:vocab])
    w.add_token_merges(merges)
    for key, add in [("tokenizer.ggml.bos_token_id", w.add_bos_token_id),
                     ("tokenizer.ggml.eos_token_id", w.add_eos_token_id)]:
        if key in r.fields and scalar(key) < vocab:
            add(scalar(key))


if __name__ == "__main__":
    main()
