#!/usr/bin/env python3
"""Reference for `iris bench decode`: batch-1 greedy decode tokens/s of HF transformers'
LlamaForCausalLM (PyTorch CPU) with the same shape and random weights.

    python tools/bench_torch_decode.py [--dtype bf16|f32] [--threads 2] [--tokens 32]
        [--device cpu|cuda] [--hidden 2048 --intermediate 5632 --heads 32 --kv-heads 4
         --vocab 32000]  (tools/gpu-check.sh: LLaMA-7B's shape on CUDA, `sdpa` attention)

Prints tokens/s as the median of per-step times over the KV cache, measured like Iris'
benchmark (16-token prompt, then `--tokens` steps). Run both on the same machine, one
after the other, and compare the ratio.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--batch", default="1", help="comma-separated batch sizes")
    ap.add_argument("--prefill", type=int, default=0, help="also time a prefill of this many tokens")
    ap.add_argument("--vit", action="store_true", help="also time one CLIP ViT-L/14-336 image encode")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--vit-batch", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.set_default_dtype(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=dev)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05)
    model.eval()
    for batch in [int(b) for b in a.batch.split(",")]:
        ids = ((torch.arange(16).unsqueeze(0) * 7919 + torch.arange(batch).unsqueeze(1) * 31) % a.vocab).to(dev)
        times = []
        with torch.no_grad():
            out = model(ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(a.tokens):
                sync()
                t = time.perf_counter()
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                sync()
                times.append(time.perf_counter() - t)
        tps = batch / statistics.median(times)
        print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "dtype": a.dtype,
                          "threads": a.threads, "batch": batch, "tokens_per_s": tps}))
    if a.prefill:
        ids = ((torch.arange(a.prefill).unsqueeze(0) * 7919) % a.vocab).to(dev)
        secs = float("inf")
        with torch.no_grad():
            for _ in range(3):  # the fastest of three, as `iris bench decode --prefill`
                sync()
                t = time.perf_counter()
                model(ids, use_cache=True)
                sync()
                secs = min(secs, time.perf_counter() - t)
        params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
        print(json.dumps({"impl": "pytorch", "dtype": a.dtype, "prefill_tokens": a.prefill, "seconds": secs,
                          "gflops_on_weights": 2 * params * a.prefill / secs / 1e9}))

    if a.vit:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, attn_implementation="sdpa")
        # Built for real (not on "meta"): its position-id buffer must hold real values.
        vit = CLIPVisionModel(vc).to(dtype).to(dev).eval()
        with torch.no_grad():
            for p in vit.parameters():
                p.uniform_(-0.05, 0.05)
            px = torch.randn(a.vit_batch, 3, 336, 336, dtype=dtype, device=dev)
            vit(px)  # warm-up (CUDA kernels load on first use)
            times = []
            for _ in range(3):
                sync()
                t = time.perf_counter()
                vit(px)
                sync()
                times.append((time.perf_counter() - t) / a.vit_batch)
        print(json.dumps({"impl": "pytorch", "dtype": a.dtype, "device": a.device, "vit_batch": a.vit_batch,
                          "vit_l14_336_seconds": statistics.median(times)}))


if __name__ == "__main__":
    main()
