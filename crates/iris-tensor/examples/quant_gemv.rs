//! Quantizing an activation row; batch-1 quantized products over weights in cache (the
//! kernel's compute rate, ns a 512-weight group) and over a large weight (a decode
//! step's rate); then products of many rows (608, a LLaVA prefill, or the rows the
//! first argument lists) over the large weight as bf16 (packed ahead) and quantized
//! (on the integer kernel below `quant::GEMM_ROWS` rows, else each panel dequantized
//! for the bf16 GEMM as it is used):
//! `cargo run --release -p iris-tensor --example quant_gemv [M,M,..]`
//! (`RAYON_NUM_THREADS=1` for one core's rates).

mod common;

use common::time;
use iris_tensor::quant::{quantize_row, QuantMatrix, QuantType};

/// A weight's values, `n · k` of them.
fn weights(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 5e4)
        .collect()
}

/// Activation values, `m · k` of them.
fn activations(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 31 % 97) as f32 - 48.0) / 97.0)
        .collect()
}

fn quantized(ty: QuantType, w: &[f32], n: usize, k: usize) -> QuantMatrix {
    let data: Vec<u8> = w.chunks(k).flat_map(|r| quantize_row(ty, r)).collect();
    QuantMatrix::new(ty, n, k, Box::new(data)).unwrap()
}

fn main() {
    let x = activations(5632);
    let s = time(20, || {
        for _ in 0..100 {
            std::hint::black_box(iris_tensor::quant::QuantRows::quantize(
                std::hint::black_box(&x),
                1,
                5632,
            ));
        }
    }) / 100.0;
    println!("quantize 5632: {:.2} us", s * 1e6);
    let types = [QuantType::Q8_0, QuantType::Q4_0, QuantType::Q4_1];
    for &(n, k, inner) in &[
        (1024usize, 2048usize, 200usize),
        (256, 8192, 200),
        (64, 8192, 800),
        (5632, 2048, 1),
    ] {
        let w = weights(n * k);
        let x = activations(k);
        for ty in types {
            let m = quantized(ty, &w, n, k);
            let s = iris_tensor::on_pool(|| {
                time(20, || {
                    for _ in 0..inner {
                        std::hint::black_box(m.matmul(std::hint::black_box(&x), 1));
                    }
                })
            }) / inner as f64;
            let groups = (n * k / 512) as f64;
            println!(
                "{n}x{k} {:5}: {:8.1} us  {:6.2} ns/group  {:6.1} GB/s",
                ty.name(),
                s * 1e6,
                s * 1e9 / groups,
                m.bytes().len() as f64 / s / 1e9
            );
        }
    }
    let ms: Vec<usize> = std::env::args()
        .nth(1)
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or(vec![608]);
    let (n, k) = (5632usize, 2048usize);
    let w = weights(n * k);
    let packed = iris_tensor::kernels::has_avx512_bf16().then(|| {
        let bf16 = iris_tensor::Tensor::from_f32(w.clone(), &[n, k])
            .unwrap()
            .to_dtype(iris_tensor::DType::BF16)
            .unwrap();
        iris_tensor::Weight::new(bf16).unwrap()
    });
    let quantized: Vec<QuantMatrix> = types.iter().map(|&ty| quantized(ty, &w, n, k)).collect();
    for m in ms {
        let x = activations(m * k);
        let xt = iris_tensor::Tensor::from_f32(x.clone(), &[m, k]).unwrap();
        let mut line = format!("{n}x{k} m={m:4}:");
        if let Some(packed) = &packed {
            let s = iris_tensor::on_pool(|| {
                time(5, || {
                    std::hint::black_box(packed.linear(&xt, None).unwrap());
                })
            });
            line += &format!("  bf16 {:7.2} ms", s * 1e3);
        }
        for q in &quantized {
            let s = iris_tensor::on_pool(|| {
                time(5, || {
                    std::hint::black_box(q.matmul(&x, m));
                })
            });
            line += &format!("  {} {:7.2} ms", q.ty().name(), s * 1e3);
        }
        println!("{line}");
    }
}
