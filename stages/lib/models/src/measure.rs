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

/// The glibc tunable by which malloc asks the kernel for transparent huge pages for the memory
/// it maps (`madvise(MADV_HUGEPAGE)`; glibc ≥ 2.35 reads it, older ones ignore it).
const HUGE_PAGES: &str = "glibc.malloc.hugetlb=1";

/// `GLIBC_TUNABLES` as `current` with malloc's huge pages added; None when `current` already
/// says how malloc should use them (the user's choice stands).
pub fn tunables_with_huge_pages(current: Option<&str>) -> Option<String> {
    match current.map(str::trim).filter(|c| !c.is_empty()) {
        None => Some(HUGE_PAGES.to_string()),
        Some(c) if c.split(':').any(|t| t.starts_with("glibc.malloc.hugetlb=")) => None,
        Some(c) => Some(format!("{c}:{HUGE_PAGES}")),
    }
}

/// Runs this program again, as the same process (`execve` of `/proc/self/exe` with the same
/// arguments), with malloc's memory on transparent huge pages, unless `GLIBC_TUNABLES` already
/// sets them; glibc reads its tunables only at start-up, hence the exec. On 4 KB pages the
/// step's walks a row apart and the GEMMs' packed panels take a TLB miss every few rows; on a
/// Zen 4, over 8 paired rounds, training ran 1.1 % (Itera-Lite) and 2.3 % (Transformer) faster
/// on huge pages and step ÷ GEMM floor fell 1.7 % for both (docs/results.md).
/// Returns only when there was nothing to do or the exec failed, and then the process runs on
/// as it is. Call it first in `main`, before any other thread starts: benchmarks do, and
/// `orchestrate exec-stage` for every built-in stage.
pub fn run_on_huge_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        let Some(tunables) = tunables_with_huge_pages(std::env::var("GLIBC_TUNABLES").ok().as_deref()) else {
            return;
        };
        let mut args = std::env::args_os();
        let mut again = std::process::Command::new("/proc/self/exe");
        // The same argv[0], so `ps` and the like name the program as before.
        if let Some(name) = args.next() {
            again.arg0(name);
        }
        // exec only returns on failure; the process then keeps 4 KB pages.
        let _ = again.args(args).env("GLIBC_TUNABLES", tunables).exec();
    }
}

/// The CPU's model name (`/proc/cpuinfo`), for benchmarks to print beside their figures.
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split(':').nth(1)))
        .map_or_else(|| "unknown CPU".to_string(), |m| m.trim().to_string())
}

/// Append `record` as one line of JSON to the file at `path` (created if missing): how the
/// benchmarks hand their figures to a script (`BENCH_JSON`).
pub fn append_json_line(path: &str, record: &serde_json::Value) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{record}")
}

/// How malloc's memory is paged in this process, for benchmarks to print beside their figures.
pub fn malloc_pages() -> &'static str {
    let asked = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.split(':').any(|t| t.trim() == HUGE_PAGES));
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    match (asked, thp.is_empty() || thp.contains("[never]")) {
        (true, false) => "transparent huge pages",
        (true, true) => "4 KB pages (transparent huge pages are off in this kernel)",
        (false, _) => "4 KB pages",
    }
}

#[cfg(test)]
mod tests {
    use super::tunables_with_huge_pages as with;

    #[test]
    fn huge_pages_join_the_users_tunables_and_never_override_them() {
        assert_eq!(with(None).as_deref(), Some("glibc.malloc.hugetlb=1"));
        assert_eq!(with(Some(" ")).as_deref(), Some("glibc.malloc.hugetlb=1"));
        assert_eq!(
            with(Some("glibc.malloc.arena_max=2")).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
        );
        assert_eq!(with(Some("glibc.malloc.hugetlb=0")), None);
        assert_eq!(with(Some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2")), None);
    }
}
