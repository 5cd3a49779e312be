//! What machine a figure was measured on: CPU model, cores, SIMD flags, memory, OS, kernel,
//! compiler and load. Stages that measure (the benchmark) and the run description a report
//! renders from both record it.

use serde_json::{json, Value};

/// CPU model, cores, SIMD flags, memory, OS and compiler of this machine.
pub fn describe() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find(|l| l.starts_with(name)).and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let simd: Vec<&str> =
        ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile"]
            .into_iter()
            .filter(|f| flags.split_whitespace().any(|x| x == *f))
            .collect();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let os = std::fs::read_to_string("/etc/os-release").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("PRETTY_NAME="))
            .map(|l| l.trim_start_matches("PRETTY_NAME=").trim_matches('"').to_string())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).ok();
    json!({
        "cpu": field("model name"),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "simd": simd,
        "memory_bytes": mem_kb * 1024,
        "os": os,
        "kernel": kernel,
        "rustc": env!("STAGE_API_RUSTC_VERSION"),
        "load_average": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
    })
}
