#!/usr/bin/env python3
"""A LLaVA whose language model is a GGUF file: the f32 LLaVA fixture's vision tower and
projector stay in `model.safetensors`, its LLaMA language model is written by gguf-py as
llama.cpp's converter writes one (llama.cpp's tensor names, q / k rows permuted the way
`convert_hf_to_gguf.py` permutes them), linear weights and the head quantized to Q8_0
by gguf-py's quantizer (`gguf.quants.quantize`), the embedding and norms f32.

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf numpy safetensors
    /tmp/gguf-venv/bin/python tools/gen_llava_gguf_fixture.py \
        tests/fixtures/llava-tiny-hub-f32 tests/fixtures/llava-tiny-hub-gguf
"""
import json
import os
import shutil
import sys

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from safetensors.numpy import load_file, save_file

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for f in ["config.json", "generation_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(os.path.join(src, f), os.path.join(dst, f))
config = json.load(open(os.path.join(src, "config.json")))
text = config["text_config"]
tensors = load_file(os.path.join(src, "model.safetensors"))
save_file({k: v for k, v in tensors.items() if not k.startswith("language_model.")}, os.path.join(dst, "model.safetensors"))

heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]


def permute(w, n_head):
    # convert_hf_to_gguf.py's LlamaModel.permute.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


names = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
w = GGUFWriter(os.path.join(dst, "language_model.gguf"), "llama")
w.add_block_count(text["num_hidden_layers"])
w.add_context_length(text["max_position_embeddings"])
w.add_embedding_length(text["hidden_size"])
w.add_feed_forward_length(text["intermediate_size"])
w.add_head_count(heads)
w.add_head_count_kv(kv_heads)
w.add_rope_dimension_count(text.get("head_dim", text["hidden_size"] // heads))
w.add_layer_norm_rms_eps(text["rms_norm_eps"])
w.add_rope_freq_base(text.get("rope_parameters", {}).get("rope_theta", text.get("rope_theta", 10000.0)))
w.add_vocab_size(text["vocab_size"])


def q8(name, x):
    w.add_tensor(name, gguf.quants.quantize(x.astype(np.float32), GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)


w.add_tensor("token_embd.weight", tensors["language_model.model.embed_tokens.weight"].astype(np.float32))
w.add_tensor("output_norm.weight", tensors["language_model.model.norm.weight"].astype(np.float32))
q8("output.weight", tensors["language_model.lm_head.weight"])
for i in range(text["num_hidden_layers"]):
    for hf, cpp in names.items():
        x = tensors[f"language_model.model.layers.{i}.{hf}"]
        if hf.startswith("self_attn.q_proj"):
            x = permute(x, heads)
        elif hf.startswith("self_attn.k_proj"):
            x = permute(x, kv_heads)
        if x.ndim == 2:
            q8(f"blk.{i}.{cpp}", x)
        else:
            w.add_tensor(f"blk.{i}.{cpp}", x.astype(np.float32))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
