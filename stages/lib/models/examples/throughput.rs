//! Model throughput benchmark: `cargo run --release -p itera-models --example throughput`.
//!
//! Itera-Lite tiny and Transformer tiny at vocab 256, max_seq_len 128, f32, the shapes the
//! original PyTorch implementation is measured at (`../shared/peer/torch_ref_bench.py`, run it
//! in the same session for a ratio): training tokens/s (forward + backward + AdamW, batch 16 ×
//! seq 128), full-sequence forward tokens/s (same shape), generation tokens/s at batch 1 (new
//! tokens ÷ wall time including the 16-token prompt's prefill; 112 new tokens) with the
//! recurrent state / KV cache, achieved GFLOP/s against this machine's measured f32 GEMM rate,
//! and the scan kernel's share of a step. Every figure is a median of the timed steps; each
//! model's step ÷ its GEMM floor is the median over alternating step / floor pairs. The core's
//! f32 FMA peak, measured first, says how near that floor already runs to the hardware; its
//! streaming rates from memory bound the elementwise passes between the GEMMs.
//!
//! Threads: BENCH_THREADS (default 1); BENCH_STEPS (timed steps, default 10; twice as many
//! step / GEMM-floor pairs); BENCH_MODELS (default `itera_lite,transformer`); BENCH_BATCH
//! (sequences per step, default 16, the peer's: other sizes show how the step and its floor
//! scale with the activations' footprint, and have no peer figure to compare with);
//! BENCH_JSON=FILE appends one JSON line per model with the figures printed (for
//! `tests/bench/model_peer.py`, which runs this beside the original).

use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW};
use itera_models::accounting::{forward_flops_per_token, param_counts};
use itera_models::adamw::FusedAdamW;
use itera_models::{Model, ModelConfig, Sampling};
use rand::{Rng, SeedableRng};

/// f32 GEMM GFLOP/s on this machine: the median of `runs` products of two 768 × 768 matrices
/// (large enough to run at the kernels' full rate, small enough for L2-blocked tiles).
fn measured_gemm_rate(runs: usize) -> candle_core::Result<f64> {
    let n = 768;
    let a = Tensor::rand(-1f32, 1.0, (n, n), &Device::Cpu)?;
    let b = Tensor::rand(-1f32, 1.0, (n, n), &Device::Cpu)?;
    a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
    let mut v = Vec::new();
    for _ in 0..runs.max(3) {
        let t = Instant::now();
        a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / median(v) / 1e9)
}

/// The fastest of five runs of `f`, in seconds: the machine's rate when nothing interferes.
fn best_of_five(f: &mut dyn FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// One core's f32 multiply-add rate, GFLOP/s, on 512-bit and on 256-bit vectors (None where the
/// CPU lacks them): twelve independent FMA chains, as many accumulators as the GEMM
/// microkernels keep, so neither latency nor memory limits it. The best of five runs.
#[cfg(target_arch = "x86_64")]
fn fma_peaks() -> (Option<f64>, Option<f64>) {
    use std::arch::x86_64::*;
    const CHAINS: usize = 12;
    const ITERS: usize = 4_000_000;
    #[target_feature(enable = "avx512f")]
    unsafe fn run512() -> f32 {
        // Opaque inputs, so the compiler cannot evaluate the chains itself.
        let (b, c) = (_mm512_set1_ps(std::hint::black_box(0.999_999)), _mm512_set1_ps(std::hint::black_box(1e-6)));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..std::hint::black_box(ITERS) {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, b, c);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run256() -> f32 {
        let (b, c) = (_mm256_set1_ps(std::hint::black_box(0.999_999)), _mm256_set1_ps(std::hint::black_box(1e-6)));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..std::hint::black_box(ITERS) {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, b, c);
            }
        }
        let mut lanes = [0f32; 8];
        acc.iter()
            .map(|&a| {
                _mm256_storeu_ps(lanes.as_mut_ptr(), a);
                lanes.iter().sum::<f32>()
            })
            .sum()
    }
    let rate = |lanes: usize, run: &dyn Fn() -> f32| {
        let best = best_of_five(&mut || {
            std::hint::black_box(run());
        });
        (2 * lanes * CHAINS * ITERS) as f64 / best / 1e9
    };
    // SAFETY (both): each runs only where the CPU reports the features it is compiled for.
    let avx512 = is_x86_feature_detected!("avx512f").then(|| rate(16, &|| unsafe { run512() }));
    let avx2 =
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then(|| rate(8, &|| unsafe { run256() }));
    (avx512, avx2)
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_peaks() -> (Option<f64>, Option<f64>) {
    (None, None)
}

/// One core's streaming rates from memory, GB/s: (read, write, copy — bytes read plus written)
/// over 128 MB buffers, far beyond any cache, the best of five passes each. The memory-side
/// roof beside the FMA peak: the steps' elementwise passes move activations of a few MB each,
/// more than L2 holds, so these rates, not arithmetic, are their roof.
fn stream_rates() -> (f64, f64, f64) {
    const LEN: usize = 32 << 20;
    let (mut a, mut b) = (vec![1f32; LEN], vec![2f32; LEN]);
    let gb = (LEN * 4) as f64 / 1e9;
    // Sixteen partial sums, so the adds vectorize and no single chain's latency limits the read.
    let read = best_of_five(&mut || {
        let mut acc = [0f32; 16];
        for ch in a.chunks_exact(16) {
            acc.iter_mut().zip(ch).for_each(|(s, &v)| *s += v);
        }
        std::hint::black_box(acc);
    });
    let write = best_of_five(&mut || {
        let v = std::hint::black_box(3f32);
        a.fill(v);
        std::hint::black_box(&a);
    });
    let copy = best_of_five(&mut || {
        b.copy_from_slice(std::hint::black_box(&a));
        std::hint::black_box(&b);
    });
    (gb / read, gb / write, 2.0 * gb / copy)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn batch(rng: &mut rand_chacha::ChaCha8Rng, b: usize, l: usize) -> Tensor {
    let v: Vec<u32> = (0..b * l).map(|_| rng.random_range(5..256)).collect();
    Tensor::from_vec(v, (b, l), &Device::Cpu).expect("batch")
}

/// Every weight matmul of a training step as (K, N) for M = batch·seq rows.
fn step_gemms(cfg: &ModelConfig) -> Vec<(usize, usize)> {
    match cfg {
        ModelConfig::IteraLite(c) => itera_gemms(c),
        ModelConfig::Transformer(c) => {
            let (d, f) = (c.d_model, c.d_ff);
            let mut v = Vec::new();
            for _ in 0..c.n_layers {
                v.extend([(d, 3 * d), (d, d), (d, f), (f, d)]);
            }
            v.push((d, c.vocab_size));
            v
        }
    }
}

/// Every weight matmul of an Itera-Lite training step as (K, N) for M = batch·seq rows; a MoE
/// layer runs each row through its top-k experts, which costs k experts' GEMMs over all M rows.
fn itera_gemms(c: &itera_models::IteraConfig) -> Vec<(usize, usize)> {
    let (d, di, n, e) = (c.d_model, c.d_inner(), c.d_state, c.expert_dim);
    let mut v = Vec::new();
    for layer in 0..c.n_layers {
        v.extend([(d, 2 * di), (di, di), (di, n), (n, di), (di, d)]);
        let experts = if c.moe_layers.contains(&layer) {
            v.push((d, c.n_experts));
            c.top_k
        } else {
            1
        };
        for _ in 0..experts {
            v.extend([(d, e), (e, d)]);
        }
    }
    v.push((d, c.vocab_size));
    v
}

/// The weight matmuls of a step — forward x·Wᵀ, backward G·W and Gᵀ·X — over operands made
/// once per distinct (K, N): the floor of a step's time at this machine's GEMM speed, with
/// nothing else in it. Timed as the hand-written steps run them
/// (`itera_models::linear_op::training_products`) and, for comparison, through candle's matmul
/// (the floor's definition before 2026-12-03), which also zero-fills each output first.
struct GemmFloor {
    /// (x, w, g) as tensors and as values, (m, k, n), and how many of the step's matmuls have
    /// that shape.
    shapes: Vec<Shape>,
    flops: f64,
}

struct Shape {
    tensors: (Tensor, Tensor, Tensor),
    values: (Vec<f32>, Vec<f32>, Vec<f32>),
    mkn: (usize, usize, usize),
    count: usize,
}

impl GemmFloor {
    fn new(shapes: &[(usize, usize)], m: usize) -> candle_core::Result<Self> {
        let mut distinct: Vec<((usize, usize), usize)> = Vec::new();
        for &s in shapes {
            match distinct.iter_mut().find(|(d, _)| *d == s) {
                Some((_, count)) => *count += 1,
                None => distinct.push((s, 1)),
            }
        }
        let mut out = Vec::new();
        for ((k, n), count) in distinct {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            let g = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu)?;
            let v = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            let values = (v(&x)?, v(&w)?, v(&g)?);
            out.push(Shape { tensors: (x, w, g), values, mkn: (m, k, n), count });
        }
        let flops = shapes.iter().map(|&(k, n)| 3.0 * 2.0 * (m * k * n) as f64).sum();
        Ok(GemmFloor { shapes: out, flops })
    }

    /// Seconds for one step's matmuls: each distinct shape run once untimed, then timed (its
    /// operands in cache, as in a repeated run), times its count; through candle or not.
    fn seconds(&self, candle: bool) -> candle_core::Result<f64> {
        let mut total = 0.0;
        for s in &self.shapes {
            let run = || -> candle_core::Result<()> {
                if candle {
                    let (x, w, g) = &s.tensors;
                    x.matmul(&w.t()?)?;
                    g.matmul(w)?;
                    x.t()?.matmul(g)?;
                } else {
                    let (x, w, g) = &s.values;
                    std::hint::black_box(itera_models::linear_op::training_products(x, w, g, s.mkn)?);
                }
                Ok(())
            };
            run()?;
            let t = Instant::now();
            run()?;
            total += t.elapsed().as_secs_f64() * s.count as f64;
        }
        Ok(total)
    }
}

fn main() -> candle_core::Result<()> {
    itera_models::measure::run_on_huge_pages();
    let threads: usize = std::env::var("BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    itera_models::measure::keep_freed_memory();
    // Before the first rayon use, so candle's pool has this size.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let steps: usize = std::env::var("BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    // Single steps vary more than medians of ten; the step ÷ floor ratio takes more pairs.
    let pairs = 2 * steps;
    let b: usize = std::env::var("BENCH_BATCH").ok().and_then(|v| v.parse().ok()).filter(|&b| b > 0).unwrap_or(16);
    let l = 128usize;
    // A measured bound, not a clock-speed guess (a guess was below what the GEMMs reached).
    let peak = measured_gemm_rate(steps)?;
    println!("itera-models throughput — {threads} thread(s), f32, batch {b} × seq {l}, vocab 256, {steps} timed steps (medians)");
    println!(
        "CPU: {}; kernels: {}; malloc: {}",
        itera_models::measure::cpu_model(),
        itera_models::simd_path(),
        itera_models::measure::malloc_pages()
    );
    println!("f32 GEMM rate measured here (768³ products): {peak:.1} GFLOP/s for {threads} thread(s)");
    let show = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.1}"));
    let (fma512, fma256) = fma_peaks();
    println!("f32 FMA peak of one core: {} GFLOP/s on 512-bit vectors, {} on 256-bit", show(fma512), show(fma256));
    let (read, write, copy) = stream_rates();
    println!(
        "one core streaming from memory: read {read:.1} GB/s, write {write:.1}, copy {copy:.1} (read + written)\n"
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let models = std::env::var("BENCH_MODELS").unwrap_or_else(|_| "itera_lite,transformer".into());
    for name in models.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let cfg = ModelConfig::build(name, "tiny", 256, &Default::default())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let model = Model::new(&cfg, 1)?;
        let mut opt = FusedAdamW::new(model.varmap.all_vars(), ParamsAdamW { lr: 1e-3, ..Default::default() })?;
        let mut drop_rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut train = Vec::new();
        for i in 0..steps + 2 {
            let x = batch(&mut rng, b, l);
            let t = Instant::now();
            opt.step(&model.loss_grads(&x, Some(&mut drop_rng))?.0)?;
            if i >= 2 {
                train.push(t.elapsed().as_secs_f64());
            }
        }
        let train_step = median(train);
        let train_tps = (b * l) as f64 / train_step;
        let mut fwd = Vec::new();
        for i in 0..steps + 2 {
            let x = batch(&mut rng, b, l);
            let t = Instant::now();
            let f = model.forward(&x, None)?;
            f.logits.sum_all()?.to_scalar::<f32>()?;
            if i >= 2 {
                fwd.push(t.elapsed().as_secs_f64());
            }
        }
        let fwd_tps = (b * l) as f64 / median(fwd);
        let prompt: Vec<u32> = (0..16).map(|_| rng.random_range(5..256)).collect();
        let mut gen = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            model.generate(&prompt, 112, Sampling::Greedy, 0)?;
            gen.push(t.elapsed().as_secs_f64());
        }
        // New tokens ÷ wall time including the prompt's prefill (the one definition).
        let gen_tps = 112.0 / median(gen);
        let flops = forward_flops_per_token(&cfg, l.div_ceil(2)) as f64;
        println!("{name} tiny ({} params, {:.2} MFLOP/token forward)", param_counts(&cfg).total, flops / 1e6);
        println!(
            "  train     {train_tps:>9.0} tok/s  ≈ {:.1} GFLOP/s (3 × forward) = {:.0}% of the GEMM rate",
            3.0 * flops * train_tps / 1e9,
            100.0 * 3.0 * flops * train_tps / 1e9 / peak
        );
        println!(
            "  forward   {fwd_tps:>9.0} tok/s  ≈ {:.1} GFLOP/s = {:.0}% of the GEMM rate",
            flops * fwd_tps / 1e9,
            100.0 * flops * fwd_tps / 1e9 / peak
        );
        println!("  generate  {gen_tps:>9.1} tok/s  (batch 1, 16-token prompt + 112 new)");
        let mut record = serde_json::json!({
            "bench": "throughput", "model": name, "threads": threads, "batch": b, "seq": l,
            "cpu": itera_models::measure::cpu_model(), "kernels": itera_models::simd_path(),
            "fma_peak_gflops": fma512.or(fma256), "train_tok_s": train_tps, "train_step_ms": train_step * 1e3,
            "forward_tok_s": fwd_tps, "generate_tok_s": gen_tps,
        });
        {
            // Step and floor measured in alternation, so the ratio of each pair shares the VM's
            // speed of the moment (it drifts ±15 % within minutes on these machines).
            let floor = GemmFloor::new(&step_gemms(&cfg), b * l)?;
            let (mut floors, mut ratios, mut candle_ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..pairs {
                let x = batch(&mut rng, b, l);
                let t = Instant::now();
                opt.step(&model.loss_grads(&x, Some(&mut drop_rng))?.0)?;
                let step = t.elapsed().as_secs_f64();
                let f = floor.seconds(false)?;
                floors.push(f);
                ratios.push(step / f);
                candle_ratios.push(step / floor.seconds(true)?);
            }
            let (lo, hi) =
                (ratios.iter().copied().fold(f64::MAX, f64::min), ratios.iter().copied().fold(0.0, f64::max));
            let f = median(floors);
            let rate = floor.flops / f;
            println!(
                "  GEMM floor: the step's {:.2} GFLOP of weight matmuls alone take {:.1} ms here ({:.1} \
                    GFLOP/s) → at most {:.0} training tok/s with every other op free",
                floor.flops / 1e9,
                f * 1e3,
                rate / 1e9,
                (b * l) as f64 / f
            );
            // Attention's score and value products (at least the causal half, forward and
            // twice that backward) are GEMMs too, just not with weights: the bound adds them
            // at the floor's rate.
            let attention = 3.0 * (flops - forward_flops_per_token(&cfg, 0) as f64) * (b * l) as f64;
            record["floor_ms"] = (f * 1e3).into();
            record["floor_with_attention_ms"] = ((f + attention / rate) * 1e3).into();
            record["step_over_floor"] = median(ratios.clone()).into();
            if attention > 0.0 {
                let t = f + attention / rate;
                println!(
                    "  with attention's {:.2} GFLOP of score/value products at that rate: {:.1} ms → at most {:.0} tok/s",
                    attention / 1e9,
                    t * 1e3,
                    (b * l) as f64 / t
                );
            }
            println!(
                "  step ÷ GEMM floor, {pairs} alternating pairs: median {:.3} (range {lo:.3}–{hi:.3}); \
                    ÷ the same matmuls through candle: {:.3}",
                median(ratios),
                median(candle_ratios)
            );
        }
        if name == "itera_lite" {
            // The scan on a training step's shapes, forward + backward, every layer.
            let n = 8;
            let a = candle_core::Var::from_tensor(&Tensor::rand(0.5f32, 0.99, (b, l, n), &Device::Cpu)?)?;
            let u = candle_core::Var::from_tensor(&Tensor::rand(-1f32, 1.0, (b, l, n), &Device::Cpu)?)?;
            let mut scan = Vec::new();
            for _ in 0..steps {
                let t = Instant::now();
                for _ in 0..4 {
                    itera_models::scan::diag_scan(&a, &u)?.sum_all()?.backward()?;
                }
                scan.push(t.elapsed().as_secs_f64());
            }
            let s = median(scan);
            println!(
                "  scan kernel (4 layers, fwd + bwd): {:.2} ms of a {:.1} ms training step = {:.1}%",
                s * 1e3,
                train_step * 1e3,
                100.0 * s / train_step
            );
        }
        if let Ok(path) = std::env::var("BENCH_JSON") {
            itera_models::measure::append_json_line(&path, &record)?;
        }
        println!();
    }
    Ok(())
}
