"""Third-party clients against a running `iris serve`: the official `openai` Python
client (streaming and not) and `grpcurl` (services listed by reflection, health).

    python tools/client_check.py --http 127.0.0.1:8000 --grpc 127.0.0.1:50051 \
        --model llava-tiny-hub-f32 --image tests/fixtures/images/scene.png

Exits non-zero with a message on the first mismatch. `scripts/client_check.sh` sets
up the environment (a venv outside the repo) and the server.
"""
import argparse
import base64
import json
import re
import shutil
import struct
import subprocess
import sys
import urllib.request

import openai


def fail(msg):
    print(f"client check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--grpc", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--grpcurl", default=shutil.which("grpcurl") or "grpcurl")
    ap.add_argument("--api-key", default="unused", help="the key the server was given")
    ap.add_argument("--structured-model", help="a served model to constrain over gRPC")
    ap.add_argument("--retrieval-model", help="a served retrieval model for /v1/embeddings")
    ap.add_argument("--model-dir", help="the folder of --model (for `iris generate`)")
    ap.add_argument("--retrieval-dir", help="the folder of --retrieval-model (for `iris embed`)")
    ap.add_argument("--iris", help="the iris binary, to compare with its CLI")
    a = ap.parse_args()

    client = openai.OpenAI(base_url=f"http://{a.http}/v1", api_key=a.api_key)
    if a.api_key != "unused":
        try:
            openai.OpenAI(base_url=f"http://{a.http}/v1", api_key="wrong").models.list()
            fail("a wrong API key was accepted")
        except openai.AuthenticationError:
            pass
    models = [m.id for m in client.models.list()]
    if a.model not in models:
        fail(f"{a.model} not in /v1/models: {models}")
    url = "data:image/png;base64," + base64.b64encode(open(a.image, "rb").read()).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is in the picture?"}]}]
    full = client.chat.completions.create(
        model=a.model, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    text = full.choices[0].message.content
    if full.usage.completion_tokens != 8 or full.choices[0].finish_reason != "length":
        fail(f"non-streamed: {full}")
    if len(full.choices[0].logprobs.content) != 8:
        fail(f"logprobs: {full.choices[0].logprobs}")
    chunks = client.chat.completions.create(
        model=a.model, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})
    streamed, usage, finish = "", None, None
    for c in chunks:
        if c.usage:
            usage = c.usage
        for ch in c.choices:
            streamed += ch.delta.content or ""
            finish = ch.finish_reason or finish
    if streamed != text or finish != "length" or usage.completion_tokens != 8:
        fail(f"streamed {streamed!r} ({finish}, {usage}) vs {text!r}")
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
        fail("an unknown model was accepted")
    except openai.NotFoundError:
        pass
    try:
        client.chat.completions.create(model=a.model, messages=messages, max_tokens=0)
        fail("max_tokens 0 was accepted")
    except openai.BadRequestError:
        pass
    print(f"openai {openai.__version__}: {text!r}, streamed the same")
    check_n(a, client)
    check_logit_bias(a, client, messages, text)
    if a.iris:
        check_completions(a, client, url)
    if a.retrieval_model and a.iris:
        check_embeddings(a, client, url)

    run = lambda *args: subprocess.run(
        [a.grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30)
    listed = run(a.grpc, "list")
    services = listed.stdout.split()
    for want in ["iris.v1.Gateway", "grpc.health.v1.Health"]:
        if want not in services:
            fail(f"grpcurl list: {want} missing from {services} ({listed.stderr})")
    # The tiers run in process: their services are not on the public port.
    for tier in ["iris.v1.VisionEncoder", "iris.v1.Connector", "iris.v1.Decoder"]:
        if tier in services:
            fail(f"grpcurl list: {tier} is served on the gateway's port")
    health = run("-d", '{"service": "iris.v1.Gateway"}', a.grpc, "grpc.health.v1.Health/Check")
    if json.loads(health.stdout or "{}").get("status") != "SERVING":
        fail(f"health: {health.stdout} {health.stderr}")
    auth = ["-H", f"authorization: Bearer {a.api_key}"]
    models = run(*auth, a.grpc, "iris.v1.Gateway/ListModels")
    if a.model not in models.stdout:
        fail(f"ListModels by reflection: {models.stdout} {models.stderr}")
    if a.api_key != "unused":
        refused = run(a.grpc, "iris.v1.Gateway/ListModels")
        if "Unauthenticated" not in refused.stderr:
            fail(f"ListModels without the key: {refused.stdout} {refused.stderr}")
    # Structured outputs over gRPC: a regex held on the BLIP-2 fixture (byte-level
    # vocabulary), the text read back from the stream's `finished` event.
    if a.structured_model:
        req = {"model": a.structured_model, "prompt": "<image> Question: yes or no? Answer:",
               "images": [base64.b64encode(open(a.image, "rb").read()).decode()],
               "sampling": {"temperature": 1.0, "seed": 3}, "max_tokens": 40,
               "constraint": {"regex": "(yes|no) [0-9]{3}"}}
        gen = run(*auth, "-d", json.dumps(req), a.grpc, "iris.v1.Gateway/Generate")
        finished = [json.loads(m)["finished"] for m in split_json(gen.stdout)
                    if "finished" in json.loads(m)]
        if len(finished) != 1 or not re.fullmatch("(yes|no) [0-9]{3}", finished[0].get("text", "")):
            fail(f"Generate with a regex constraint: {gen.stdout} {gen.stderr}")
        print(f"grpcurl Generate with a regex constraint: {finished[0]['text']!r}")
    print(f"grpcurl: {len(services)} services by reflection, Gateway SERVING")


def check_completions(a, client, url):
    """/v1/completions: a raw prompt with the model's image marker and the image in
    Iris' `images` list gives what `iris generate` gives for them; streamed the same;
    legacy logprobs; `n` choices."""
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    kw = dict(model=a.model, prompt=prompt, max_tokens=8, temperature=0,
              extra_body={"images": [url]})
    r = client.completions.create(logprobs=2, **kw)
    cli = json.loads(subprocess.run(
        [a.iris, "generate", "--model", a.model_dir, "--image", a.image, "--prompt", prompt,
         "--max-new-tokens", "8", "--json"], capture_output=True, text=True, check=True).stdout)
    text = r.choices[0].text
    if r.object != "text_completion" or text != cli["text"]:
        fail(f"/v1/completions {text!r} != iris generate {cli['text']!r}")
    lp = r.choices[0].logprobs
    if len(lp.tokens) != 8 or len(lp.top_logprobs[0]) != 2 or r.usage.completion_tokens != 8:
        fail(f"/v1/completions logprobs / usage: {r}")
    if any(abs(x - y) > 1e-4 for x, y in zip(lp.token_logprobs, cli["logprobs"])):
        fail(f"/v1/completions logprobs {lp.token_logprobs} != {cli['logprobs']}")
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)
                       if c.choices)
    if streamed != text:
        fail(f"/v1/completions streamed {streamed!r} != {text!r}")
    two = client.completions.create(**{**kw, "n": 2, "temperature": 1.0, "seed": 5})
    if sorted(c.index for c in two.choices) != [0, 1]:
        fail(f"/v1/completions n=2: {two}")
    print(f"/v1/completions: {text!r} = iris generate, streamed the same, n=2")


def check_embeddings(a, client, url):
    """/v1/embeddings equal `iris embed`'s within 1e-6: a text and an image (a data:
    URL; its query rows concatenated)."""
    text = "a red square on a blue field"
    r = client.embeddings.create(model=a.retrieval_model, input=[text, url])
    cli = json.loads(subprocess.run(
        [a.iris, "embed", "--model", a.retrieval_dir, "--text", text, "--image", a.image],
        capture_output=True, text=True, check=True).stdout)["embeddings"]
    want = {"text": cli[1]["embedding"], "image": [x for row in cli[0]["embedding"] for x in row]}
    got = {"text": r.data[0].embedding, "image": r.data[1].embedding}
    for k in want:
        if len(got[k]) != len(want[k]) or max(abs(x - y) for x, y in zip(got[k], want[k])) > 1e-6:
            fail(f"/v1/embeddings {k}: not iris embed's")
    if r.usage.prompt_tokens <= 0:
        fail(f"/v1/embeddings usage: {r.usage}")
    # The client asks for base64 unless told (and decodes it); asked explicitly, it
    # hands over the string. Floats too.
    b64 = client.embeddings.create(model=a.retrieval_model, input=text, encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    floats = client.embeddings.create(model=a.retrieval_model, input=text, encoding_format="float")
    for got_text in (decoded, floats.data[0].embedding):
        if max(abs(x - y) for x, y in zip(got_text, want["text"])) > 1e-6:
            fail("/v1/embeddings: base64 and float are not the same embedding")
    print(f"/v1/embeddings: a text ({len(want['text'])} floats) and an image "
          f"({len(cli[0]['embedding'])} rows) = iris embed within 1e-6")


def check_logit_bias(a, client, messages, greedy):
    """logit_bias: +100 on one token makes greedy decoding pick it every time (id 8 is
    the fixture's "A"); an out-of-range bias is a 400."""
    kw = dict(model=a.model, messages=messages, max_tokens=8, temperature=0)
    r = client.chat.completions.create(logit_bias={"8": 100}, **kw)
    if r.choices[0].message.content != "A" * 8:
        fail(f"logit_bias +100 on 'A': {r.choices[0].message.content!r}")
    r = client.chat.completions.create(logit_bias={"8": -100}, **kw)
    if r.choices[0].message.content != greedy:
        fail(f"logit_bias -100 on a token greedy never picks changed the text")
    try:
        client.chat.completions.create(logit_bias={"8": 101}, **kw)
        fail("a logit_bias of 101 was accepted")
    except openai.BadRequestError:
        pass
    print("logit_bias: +100 forces its token, -100 on an unused one changes nothing, 101 refused")


def splitmix64(z):
    m = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def seed_stream(seed, i):
    """iris_engine::seed_stream: the seed choice i of a request with `n` draws with."""
    return seed if i == 0 else splitmix64(seed ^ splitmix64(0x5EED000000000000 | i))


def prefix_hits(a, model):
    req = urllib.request.Request(f"http://{a.http}/metrics",
                                 headers={"authorization": f"Bearer {a.api_key}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    m = re.search(r'^\w*prefix_cache_hit_blocks\{[^}]*model="' + re.escape(model) + r'"[^}]*\} (\d+)',
                  text, re.M)
    if not m:
        fail(f"no prefix_cache_hit_blocks for {model} in /metrics")
    return int(m.group(1))


def check_n(a, client):
    """`n` = 4: four choices, each what the request alone gives with its seed stream,
    streamed the same, and the prompt's full blocks computed once (prefix-cache hits
    for the other three)."""
    # A prompt no earlier request began with: only the samples share its blocks.
    seed, n = 2024, 4
    fresh = [{"role": "user", "content": "n check: " + "a b c d e f g h i j k l m " * 4}]
    kw = dict(model=a.model, messages=fresh, max_tokens=6, temperature=1.0)
    hits = prefix_hits(a, a.model)
    r = client.chat.completions.create(n=n, seed=seed, **kw)
    hit = prefix_hits(a, a.model) - hits
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    if len(texts) != n or r.usage.completion_tokens != n * 6:
        fail(f"n={n}: {r}")
    full = (r.usage.prompt_tokens - 1) // 16
    if hit != (n - 1) * full:
        fail(f"n={n}: {hit} prefix-cache hits, not {n - 1} x {full} full prompt blocks")
    streamed = [""] * n
    for c in client.chat.completions.create(n=n, seed=seed, stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
    if streamed != texts:
        fail(f"n={n} streamed {streamed} != {texts}")
    for i in range(n):
        one = client.chat.completions.create(seed=seed_stream(seed, i), **kw)
        if one.choices[0].message.content != texts[i]:
            fail(f"choice {i} {texts[i]!r} != alone {one.choices[0].message.content!r}")
    if len(set(texts)) == 1:
        fail(f"n={n}: every choice the same: {texts}")
    print(f"n={n}: {len(set(texts))} different choices, each its seed stream alone; "
          f"the prompt's {full} full blocks computed once ({hit} hits)")


def split_json(out):
    """grpcurl's stream output: one pretty-printed JSON object per message."""
    dec, i, msgs = json.JSONDecoder(), 0, []
    while i < len(out):
        if out[i].isspace():
            i += 1
            continue
        _, j = dec.raw_decode(out, i)
        msgs.append(out[i:j])
        i = j
    return msgs


if __name__ == "__main__":
    main()
