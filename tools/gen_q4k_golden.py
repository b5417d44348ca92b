#!/usr/bin/env python3
"""A golden for Iris' K-quant reading: Q4_K (or, with `q6_k`, Q6_K) super-blocks of
pseudo-random bytes (fixed seed; every bit of the scale packing exercised, f16
super-scales in a sane range) and their values as gguf-py dequantizes them
(`gguf.quants.dequantize`, the code HF transformers' GGUF loader calls), float32.

    python3 -m venv /tmp/gguf-venv && /tmp/gguf-venv/bin/pip install gguf numpy
    /tmp/gguf-venv/bin/python tools/gen_q4k_golden.py tests/fixtures/gguf/q4_k.json
    /tmp/gguf-venv/bin/python tools/gen_q4k_golden.py tests/fixtures/gguf/q6_k.json q6_k
"""
import json
import sys

from importlib.metadata import version
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

ROWS, K = 3, 512
TYPE = sys.argv[2] if len(sys.argv) > 2 else "q4_k"
rng = np.random.default_rng(20261206)
blocks = []
for _ in range(ROWS * K // 256):
    if TYPE == "q4_k":
        d = np.float16(rng.uniform(1e-3, 2e-2)).tobytes()
        dmin = np.float16(rng.uniform(1e-3, 2e-2)).tobytes()
        scales = rng.integers(0, 256, 12, dtype=np.uint8).tobytes()
        qs = rng.integers(0, 256, 128, dtype=np.uint8).tobytes()
        blocks.append(d + dmin + scales + qs)
    else:
        # ql (low nibbles), qh (high bit pairs), int8 scales, then the f16 scale.
        ql = rng.integers(0, 256, 128, dtype=np.uint8).tobytes()
        qh = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        scales = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        d = np.float16(rng.uniform(1e-4, 2e-3)).tobytes()
        blocks.append(ql + qh + scales + d)
raw = np.frombuffer(b"".join(blocks), dtype=np.uint8).reshape(ROWS, -1)
qtype = {"q4_k": GGMLQuantizationType.Q4_K, "q6_k": GGMLQuantizationType.Q6_K}[TYPE]
values = dequantize(raw, qtype).astype(np.float32)
assert values.shape == (ROWS, K), values.shape
out = {
    "source": f"gguf-py {version('gguf')} quants.dequantize, numpy {np.__version__}",
    "type": TYPE,
    "rows": ROWS,
    "k": K,
    "bytes_hex": raw.tobytes().hex(),
    # float32 values, as their bit patterns (exact).
    "value_bits": values.view(np.uint32).ravel().tolist(),
}
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
    f.write("\n")
