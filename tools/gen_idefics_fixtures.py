#!/usr/bin/env python3
"""Builds the tiny IDEFICS (Flamingo) fixture under tests/fixtures/ with HF transformers:
`IdeficsForVisionText2Text` (CLIP-style ViT -> Perceiver Resampler -> LLaMA with gated
cross-attention every `cross_layer_interval` layers, decoupled embeddings/head), random
weights (std 0.1, norms 1 + 0.1*N, gates set non-zero since the default zeros make the
image irrelevant), a LLaMA-style tokenizer with `<fake_token_around_image>` and
`<image>`, `IdeficsImageProcessor` (PIL backend).

Goldens for three prompts, each given as the processor's list of text pieces and images:
one image; three images in a few-shot prompt; text only. Per prompt: input ids,
image_attention_mask, pixel values, prefill logits, greedy ids and logprobs; per image of
the first prompt: vision features and perceiver output.

Run from the repository root with one torch thread: python tools/gen_idefics_fixtures.py
"""
import json
import os
import shutil
import sys

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_llava_fixtures import IMAGES, ROOT, init_weights, make_tokenizer  # noqa: E402

torch.set_num_threads(1)


def build(name, overrides, perceiver_overrides, prompt_names):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>"]})
    cfg = IdeficsConfig(
        # The last two tokens (<image>, <fake_token_around_image>) live in the decoupled
        # additional embedding and head, as in IDEFICS-9B.
        vocab_size=len(tok) - 2, additional_vocab_size=2, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        use_resampler=True, **{"qk_layer_norms": False, "cross_layer_interval": 2, **overrides},
        vision_config=dict(embed_dim=32, image_size=30, patch_size=6, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8, **{"qk_layer_norms_perceiver": False, **perceiver_overrides}),
    )
    model = IdeficsForVisionText2Text(cfg).eval()
    init_weights(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "alpha" in n:
                p.fill_(0.7)  # tanh(0.7) ≈ 0.6: the image matters
    proc = IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=30), tokenizer=tok, image_size=30)
    model.save_pretrained(out)
    proc.save_pretrained(out)

    ref = IdeficsForVisionText2Text.from_pretrained(out).eval()
    proc = IdeficsProcessor.from_pretrained(out, backend="pil")
    img = {n: Image.open(os.path.join(IMAGES, n)) for n in ["scene.png", "tall.jpg"]}
    prompts = {
        "one_image": ["User:", "scene.png", "What is in the picture?\nAssistant:"],
        "few_shot": ["scene.png", "Q: What is this? A: a red circle.", "tall.jpg", "Q: What is this? A: stripes.",
                     "scene.png", "Q: What is this? A:"],
        "text_only": ["The quick brown fox jumps over"],
    }
    golden, cases = {}, {}
    prompts = {k: v for k, v in prompts.items() if k in prompt_names}
    for name, pieces in prompts.items():
        items = [img[p] if p in img else p for p in pieces]
        inputs = proc(text=[items], return_tensors="pt")
        with torch.no_grad():
            golden[f"{name}/logits"] = ref(**inputs).logits[0]
            gen = ref.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
            if name == "one_image":
                pv = inputs["pixel_values"][0]
                vis = ref.model.vision_model(pv).last_hidden_state
                golden["one_image/pixel_values"] = pv
                golden["one_image/vision_features"] = vis
                golden["one_image/perceiver_output"] = ref.model.perceiver_resampler(vis)
        n_prompt = inputs["input_ids"].shape[1]
        ids = gen.sequences[0, n_prompt:].tolist()
        cases[name] = {
            "pieces": pieces,
            "input_ids": inputs["input_ids"][0].tolist(),
            "image_attention_mask": inputs["image_attention_mask"][0].tolist() if "image_attention_mask" in inputs else [],
            "token_ids": ids,
            "logprobs": [torch.log_softmax(l[0], -1)[t].item() for l, t in zip(gen.logits, ids)],
            "text": proc.tokenizer.decode(ids, skip_special_tokens=True),
        }
        print(name, n_prompt, "tokens; greedy", ids)
    save_file({k: v.contiguous() for k, v in golden.items()}, os.path.join(out, "golden.safetensors"))
    json.dump(cases, open(os.path.join(out, "golden.json"), "w"), indent=1)


def main():
    build("idefics-tiny-f32", {}, {}, ["one_image", "few_shot", "text_only"])
    # IDEFICS-80B's options: per-head q/k norms in the gated cross-attention and the
    # resampler, one gate value per channel, a gated layer before every layer.
    build("idefics-tiny-qknorm-f32", dict(qk_layer_norms=True, alpha_type="vector", cross_layer_interval=1),
          dict(qk_layer_norms_perceiver=True), ["one_image", "few_shot"])


if __name__ == "__main__":
    main()
