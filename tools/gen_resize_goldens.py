#!/usr/bin/env python3
"""PIL bicubic / bilinear resizes of the fixture images at sizes that take each pass
order, saved as tests/fixtures/images/resize_goldens.safetensors (uint8, HWC) for the
resampler's exactness test. Run from the repository root: python tools/gen_resize_goldens.py
"""
import os
import random

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "images")


def main():
    rng = random.Random(5)
    out = {}
    for name in ["scene.png", "tall.jpg"]:
        im = Image.open(os.path.join(IMAGES, name)).convert("RGB")
        out[f"{name}/source"] = torch.from_numpy(np.array(im))
        sizes = [(32, 32), (30, 48), (9, 10), (60, 32), (45, 70), (20, 13)]
        sizes += [(rng.randint(4, 100), rng.randint(4, 100)) for _ in range(14)]
        for w, h in sizes:
            for filt, tag in [(Image.BICUBIC, "bicubic"), (Image.BILINEAR, "bilinear")]:
                out[f"{name}/{tag}/{w}x{h}"] = torch.from_numpy(np.array(im.resize((w, h), filt)))
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(IMAGES, "resize_goldens.safetensors"))
    print(len(out), "tensors")


if __name__ == "__main__":
    main()
