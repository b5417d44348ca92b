#!/usr/bin/env python3
"""Builds the tiny LLaVA fixtures under tests/fixtures/ with HF transformers.

Each fixture is a real `LlavaForConditionalGeneration` (CLIP ViT -> MLP projector ->
LLaMA), or `LlavaNextForConditionalGeneration` (the same, with images tiled to the best
of `image_grid_pinpoints`, the feature grid unpadded and `image_newline` rows), with
random weights (std 0.1, norm weights 1 + 0.1*N so logits are not
degenerate), saved with `save_pretrained`, its weights then rewritten into one of the
checkpoint layouts found in the wild, and reloaded through `from_pretrained` (so HF
itself vouches for the layout) before the goldens are computed:

  golden.safetensors  pixel_values, vision_features (selected layer, after the select
                      strategy), projector_output, logits (prefill, every position)
  golden.json         prompt, image files, input_ids, greedy ids and their logprobs

LLaVA-NeXT fixtures store each image's tensors apart (its tile count depends on its
size): pixel_values_<i> [tiles, 3, H, W], vision_features_<i> [tiles, tokens, width],
image_features_<i> (projected, unpadded, newline rows: what replaces its placeholders).

Run from the repository root with one torch thread (bit-reproducible):
    python tools/gen_llava_fixtures.py [NAME ...]      # NAMEs: only those fixtures
Needs torch, transformers==5.24.0, tokenizers, pillow, safetensors (see tools/README.md).
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

torch.set_num_threads(1)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
IMAGES = os.path.join(ROOT, "images")

CORPUS = [
    "USER: What is in the picture? ASSISTANT: A red square on a blue field.",
    "Describe the image in detail. There is a cat sitting next to a window.",
    "The quick brown fox jumps over the lazy dog while the sun sets slowly.",
    "How many objects are there? Two circles, one triangle and a green line.",
    "Vision language models read images and text together to answer questions.",
]


def make_tokenizer(path):
    """A LLaMA-style BPE (metaspace, byte fallback, BOS added) trained on a small corpus."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=[f"<0x{i:02X}>" for i in range(256)],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def make_images():
    """Synthetic photos: smooth gradients, shapes and noise, odd sizes so resize and
    center-crop are exercised; PNG, JPEG and WebP."""
    os.makedirs(IMAGES, exist_ok=True)
    rng = np.random.default_rng(7)
    h, w = 43, 57
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack(
        [
            128 + 100 * np.sin(x / 7.0),
            128 + 100 * np.cos(y / 5.0),
            (x * 4 + y * 3) % 256,
        ],
        axis=-1,
    )
    img[(x - 30) ** 2 + (y - 20) ** 2 < 90] = [250, 40, 30]
    img += rng.normal(0, 12, img.shape)
    a = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    a.save(os.path.join(IMAGES, "scene.png"))
    a.save(os.path.join(IMAGES, "scene.webp"), lossless=True)
    h, w = 64, 40
    y, x = np.mgrid[0:h, 0:w]
    img2 = np.stack([(y * 4) % 256, 255 - (x * 6) % 256, 128 + 60 * np.sin((x + y) / 6.0)], axis=-1)
    img2 += rng.normal(0, 8, img2.shape)
    b = Image.fromarray(np.clip(img2, 0, 255).astype(np.uint8))
    b.save(os.path.join(IMAGES, "tall.jpg"), quality=92)
    # A wide one (its own generator: the two above stay as they were), for LLaVA-NeXT's
    # 1x3 grid.
    rng = np.random.default_rng(11)
    h, w = 40, 100
    y, x = np.mgrid[0:h, 0:w]
    img3 = np.stack([(x * 3) % 256, 80 + 70 * np.cos(y / 4.0), 200 - (x + 2 * y) % 160], axis=-1)
    img3[(x % 25 < 4) | (y % 13 < 2)] = [20, 220, 90]
    img3 += rng.normal(0, 10, img3.shape)
    c = Image.fromarray(np.clip(img3, 0, 255).astype(np.uint8))
    c.save(os.path.join(IMAGES, "wide.png"))
    return {"scene.png": a, "tall.jpg": Image.open(os.path.join(IMAGES, "tall.jpg")), "wide.png": c}


def init_weights(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def fresh(name):
    """The fixture's folder, emptied, with torch's generator reset."""
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    return out


def write_golden(out, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "golden.safetensors"))
    json.dump(meta, open(os.path.join(out, "golden.json"), "w"), indent=1)


def relayout(path, layout):
    """Rewrites the saved keys (transformers 5 writes `vision_tower.*`,
    `language_model.model.*`, `language_model.lm_head`, `multi_modal_projector.*`)."""
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    index_path = os.path.join(path, "model.safetensors.index.json")
    index = json.load(open(index_path)) if os.path.exists(index_path) else None

    def rename(k):
        if layout == "hub":
            return k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k
        if layout == "model":
            if k.startswith("language_model.lm_head"):
                return k.replace("language_model.lm_head", "lm_head", 1)
            if k.startswith("language_model.model."):
                return "model.language_model." + k[len("language_model.model.") :]
            return "model." + k
        return k

    for f in files:
        sd = load_file(os.path.join(path, f))
        save_file({rename(k): v.contiguous() for k, v in sd.items()}, os.path.join(path, f), metadata={"format": "pt"})
    if index:
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        json.dump(index, open(index_path, "w"), indent=2)


def build(name, *, dtype, layout, vision, text, llava, prompt, images, max_new_tokens=8, shard=None,
          text_cls=LlamaConfig, vision_cls=CLIPVisionConfig):
    if ONLY and name not in ONLY:
        return
    out = fresh(name)
    tokenizer = make_tokenizer(out)
    vc = vision_cls(**vision)
    siglip = vision_cls is SiglipVisionConfig
    tc = text_cls(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id, **llava)
    model = LlavaForConditionalGeneration(cfg).eval()
    init_weights(model)
    if siglip:
        # SigLIP: resize to the exact size, mean and std 0.5, no class token.
        ip = SiglipImageProcessorPil(size={"height": vc.image_size, "width": vc.image_size})
    else:
        ip = CLIPImageProcessorPil(
            size={"shortest_edge": vc.image_size}, crop_size={"height": vc.image_size, "width": vc.image_size}
        )
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer,
        patch_size=vc.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_additional_image_tokens=0 if siglip else 1,
    )
    model.to(dtype).save_pretrained(out, max_shard_size=shard) if shard else model.to(dtype).save_pretrained(out)
    proc.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    relayout(out, layout)

    # The reference is the model as HF loads it from disk.
    ref = LlavaForConditionalGeneration.from_pretrained(out, dtype=dtype).eval()
    proc = LlavaProcessor.from_pretrained(out, backend="pil")
    pil_images = [images[f] for f in images_of(prompt, images)]
    inputs = proc(text=prompt, images=pil_images or None, return_tensors="pt")
    golden = {"logits": None}
    with torch.no_grad():
        out_fwd = ref(**inputs)
        golden["logits"] = out_fwd.logits[0].float()
        if pil_images:
            pv = inputs["pixel_values"].to(dtype)
            feats = ref.model.vision_tower(pv, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
            if cfg.vision_feature_select_strategy == "default":
                feats = feats[:, 1:]
            golden["pixel_values"] = inputs["pixel_values"].float()
            golden["vision_features"] = feats.float()
            golden["projector_output"] = ref.model.multi_modal_projector(feats).float()
        gen = ref.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    n_prompt = inputs["input_ids"].shape[1]
    ids = gen.sequences[0, n_prompt:].tolist()
    logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(gen.logits, ids)]
    write_golden(out, golden, {
        "prompt": prompt,
        "images": images_of(prompt, images),
        "dtype": str(dtype).replace("torch.", ""),
        "layout": layout,
        "prompt_token_ids": inputs["input_ids"][0].tolist(),
        "token_ids": ids,
        "logprobs": logprobs,
        "text": proc.tokenizer.decode(ids, skip_special_tokens=True),
        "max_new_tokens": max_new_tokens,
    })
    print(name, "prompt", n_prompt, "tokens; greedy", ids)


def build_next(name, *, dtype, vision, text, next_cfg, prompt, images, max_new_tokens=8):
    """A LLaVA-NeXT fixture (as saved by transformers 5, LlavaNextProcessor's PIL backend)."""
    if ONLY and name not in ONLY:
        return
    out = fresh(name)
    tokenizer = make_tokenizer(out)
    vc = CLIPVisionConfig(**vision)
    tc = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **text)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id, **next_cfg)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    init_weights(model)
    s = vc.image_size
    ip = LlavaNextImageProcessorPil(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s},
        image_grid_pinpoints=cfg.image_grid_pinpoints,
    )
    proc = LlavaNextProcessor(
        image_processor=ip, tokenizer=tokenizer, patch_size=vc.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, num_additional_image_tokens=1,
    )
    model.to(dtype).save_pretrained(out)
    proc.save_pretrained(out)
    model.generation_config.save_pretrained(out)

    ref = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=dtype).eval()
    proc = LlavaNextProcessor.from_pretrained(out, backend="pil")
    files = images_of(prompt, images)
    inputs = proc(text=prompt, images=[images[f] for f in files], return_tensors="pt")
    golden = {}
    layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
    with torch.no_grad():
        golden["logits"] = ref(**inputs).logits[0].float()
        packed = ref.model.get_image_features(
            inputs["pixel_values"].to(dtype), inputs["image_sizes"]
        ).pooler_output
        for i, (size, feats) in enumerate(zip(inputs["image_sizes"], packed)):
            tiles = image_size_to_num_patches(size, cfg.image_grid_pinpoints, vc.image_size)
            pv = inputs["pixel_values"][i][:tiles]
            states = ref.model.vision_tower(pv.to(dtype), output_hidden_states=True).hidden_states
            sel = torch.cat([states[l] for l in layers], dim=-1)
            if cfg.vision_feature_select_strategy == "default":
                sel = sel[:, 1:]
            golden[f"pixel_values_{i}"] = pv.float()
            golden[f"vision_features_{i}"] = sel.float()
            golden[f"image_features_{i}"] = feats.float()
        gen = ref.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    n_prompt = inputs["input_ids"].shape[1]
    ids = gen.sequences[0, n_prompt:].tolist()
    logprobs = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(gen.logits, ids)]
    # The processor's placeholder count for a spread of sizes (thin, square, huge).
    sides = [1, 7, 29, 30, 31, 43, 57, 60, 89, 90, 100, 333, 1000, 4000]
    sizes = [[h, w] for h in sides for w in sides]
    counts = proc._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    write_golden(out, golden, {
        "prompt": prompt,
        "images": files,
        "image_sizes": inputs["image_sizes"].tolist(),
        "token_counts": [[h, w, n] for (h, w), n in zip(sizes, counts)],
        "dtype": str(dtype).replace("torch.", ""),
        "prompt_token_ids": inputs["input_ids"][0].tolist(),
        "token_ids": ids,
        "logprobs": logprobs,
        "text": proc.tokenizer.decode(ids, skip_special_tokens=True),
        "max_new_tokens": max_new_tokens,
    })
    print(name, "prompt", n_prompt, "tokens; image sizes", inputs["image_sizes"].tolist(), "greedy", ids)


IMAGE_ORDER = {}
# Fixture names given on the command line: build only those (default: all).
ONLY = set(sys.argv[1:])


def images_of(prompt, images):
    return IMAGE_ORDER.get(prompt, [])


def main():
    images = make_images()
    p1 = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    p2 = "USER: <image> and <image> Describe the two images. ASSISTANT:"
    IMAGE_ORDER[p1] = ["scene.png"]
    IMAGE_ORDER[p2] = ["scene.png", "tall.jpg"]
    p3 = "USER: <image> <image>\nand <image> Which is the widest? ASSISTANT:"
    p4 = "USER: <image>\nDescribe it. ASSISTANT: It shows <image>"
    IMAGE_ORDER[p3] = ["scene.png", "tall.jpg", "wide.png"]
    IMAGE_ORDER[p4] = ["wide.png", "tall.jpg"]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=30, patch_size=6, hidden_act="quick_gelu", projection_dim=32)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5)
    # 1. Hub layout, f32, multi-head attention, strategy "default" (CLS dropped), layer -2.
    build("llava-tiny-hub-f32", dtype=torch.float32, layout="hub", vision=vision, text=text,
          llava=dict(vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu"),
          prompt=p1, images=images)
    # 2. transformers 5 default layout, bf16, grouped-query attention, strategy "full",
    #    sharded safetensors, two images.
    build("llava-tiny-gqa-bf16", dtype=torch.bfloat16, layout="t5", shard="40KB",
          vision=dict(vision, image_size=32, patch_size=8, hidden_act="gelu"),
          text=dict(text, num_key_value_heads=2, rope_theta=500000.0),
          llava=dict(vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu"),
          prompt=p2, images=images)
    # 3. `model.*` layout, f32, GQA with q/k/v/o bias, tied head, text only and image.
    build("llava-tiny-model-f32", dtype=torch.float32, layout="model",
          vision=vision, text=dict(text, num_key_value_heads=1, attention_bias=True, tie_word_embeddings=True),
          llava=dict(vision_feature_layer=-3, vision_feature_select_strategy="default",
                     projector_hidden_act="gelu", tie_word_embeddings=True),
          prompt=p2, images=images)
    # 4. Qwen2 language model (bias on q/k/v only), hub layout, f32.
    build("llava-tiny-qwen2-f32", dtype=torch.float32, layout="hub", text_cls=Qwen2Config,
          vision=vision, text=dict(text, num_key_value_heads=2, rope_theta=1000000.0),
          llava=dict(vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu"),
          prompt=p1, images=images)
    # 5. SigLIP tower (no class token, gelu_pytorch_tanh, its head skipped) + Qwen2, as
    #    LLaVA-Interleave's configs: the last layer's states, strategy "full".
    siglip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh")
    build("llava-tiny-siglip-qwen2-f32", dtype=torch.float32, layout="hub", text_cls=Qwen2Config,
          vision_cls=SiglipVisionConfig,
          vision=siglip, text=dict(text, num_key_value_heads=2, rope_theta=1000000.0),
          llava=dict(vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu"),
          prompt=p2, images=images)
    # 6. The same at bf16, one image, layer -2 with strategy "default" (HF drops the
    #    first row even with no class token: a patch).
    build("llava-tiny-siglip-qwen2-bf16", dtype=torch.bfloat16, layout="hub", text_cls=Qwen2Config,
          vision_cls=SiglipVisionConfig,
          vision=siglip, text=dict(text, num_key_value_heads=2, rope_theta=1000000.0),
          llava=dict(vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu"),
          prompt=p1, images=images)
    # 7. LLaVA-NeXT: three images of different sizes and grids (2x2, 2x2 tall, 1x3),
    #    two vision layers concatenated, strategy "default".
    pinpoints = [[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]]
    next_cfg = dict(image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
                    projector_hidden_act="gelu")
    build_next("llava-next-tiny-f32", dtype=torch.float32, vision=vision, text=text,
               next_cfg=dict(next_cfg, vision_feature_layer=[-3, -1]), prompt=p3, images=images)
    # 8. The same at bf16, GQA, one layer (-2), the images in another order.
    build_next("llava-next-tiny-bf16", dtype=torch.bfloat16, vision=vision,
               text=dict(text, num_key_value_heads=2), next_cfg=dict(next_cfg, vision_feature_layer=-2),
               prompt=p4, images=images)


if __name__ == "__main__":
    sys.exit(main())
