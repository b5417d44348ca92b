//! Batch-1 quantized products, single-threaded with the weight in cache (the kernel's
//! compute rate, ns a 512-weight group) and over a large weight (the step's rate):
//! `cargo run --release -p iris-tensor --example quant_gemv`. Then a 608-row prefill
//! product of the large weight as bf16 (packed ahead) and quantized (each panel
//! dequantized as it is used): the difference is what dequantizing costs.
use std::time::Instant;

use iris_tensor::quant::{quantize_row, QuantMatrix, QuantType};

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let x: Vec<f32> = (0..5632)
        .map(|i| ((i * 31 % 97) as f32 - 48.0) / 97.0)
        .collect();
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
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 5e4)
            .collect();
        let x: Vec<f32> = (0..k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 97.0)
            .collect();
        for ty in types {
            let data: Vec<u8> = w.chunks(k).flat_map(|r| quantize_row(ty, r)).collect();
            let m = QuantMatrix::new(ty, n, k, Box::new(data)).unwrap();
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
    // Rows of the products below: 608 (a LLaVA prefill) unless the first argument
    // lists others.
    let ms: Vec<usize> = std::env::args()
        .nth(1)
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or(vec![608]);
    let (n, k) = (5632usize, 2048usize);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 5e4)
        .collect();
    let packed = iris_tensor::kernels::has_avx512_bf16().then(|| {
        let bf16 = iris_tensor::Tensor::from_f32(w.clone(), &[n, k])
            .unwrap()
            .to_dtype(iris_tensor::DType::BF16)
            .unwrap();
        iris_tensor::Weight::new(bf16).unwrap()
    });
    let quantized: Vec<QuantMatrix> = types
        .iter()
        .map(|&ty| {
            let data: Vec<u8> = w.chunks(k).flat_map(|r| quantize_row(ty, r)).collect();
            QuantMatrix::new(ty, n, k, Box::new(data)).unwrap()
        })
        .collect();
    for m in ms {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 97.0)
            .collect();
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
