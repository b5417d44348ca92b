//! GFLOP/s of `linear` with bf16 weights at decode and prefill shapes (TinyLlama's
//! projections), row-major (`linear`) and as a `Weight` (packed once where the CPU has
//! AVX-512 BF16), best of several
//! runs:
//! `cargo run --release -p iris-tensor --example linear_gflops [M,M,..] [NxK,..]`.

mod common;

use common::time;
use iris_tensor::{linear, DType, Tensor, Weight};

fn main() {
    // `[M,M,..] [NxK,NxK,..]`: rows, then weight shapes (TinyLlama's by default; the
    // ViT-L's are 1024x1024,4096x1024,1024x4096).
    let shapes: Vec<(usize, usize)> = std::env::args()
        .nth(2)
        .map(|s| {
            s.split(',')
                .map(|nk| {
                    let (n, k) = nk.split_once('x').expect("shapes are NxK");
                    (n.parse().unwrap(), k.parse().unwrap())
                })
                .collect()
        })
        .unwrap_or(vec![(2048, 2048), (5632, 2048), (2048, 5632)]);
    let ms: Vec<usize> = std::env::args()
        .nth(1)
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or(vec![1, 8, 32, 64, 608]);
    for &(n, k) in &shapes {
        let w = Tensor::from_f32(
            (0..n * k)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 5e4)
                .collect(),
            &[n, k],
        )
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
        let packed =
            iris_tensor::kernels::has_avx512_bf16().then(|| Weight::new(w.clone()).unwrap());
        for &m in &ms {
            let x = Tensor::from_f32(
                (0..m * k)
                    .map(|i| ((i * 31 % 97) as f32 - 48.0) / 97.0)
                    .collect(),
                &[m, k],
            )
            .unwrap();
            let flop = 2.0 * (m * n * k) as f64;
            let reps = (4e9 / flop).clamp(2.0, 200.0) as usize;
            let plain = time(reps, || {
                std::hint::black_box(linear(&x, &w, None).unwrap());
            });
            let packed = packed.as_ref().map(|p| {
                time(reps, || {
                    std::hint::black_box(p.linear(&x, None).unwrap());
                })
            });
            println!(
                "n={n:5} k={k:5} m={m:4}: row-major {:8.3} ms {:6.1} GFLOP/s | packed {}",
                plain * 1e3,
                flop / plain / 1e9,
                packed.map_or("n/a".into(), |s| format!(
                    "{:8.3} ms {:6.1} GFLOP/s",
                    s * 1e3,
                    flop / s / 1e9
                ))
            );
        }
    }
}
