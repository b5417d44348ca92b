// Iris' CUDA kernels: everything the CUDA backend runs that is not a GEMM (those go
// through cuBLASLt). Compiled by NVRTC at start-up for the device's architecture; CI
// compiles this file for sm_80 and sm_90 (`iris-tensor/tests/cuda_kernels.rs`).
//
// Layouts are the CPU backend's: contiguous row-major, activations f32, weights and
// K/V f32, bf16 or f16 held as raw 16-bit patterns (`unsigned short`). Reductions
// accumulate in f32 (f64 is slow on most GPUs; tolerances in the backend tests allow
// it). Every kernel bounds-checks its index.

typedef unsigned short u16;
typedef unsigned int u32;

// NVRTC has no <math.h> constants.
#define NEG_INF __int_as_float(0xff800000)

// ---------------------------------------------------------------- conversions

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round to nearest even, NaN kept quiet (as `half::bf16::from_f32`).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((b | 0x00400000u) >> 16);
    }
    b += 0x7fffu + ((b >> 16) & 1u);
    return (u16)(b >> 16);
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// dtype codes shared with the Rust side: 0 f32, 1 bf16, 2 f16.
__device__ __forceinline__ float load_as_f32(const void* p, size_t i, int dtype) {
    if (dtype == 0) return ((const float*)p)[i];
    if (dtype == 1) return bf16_to_f32(((const u16*)p)[i]);
    return f16_to_f32(((const u16*)p)[i]);
}

__device__ __forceinline__ float round_to(float x, int dtype) {
    if (dtype == 1) return bf16_to_f32(f32_to_bf16(x));
    if (dtype == 2) return f16_to_f32(f32_to_f16(x));
    return x;
}

#define GRID_STRIDE(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); \
         i += (size_t)blockDim.x * gridDim.x)

extern "C" __global__ void to_f32(const void* src, float* dst, size_t n, int dtype) {
    GRID_STRIDE(i, n) { dst[i] = load_as_f32(src, i, dtype); }
}

extern "C" __global__ void f32_to_half(const float* src, u16* dst, size_t n, int dtype) {
    GRID_STRIDE(i, n) { dst[i] = dtype == 1 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]); }
}

extern "C" __global__ void round_in_place(float* x, size_t n, int dtype) {
    GRID_STRIDE(i, n) { x[i] = round_to(x[i], dtype); }
}

// ---------------------------------------------------------------- element-wise

// op: 0 gelu (erf), 1 gelu tanh, 2 quick gelu, 3 silu, 4 relu, 5 scale by a, 6 tanh.
extern "C" __global__ void unary(float* x, size_t n, int op, float a) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        float y;
        switch (op) {
            case 0: y = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); break;
            case 1: {
                const float c = 0.79788456080286536f;  // sqrt(2/pi)
                y = 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
                break;
            }
            case 2: y = v / (1.0f + expf(-1.702f * v)); break;
            case 3: y = v / (1.0f + expf(-v)); break;
            case 4: y = fmaxf(v, 0.0f); break;
            case 5: y = v * a; break;
            default: y = tanhf(v); break;
        }
        x[i] = y;
    }
}

// op: 0 add, 1 mul; `b` in any dtype.
extern "C" __global__ void binary(float* a, const void* b, size_t n, int op, int b_dtype) {
    GRID_STRIDE(i, n) {
        float y = load_as_f32(b, i, b_dtype);
        a[i] = op == 0 ? a[i] + y : a[i] * y;
    }
}

// `row` has `d` values, or one broadcast to every element (row_len 1).
extern "C" __global__ void binary_row(float* a, const void* row, size_t n, size_t d,
                                      size_t row_len, int op, int row_dtype) {
    GRID_STRIDE(i, n) {
        float y = load_as_f32(row, row_len == 1 ? 0 : i % d, row_dtype);
        a[i] = op == 0 ? a[i] + y : a[i] * y;
    }
}

// ---------------------------------------------------------------- reductions

// Sum over a block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    v = lane < warps ? shared[lane] : 0.0f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    float r = shared[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x / 32;
    v = lane < warps ? shared[lane] : NEG_INF;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    float r = shared[0];
    __syncthreads();
    return r;
}

// One block per row. LayerNorm with biased variance (two passes over the row).
extern "C" __global__ void layer_norm(float* x, const void* w, const void* b, size_t d,
                                      float eps, int w_dtype, int has_bias) {
    __shared__ float shared[32];
    float* row = x + blockIdx.x * d;
    float s = 0.0f;
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) s += row[i];
    float mean = block_sum(s, shared) / (float)d;
    float v = 0.0f;
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) {
        float c = row[i] - mean;
        v += c * c;
    }
    float inv = rsqrtf(block_sum(v, shared) / (float)d + eps);
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) {
        float y = (row[i] - mean) * inv * load_as_f32(w, i, w_dtype);
        row[i] = has_bias ? y + load_as_f32(b, i, w_dtype) : y;
    }
}

// One block per row: w · round(x / rms(x)), as HF's LlamaRMSNorm.
extern "C" __global__ void rms_norm(float* x, const void* w, size_t d, float eps, int w_dtype,
                                    int round_dtype) {
    __shared__ float shared[32];
    float* row = x + blockIdx.x * d;
    float s = 0.0f;
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) s += row[i] * row[i];
    float inv = rsqrtf(block_sum(s, shared) / (float)d + eps);
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) {
        row[i] = round_to(row[i] * inv, round_dtype) * load_as_f32(w, i, w_dtype);
    }
}

extern "C" __global__ void softmax_rows(float* x, size_t d) {
    __shared__ float shared[32];
    float* row = x + blockIdx.x * d;
    float m = NEG_INF;
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, row[i]);
    m = block_max(m, shared);
    float s = 0.0f;
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) {
        float e = expf(row[i] - m);
        row[i] = e;
        s += e;
    }
    float inv = 1.0f / block_sum(s, shared);
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) row[i] *= inv;
}

extern "C" __global__ void l2_normalize_rows(float* x, size_t d) {
    __shared__ float shared[32];
    float* row = x + blockIdx.x * d;
    float s = 0.0f;
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) s += row[i] * row[i];
    float n = fmaxf(sqrtf(block_sum(s, shared)), 1e-12f);
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) row[i] /= n;
}

// The first index whose value is not finite, as the minimum over the grid (`out` starts
// at n).
extern "C" __global__ void first_non_finite(const float* x, size_t n, unsigned long long* out) {
    GRID_STRIDE(i, n) {
        if (!isfinite(x[i])) atomicMin(out, (unsigned long long)i);
    }
}

// One block per row: the largest logit (first on ties), the row's log-sum-exp, and
// the chosen token's log-probability.
extern "C" __global__ void argmax_rows(const float* x, size_t d, u32* ids, float* logprobs) {
    __shared__ float vals[32];
    __shared__ u32 idx[32];
    __shared__ float shared[32];
    const float* row = x + blockIdx.x * d;
    float best = NEG_INF;
    u32 at = 0;
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) {
        float v = row[i];
        if (v > best) {
            best = v;
            at = (u32)i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        u32 oi = __shfl_xor_sync(0xffffffffu, at, o);
        if (ov > best || (ov == best && oi < at)) {
            best = ov;
            at = oi;
        }
    }
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        vals[warp] = best;
        idx[warp] = at;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / 32); ++w) {
            if (vals[w] > best || (vals[w] == best && idx[w] < at)) {
                best = vals[w];
                at = idx[w];
            }
        }
        vals[0] = best;
        idx[0] = at;
    }
    __syncthreads();
    best = vals[0];
    at = idx[0];
    float s = 0.0f;
    for (size_t i = threadIdx.x; i < d; i += blockDim.x) s += expf(row[i] - best);
    float lse = logf(block_sum(s, shared)) + best;
    if (threadIdx.x == 0) {
        ids[blockIdx.x] = at;
        logprobs[blockIdx.x] = row[at] - lse;
    }
}

// ---------------------------------------------------------------- data movement

// Rows `ids` of a `[rows, d]` table (any dtype) as f32.
extern "C" __global__ void gather_rows(const void* table, const u32* ids, float* out,
                                       size_t n_ids, size_t d, int dtype) {
    GRID_STRIDE(i, n_ids * d) {
        size_t r = i / d, c = i % d;
        out[i] = load_as_f32(table, (size_t)ids[r] * d + c, dtype);
    }
}

// Columns `start..start+len` of `[rows, d]`, element size `es` bytes (2 or 4).
extern "C" __global__ void narrow_cols(const char* src, char* dst, size_t rows, size_t d,
                                       size_t start, size_t len, int es) {
    GRID_STRIDE(i, rows * len) {
        size_t r = i / len, c = i % len;
        size_t from = (r * d + start + c) * es, to = i * es;
        if (es == 4) {
            *(float*)(dst + to) = *(const float*)(src + from);
        } else {
            *(u16*)(dst + to) = *(const u16*)(src + from);
        }
    }
}

// One part `[rows, w]` (f32) into columns `at..at+w` of `[rows, d]`.
extern "C" __global__ void put_cols(const float* part, float* out, size_t rows, size_t w,
                                    size_t d, size_t at) {
    GRID_STRIDE(i, rows * w) {
        size_t r = i / w, c = i % w;
        out[r * d + at + c] = part[i];
    }
}

// Row `at[i]` of `x` (`d` wide) becomes row `i` of `src`.
extern "C" __global__ void scatter_rows(float* x, const float* src, const u32* at, size_t n,
                                        size_t d) {
    GRID_STRIDE(i, n * d) {
        size_t r = i / d, c = i % d;
        x[(size_t)at[r] * d + c] = src[i];
    }
}

// A `[c, s, s]` image into its `p`×`p` patches `[(s/p)², c·p·p]`.
extern "C" __global__ void patches(const float* px, float* out, size_t c, size_t s, size_t p) {
    size_t g = s / p, per = c * p * p;
    GRID_STRIDE(i, g * g * per) {
        size_t patch = i / per, k = i % per;
        size_t gy = patch / g, gx = patch % g;
        size_t ch = k / (p * p), ky = (k / p) % p, kx = k % p;
        out[i] = px[ch * s * s + (gy * p + ky) * s + gx * p + kx];
    }
}

// HF's "rotate half" RoPE of `[rows, heads·2·half]`, row `t` by row `t` of cos/sin.
extern "C" __global__ void rope(float* x, const float* cos, const float* sin, size_t rows,
                                size_t heads, size_t half, int dtype) {
    GRID_STRIDE(i, rows * heads * half) {
        size_t t = i / (heads * half), h = (i / half) % heads, j = i % half;
        float* head = x + (t * heads + h) * 2 * half;
        float x1 = head[j], x2 = head[j + half];
        float c = cos[t * half + j], s = sin[t * half + j];
        head[j] = round_to(round_to(x1 * c, dtype) + round_to(-x2 * s, dtype), dtype);
        head[j + half] = round_to(round_to(x2 * c, dtype) + round_to(x1 * s, dtype), dtype);
    }
}

// ---------------------------------------------------------------- attention

// Head dims up to 32 · MAX_PER_LANE.
#define MAX_PER_LANE 8

// Where key/value row `j` of a sequence lives: contiguous rows (`table` null) or the
// paged arena (`table` maps row / block_size to a block whose `block_size` key rows
// are followed by its `block_size` value rows).
struct Rows {
    const void* k;  // keys (paged: the arena)
    const void* v;  // values (paged: the arena too)
    const u32* table;
    size_t block_size;
    size_t width;  // values a row
    int dtype;
};

__device__ __forceinline__ size_t key_at(const Rows& r, size_t j) {
    if (r.table == 0) return j * r.width;
    return (size_t)r.table[j / r.block_size] * 2 * r.block_size * r.width +
           (j % r.block_size) * r.width;
}

__device__ __forceinline__ size_t value_at(const Rows& r, size_t j) {
    if (r.table == 0) return j * r.width;
    return key_at(r, j) + r.block_size * r.width;
}

// One warp: query `q` (hd values) against keys `0..limit` of KV head `kvh`, online
// softmax (flash-style: no score row is stored), output `hd` values to `out`.
__device__ void attend_warp(const float* q, const Rows& r, size_t kvh, size_t hd, size_t limit,
                            float scale, float* out) {
    int lane = threadIdx.x % 32;
    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
    int per = (int)((hd + 31) / 32);
    for (int e = 0; e < per; ++e) {
        size_t dd = lane + 32 * e;
        qv[e] = dd < hd ? q[dd] : 0.0f;
        acc[e] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (size_t j = 0; j < limit; ++j) {
        size_t k0 = key_at(r, j) + kvh * hd, v0 = value_at(r, j) + kvh * hd;
        float s = 0.0f;
        for (int e = 0; e < per; ++e) {
            size_t dd = lane + 32 * e;
            if (dd < hd) s += qv[e] * load_as_f32(r.k, k0 + dd, r.dtype);
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        s *= scale;
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new), p = expf(s - m_new);
        l = l * corr + p;
        for (int e = 0; e < per; ++e) {
            size_t dd = lane + 32 * e;
            float v = dd < hd ? load_as_f32(r.v, v0 + dd, r.dtype) : 0.0f;
            acc[e] = acc[e] * corr + p * v;
        }
        m = m_new;
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int e = 0; e < per; ++e) {
        size_t dd = lane + 32 * e;
        if (dd < hd) out[dd] = acc[e] * inv;
    }
}

// Attention over given keys and values (prefill, a ViT's images, cross-attention):
// q `[blocks·tq, heads·hd]`, k/v `[blocks·tk, kv_heads·hd]` f32. Grid: (tq·blocks,
// kv_heads); a block's warps are the query heads of one KV head (they read the same
// keys). causal < 0: every query sees every key of its block; else query i sees keys
// 0..=causal+i.
extern "C" __global__ void attention(const float* q, const float* k, const float* v,
                                     float* out, size_t tq, size_t tk, size_t heads,
                                     size_t kv_heads, size_t hd, long long causal) {
    size_t row = blockIdx.x, kvh = blockIdx.y;
    size_t group = heads / kv_heads, h = kvh * group + threadIdx.x / 32;
    if (threadIdx.x / 32 >= group) return;
    size_t b = row / tq, i = row % tq;
    size_t width = kv_heads * hd;
    Rows r;
    r.k = k + b * tk * width;
    r.v = v + b * tk * width;
    r.table = 0;
    r.block_size = 0;
    r.width = width;
    r.dtype = 0;
    size_t limit = causal < 0 ? tk : min(tk, (size_t)causal + i + 1);
    attend_warp(q + row * heads * hd + h * hd, r, kvh, hd, limit, rsqrtf((float)hd),
                out + row * heads * hd + h * hd);
}

// A batch step over the paged arena: sequence s's queries are rows
// `first[s]..first[s]+rows[s]` of q, its keys the first `cached[s] + rows[s]` rows
// found through its block table (`tables + table_at[s]`), causally from `cached[s]`.
// Grid: (Σ rows, kv_heads); warps as in `attention`. `seq_of[row]` names the sequence.
extern "C" __global__ void paged_attention(const float* q, const void* arena, float* out,
                                           const u32* tables, const u32* table_at,
                                           const u32* seq_of, const u32* first,
                                           const u32* cached, size_t block_size,
                                           size_t heads, size_t kv_heads, size_t hd,
                                           int dtype) {
    size_t row = blockIdx.x, kvh = blockIdx.y;
    size_t group = heads / kv_heads, h = kvh * group + threadIdx.x / 32;
    if (threadIdx.x / 32 >= group) return;
    u32 s = seq_of[row];
    size_t i = row - first[s];
    Rows r;
    r.k = arena;
    r.v = arena;
    r.table = tables + table_at[s];
    r.block_size = block_size;
    r.width = kv_heads * hd;
    r.dtype = dtype;
    size_t limit = (size_t)cached[s] + i + 1;
    attend_warp(q + row * heads * hd + h * hd, r, kvh, hd, limit, rsqrtf((float)hd),
                out + row * heads * hd + h * hd);
}

// Writes rows `k`, `v` (`[n, width]` f32) at positions `start..start+n` of a sequence
// whose blocks are `table`, in the arena's dtype.
extern "C" __global__ void kv_write(void* arena, const u32* table, const float* k,
                                    const float* v, size_t n, size_t start, size_t width,
                                    size_t block_size, int dtype) {
    GRID_STRIDE(i, n * width) {
        size_t t = i / width, c = i % width, pos = start + t;
        size_t base = (size_t)table[pos / block_size] * 2 * block_size * width +
                      (pos % block_size) * width + c;
        size_t vbase = base + block_size * width;
        if (dtype == 0) {
            ((float*)arena)[base] = k[i];
            ((float*)arena)[vbase] = v[i];
        } else {
            ((u16*)arena)[base] = f32_to_bf16(k[i]);
            ((u16*)arena)[vbase] = f32_to_bf16(v[i]);
        }
    }
}

// ---------------------------------------------------------------- sampling

// SplitMix64, as the host sampler's (iris_tensor::sample).
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// An order-preserving unsigned key of a float (larger float, larger key).
__device__ __forceinline__ u32 order_key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

#define SAMPLE_THREADS 512
#define CANDIDATES 512
#define TARGET 256
#define TOP_LOGPROBS 20

// One block of SAMPLE_THREADS per row: the host sampler's draw (temperature, top-k,
// top-p, min-p, the (seed, position) draw) on the device, over the candidates that can
// matter: the TARGET most likely tokens and any tied with the last. Sorted by (scaled
// logit desc, id asc) as the host sorts. status 0: `ids` holds the draw; 1: the
// nucleus reaches past the candidates (or ties overflow them) — the caller draws on
// the host from the whole row. Also each row's chosen log-probability and its
// `n_top` most likely tokens' (`top_ids`, `top_lps`, TOP_LOGPROBS a row).
extern "C" __global__ void sample_rows(const float* x, size_t d, const float* temperature,
                                       const u32* top_k, const float* top_p,
                                       const float* min_p, const unsigned long long* seed,
                                       const unsigned long long* position, u32 n_top,
                                       u32* ids, float* logprobs, u32* status, u32* top_ids,
                                       float* top_lps) {
    __shared__ float shared[32];
    __shared__ u32 hist[256];
    __shared__ float cand_s[CANDIDATES];
    __shared__ u32 cand_id[CANDIDATES];
    __shared__ u32 count;
    __shared__ u32 prefix, prefix_mask, need;
    __shared__ double dsum[SAMPLE_THREADS / 32];
    const size_t r = blockIdx.x;
    const float* row = x + r * d;
    // Greedy rows (temperature 0) take the first candidate: the argmax, first on ties.
    const bool greedy = !(temperature[r] > 0.0f);
    const float t = greedy ? 1.0f : temperature[r];
    const int tid = threadIdx.x;

    // The row's max, and Σ exp(l - max) (log-probabilities) and Σ exp((l - max)/t)
    // (the draw), in f64 as the host.
    float m = NEG_INF;
    for (size_t i = tid; i < d; i += blockDim.x) m = fmaxf(m, row[i]);
    m = block_max(m, shared);
    double s1 = 0.0, st = 0.0;
    for (size_t i = tid; i < d; i += blockDim.x) {
        s1 += exp((double)(row[i] - m));
        st += exp((double)((row[i] - m) / t));
    }
    for (int pass = 0; pass < 2; ++pass) {
        double v = pass == 0 ? s1 : st;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (tid % 32 == 0) dsum[tid / 32] = v;
        __syncthreads();
        if (tid == 0) {
            double a = 0.0;
            for (int w = 0; w < SAMPLE_THREADS / 32; ++w) a += dsum[w];
            dsum[0] = a;
        }
        __syncthreads();
        if (pass == 0) s1 = dsum[0]; else st = dsum[0];
        __syncthreads();
    }
    const float lse = (float)log(s1) + m;

    // Radix select (8 bits a pass) of the TARGET-th largest scaled logit's key.
    if (tid == 0) {
        prefix = 0;
        prefix_mask = 0;
        need = d < TARGET ? (u32)d : TARGET;
        count = 0;
    }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (size_t i = tid; i < d; i += blockDim.x) {
            u32 k = order_key((row[i] - m) / t);
            if ((k & prefix_mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            u32 above = 0;
            int digit = 255;
            for (; digit > 0; --digit) {
                if (above + hist[digit] >= need) break;
                above += hist[digit];
            }
            need -= above;
            prefix |= (u32)digit << shift;
            prefix_mask |= 255u << shift;
        }
        __syncthreads();
    }
    const u32 threshold = prefix;

    // Every token at or above the threshold.
    for (size_t i = tid; i < d; i += blockDim.x) {
        float sv = (row[i] - m) / t;
        if (order_key(sv) >= threshold) {
            u32 at = atomicAdd(&count, 1u);
            if (at < CANDIDATES) {
                cand_s[at] = sv;
                cand_id[at] = (u32)i;
            }
        }
    }
    __syncthreads();
    const u32 n = min(count, (u32)CANDIDATES);
    for (u32 i = n + tid; i < CANDIDATES; i += blockDim.x) {
        cand_s[i] = NEG_INF;
        cand_id[i] = 0xffffffffu;
    }
    __syncthreads();
    // Bitonic sort: (scaled logit desc, id asc) first.
    for (u32 size = 2; size <= CANDIDATES; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            for (u32 i = tid; i < CANDIDATES; i += blockDim.x) {
                u32 j = i ^ stride;
                if (j > i) {
                    bool before_ij = cand_s[i] > cand_s[j] ||
                                     (cand_s[i] == cand_s[j] && cand_id[i] < cand_id[j]);
                    bool up = (i & size) == 0;
                    if (up != before_ij) {
                        float ts = cand_s[i];
                        cand_s[i] = cand_s[j];
                        cand_s[j] = ts;
                        u32 ti = cand_id[i];
                        cand_id[i] = cand_id[j];
                        cand_id[j] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (tid != 0) return;
    for (u32 i = 0; i < n_top && i < TOP_LOGPROBS; ++i) {
        u32 id = i < n ? cand_id[i] : 0;
        top_ids[r * TOP_LOGPROBS + i] = id;
        top_lps[r * TOP_LOGPROBS + i] = i < n ? row[id] - lse : NEG_INF;
    }
    if (greedy) {
        ids[r] = cand_id[0];
        logprobs[r] = row[cand_id[0]] - lse;
        status[r] = 0;
        return;
    }
    if (count > CANDIDATES) {
        status[r] = 1;
        return;
    }
    // The host's keep rules over the sorted candidates.
    u32 keep = n;
    u32 k = top_k[r];
    bool limited = k > 0 && k <= n;
    if (k > 0 && k < keep) keep = k;
    double mass = 0.0;
    bool reached = false;
    for (u32 i = 0; i < keep; ++i) {
        mass += exp((double)cand_s[i]) / st;
        if (mass >= (double)top_p[r]) {
            keep = i + 1;
            reached = true;
            break;
        }
    }
    if (!reached && !limited && n < d) {
        status[r] = 1;  // the nucleus may hold tokens past the candidates
        return;
    }
    if (min_p[r] > 0.0f) {
        double floor = exp((double)cand_s[0]) / st * (double)min_p[r];
        u32 kept = 0;
        while (kept < keep && exp((double)cand_s[kept]) / st >= floor) ++kept;
        keep = kept > 0 ? kept : 1;
    }
    double kept_mass = 0.0;
    for (u32 i = 0; i < keep; ++i) kept_mass += exp((double)cand_s[i]) / st;
    unsigned long long rnd = splitmix64(seed[r] ^ splitmix64(position[r]));
    double u = (double)(rnd >> 11) / 9007199254740992.0 * kept_mass;
    double acc = 0.0;
    u32 choice = cand_id[keep - 1];
    for (u32 i = 0; i < keep; ++i) {
        acc += exp((double)cand_s[i]) / st;
        if (u < acc) {
            choice = cand_id[i];
            break;
        }
    }
    ids[r] = choice;
    logprobs[r] = row[choice] - lse;
    status[r] = 0;
}
