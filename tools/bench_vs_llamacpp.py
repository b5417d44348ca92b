#!/usr/bin/env python3
"""Iris' decode against llama.cpp's on the same shape, in strict alternation (the
machine is shared and its bandwidth drifts within a minute: compare within a pair,
never across minutes).

Each pair, for each format: `iris bench decode --dtypes F --batch 1 --json` (its own
bandwidth probe right before every step: tokens/s, the share of the weight-read bound,
the probe's GB/s), then `llama-bench -p 0 -n TOKENS -t 2` on the GGUF file of that
format (TinyLlama-1.1B's shape, tools/gen_llama_gguf.py, quantized by llama-quantize).
llama.cpp's implied bandwidth is its tokens/s times the bytes Iris' step reads for the
same format, set against Iris' probe (`iris bench bandwidth`) right before and right
after llama.cpp's run: the bandwidth of llama.cpp's own minute. With --prefill N, also `iris bench decode --prefill N` against
`llama-bench -p N -n 0`.

With --abba, each pair runs Iris, llama.cpp, llama.cpp, Iris and sets the mean of each
side's two runs against the other's: this machine's bandwidth jumps between ~33 and
~60 GB/s from minute to minute, and one run each leaves a pair to whichever side drew
the fast minute; the counterbalanced order gives both sides the same exposure to a
drift. Every run is printed with its probe.

    python3 tools/bench_vs_llamacpp.py --iris target/release/iris --pairs 6 \
        --formats bf16,q8_0,q4_0 [--prefill 608] [--json OUT]

The llama.cpp binaries and model files are made on first use (tools/llamacpp.sh,
~15 min; the GGUF files, ~2.2 GB f16 and its quantizations, in IRIS_CACHE).
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("IRIS_CACHE", os.path.expanduser("~/.cache/iris"))
# llama-quantize's names for the formats Iris has.
LLAMA_TYPES = {"bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def llama_bin():
    return sh(["bash", os.path.join(HERE, "llamacpp.sh")]).strip()


def model_file(bin_dir, fmt):
    """The TinyLlama-shaped GGUF in `fmt`, made once."""
    f16 = os.path.join(CACHE, "tinyllama-shape-f16.gguf")
    if not os.path.exists(f16):
        venv = os.environ.get("IRIS_GGUF_VENV", "/tmp/iris-gguf-venv")
        if not os.path.exists(os.path.join(venv, "bin", "python")):
            sh([sys.executable, "-m", "venv", venv])
            sh([os.path.join(venv, "bin", "pip"), "install", "-q", "numpy", "sentencepiece", "pyyaml"])
        env = dict(os.environ, PYTHONPATH=os.path.join(CACHE, "llama.cpp-src", "gguf-py"))
        sh([os.path.join(venv, "bin", "python"), os.path.join(HERE, "gen_llama_gguf.py"), f16 + ".part"], env=env)
        os.rename(f16 + ".part", f16)
    out = os.path.join(CACHE, f"tinyllama-shape-{fmt}.gguf")
    if not os.path.exists(out):
        env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
        sh([os.path.join(bin_dir, "llama-quantize"), f16, out + ".part", LLAMA_TYPES[fmt], "2"], env=env)
        os.rename(out + ".part", out)
    return out


def iris(exe, fmt, tokens, prefill=0):
    args = [exe, "bench", "decode", "--dtypes", fmt, "--batch", "1", "--tokens", str(tokens), "--json"]
    if prefill:
        args += ["--prefill", str(prefill)]
    rows = [json.loads(l) for l in sh(args).splitlines() if l.startswith("{")]
    return rows


def probe(exe):
    """Iris' bandwidth probe right now (GB/s, the best of its passes)."""
    out = sh([exe, "bench", "bandwidth", "--passes", "5"])
    return json.loads(out.strip().splitlines()[-1])["best_bytes_per_s"] / 1e9


def llama(bin_dir, path, p, n, reps):
    env = dict(os.environ, LD_LIBRARY_PATH=bin_dir)
    out = sh([os.path.join(bin_dir, "llama-bench"), "-m", path, "-p", str(p), "-n", str(n),
              "-t", "2", "-r", str(reps), "-o", "json"], env=env)
    return json.loads(out)[0]["avg_ts"]


def abba(a, bin_dir, path, pair, f, results):
    """One counterbalanced pair: Iris, llama.cpp, llama.cpp, Iris."""
    first = iris(a.iris, f, a.tokens)[0]
    runs = []
    for _ in range(2):
        before = probe(a.iris)
        ts = llama(bin_dir, path, 0, a.tokens, 1)
        runs.append((ts, max(before, probe(a.iris))))
    last = iris(a.iris, f, a.tokens)[0]
    mine = [first, last]
    iris_ts = sum(r["tokens_per_s"] for r in mine) / 2
    llama_ts = sum(ts for ts, _ in runs) / 2
    for r in mine:
        print(f"pair {pair} {f:>5}: iris {r['tokens_per_s']:6.2f} tok/s ({100 * r['ratio']:.1f}% of its "
              f"probe's bound, probe {r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s)", flush=True)
    for ts, around in runs:
        implied = ts * first["bytes_per_token"] / 1e9
        print(f"pair {pair} {f:>5}: llama.cpp {ts:6.2f} tok/s (implies {implied:.1f} GB/s; probe around "
              f"it {around:.1f}, {100 * implied / around:.1f}% of its bound)", flush=True)
    print(f"pair {pair} {f:>5}: means iris {iris_ts:6.2f} | llama.cpp {llama_ts:6.2f} | "
          f"iris/llama {iris_ts / llama_ts:.2f}", flush=True)
    results.append({
        "pair": pair, "format": f, "abba": True,
        "iris_runs": [{"tokens_per_s": r["tokens_per_s"], "share_of_bound": r["ratio"],
                       "probe_gb_s": r["bandwidth_bytes_per_s"] / 1e9} for r in mine],
        "llama_runs": [{"tokens_per_s": ts, "probe_around_gb_s": around} for ts, around in runs],
        "iris_tokens_per_s": iris_ts, "llama_tokens_per_s": llama_ts, "iris_over_llama": iris_ts / llama_ts,
    })


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iris", required=True)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--formats", default="bf16,q8_0,q4_0")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=0)
    ap.add_argument("--abba", action="store_true",
                    help="each pair Iris, llama.cpp, llama.cpp, Iris; the means compared")
    ap.add_argument("--json")
    a = ap.parse_args()
    bin_dir = llama_bin()
    formats = a.formats.split(",")
    files = {f: model_file(bin_dir, f) for f in formats}
    results = []
    for pair in range(1, a.pairs + 1):
        for f in formats:
            if a.abba:
                abba(a, bin_dir, files[f], pair, f, results)
                continue
            row = iris(a.iris, f, a.tokens)[0]
            # The probe right before and right after llama.cpp's run: the machine's
            # bandwidth in llama.cpp's own minute (the better of the two).
            before = probe(a.iris)
            ts = llama(bin_dir, files[f], 0, a.tokens, 1)
            around = max(before, probe(a.iris))
            implied = ts * row["bytes_per_token"] / 1e9
            r = {
                "pair": pair, "format": f, "iris_tokens_per_s": row["tokens_per_s"],
                "iris_share_of_bound": row["ratio"], "probe_gb_s": row["bandwidth_bytes_per_s"] / 1e9,
                "llama_tokens_per_s": ts, "llama_implied_gb_s": implied,
                "probe_around_llama_gb_s": around, "llama_share_of_bound": implied / around,
                "iris_over_llama": row["tokens_per_s"] / ts,
            }
            results.append(r)
            print(f"pair {pair} {f:>5}: iris {r['iris_tokens_per_s']:6.2f} tok/s "
                  f"({100 * r['iris_share_of_bound']:.1f}% of its probe's bound, probe {r['probe_gb_s']:.1f} GB/s) | "
                  f"llama.cpp {ts:6.2f} tok/s (implies {implied:.1f} GB/s; probe around it {around:.1f}, "
                  f"{100 * implied / around:.1f}% of its bound) | iris/llama {r['iris_over_llama']:.2f}",
                  flush=True)
    if a.prefill:
        for f in formats:
            rows = iris(a.iris, f, 4, a.prefill)
            ts = llama(bin_dir, files[f], a.prefill, 0, 1)
            line = [l for l in rows if "prefill_tokens_per_s" in l]
            mine = line[0]["prefill_tokens_per_s"] if line else float("nan")
            results.append({"format": f, "prefill": a.prefill, "iris_tokens_per_s": mine, "llama_tokens_per_s": ts})
            print(f"prefill {a.prefill} {f:>5}: iris {mine:7.1f} tok/s | llama.cpp {ts:7.1f} tok/s | "
                  f"iris/llama {mine / ts:.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
