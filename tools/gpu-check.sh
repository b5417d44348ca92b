#!/usr/bin/env bash
# The GPU check, in one go on a machine with an NVIDIA GPU, CUDA, PyTorch and
# transformers (no Rust toolchain, no network), from binaries tools/gpu-build.sh made
# on a CPU machine (gpu-bin/):
#   1. the backend test suite on CUDA (every operation against plain references);
#   2. the golden tests on CUDA (HF transformers' outputs, greedy tokens);
#   3. a LLaMA-7B-shaped bf16 model with random weights made here: decode tokens/s at
#      batch 1, 8, 32, 64 against the HBM roofline (bandwidth measured in the same
#      run by a device-to-device copy), prefill tokens/s;
#   4. one rank over NCCL (the tensor-parallel path on one GPU), one CLIP
#      ViT-L/14-336 batch;
#   5. HF transformers (PyTorch eager, bf16, sdpa) on the same shapes, then the ratios.
# Inside 10 minutes; every stage has its own time limit and the check goes on after a
# failed stage, so one failure does not hide the rest.
#   bash tools/gpu-check.sh            (GPU_BIN=gpu-bin PYTHON=python3 DEVICE=cuda:0)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${GPU_BIN:-gpu-bin}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda:0}
out=$(mktemp -d)
status=0
stage() { echo; echo "=== $1 ($(date +%T))"; }
fail() { echo "FAILED: $1"; status=1; }

stage "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv 2>&1 | head -3
"$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' 2>&1 | tail -1

# cudarc finds libnvrtc, libcublasLt and libnccl by name (libnccl.so.2, NCCL's own
# name, is not among the names it tries): give it unversioned links to whatever
# this machine has (a CUDA toolkit, or PyTorch's nvidia-* wheels), and their folders.
libs="$out/lib"
mkdir -p "$libs"
roots="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu $("$PYTHON" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)"
for name in nvrtc cublasLt nccl; do
    found=$(find $roots -maxdepth 4 -name "lib$name.so*" ! -name "*alt*" 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$found" ]; then
        ln -sf "$found" "$libs/lib$name.so"
        LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
        echo "lib$name: $found"
    else
        echo "lib$name: not found under $roots"
    fi
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"

stage "backend test suite on $DEVICE"
IRIS_TEST_DEVICE=$DEVICE timeout 50 "$BIN/backend" --test-threads 1 2>&1 | tail -n 40 || fail "backend suite"

stage "golden tests on $DEVICE"
IRIS_TEST_DEVICE=$DEVICE IRIS_FIXTURES="$PWD/tests/fixtures" timeout 50 "$BIN/goldens" --test-threads 1 2>&1 | tail -n 40 || fail "goldens"

# LLaMA-7B: hidden 4096, 32 layers, 32 heads (no GQA), MLP 11008, vocabulary 32000.
shape="--hidden 4096 --layers 32 --heads 32 --intermediate 11008 --vocab 32000"
stage "Iris: LLaMA-7B-shaped bf16 decode and prefill on $DEVICE"
timeout 170 "$BIN/iris" bench decode --device "$DEVICE" --dtypes bf16 $shape --kv-heads 32 \
    --batch 1,8,32,64 --kv bf16 --tokens 16 --prefill 512 --json 2>&1 | tee "$out/iris_decode.txt" | tail -n 8 || fail "iris decode"
stage "Iris: one rank over NCCL (TinyLlama shape, bf16, batch 1)"
timeout 50 "$BIN/iris" bench decode --device "$DEVICE" --dtypes bf16 --tp 1 --tp-transport nccl \
    --kv bf16 --batch 1 --tokens 8 2>&1 | tail -n 2 || fail "iris nccl"

stage "Iris: CLIP ViT-L/14-336 on $DEVICE"
timeout 50 "$BIN/iris" bench vit --device "$DEVICE" --batch 1,8 --runs 3 2>&1 | tee "$out/iris_vit.txt" | tail -n 2 || fail "iris vit"

stage "HF transformers (PyTorch eager, bf16, sdpa) on the same shapes"
timeout 190 "$PYTHON" tools/bench_torch_decode.py --device cuda --dtype bf16 $shape --kv-heads 32 \
    --batch 1,8,32,64 --tokens 16 --prefill 512 --vit --vit-batch 8 2>&1 | grep '"impl"' | tee "$out/torch.txt" || fail "torch"

stage "summary"
"$PYTHON" - "$out" <<'PY'
import json, re, sys
d = sys.argv[1]
def lines(name):
    try:
        return [json.loads(l) for l in open(f"{d}/{name}") if l.startswith("{")]
    except OSError:
        return []
iris, torch = lines("iris_decode.txt"), lines("torch.txt")
t_dec = {r["batch"]: r["tokens_per_s"] for r in torch if "batch" in r}
for r in iris:
    if "batch" in r:
        b = r["batch"]
        vs = f", {r['tokens_per_s'] / t_dec[b]:.2f}x transformers ({t_dec[b]:.1f} tok/s)" if b in t_dec else ""
        print(f"decode batch {b:>2}: {r['tokens_per_s']:9.1f} tok/s; batch-1 step at {100 * r['ratio']:.1f}% of the HBM roofline "
              f"({r['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s copy){vs}")
for l in open(f"{d}/iris_decode.txt", errors="replace"):
    m = re.search(r"prefill (\d+) tokens: ([\d.]+) s", l)
    if m:
        tp = [r for r in torch if "prefill_tokens" in r]
        n, s = int(m.group(1)), float(m.group(2))
        vs = f", {tp[0]['seconds'] / s:.2f}x transformers ({n / tp[0]['seconds']:.0f} tok/s)" if tp else ""
        print(f"prefill {n}: {n / s:.0f} tok/s{vs}")
for l in open(f"{d}/iris_vit.txt", errors="replace"):
    m = re.search(r"batch (\d+) on \S+: ([\d.]+) s per image", l)
    if m:
        tv = [r for r in torch if "vit_l14_336_seconds" in r]
        b, s = int(m.group(1)), float(m.group(2))
        vs = f", {tv[0]['vit_l14_336_seconds'] / s:.2f}x transformers batch {tv[0]['vit_batch']}" if tv and b == tv[0]["vit_batch"] else ""
        print(f"ViT-L/14-336 batch {b}: {s * 1e3:.1f} ms per image{vs}")
PY
echo
[ $status -eq 0 ] && echo "gpu-check: all stages ran" || echo "gpu-check: some stages FAILED (above)"
exit $status
