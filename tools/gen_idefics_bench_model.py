#!/usr/bin/env python3
"""A mid-sized random IDEFICS checkpoint (~130M parameters; not committed) for
`iris bench decode-images`, where the tiny fixture is too small to show what caching
the images' cross-attention K/V saves per decode step.

    python tools/gen_idefics_bench_model.py /tmp/idefics-bench
    iris bench decode-images --model /tmp/idefics-bench --image tests/fixtures/images/scene.png
"""
import os
import sys

import torch
from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_llava_fixtures import init_weights, make_tokenizer  # noqa: E402


def main(out):
    torch.manual_seed(0)
    tok = make_tokenizer(out)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>"]})
    cfg = IdeficsConfig(
        vocab_size=len(tok) - 2, additional_vocab_size=2, hidden_size=1024, intermediate_size=2816,
        num_hidden_layers=8, num_attention_heads=16, cross_layer_interval=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        use_resampler=True,
        vision_config=dict(embed_dim=512, image_size=224, patch_size=14, num_hidden_layers=4,
                           num_attention_heads=8, intermediate_size=2048),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=2,
                              resampler_n_heads=8, resampler_head_dim=64),
    )
    model = IdeficsForVisionText2Text(cfg).eval()
    init_weights(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "alpha" in n:
                p.fill_(0.7)
    model.save_pretrained(out)
    IdeficsProcessor(image_processor=IdeficsImageProcessorPil(image_size=224), tokenizer=tok,
                     image_size=224).save_pretrained(out)
    print("wrote", out, sum(p.numel() for p in model.parameters()), "parameters")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/idefics-bench")
