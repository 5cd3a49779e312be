//! Where a training step's time goes: forward+loss and backward (AUTOGRAD=1; else the two as one
//! `Model::loss_grads`), AdamW update; MODE=forward times
//! the inference forward alone, MODE=generate batch-1 generation (16-token prompt + 112 new, for
//! profiling the slice decoders). Threads: RAYON_NUM_THREADS. STEPS (default 12, the first two
//! untimed) sets how many training steps run: more give a profiler more samples.
//! `cargo run --release -p itera-models --example step_breakdown` (MODEL=itera_lite|transformer).
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::{Optimizer, ParamsAdamW};
use itera_models::adamw::FusedAdamW;
use itera_models::{Model, ModelConfig};
use rand::{Rng, SeedableRng};

fn main() -> candle_core::Result<()> {
    itera_models::measure::run_on_huge_pages();
    itera_models::measure::keep_freed_memory();
    let name = std::env::var("MODEL").unwrap_or_else(|_| "itera_lite".into());
    let cfg = ModelConfig::build(&name, "tiny", 256, &Default::default())
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let model = Model::new(&cfg, 1)?;
    let mut opt = FusedAdamW::new(model.varmap.all_vars(), ParamsAdamW { lr: 1e-3, ..Default::default() })?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut drop_rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    if std::env::var("MODE").as_deref() == Ok("generate") {
        let prompt: Vec<u32> = (0..16).map(|_| rng.random_range(5..256)).collect();
        let t = Instant::now();
        for _ in 0..50 {
            model.generate(&prompt, 112, itera_models::Sampling::Greedy, 0)?;
        }
        println!("{name}: generation {:.0} tok/s", 50.0 * 112.0 / t.elapsed().as_secs_f64());
        return Ok(());
    }
    if std::env::var("MODE").as_deref() == Ok("forward") {
        // Inference forward only (what the bench's forward figure times).
        let mut times = Vec::new();
        for i in 0..20 {
            let v: Vec<u32> = (0..16 * 128).map(|_| rng.random_range(5..256)).collect();
            let x = Tensor::from_vec(v, (16, 128), &Device::Cpu)?;
            let t = Instant::now();
            model.forward(&x, None)?.logits.sum_all()?.to_scalar::<f32>()?;
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        println!("{name}: inference forward {:.1} ms", times[times.len() / 2]);
        return Ok(());
    }
    // Forward and backward apart only through autograd (AUTOGRAD=1, or a model the
    // hand-written step does not cover); `Model::loss_grads` otherwise, timed as one.
    let autograd = std::env::var("AUTOGRAD").as_deref() == Ok("1");
    let (mut f, mut b, mut u) = (Vec::new(), Vec::new(), Vec::new());
    let steps: usize = std::env::var("STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(12).max(3);
    for i in 0..steps {
        let v: Vec<u32> = (0..16 * 128).map(|_| rng.random_range(5..256)).collect();
        let x = Tensor::from_vec(v, (16, 128), &Device::Cpu)?;
        let t = Instant::now();
        let (grads, t1) = if autograd {
            let (ce, aux) = model.loss(&x, Some(&mut drop_rng))?;
            let loss = (ce + aux)?;
            loss.to_scalar::<f32>()?;
            let t1 = Instant::now();
            (loss.backward()?, t1)
        } else {
            (model.loss_grads(&x, Some(&mut drop_rng))?.0, t)
        };
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        if i >= 2 {
            f.push((t1 - t).as_secs_f64());
            b.push((t2 - t1).as_secs_f64());
            u.push((t3 - t2).as_secs_f64());
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    let (f, b, u) = (med(f), med(b), med(u));
    if autograd {
        println!("{name}: forward+loss {f:.1} ms, backward {b:.1} ms, AdamW {u:.1} ms (autograd)");
    } else {
        println!("{name}: forward+loss+backward {b:.1} ms, AdamW {u:.1} ms (Model::loss_grads)");
    }
    Ok(())
}
