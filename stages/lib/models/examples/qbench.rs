//! Quantized vs f32 inference throughput: `cargo run --release -p itera-models --example qbench`.
//!
//! Itera-Lite tiny and Transformer tiny (vocab 256): full-sequence forward tokens/s at batch 16 ×
//! seq 128 and generation tokens/s at batch 1, f32 vs INT8 vs INT4, same process, same threads
//! (BENCH_THREADS, default 1), medians of BENCH_STEPS (default 10) timed runs after warm-up, the
//! three variants interleaved run by run; each × f32 is the median of the rounds' own ratios.
//! `ITERA_SIMD=avx2` (or `portable`) runs the kernels a lesser CPU would; the header says which
//! ran. Freed memory stays in the process, as in `orchestrate exec-stage`. BENCH_JSON=FILE
//! appends one JSON line per model and weight format with the figures printed.

use std::time::Instant;

use candle_core::{Device, Tensor};
use itera_models::qmodel::QuantSpec;
use itera_models::quant::Scheme;
use itera_models::{Model, ModelConfig, Sampling};
use rand::{Rng, SeedableRng};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median over rounds of a variant's rate ÷ f32's rate in the same round: runs a few
/// milliseconds apart share the machine's speed of the moment, medians of whole series do not.
fn round_ratios(rates: &[f64], f32_rates: &[f64]) -> f64 {
    median(rates.iter().zip(f32_rates).map(|(r, f)| r / f).collect())
}

fn main() -> candle_core::Result<()> {
    itera_models::measure::run_on_huge_pages();
    let threads: usize = std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let steps: usize = std::env::var("BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    itera_models::measure::keep_freed_memory();
    let (b, l) = (16usize, 128usize);
    println!("quantized inference — {threads} thread(s), batch {b} × seq {l} forward, batch 1 generation (16 + 112 tokens), medians of {steps}");
    println!(
        "CPU: {}; kernels: {}; malloc: {}\n",
        itera_models::measure::cpu_model(),
        itera_models::simd_path(),
        itera_models::measure::malloc_pages()
    );
    println!("| model | weights | forward tok/s | × f32 | generate tok/s | × f32 |");
    println!("|---|---|---|---|---|---|");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let v: Vec<u32> = (0..b * l).map(|_| rng.random_range(5..256)).collect();
    let x = Tensor::from_vec(v, (b, l), &Device::Cpu)?;
    let prompt: Vec<u32> = (0..16).map(|i| 5 + i * 3).collect();
    for name in ["itera_lite", "transformer"] {
        let cfg = ModelConfig::build(name, "tiny", 256, &Default::default())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let schemes = [None, Some(Scheme::Int8), Some(Scheme::Int4)];
        let mut models = Vec::new();
        for scheme in schemes {
            let mut model = Model::new(&cfg, 1)?;
            if let Some(s) = scheme {
                model
                    .quantize(&QuantSpec { scheme: s, group_size: 32, embeddings: true, exclude: vec![] })
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            }
            models.push(model);
        }
        // Interleaved: each round times every variant once, so a change in the machine's speed
        // during the run touches all of them alike.
        let (mut fwd, mut gen) = (vec![Vec::new(); 3], vec![Vec::new(); 3]);
        for i in 0..steps + 2 {
            for (model, rates) in models.iter().zip(fwd.iter_mut()) {
                let t = Instant::now();
                model.forward(&x, None)?;
                if i >= 2 {
                    rates.push((b * l) as f64 / t.elapsed().as_secs_f64());
                }
            }
        }
        for i in 0..steps + 1 {
            for (model, rates) in models.iter().zip(gen.iter_mut()) {
                let t = Instant::now();
                model.generate(&prompt, 112, Sampling::Greedy, 0)?;
                if i >= 1 {
                    // New tokens ÷ wall time including the prompt's prefill (the one definition).
                    rates.push(112.0 / t.elapsed().as_secs_f64());
                }
            }
        }
        for (i, scheme) in schemes.iter().enumerate() {
            let label = scheme.map(|s| s.name()).unwrap_or("f32");
            let (fr, gr) = (round_ratios(&fwd[i], &fwd[0]), round_ratios(&gen[i], &gen[0]));
            let (f, g) = (median(fwd[i].clone()), median(gen[i].clone()));
            println!("| {name} tiny | {label} | {f:.0} | {fr:.2} | {g:.0} | {gr:.2} |");
            if let Ok(path) = std::env::var("BENCH_JSON") {
                let record = serde_json::json!({
                    "bench": "qbench", "model": name, "weights": label, "threads": threads,
                    "kernels": itera_models::simd_path(), "forward_tok_s": f, "forward_x_f32": fr,
                    "generate_tok_s": g, "generate_x_f32": gr,
                });
                itera_models::measure::append_json_line(&path, &record)?;
            }
        }
    }
    Ok(())
}
