"""Writes the fuzz targets' seed inputs into fuzz/seeds/<target>/ (committed with this
script; standard library only): the fixture images, small safetensors files, OpenAI
request bodies and protobuf-encoded gRPC requests.

    python3 fuzz/seeds.py
"""
import base64
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
MODEL = "llava-tiny-hub-f32"


def out(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def varint(n):
    b = bytearray()
    while True:
        x = n & 0x7F
        n >>= 7
        if n:
            b.append(x | 0x80)
        else:
            b.append(x)
            return bytes(b)


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 5:
        return key + struct.pack("<f", payload)
    return key + varint(len(payload)) + payload


def s(num, text):
    return field(num, 2, text.encode() if isinstance(text, str) else text)


def packed(num, values):
    return field(num, 2, b"".join(varint(v) for v in values))


def safetensors(tensors):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def gguf(meta, tensors):
    """A GGUF v3 file: `meta` [(key, type, bytes)], `tensors` [(name, dims, type, data)]."""
    def string(x):
        return struct.pack("<Q", len(x)) + x.encode()
    b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, ty, raw in meta:
        b += string(k) + struct.pack("<I", ty) + raw
    off, data = 0, b""
    for name, dims, ty, raw in tensors:
        b += string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        b += struct.pack("<IQ", ty, off)
        pad = raw + b"\0" * (-len(raw) % 32)
        data += pad
        off += len(pad)
    b += b"\0" * (-len(b) % 32)
    return b + data


def main():
    shutil.rmtree(os.path.join(HERE, "seeds"), ignore_errors=True)
    for img in ["scene.png", "scene.webp", "tall.jpg", "cmyk.jpg", "gray16.png"]:
        out("image", img, open(os.path.join(FIXTURES, "images", img), "rb").read())

    f32 = struct.pack("<4f", 1, 2, 3, 4)
    out("safetensors", "two", safetensors({"a": ("F32", [2, 2], f32), "b": ("BF16", [2], b"\x80\x3f\x00\x40")}))
    out("safetensors", "f16", safetensors({"x": ("F16", [1, 2], b"\x00\x3c\x00\x40")}))
    out("safetensors", "truncated", safetensors({"a": ("F32", [2, 2], f32)})[:-3])

    tokens = struct.pack("<IQ", 8, 2) + struct.pack("<Q", 3) + b"<s>" + struct.pack("<Q", 1) + b"a"
    meta = [("general.architecture", 8, struct.pack("<Q", 5) + b"llama"),
            ("llama.block_count", 4, struct.pack("<I", 1)),
            ("tokenizer.ggml.tokens", 9, tokens)]
    out("gguf", "small", gguf(meta, [("token_embd.weight", [32, 2], 3, b"\1" * 40),
                                    ("output_norm.weight", [8], 0, struct.pack("<8f", *range(8)))]))
    out("gguf", "q8", gguf([], [("w", [32], 8, b"\2" * 34)]))

    out("chat", "empty", b"")
    out("chat", "some", bytes(range(64)))

    gray = base64.b64encode(open(os.path.join(FIXTURES, "images", "gray16.png"), "rb").read()).decode()
    text = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi </s><s>USER: x"}]}
    image = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{gray}"}},
        {"type": "text", "text": "What is <image> here?"}]}]}
    stream = dict(text, stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2,
                  stop=["x", "y"], seed=-3, temperature=0.7, top_p=0.9)
    bad = dict(text, max_tokens="8", temperature="hot")
    for name, body in [("text", text), ("image", image), ("stream", stream), ("bad", bad)]:
        out("openai", name + ".json", json.dumps(body))

    sampling = field(1, 5, 0.0) + field(8, 0, 7)
    gen = s(1, MODEL) + s(2, "USER: hi ASSISTANT:") + field(6, 0, 2) + s(5, sampling)
    chat = s(1, MODEL) + s(3, s(1, "user") + s(3, s(1, "hello </s>"))) + field(6, 0, 2)
    dec = s(1, MODEL) + packed(2, [1, 3148, 1001, 29901]) + field(6, 0, 2) + s(5, sampling)
    tensor = s(1, "f32") + packed(2, [1, 4]) + s(3, struct.pack("<4f", 0.5, -1, 2, float("nan")))
    dec_img = dec + s(3, tensor)
    # The first byte picks the target's path: odd the gateway, even the decoder.
    for name, msg in [("generate", b"\x01" + gen), ("chat", b"\x01" + chat), ("decode", b"\x00" + dec),
                      ("decode_tokens", b"\x00" + dec_img)]:
        out("proto", name, msg)


if __name__ == "__main__":
    main()
