//! Microbenchmark of one quantized matmul against candle's f32 matmul (same shapes, 1 thread):
//! `cargo run --release -p itera-models --example qkernel`.
use std::time::Instant;

use candle_core::{Device, Tensor};
use itera_models::quant::{QWeight, Scheme};

fn time(mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[7]
}

fn main() -> candle_core::Result<()> {
    itera_models::measure::run_on_huge_pages();
    std::env::set_var("RAYON_NUM_THREADS", std::env::var("BENCH_THREADS").unwrap_or("1".into()));
    itera_models::measure::keep_freed_memory();
    println!(
        "CPU: {}; kernels: {}; malloc: {}",
        itera_models::measure::cpu_model(),
        itera_models::simd_path(),
        itera_models::measure::malloc_pages()
    );
    for (m, n, k) in [(2048, 512, 128), (2048, 128, 256), (2048, 64, 128), (1, 512, 128), (1, 256, 128)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let wt = w.t()?;
        let tf = time(|| {
            x.matmul(&wt).unwrap();
        });
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let q8 = QWeight::quantize("w", &wv, n, k, Scheme::Int8, 32).unwrap();
        let q4 = QWeight::quantize("w", &wv, n, k, Scheme::Int4, 32).unwrap();
        let t8 = time(|| {
            q8.matmul_t(&xs, m);
        });
        let t4 = time(|| {
            q4.matmul_t(&xs, m);
        });
        let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        println!(
            "{m}x{n}x{k}: f32 {:.1} GFLOP/s ({:.1} µs), int8 {:.1} ({:.1} µs), int4 {:.1} ({:.1} µs)",
            gf(tf),
            tf * 1e6,
            gf(t8),
            t8 * 1e6,
            gf(t4),
            t4 * 1e6
        );
    }
    Ok(())
}
