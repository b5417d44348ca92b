#!/usr/bin/env python3
"""Builds the tiny BLIP (v1) fixtures under tests/fixtures/ with HF transformers:
`BlipForConditionalGeneration` (ViT -> BERT text decoder with cross-attention to the
image, causal self-attention, LM head) and `BlipForImageTextRetrieval` (BERT text
encoder with cross-attention; ITM head on [CLS]; ITC = cosine of projected [CLS]s),
random weights (std 0.1, norms 1 + 0.1*N), a BERT WordPiece tokenizer with BLIP's
added `[DEC]` / `[ENC]`, `BlipImageProcessor` (PIL backend).

  blip-tiny-caption-f32/golden.*    vision features, per prompt: input ids, greedy ids,
                                    their logprobs, first-step logits (the tiny decoder's
                                    greedy output repeats one token whatever the init, so
                                    the full first-step logits carry the check)
  blip-tiny-retrieval-f32/golden.*  per pair: text ids, ITM logits / probability, ITC

Run from the repository root with one torch thread: python tools/gen_blip_fixtures.py
"""
import json
import os
import shutil
import sys

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_blip2_fixtures import make_bert_tokenizer  # noqa: E402
from gen_llava_fixtures import IMAGES, ROOT, init_weights  # noqa: E402

torch.set_num_threads(1)

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)


def setup(name, model_cls):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    tok = make_bert_tokenizer()
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, encoder_hidden_size=VISION["hidden_size"],
                          max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                          sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.sep_token_id)
    cfg = BlipConfig(vision_config=BlipVisionConfig(**VISION).to_dict(), text_config=text.to_dict(),
                     image_text_hidden_size=24)
    model = model_cls(cfg).eval()
    init_weights(model)
    proc = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out, model_cls.from_pretrained(out).eval(), BlipProcessor.from_pretrained(out, backend="pil")


def caption():
    out, ref, proc = setup("blip-tiny-caption-f32", BlipForConditionalGeneration)
    pil = Image.open(os.path.join(IMAGES, "scene.png"))
    golden, cases = {}, []
    for i, prompt in enumerate(["", "a picture of"]):
        inputs = proc(images=pil, text=prompt or None, return_tensors="pt")
        with torch.no_grad():
            if i == 0:
                golden["pixel_values"] = inputs["pixel_values"]
                golden["vision_features"] = ref.vision_model(inputs["pixel_values"]).last_hidden_state[0]
            gen = ref.generate(**inputs, max_new_tokens=8, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        seq = gen.sequences[0].tolist()
        new = seq[len(seq) - len(gen.logits):]
        golden[f"first_logits_{i}"] = gen.logits[0][0]
        cases.append({
            "prompt": prompt,
            "input_ids": inputs["input_ids"][0].tolist() if "input_ids" in inputs else [],
            "sequence": seq,
            "token_ids": new,
            "logprobs": [torch.log_softmax(l[0], -1)[t].item() for l, t in zip(gen.logits, new)],
            "text": proc.decode(seq, skip_special_tokens=True),
        })
    save_file({k: v.contiguous() for k, v in golden.items()}, os.path.join(out, "golden.safetensors"))
    json.dump({"image": "scene.png", "cases": cases}, open(os.path.join(out, "golden.json"), "w"), indent=1)
    print("caption", [(c["prompt"], c["token_ids"]) for c in cases])


def retrieval():
    out, ref, proc = setup("blip-tiny-retrieval-f32", BlipForImageTextRetrieval)
    cases = []
    for image, text in [("scene.png", "a red circle on a blue field"), ("tall.jpg", "a cat sitting next to a window")]:
        inputs = proc(images=Image.open(os.path.join(IMAGES, image)), text=text, return_tensors="pt")
        with torch.no_grad():
            itm = ref(**inputs, use_itm_head=True).itm_score[0]
            itc = ref(**inputs, use_itm_head=False).itm_score[0]
        cases.append({"image": image, "text": text, "input_ids": inputs["input_ids"][0].tolist(),
                      "itm_logits": itm.tolist(), "itm_probability": torch.softmax(itm, -1)[1].item(),
                      "itc_similarity": itc.reshape(-1)[0].item()})
    json.dump({"cases": cases}, open(os.path.join(out, "golden.json"), "w"), indent=1)
    print("retrieval", [(c["itm_probability"], c["itc_similarity"]) for c in cases])


if __name__ == "__main__":
    caption()
    retrieval()
