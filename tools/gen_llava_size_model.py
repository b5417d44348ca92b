#!/usr/bin/env python3
"""A LLaVA-1.5 checkpoint of real size with random bf16 weights (not committed): CLIP
ViT-L/14-336 (LLaVA-1.5's vision tower, 304M parameters), the 2-layer MLP projector, and
a TinyLlama-1.1B language model (22 layers, hidden 2048, GQA 32/4, vocab 32000), in the
hub layout. For measuring what each tier holds in memory (`tools/tier_memory.sh`) and
serving (`tools/bench_serving.sh`); the tokenizer and processor are the tiny fixture's,
resized to 336 pixels, and the LM head's rows of ids that are not text (past the
tokenizer's 300, its <unk> <s> </s> and "▁") are zero, so greedy output is visible text that
runs to max_tokens.

    python tools/gen_llava_size_model.py /tmp/llava-size      # ~2.8 GB
    python tools/gen_llava_size_model.py /tmp/llava-many --many-layers   # ~340 MB

`--many-layers` makes the model of the KV-budget issue instead: a language model of
1,200 small layers (hidden 96, 6 heads of 16, 2 KV heads, MLP 160, context 2048, f32,
340 MB) behind the tiny fixture's vision tower — little weight, a lot of KV per token.

The config comes from transformers' own config classes; the weights are written
tensor by tensor with numpy (normal, std 0.02; norm weights 1), so no 4 GB f32 model
is built in memory.
"""
import json
import os
import shutil
import struct
import sys

import numpy as np
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                       "llava-tiny-hub-f32")


def shapes(vc, tc):
    d, i, p = vc.hidden_size, vc.intermediate_size, vc.patch_size
    v = "vision_tower.vision_model"
    out = [
        (f"{v}.embeddings.patch_embedding.weight", [d, 3, p, p]),
        (f"{v}.embeddings.class_embedding", [d]),
        (f"{v}.embeddings.position_embedding.weight", [(vc.image_size // p) ** 2 + 1, d]),
        (f"{v}.pre_layrnorm.weight", [d]), (f"{v}.pre_layrnorm.bias", [d]),
        (f"{v}.post_layernorm.weight", [d]), (f"{v}.post_layernorm.bias", [d]),
    ]
    for l in range(vc.num_hidden_layers):
        pre = f"{v}.encoder.layers.{l}"
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"]:
            out += [(f"{pre}.self_attn.{proj}.weight", [d, d]), (f"{pre}.self_attn.{proj}.bias", [d])]
        for n in ["layer_norm1", "layer_norm2"]:
            out += [(f"{pre}.{n}.weight", [d]), (f"{pre}.{n}.bias", [d])]
        out += [(f"{pre}.mlp.fc1.weight", [i, d]), (f"{pre}.mlp.fc1.bias", [i]),
                (f"{pre}.mlp.fc2.weight", [d, i]), (f"{pre}.mlp.fc2.bias", [d])]
    h = tc.hidden_size
    out += [("multi_modal_projector.linear_1.weight", [h, d]), ("multi_modal_projector.linear_1.bias", [h]),
            ("multi_modal_projector.linear_2.weight", [h, h]), ("multi_modal_projector.linear_2.bias", [h])]
    kv = tc.num_key_value_heads * (h // tc.num_attention_heads)
    m = "language_model.model"
    out += [(f"{m}.embed_tokens.weight", [tc.vocab_size, h]), (f"{m}.norm.weight", [h]),
            ("language_model.lm_head.weight", [tc.vocab_size, h])]
    for l in range(tc.num_hidden_layers):
        pre = f"{m}.layers.{l}"
        out += [(f"{pre}.self_attn.q_proj.weight", [h, h]), (f"{pre}.self_attn.k_proj.weight", [kv, h]),
                (f"{pre}.self_attn.v_proj.weight", [kv, h]), (f"{pre}.self_attn.o_proj.weight", [h, h]),
                (f"{pre}.mlp.gate_proj.weight", [tc.intermediate_size, h]),
                (f"{pre}.mlp.up_proj.weight", [tc.intermediate_size, h]),
                (f"{pre}.mlp.down_proj.weight", [h, tc.intermediate_size]),
                (f"{pre}.input_layernorm.weight", [h]), (f"{pre}.post_attention_layernorm.weight", [h])]
    return out


# Ids the fixture's tokenizer has (its vocabulary is 300 tokens), and those of them that
# show no text on their own (<unk> <s> </s>, and "▁", a space that decodes to nothing).
SHOWN = 300
NOT_TEXT = [0, 1, 2, 46]


def tensor_bytes(name, shape, rng, dtype):
    n = int(np.prod(shape))
    if "norm" in name and name.endswith("weight"):
        x = np.ones(n, dtype=np.float32)
    else:
        x = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    if name == "language_model.lm_head.weight" and shape[0] > SHOWN:
        # Only ids the (tiny) tokenizer shows as text get logits: the rest (NOT_TEXT
        # included) are 0, far below the best text ones, so served text is visible,
        # streams token by token and runs to max_tokens.
        x.reshape(shape)[SHOWN:] = 0.0
        x.reshape(shape)[NOT_TEXT] = 0.0
        # Text rows 100× larger: their logits (std ~90) dwarf the zeros, so sampling at
        # temperature 1 (a client's default) still draws text, and greedy is unchanged.
        x.reshape(shape)[:SHOWN] *= 100.0
    if dtype == "F32":
        return x.tobytes()
    # Round to nearest even, as torch's bf16 conversion does.
    u = x.view(np.uint32)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16).tobytes()


def main(out, many_layers):
    os.makedirs(out, exist_ok=True)
    if many_layers:
        dtype, size, patch = "F32", 30, 6
        vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=size, patch_size=patch,
                              projection_dim=32, hidden_act="quick_gelu")
        tc = LlamaConfig(vocab_size=302, hidden_size=96, intermediate_size=160, num_hidden_layers=1200,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
                         eos_token_id=2, pad_token_id=300)
    else:
        dtype, size, patch = "BF16", 336, 14
        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=size, patch_size=patch,
                              projection_dim=768, hidden_act="quick_gelu")
        tc = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=300)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=301,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=(size // patch) ** 2)
    d = cfg.to_dict()
    d["architectures"] = ["LlavaForConditionalGeneration"]
    d["dtype"] = "float32" if dtype == "F32" else "bfloat16"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(os.path.join(FIXTURE, name), out)
    with open(os.path.join(FIXTURE, "processor_config.json")) as f:
        proc = json.load(f)
    proc["image_processor"]["crop_size"] = {"height": size, "width": size}
    proc["image_processor"]["size"] = {"shortest_edge": size}
    proc["patch_size"] = patch
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump(proc, f, indent=2)

    tensors = shapes(vc, tc)
    header, offset = {}, 0
    width = 4 if dtype == "F32" else 2
    for name, shape in tensors:
        n = int(np.prod(shape)) * width
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    rng = np.random.default_rng(0)
    params = {"vision": 0, "projector": 0, "language": 0}
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape in tensors:
            f.write(tensor_bytes(name, shape, rng, dtype))
            part = ("vision" if name.startswith("vision_tower") else
                    "projector" if name.startswith("multi_modal_projector") else "language")
            params[part] += int(np.prod(shape))
    print(json.dumps({k: {"params": v, "bytes": width * v} for k, v in params.items()}))


if __name__ == "__main__":
    main(sys.argv[1], "--many-layers" in sys.argv[2:])
