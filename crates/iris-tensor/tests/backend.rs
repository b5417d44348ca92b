//! The backend test suite: every operation the models compose, on random inputs, against
//! a plain reference written here with loops (f64 sums). It runs on the device named by
//! `IRIS_TEST_DEVICE` (`cpu` by default: CI; `cuda` / `cuda:N`: `tools/gpu-check.sh`
//! on a GPU machine), with the same tolerances on every backend: 1e-4 relative for f32
//! work, the rounding of one bf16 / f16 step where an operation rounds.

use half::{bf16, f16};
use iris_tensor::attention::{
    attention, attention_blocks, attention_cached, attention_cross, AttnShape,
};
use iris_tensor::kv::{KvArena, KvCache, KvDtype};
use iris_tensor::sample::{Draw, Sampler, SamplingParams};
use iris_tensor::{linear, Activation, DType, Device, RopeTable, Tensor, Weight};

fn device() -> Device {
    let name = std::env::var("IRIS_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    Device::parse(&name).unwrap_or_else(|e| panic!("IRIS_TEST_DEVICE={name}: {e}"))
}

/// Deterministic values in [-1, 1).
fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn on(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_f32(v, shape)
        .unwrap()
        .to_device(device())
        .unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    assert_eq!(t.device(), device(), "the result stays on the device");
    t.to_f32_vec()
}

#[track_caller]
fn close(got: &[f32], want: &[f64], rel: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-6f64, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs();
        assert!(
            err <= rel * scale.max(w.abs()) + 1e-6,
            "{what}: element {i}: got {g}, want {w} (err {err:.3e}, scale {scale:.3e})"
        );
    }
}

fn bf16r(x: f64) -> f64 {
    bf16::from_f32(x as f32).to_f32() as f64
}

fn gelu(x: f64) -> f64 {
    // erf by its series (enough terms for |x| ≤ 4).
    let z = x / std::f64::consts::SQRT_2;
    let (mut term, mut sum) = (z, z);
    for n in 1..80 {
        term *= -z * z / n as f64;
        sum += term / (2 * n + 1) as f64;
    }
    0.5 * x * (1.0 + sum * 2.0 / std::f64::consts::PI.sqrt())
}

#[test]
fn dtype_conversions_round_to_nearest_even() {
    let x = rand(1000, 1);
    let t = on(x.clone(), &[10, 100]);
    for dt in [DType::BF16, DType::F16] {
        let narrow = t.to_dtype(dt).unwrap();
        assert_eq!(narrow.dtype(), dt);
        let back = host(&narrow.to_dtype(DType::F32).unwrap());
        let want: Vec<f64> = x
            .iter()
            .map(|&v| match dt {
                DType::BF16 => bf16::from_f32(v).to_f32() as f64,
                _ => f16::from_f32(v).to_f32() as f64,
            })
            .collect();
        close(&back, &want, 0.0, "narrow and back");
        let rounded = host(&t.clone().round_to(dt).unwrap());
        close(&rounded, &want, 0.0, "round_to");
    }
    // Bytes in the tensor's own dtype.
    let b = t.to_dtype(DType::BF16).unwrap().to_le_bytes().unwrap();
    assert_eq!(b.len(), 2000);
    assert_eq!(
        u16::from_le_bytes([b[0], b[1]]),
        bf16::from_f32(x[0]).to_bits()
    );
}

#[test]
fn activations_scale_and_tanh() {
    let x: Vec<f32> = rand(4099, 2).into_iter().map(|v| v * 4.0).collect();
    type Reference = fn(f64) -> f64;
    let cases: [(Activation, Reference); 5] = [
        (Activation::Gelu, gelu),
        (Activation::GeluTanh, |x| {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }),
        (Activation::QuickGelu, |x| x / (1.0 + (-1.702 * x).exp())),
        (Activation::Silu, |x| x / (1.0 + (-x).exp())),
        (Activation::Relu, |x| x.max(0.0)),
    ];
    for (act, f) in cases {
        let got = host(&on(x.clone(), &[x.len()]).activation(act).unwrap());
        let want: Vec<f64> = x.iter().map(|&v| f(v as f64)).collect();
        close(&got, &want, 1e-5, &format!("{act:?}"));
    }
    let got = host(&on(x.clone(), &[x.len()]).scale(-0.37).unwrap());
    close(
        &got,
        &x.iter().map(|&v| v as f64 * -0.37).collect::<Vec<_>>(),
        1e-6,
        "scale",
    );
    let got = host(&on(x.clone(), &[x.len()]).tanh().unwrap());
    close(
        &got,
        &x.iter().map(|&v| (v as f64).tanh()).collect::<Vec<_>>(),
        1e-5,
        "tanh",
    );
}

#[test]
fn elementwise_and_row_broadcasts() {
    let (r, d) = (37, 65);
    let (a, b) = (rand(r * d, 3), rand(r * d, 4));
    let row = rand(d, 5);
    let ta = on(a.clone(), &[r, d]);
    let sum = host(&ta.clone().add_elem(&on(b.clone(), &[r, d])).unwrap());
    close(
        &sum,
        &a.iter()
            .zip(&b)
            .map(|(x, y)| (x + y) as f64)
            .collect::<Vec<_>>(),
        1e-6,
        "add",
    );
    let prod = host(&ta.clone().mul_elem(&on(b.clone(), &[r, d])).unwrap());
    close(
        &prod,
        &a.iter()
            .zip(&b)
            .map(|(x, y)| (x * y) as f64)
            .collect::<Vec<_>>(),
        1e-6,
        "mul",
    );
    // A bf16 operand (a weight) is widened exactly.
    let bb = on(b.clone(), &[r, d]).to_dtype(DType::BF16).unwrap();
    let sum = host(&ta.clone().add_elem(&bb).unwrap());
    let want: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| *x as f64 + bf16r(*y as f64))
        .collect();
    close(&sum, &want, 1e-6, "add bf16");
    let added = host(&ta.clone().add_row(&on(row.clone(), &[d])).unwrap());
    let want: Vec<f64> = (0..r * d).map(|i| (a[i] + row[i % d]) as f64).collect();
    close(&added, &want, 1e-6, "add_row");
    let gated = host(&ta.clone().mul_row(&on(row.clone(), &[d])).unwrap());
    let want: Vec<f64> = (0..r * d).map(|i| (a[i] * row[i % d]) as f64).collect();
    close(&gated, &want, 1e-6, "mul_row");
    let one = host(&ta.clone().mul_row(&on(vec![0.25], &[1])).unwrap());
    close(
        &one,
        &a.iter().map(|x| *x as f64 * 0.25).collect::<Vec<_>>(),
        1e-6,
        "mul by one value",
    );
    assert!(ta.add_elem(&on(row, &[d])).is_err(), "shapes must match");
}

#[test]
fn norms_softmax_and_l2() {
    let (r, d) = (9, 300);
    let x: Vec<f32> = rand(r * d, 6).into_iter().map(|v| v * 3.0 + 0.5).collect();
    let (w, b) = (rand(d, 7), rand(d, 8));
    let rows = |f: &dyn Fn(&[f32]) -> Vec<f64>| -> Vec<f64> { x.chunks(d).flat_map(f).collect() };
    let ln = host(
        &on(x.clone(), &[r, d])
            .layer_norm(&on(w.clone(), &[d]), Some(&on(b.clone(), &[d])), 1e-5)
            .unwrap(),
    );
    let want = rows(&|row| {
        let m = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / d as f64;
        row.iter()
            .enumerate()
            .map(|(i, &v)| (v as f64 - m) / (var + 1e-5).sqrt() * w[i] as f64 + b[i] as f64)
            .collect()
    });
    close(&ln, &want, 1e-4, "layer_norm");
    for round in [DType::F32, DType::BF16] {
        let got = host(
            &on(x.clone(), &[r, d])
                .rms_norm(&on(w.clone(), &[d]), 1e-6, round)
                .unwrap(),
        );
        let want = rows(&|row| {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            row.iter()
                .enumerate()
                .map(|(i, &v)| {
                    let n = v as f64 * inv;
                    let n = if round == DType::BF16 { bf16r(n) } else { n };
                    n * w[i] as f64
                })
                .collect()
        });
        // bf16: a value at a rounding tie may land on either side.
        let tol = if round == DType::BF16 { 8e-3 } else { 1e-4 };
        close(&got, &want, tol, &format!("rms_norm {round}"));
    }
    let sm = host(&on(x.clone(), &[r, d]).softmax_last().unwrap());
    let want = rows(&|row| {
        let m = row.iter().fold(f64::MIN, |a, &v| a.max(v as f64));
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.into_iter().map(|v| v / s).collect()
    });
    close(&sm, &want, 1e-4, "softmax");
    let l2 = host(&on(x.clone(), &[r, d]).l2_normalize().unwrap());
    let want = rows(&|row| {
        let n = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        row.iter().map(|&v| v as f64 / n).collect()
    });
    close(&l2, &want, 1e-5, "l2_normalize");
}

fn reference_linear(
    x: &[f32],
    w: &[f64],
    b: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t]).sum();
            out[i * n + j] = s + b.map_or(0.0, |b| b[j] as f64);
        }
    }
    out
}

#[test]
fn linear_and_matmul_in_every_weight_dtype() {
    let (k, n) = (96, 70);
    let w = rand(n * k, 9);
    let b = rand(n, 10);
    for m in [1, 8, 70] {
        let x = rand(m * k, 11 + m as u64);
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let wt = on(w.clone(), &[n, k]).to_dtype(dt).unwrap();
            let wv: Vec<f64> = wt.to_f32_vec().into_iter().map(|v| v as f64).collect();
            // Activations already of the weight's precision, as a 16-bit model's are (a
            // backend may round them to the weight's dtype before the product, as
            // PyTorch's matmul does, or not).
            let xr: Vec<f32> = match dt {
                DType::F32 => x.clone(),
                DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
                DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            };
            let want = reference_linear(&xr, &wv, Some(&b), m, k, n);
            let xt = on(xr.clone(), &[m, k]);
            let got = linear(&xt, &wt, Some(&on(b.clone(), &[n]))).unwrap();
            assert_eq!(got.shape(), &[m, n]);
            close(&host(&got), &want, 1e-4, &format!("linear m={m} {dt}"));
            // The same through a Weight (packed where the CPU packs), alone and two at once.
            let weight = Weight::new(wt.clone()).unwrap();
            close(
                &host(&weight.linear(&xt, None).unwrap()),
                &reference_linear(&xr, &wv, None, m, k, n),
                1e-4,
                "Weight",
            );
            let both = Weight::linear_many(
                &[(&weight, None), (&weight, Some(&on(b.clone(), &[n])))],
                &xt,
            )
            .unwrap();
            close(&host(&both[1]), &want, 1e-4, "linear_many");
        }
    }
    // matmul [m,k]·[k,n].
    let (m, k, n) = (13, 40, 29);
    let (a, bm) = (rand(m * k, 20), rand(k * n, 21));
    let got = host(
        &on(a.clone(), &[m, k])
            .matmul(&on(bm.clone(), &[k, n]))
            .unwrap(),
    );
    let mut want = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            want[i * n + j] = (0..k)
                .map(|t| a[i * k + t] as f64 * bm[t * n + j] as f64)
                .sum();
        }
    }
    close(&got, &want, 1e-4, "matmul");
    assert!(linear(
        &on(a, &[m, k]),
        &on(rand(n * (k + 1), 22), &[n, k + 1]),
        None
    )
    .is_err());
}

#[test]
fn gathers_narrows_concats_scatters_and_patches() {
    let (rows, d) = (50, 24);
    let table = rand(rows * d, 30);
    let ids = [7u32, 0, 49, 7, 3];
    for dt in [DType::F32, DType::BF16] {
        let t = on(table.clone(), &[rows, d]).to_dtype(dt).unwrap();
        let tv = t.to_f32_vec();
        let got = host(&t.index_rows(&ids).unwrap());
        let want: Vec<f64> = ids
            .iter()
            .flat_map(|&i| tv[i as usize * d..(i as usize + 1) * d].to_vec())
            .map(|v| v as f64)
            .collect();
        close(&got, &want, 0.0, "index_rows");
        assert!(t.index_rows(&[50]).is_err());
        let nr = t.narrow_rows(10, 5).unwrap();
        assert_eq!(nr.dtype(), dt, "narrow_rows keeps the dtype");
        close(
            &host(&nr),
            &tv[10 * d..15 * d]
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<_>>(),
            0.0,
            "narrow_rows",
        );
        let nc = t.narrow_cols(5, 7).unwrap();
        let want: Vec<f64> = (0..rows)
            .flat_map(|r| tv[r * d + 5..r * d + 12].to_vec())
            .map(|v| v as f64)
            .collect();
        close(&host(&nc), &want, 0.0, "narrow_cols");
    }
    let (a, b) = (on(rand(3 * d, 31), &[3, d]), on(rand(2 * d, 32), &[2, d]));
    let cat = host(&Tensor::cat_rows(&[&a, &b]).unwrap());
    let want: Vec<f64> = a
        .to_f32_vec()
        .into_iter()
        .chain(b.to_f32_vec())
        .map(|v| v as f64)
        .collect();
    close(&cat, &want, 0.0, "cat_rows");
    let c = on(rand(3 * 5, 33), &[3, 5]);
    let cols = Tensor::cat_cols(&[&a, &c]).unwrap();
    assert_eq!(cols.shape(), &[3, d + 5]);
    let (av, cv) = (a.to_f32_vec(), c.to_f32_vec());
    let want: Vec<f64> = (0..3)
        .flat_map(|r| {
            av[r * d..(r + 1) * d]
                .iter()
                .chain(&cv[r * 5..(r + 1) * 5])
                .copied()
                .collect::<Vec<_>>()
        })
        .map(|v| v as f64)
        .collect();
    close(&host(&cols), &want, 0.0, "cat_cols");
    let x = on(rand(6 * d, 34), &[6, d]);
    let xv = x.to_f32_vec();
    let bv = b.to_f32_vec();
    let got = host(&x.clone().scatter_rows(&[4, 1], &b).unwrap());
    let mut want: Vec<f64> = xv.iter().map(|&v| v as f64).collect();
    for (i, &r) in [4usize, 1].iter().enumerate() {
        for c in 0..d {
            want[r * d + c] = bv[i * d + c] as f64;
        }
    }
    close(&got, &want, 0.0, "scatter_rows");
    assert!(x.clone().scatter_rows(&[6, 0], &b).is_err());
    // No rows (a prompt without images): the tensor as it was.
    let none = Tensor::cat_rows(&[]).unwrap();
    close(
        &host(&x.scatter_rows(&[], &none).unwrap()),
        &xv.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        0.0,
        "scatter of nothing",
    );
    // Patches of a [3, 8, 8] image in 4×4: [(8/4)², 3·16].
    let (ch, s, p) = (3, 8, 4);
    let px = rand(ch * s * s, 35);
    let got = host(&on(px.clone(), &[ch, s, s]).patches(p).unwrap());
    let g = s / p;
    let mut want = Vec::new();
    for gy in 0..g {
        for gx in 0..g {
            for c in 0..ch {
                for ky in 0..p {
                    for kx in 0..p {
                        want.push(px[c * s * s + (gy * p + ky) * s + gx * p + kx] as f64);
                    }
                }
            }
        }
    }
    close(&got, &want, 0.0, "patches");
}

#[test]
fn rope_rotates_half_at_each_position() {
    let (heads, hd) = (3, 16);
    let half = hd / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let positions = [0usize, 5, 6, 130];
    let x = rand(positions.len() * heads * hd, 40);
    for dt in [DType::F32, DType::BF16] {
        let table = RopeTable::new(&inv_freq, &positions, dt, device()).unwrap();
        let got = host(
            &on(x.clone(), &[positions.len(), heads * hd])
                .rope(&table, heads)
                .unwrap(),
        );
        let r = |v: f64| if dt == DType::BF16 { bf16r(v) } else { v };
        let mut want = vec![0f64; x.len()];
        for (t, &pos) in positions.iter().enumerate() {
            for h in 0..heads {
                for i in 0..half {
                    let a = pos as f32 * inv_freq[i];
                    let (c, s) = (r(a.cos() as f64), r(a.sin() as f64));
                    let o = (t * heads + h) * hd;
                    let (x1, x2) = (x[o + i] as f64, x[o + i + half] as f64);
                    want[o + i] = r(r(x1 * c) + r(-x2 * s));
                    want[o + i + half] = r(r(x2 * c) + r(x1 * s));
                }
            }
        }
        let tol = if dt == DType::BF16 { 8e-3 } else { 1e-5 };
        close(&got, &want, tol, &format!("rope {dt}"));
    }
}

/// Plain attention: `q` `[tq, h·hd]`, `k`/`v` `[tk, kvh·hd]`, query `i` seeing keys
/// `0..limit(i)`.
fn reference_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (h, kvh, hd): (usize, usize, usize),
    limit: impl Fn(usize) -> usize,
) -> Vec<f64> {
    let tq = q.len() / (h * hd);
    let mut out = vec![0f64; q.len()];
    for i in 0..tq {
        for head in 0..h {
            let g = head / (h / kvh);
            let n = limit(i);
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    (0..hd)
                        .map(|d| {
                            q[i * h * hd + head * hd + d] as f64
                                * k[j * kvh * hd + g * hd + d] as f64
                        })
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = scores.iter().fold(f64::MIN, |a, &b| a.max(b));
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                out[i * h * hd + head * hd + d] = (0..n)
                    .map(|j| e[j] / sum * v[j * kvh * hd + g * hd + d] as f64)
                    .sum();
            }
        }
    }
    out
}

fn shape(h: usize, kvh: usize, hd: usize) -> AttnShape {
    AttnShape {
        n_heads: h,
        n_kv_heads: kvh,
        head_dim: hd,
        bf16_products_from: None,
    }
}

#[test]
fn attention_over_given_keys_causal_and_not_with_gqa() {
    for (h, kvh, hd) in [(4, 2, 16), (8, 1, 64), (3, 3, 40)] {
        for (tq, tk, causal) in [
            (1, 9, None),
            (20, 20, Some(0)),
            (5, 30, Some(25)),
            (17, 50, None),
        ] {
            let (q, k, v) = (
                rand(tq * h * hd, 50),
                rand(tk * kvh * hd, 51),
                rand(tk * kvh * hd, 52),
            );
            let got = attention(
                &on(q.clone(), &[tq, h * hd]),
                &on(k.clone(), &[tk, kvh * hd]),
                &on(v.clone(), &[tk, kvh * hd]),
                shape(h, kvh, hd),
                causal,
            )
            .unwrap();
            let want = reference_attention(&q, &k, &v, (h, kvh, hd), |i| {
                causal.map_or(tk, |p| (p + i + 1).min(tk))
            });
            close(
                &host(&got),
                &want,
                1e-4,
                &format!("attention h{h}/{kvh} hd{hd} tq{tq} tk{tk} {causal:?}"),
            );
        }
    }
    // Blocks of rows attend within their block only (a ViT's batched images).
    let (h, hd, tokens, images) = (2, 8, 7, 3);
    let (q, k, v) = (
        rand(images * tokens * h * hd, 53),
        rand(images * tokens * h * hd, 54),
        rand(images * tokens * h * hd, 55),
    );
    let got = host(
        &attention_blocks(
            &on(q.clone(), &[images * tokens, h * hd]),
            &on(k.clone(), &[images * tokens, h * hd]),
            &on(v.clone(), &[images * tokens, h * hd]),
            tokens,
            shape(h, h, hd),
            None,
        )
        .unwrap(),
    );
    let w = tokens * h * hd;
    let want: Vec<f64> = (0..images)
        .flat_map(|b| {
            let r = b * w..(b + 1) * w;
            reference_attention(&q[r.clone()], &k[r.clone()], &v[r], (h, h, hd), |_| tokens)
        })
        .collect();
    close(&got, &want, 1e-4, "attention_blocks");
}

#[test]
fn a_batch_step_over_the_paged_cache_equals_plain_attention() {
    let (h, kvh, hd) = (8, 2, 32);
    let kw = kvh * hd;
    let (block_size, blocks) = (4, 64);
    for dtype in [KvDtype::F32, KvDtype::Bf16] {
        let arena = std::sync::Arc::new(
            KvArena::reserved_on(1, blocks, block_size, kw, dtype, device()).unwrap(),
        );
        assert_eq!(arena.device(), device());
        // (cached rows, new rows): decoding sequences, a few rows, a prefill chunk.
        let shapes: [(usize, usize); 4] = [(5, 1), (0, 19), (9, 3), (30, 1)];
        let mut next_block = 0u32;
        let mut caches = Vec::new();
        let mut all_k = Vec::new();
        let mut all_v = Vec::new();
        for (n, &(cached, new)) in shapes.iter().enumerate() {
            let total = cached + new;
            let table: Vec<u32> = (0..total.div_ceil(block_size))
                .map(|_| {
                    next_block += 1;
                    // Blocks out of order, as a pool hands them out.
                    (next_block * 7) % blocks as u32
                })
                .collect();
            let mut c = KvCache::new(1).paged(arena.clone(), table, vec![], kw);
            let (k, v) = (
                rand(total * kw, 60 + n as u64),
                rand(total * kw, 70 + n as u64),
            );
            if cached > 0 {
                c.write(
                    0,
                    &on(k[..cached * kw].to_vec(), &[cached, kw]),
                    &on(v[..cached * kw].to_vec(), &[cached, kw]),
                )
                .unwrap();
                c.advance(cached);
            }
            all_k.push(k);
            all_v.push(v);
            caches.push(c);
        }
        // This step's K/V of every sequence back to back, written in one call.
        let rows: Vec<usize> = shapes.iter().map(|s| s.1).collect();
        let step_k: Vec<f32> = shapes
            .iter()
            .zip(&all_k)
            .flat_map(|(&(c, t), k)| k[c * kw..(c + t) * kw].to_vec())
            .collect();
        let step_v: Vec<f32> = shapes
            .iter()
            .zip(&all_v)
            .flat_map(|(&(c, t), v)| v[c * kw..(c + t) * kw].to_vec())
            .collect();
        let total_rows: usize = rows.iter().sum();
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        KvCache::write_batch(
            &mut refs,
            &rows,
            0,
            &on(step_k, &[total_rows, kw]),
            &on(step_v, &[total_rows, kw]),
        )
        .unwrap();
        let q = rand(total_rows * h * hd, 80);
        let got = host(
            &attention_cached(
                &on(q.clone(), &[total_rows, h * hd]),
                &refs,
                &rows,
                0,
                shape(h, kvh, hd),
            )
            .unwrap(),
        );
        let mut r0 = 0;
        let mut want = Vec::new();
        for (i, &(cached, new)) in shapes.iter().enumerate() {
            let total = cached + new;
            let kv = |x: &[f32]| -> Vec<f32> {
                x[..total * kw]
                    .iter()
                    .map(|&v| {
                        if dtype == KvDtype::Bf16 {
                            bf16::from_f32(v).to_f32()
                        } else {
                            v
                        }
                    })
                    .collect()
            };
            let qi = &q[r0 * h * hd..(r0 + new) * h * hd];
            want.extend(reference_attention(
                qi,
                &kv(&all_k[i]),
                &kv(&all_v[i]),
                (h, kvh, hd),
                |j| cached + j + 1,
            ));
            r0 += new;
        }
        close(
            &got,
            &want,
            1e-4,
            &format!("paged attention, {dtype} arena"),
        );
        // A position past a table's blocks is an error, not a write out of bounds.
        let mut c = KvCache::new(1).paged(arena.clone(), vec![0], vec![], kw);
        let five = on(rand(5 * kw, 90), &[5, kw]);
        assert!(c.write(0, &five, &five).is_err());
    }
}

#[test]
fn cross_attention_reads_an_images_keys() {
    let (h, hd, latents, images) = (4, 16, 6, 2);
    let w = h * hd;
    let (k, v) = (
        rand(latents * images * w, 100),
        rand(latents * images * w, 101),
    );
    let mut cache = KvCache::new(2);
    cache
        .set_cross(
            1,
            on(k.clone(), &[latents * images, w]),
            on(v.clone(), &[latents * images, w]),
        )
        .unwrap();
    assert!(cache.has_cross(1) && !cache.has_cross(0));
    let q = rand(3 * w, 102);
    let qt = on(q.clone(), &[3, w]);
    let got = attention_cross(&qt, &cache, 1, Some(latents..2 * latents), shape(h, h, hd))
        .unwrap()
        .unwrap();
    let r = latents * w..2 * latents * w;
    let want = reference_attention(&q, &k[r.clone()], &v[r], (h, h, hd), |_| latents);
    close(&host(&got), &want, 1e-4, "cross-attention, second image");
    assert!(attention_cross(&qt, &cache, 0, None, shape(h, h, hd))
        .unwrap()
        .is_none());
    assert!(attention_cross(&qt, &cache, 1, Some(0..3 * latents), shape(h, h, hd)).is_err());
}

#[test]
fn untrusted_values_and_token_choice() {
    let mut x = rand(1000, 110);
    assert_eq!(on(x.clone(), &[10, 100]).first_non_finite().unwrap(), None);
    x[637] = f32::NAN;
    x[900] = f32::INFINITY;
    let (i, v) = on(x, &[10, 100]).first_non_finite().unwrap().unwrap();
    assert_eq!(i, 637);
    assert!(v.is_nan());
    // Greedy on the device: each row's argmax (first on ties) and its log-probability.
    let (rows, vocab) = (5, 3001);
    let mut logits = rand(rows * vocab, 111);
    logits[2 * vocab + 77] = 9.0;
    logits[2 * vocab + 1500] = 9.0;
    let t = on(logits.clone(), &[rows, vocab]);
    let greedy = Sampler::new(SamplingParams::default());
    let empty: [u32; 0] = [];
    let draws: Vec<Draw> = (0..rows)
        .map(|i| Draw {
            sampler: &greedy,
            position: i,
            prompt: &empty,
            output: &empty,
            top_logprobs: 0,
            allowed: None,
            bias: &[],
        })
        .collect();
    let drawn = t.sample_rows(&draws).unwrap();
    for (r, d) in drawn.iter().enumerate() {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let best = row
            .iter()
            .enumerate()
            .fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
        assert_eq!(d.id as usize, best, "row {r}");
        let m = row[best] as f64;
        let lse = row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        assert!(
            (d.logprob as f64 - (row[best] as f64 - lse)).abs() < 1e-4,
            "row {r} logprob"
        );
    }
    assert_eq!(drawn[2].id, 77, "first of two equal maxima");
    assert_eq!(t.argmax_rows().unwrap()[2], 77);
    // Sampled rows give the host sampler's choice on every backend, whatever rule binds:
    // top-k, a nucleus inside or past a GPU's candidates, min-p, penalties, greedy with
    // top log-probabilities; and the host's log-probabilities.
    let host_draw =
        |row: &[f32], s: &Sampler, pos: usize, out: &[u32]| s.sample(row, pos, &empty, out);
    let configs = [
        SamplingParams {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.9,
            seed: 7,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_p: 0.3,
            seed: 8,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.3,
            seed: 9,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            min_p: 0.2,
            seed: 10,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.9,
            top_k: 2000,
            top_p: 0.99,
            seed: 11,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.5,
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            seed: 12,
            ..Default::default()
        },
        SamplingParams::default(),
    ];
    let output = [77u32, 5, 5];
    for (c, params) in configs.iter().enumerate() {
        let sampler = Sampler::new(*params);
        let draws: Vec<Draw> = (0..rows)
            .map(|i| Draw {
                sampler: &sampler,
                position: 40 + i,
                prompt: &empty,
                output: &output,
                top_logprobs: 3,
                allowed: None,
                bias: &[],
            })
            .collect();
        let drawn = t.sample_rows(&draws).unwrap();
        for (r, d) in drawn.iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            assert_eq!(
                d.id,
                host_draw(row, &sampler, 40 + r, &output),
                "config {c} row {r}"
            );
            let lp = iris_tensor::sample::log_softmax(row);
            assert!(
                (d.logprob - lp[d.id as usize]).abs() < 1e-4,
                "config {c} row {r} logprob"
            );
            let want = iris_tensor::sample::top_logprobs(&lp, 3);
            assert_eq!(
                d.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>(),
                want.iter().map(|t| t.0).collect::<Vec<_>>(),
                "config {c} row {r} top ids"
            );
            for (g, w) in d.top_logprobs.iter().zip(&want) {
                assert!((g.1 - w.1).abs() < 1e-4, "config {c} row {r} top logprob");
            }
        }
    }
}
