#!/usr/bin/env python3
"""Images in color modes PIL converts on load, with what PIL makes of them (HF's image
processors call `convert("RGB")` on the PIL image), for `iris-image`'s decode tests:

- `cmyk.jpg`: a CMYK JPEG as Photoshop / PIL write them (Adobe APP14 marker, inverted
  channels); PIL reads it as "CMYK" and converts with r = (255 - c)(255 - k) / 255.
- `gray16.png`: a 16-bit grayscale PNG; PIL opens it as "I;16" and `convert("RGB")`
  clips at 255 (it does not scale to 8 bits).

    python tools/gen_color_goldens.py     # writes tests/fixtures/images/{cmyk.jpg,gray16.png,color_goldens.json}
"""
import json
import os

import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "images")


def main():
    rng = np.random.default_rng(7)
    cmyk = Image.fromarray(rng.integers(0, 256, (12, 16, 4), dtype=np.uint8), mode="CMYK")
    cmyk.save(os.path.join(OUT, "cmyk.jpg"), quality=95)
    gray = rng.integers(0, 1024, (6, 8)).astype("<u2")
    gray[0, :4] = [0, 255, 256, 65535]
    Image.frombytes("I;16", (8, 6), gray.tobytes()).save(os.path.join(OUT, "gray16.png"))
    goldens = {}
    for name in ["cmyk.jpg", "gray16.png"]:
        im = Image.open(os.path.join(OUT, name))
        rgb = np.array(im.convert("RGB"))
        goldens[name] = {"mode": im.mode, "width": im.width, "height": im.height,
                         "rgb": rgb.reshape(-1).tolist()}
    with open(os.path.join(OUT, "color_goldens.json"), "w") as f:
        json.dump(goldens, f)
    print({k: (v["mode"], v["width"], v["height"]) for k, v in goldens.items()})


if __name__ == "__main__":
    main()
