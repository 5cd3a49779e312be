//! Throughput measurements shared by the stages that report speed: medians of timed runs
//! after a warm-up, in this process and on the current rayon pool.

use std::time::Instant;

use candle_core::Tensor;

use crate::{Model, Sampling};

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Rate {
    /// Tokens per second: median, slowest and fastest run.
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Rate {
    fn from(mut v: Vec<f64>) -> Rate {
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            0.5 * (v[n / 2 - 1] + v[n / 2])
        };
        Rate { median, min: v.first().copied().unwrap_or(0.0), max: v.last().copied().unwrap_or(0.0), runs: n }
    }
}

/// Full-sequence forward tokens/s on `x` (batch, seq): one warm-up, then `runs` timed runs.
pub fn forward_rate(model: &Model, x: &Tensor, runs: usize) -> candle_core::Result<Rate> {
    let tokens = x.elem_count() as f64;
    model.forward(x, None)?;
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        model.forward(x, None)?;
        v.push(tokens / t.elapsed().as_secs_f64().max(1e-9));
    }
    Ok(Rate::from(v))
}

/// Forward tokens/s of several models measured in turns (a, b, a, b, …) so that a change in
/// machine load affects them alike.
pub fn forward_rates(models: &[&Model], x: &Tensor, runs: usize) -> candle_core::Result<Vec<Rate>> {
    let tokens = x.elem_count() as f64;
    for m in models {
        m.forward(x, None)?;
    }
    let mut v = vec![Vec::with_capacity(runs); models.len()];
    for _ in 0..runs.max(1) {
        for (i, m) in models.iter().enumerate() {
            let t = Instant::now();
            m.forward(x, None)?;
            v[i].push(tokens / t.elapsed().as_secs_f64().max(1e-9));
        }
    }
    Ok(v.into_iter().map(Rate::from).collect())
}

/// Greedy generation at batch 1: `new_tokens` after `prompt`, tokens/s over prompt + new
/// tokens, and per-token latencies (seconds) of the decode steps from the last run.
pub fn generate_rate(
    model: &Model,
    prompt: &[u32],
    new_tokens: usize,
    runs: usize,
) -> candle_core::Result<(Rate, Vec<f64>)> {
    model.generate(prompt, new_tokens.min(4), Sampling::Greedy, 0)?;
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        model.generate(prompt, new_tokens, Sampling::Greedy, 0)?;
        // The one definition of generation speed: new tokens ÷ wall time, prefill included.
        v.push(new_tokens as f64 / t.elapsed().as_secs_f64().max(1e-9));
    }
    let mut decoder = model.decoder()?;
    let mut lat = Vec::with_capacity(new_tokens);
    let mut logits = decoder.feed(prompt)?;
    for _ in 0..new_tokens {
        let t = Instant::now();
        let next = logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) })
            .0 as u32;
        logits = decoder.feed(&[next])?;
        lat.push(t.elapsed().as_secs_f64());
    }
    Ok((Rate::from(v), lat))
}

/// The `q`-quantile (0..=1) of `v` by nearest rank.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let idx = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[idx]
}

/// Training allocates and frees megabyte-sized tensors hundreds of times a step; glibc hands
/// such blocks back to the kernel and the next step faults them in again page by page (~10 % of
/// a step). Benchmarks call this first, and `orchestrate exec-stage` for every stage.
pub fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The CPU's model name (`/proc/cpuinfo`), for benchmarks to print beside their figures.
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .map_or_else(|| "unknown CPU".to_string(), |m| m.trim().to_string())
}
