#!/usr/bin/env python3
"""A golden for Iris' Q4_K reading: Q4_K super-blocks of pseudo-random bytes (fixed
seed; every bit of the 6-bit scale packing exercised, f16 super-scales in a sane
range) and their values as gguf-py dequantizes them (`gguf.quants.dequantize`, the
code HF transformers' GGUF loader calls), float32.

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf numpy
    /tmp/gguf-venv/bin/python tools/gen_q4k_golden.py tests/fixtures/gguf/q4_k.json
"""
import json
import sys

from importlib.metadata import version
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

ROWS, K = 3, 512
rng = np.random.default_rng(20261206)
blocks = []
for _ in range(ROWS * K // 256):
    d = np.float16(rng.uniform(1e-3, 2e-2)).tobytes()
    dmin = np.float16(rng.uniform(1e-3, 2e-2)).tobytes()
    scales = rng.integers(0, 256, 12, dtype=np.uint8).tobytes()
    qs = rng.integers(0, 256, 128, dtype=np.uint8).tobytes()
    blocks.append(d + dmin + scales + qs)
raw = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(ROWS, -1)
values = dequantize(raw, GGMLQuantizationType.Q4_K).astype(np.float32)
assert values.shape == (ROWS, K), values.shape
out = {
    "source": f"gguf-py {version('gguf')} quants.dequantize, numpy {np.__version__}",
    "rows": ROWS,
    "k": K,
    "bytes_hex": raw.tobytes().hex(),
    # float32 values, as their bit patterns (exact).
    "value_bits": values.view(np.uint32).ravel().tolist(),
}
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
    f.write("\n")
