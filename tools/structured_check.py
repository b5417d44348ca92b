"""Structured outputs through the official `openai` client against a running `iris
serve` on a tiny random model (whose free output is noise): 200 requests over several
JSON schemas (nested objects, arrays, enums, number ranges, required fields), streamed
and not, run 16 at a time with unconstrained requests in the same batches; every
constrained text must parse and validate (`jsonschema`), every unconstrained one must
equal the same request run alone. Also: `json_object`, a regex, a Lark grammar (Iris'
`response_format` extensions, through `extra_body`) and a schema that does not compile
(a 400 with the compiler's message). The fixture's context is 128 positions: the
schemas bound their strings, numbers and arrays to fit.

    python tools/structured_check.py --http 127.0.0.1:8000 --model blip2-tiny-opt-f32

`scripts/client_check.sh` sets up the environment and the server.
"""
import argparse
import concurrent.futures
import json
import re
import sys

import jsonschema
import openai

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "kind": {"enum": ["cat", "dog", "bird"]},
        },
        "required": ["name", "age", "kind"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "objects": {
                "type": "array",
                "items": {"type": "string", "maxLength": 6},
                "minItems": 1,
                "maxItems": 3,
            },
            "box": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": -5, "maximum": 99},
                    "visible": {"type": "boolean"},
                },
                "required": ["x", "visible"],
                "additionalProperties": False,
            },
        },
        "required": ["objects", "box"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "total": {"type": "integer", "minimum": 1, "maximum": 999},
            "currency": {"enum": ["EUR", "USD"]},
            "items": {
                "type": "array",
                "maxItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["total", "currency", "items"],
        "additionalProperties": False,
    },
]


def fail(msg):
    print(f"structured check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--http", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--requests", type=int, default=200)
    a = ap.parse_args()
    client = openai.OpenAI(base_url=f"http://{a.http}/v1", api_key=a.api_key, max_retries=0)
    messages = [{"role": "user", "content": "Describe the picture as JSON."}]

    def free(i):
        r = client.chat.completions.create(
            model=a.model, messages=[{"role": "user", "content": f"Say something {i}."}],
            max_tokens=12, temperature=0)
        return r.choices[0].message.content

    def constrained(i):
        schema = SCHEMAS[i % len(SCHEMAS)]
        fmt = {"type": "json_schema",
               "json_schema": {"name": f"s{i % len(SCHEMAS)}", "schema": schema, "strict": True}}
        kw = dict(model=a.model, messages=messages, max_tokens=90, temperature=1.0, seed=i,
                  response_format=fmt)
        if i % 2:
            text, finish = "", None
            for c in client.chat.completions.create(stream=True, **kw):
                if c.choices:
                    text += c.choices[0].delta.content or ""
                    finish = c.choices[0].finish_reason or finish
        else:
            r = client.chat.completions.create(**kw)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        if finish != "stop":
            fail(f"request {i}: finish {finish}: {text!r}")
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError) as e:
            fail(f"request {i}: {e}: {text!r}")
        return text

    alone = [free(i) for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(constrained, i) for i in range(a.requests)]
        mixed = [pool.submit(free, i) for i in range(20)]
        texts = [f.result() for f in futs]
        for i, f in enumerate(mixed):
            if f.result() != alone[i]:
                fail(f"free request {i} batched with constrained ones: {f.result()!r} != {alone[i]!r}")

    extra = [
        ({"type": "json_object"}, lambda t: isinstance(json.loads(t), dict)),
        ({"type": "regex", "regex": "(yes|no), [0-9]{3}"},
         lambda t: re.fullmatch("(yes|no), [0-9]{3}", t)),
        ({"type": "grammar", "grammar": 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'},
         lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t)),
    ]
    for fmt, ok in extra:
        r = client.chat.completions.create(
            model=a.model, messages=messages, max_tokens=90, temperature=1.0, seed=7,
            extra_body={"response_format": fmt})
        t = r.choices[0].message.content
        if r.choices[0].finish_reason != "stop" or not ok(t):
            fail(f"{fmt['type']}: {r.choices[0].finish_reason} {t!r}")
    try:
        client.chat.completions.create(
            model=a.model, messages=messages, max_tokens=8,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
        fail("a schema that does not compile was accepted")
    except openai.BadRequestError as e:
        if "does not compile" not in str(e):
            fail(f"the 400 does not say why: {e}")
    print(f"structured outputs: {len(texts)} schema-constrained completions valid "
          f"(e.g. {texts[0]!r}), 20 free ones unchanged beside them, json_object / regex / "
          f"grammar held, a bad schema refused")


if __name__ == "__main__":
    main()
