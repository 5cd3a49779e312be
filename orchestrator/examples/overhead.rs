//! Orchestration overhead benchmark: `cargo run --release -p orchestrator --example overhead`.
//!
//! Drives the release `orchestrate` binary exactly as a user would (one process per command)
//! on three pipelines of small command stages: the 8-stage phase4-shaped pipeline the peers'
//! benchmark runs (`../shared/peer/orch/make_pipelines.py --shape phase4`: vocab → two
//! trainings, one writing 100 MB → quantize ∥ distill → export → benchmark → report), a
//! 200-stage wide DAG (+ a join) and a 200-stage chain. For each: cold run, no-op rerun, `plan`,
//! and a rerun after one mid-pipeline param changes; then blake3 hashing throughput of a 1 GiB
//! file. Prints our medians with min–max only: a ratio to DVC or Snakemake counts only when they
//! run in the same session on the same machine, which `../shared/peer/orch/bench.py` does
//! (`--tools dvc,smk,orch`, with `ORCH` pointing at this binary).
//!
//! Options (env): BENCH_REPEATS (default 7), BENCH_SKIP_HASH=1. `BENCH_LARGE=200,1000,10000`
//! instead measures wide and chain pipelines of those sizes once each: cold run (and per stage),
//! no-op rerun (and per stage), `plan`, and the peak memory of `plan`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("bench executable path");
    // target/release/examples/bench → target/release/orchestrate
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf();
    let bin = dir.join("orchestrate");
    let stale = match (std::fs::metadata(&bin), std::fs::metadata(&exe)) {
        (Ok(b), Ok(e)) => b.modified().ok() < e.modified().ok(),
        _ => true,
    };
    if stale {
        let profile = if dir.ends_with("release") { "--release" } else { "--profile=dev" };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", profile, "-p", "orchestrator", "--bin", "orchestrate"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "could not build the orchestrate binary");
    }
    bin
}

struct Stats {
    median: f64,
    min: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    Stats { median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] }
}

fn time_cmd(bin: &Path, dir: &Path, args: &[&str]) -> f64 {
    let t = Instant::now();
    let out = Command::new(bin).current_dir(dir).args(args).output().expect("run orchestrate");
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "orchestrate {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    secs
}

struct Case {
    name: &'static str,
    file: PathBuf,
    /// `--set` that changes one param mid-pipeline; `{}` is replaced by a fresh value each time.
    change: &'static str,
    stages: usize,
}

/// The peers' phase4 shape (make_pipelines.py): the same commands, stage names and params.
fn phase4_pipeline() -> String {
    let big = 100 * 1000 * 1000;
    let stage = |name: &str, cmd: &str, inputs: &[(&str, &str)], params: &str| {
        let ins: Vec<String> = inputs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!(
            "  {name}:\n    kind: command\n    params: {{{params}}}\n    cmd: \"{cmd}\"\n    inputs: {{{}}}\n    outputs: [o]\n",
            ins.join(", ")
        )
    };
    let mut s = String::from("name: phase4\nstages:\n");
    s += &stage(
        "vocab",
        "(cat ${inputs.raw}; echo vocab size=${params.size}) > ${outputs.o}",
        &[("raw", "file:raw.txt")],
        "size: 1000",
    );
    s += &stage(
        "train_teacher",
        &format!(
            "(cat ${{inputs.v}}; echo teacher epochs=${{params.epochs}}; head -c {big} /dev/zero) > ${{outputs.o}}"
        ),
        &[("v", "vocab.o")],
        "epochs: 3",
    );
    s += &stage(
        "train_baseline",
        "(cat ${inputs.v}; echo baseline epochs=${params.epochs}) > ${outputs.o}",
        &[("v", "vocab.o")],
        "epochs: 2",
    );
    s += &stage(
        "quantize",
        "(cat ${inputs.b}; echo quant bits=${params.bits}; : note=${params.calib_note}) > ${outputs.o}",
        &[("b", "train_baseline.o")],
        "bits: 8, calib_note: 0",
    );
    s += &stage(
        "distill",
        "(cksum < ${inputs.t}; cat ${inputs.b}; echo distill alpha=${params.alpha}) > ${outputs.o}",
        &[("t", "train_teacher.o"), ("b", "train_baseline.o")],
        "alpha: 0.5",
    );
    s += &stage(
        "onnx_export",
        "(cat ${inputs.q} ${inputs.s}; echo opset=${params.opset}) > ${outputs.o}",
        &[("q", "quantize.o"), ("s", "distill.o")],
        "opset: 17",
    );
    s += &stage(
        "benchmark",
        "(cksum < ${inputs.m}; echo iters=${params.iters}) > ${outputs.o}",
        &[("m", "onnx_export.o")],
        "iters: 10",
    );
    s += &stage(
        "report",
        "(cat ${inputs.b}; echo fmt=${params.fmt}) > ${outputs.o}",
        &[("b", "benchmark.o")],
        "fmt: md",
    );
    s
}

fn wide_pipeline(n: usize) -> String {
    let mut s = String::from("name: wide\nparams: {salt: 0}\nstages:\n");
    for i in 0..n {
        let salt = if i == n / 2 { "${params.salt}" } else { "0" };
        s.push_str(&format!("  s{i}: {{kind: command, cmd: \"echo {i} {salt} > ${{outputs.o}}\", outputs: [o]}}\n"));
    }
    s.push_str("  join:\n    kind: command\n    cmd: \"cat ");
    for i in 0..n {
        s.push_str(&format!("${{inputs.i{i}}} "));
    }
    s.push_str("> ${outputs.o}\"\n    outputs: [o]\n    inputs:\n");
    for i in 0..n {
        s.push_str(&format!("      i{i}: s{i}.o\n"));
    }
    s
}

fn chain_pipeline(n: usize) -> String {
    let mut s = String::from("name: chain\nparams: {salt: 0}\nstages:\n  c0: {kind: command, cmd: \"echo 0 > ${outputs.o}\", outputs: [o]}\n");
    for i in 1..n {
        let salt = if i == n / 2 { "${params.salt}" } else { "0" };
        s.push_str(&format!(
            "  c{i}: {{kind: command, cmd: \"cat ${{inputs.i}} > ${{outputs.o}}; echo {i} {salt} >> ${{outputs.o}}\", inputs: {{i: c{}.o}}, outputs: [o]}}\n",
            i - 1
        ));
    }
    s
}

fn fmt(s: &Stats) -> String {
    format!("{:>8.1} ms [{:.1}–{:.1}]", s.median * 1e3, s.min * 1e3, s.max * 1e3)
}

/// Run `bin` with `args` in `dir`; (seconds, peak RSS of the process in bytes). The child is
/// reaped by `wait4`, which also returns its own rusage (std's `wait` does not).
#[allow(clippy::zombie_processes)]
fn time_and_rss(bin: &Path, dir: &Path, args: &[&str]) -> (f64, u64) {
    let t = Instant::now();
    let child = Command::new(bin)
        .current_dir(dir)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run orchestrate");
    let mut status = 0;
    // SAFETY: waiting for our own child; rusage is written by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    let secs = t.elapsed().as_secs_f64();
    assert!(rc > 0 && status == 0, "orchestrate {args:?} failed (status {status})");
    (secs, ru.ru_maxrss as u64 * 1024)
}

/// `BENCH_LARGE`: wide and chain pipelines of each size, one run of each measure.
fn large(bin: &Path, work: &Path, sizes: &[usize]) {
    println!("large DAGs (one run each; per stage = total ÷ stages)");
    println!("| shape | N | cold | per stage | no-op | per stage | plan | plan peak RSS |");
    println!("|---|---|---|---|---|---|---|---|");
    for &n in sizes {
        for (shape, text) in [("wide", wide_pipeline(n)), ("chain", chain_pipeline(n))] {
            let file = work.join(format!("{shape}-{n}.yaml"));
            std::fs::write(&file, text).expect("write");
            let store = work.join(format!("store-{shape}-{n}"));
            let (f, s) = (file.to_str().expect("utf-8"), store.to_str().expect("utf-8"));
            let stages = if shape == "wide" { n + 1 } else { n } as f64;
            let (cold, _) = time_and_rss(bin, work, &["run", f, "--store", s]);
            let (noop, _) = time_and_rss(bin, work, &["run", f, "--store", s]);
            let (plan, rss) = time_and_rss(bin, work, &["plan", f, "--store", s]);
            println!(
                "| {shape} | {n} | {cold:.2} s | {:.2} ms | {:.0} ms | {:.3} ms | {:.0} ms | {:.1} MB |",
                cold / stages * 1e3,
                noop * 1e3,
                noop / stages * 1e3,
                plan * 1e3,
                rss as f64 / 1e6
            );
            let _ = std::fs::remove_dir_all(&store);
        }
    }
}

fn main() {
    if let Ok(sizes) = std::env::var("BENCH_LARGE") {
        let sizes: Vec<usize> = sizes.split(',').filter_map(|s| s.trim().parse().ok()).collect();
        let work = tempfile::tempdir().expect("temp dir");
        large(&binary(), work.path(), &sizes);
        return;
    }
    let repeats: usize = std::env::var("BENCH_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(7).max(1);
    let bin = binary();
    let work = tempfile::tempdir().expect("temp dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::copy(root.join("pipelines/examples/data/essay.txt"), work.path().join("raw.txt")).expect("copy data");
    std::fs::write(work.path().join("phase4.yaml"), phase4_pipeline()).expect("write");
    std::fs::write(work.path().join("wide.yaml"), wide_pipeline(200)).expect("write");
    std::fs::write(work.path().join("chain.yaml"), chain_pipeline(200)).expect("write");

    let cases = [
        Case {
            name: "phase4 shape (8 stages, one writes 100 MB; the peers' pipeline)",
            file: work.path().join("phase4.yaml"),
            change: "quantize.bits={}",
            stages: 8,
        },
        Case { name: "wide (200 + join)", file: work.path().join("wide.yaml"), change: "salt={}", stages: 201 },
        Case { name: "chain (200)", file: work.path().join("chain.yaml"), change: "salt={}", stages: 200 },
    ];

    println!("orchestrate overhead benchmark — {} repeats, binary {}", repeats, bin.display());
    println!("(medians [min–max]; peers side by side: ../shared/peer/orch/bench.py)\n");
    let mut per_stage_overhead = None;
    for case in &cases {
        let file = case.file.to_str().expect("utf-8");
        let mut cold = Vec::new();
        let mut noop = Vec::new();
        let mut plan = Vec::new();
        let mut change = Vec::new();
        for r in 0..repeats.min(3) {
            let store = work.path().join(format!("store-{}-{r}", case.stages));
            let s = store.to_str().expect("utf-8");
            cold.push(time_cmd(&bin, work.path(), &["run", file, "--store", s]));
        }
        let store = work.path().join(format!("store-{}-0", case.stages));
        let s = store.to_str().expect("utf-8");
        for _ in 0..repeats {
            noop.push(time_cmd(&bin, work.path(), &["run", file, "--store", s]));
            plan.push(time_cmd(&bin, work.path(), &["plan", file, "--store", s]));
        }
        for r in 0..repeats.min(3) {
            let set = case.change.replace("{}", &(1000 + r).to_string());
            change.push(time_cmd(&bin, work.path(), &["run", file, "--store", s, "--set", &set]));
        }
        let (cold, noop, plan, change) = (stats(cold), stats(noop), stats(plan), stats(change));
        println!("{}", case.name);
        println!("  cold run          {}", fmt(&cold));
        println!("  no-op rerun       {}", fmt(&noop));
        println!("  plan (dry run)    {}", fmt(&plan));
        println!("  one param changed {}", fmt(&change));
        if case.name.starts_with("chain") {
            // What the same 200 commands cost run back to back by hand, without orchestration.
            let t = Instant::now();
            let scratch = work.path().join("direct");
            std::fs::create_dir_all(&scratch).expect("mkdir");
            std::fs::write(scratch.join("o0"), "0\n").expect("write");
            for i in 1..200 {
                let ok = Command::new("sh")
                    .arg("-c")
                    .arg(format!("cat o{} > o{i}; echo {i} 0 >> o{i}", i - 1))
                    .current_dir(&scratch)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                assert!(ok);
            }
            let direct = t.elapsed().as_secs_f64();
            let overhead = (cold.median - direct) / 200.0;
            // The commit protocol syncs twice per stage (the output file before its rename, the
            // sled index at commit): measure what one costs on this filesystem.
            let mut syncs = Vec::new();
            for i in 0..100 {
                use std::io::Write;
                let t = Instant::now();
                let mut f = std::fs::File::create(scratch.join(format!("sync{i}"))).expect("create");
                f.write_all(b"0123456789").expect("write");
                f.sync_all().expect("fsync");
                syncs.push(t.elapsed().as_secs_f64());
            }
            let fsync = stats(syncs).median;
            println!(
                "  orchestration overhead per stage: {:.2} ms (cold chain {:.0} ms − the same commands run directly {:.0} ms, / 200)",
                overhead * 1e3,
                cold.median * 1e3,
                direct * 1e3
            );
            println!(
                "  scheduler decision per stage (no-op chain / 200: key, cache lookup, bookkeeping, incl. process start): {:.3} ms",
                noop.median / 200.0 * 1e3
            );
            println!(
                "    of which durability, 2 fsyncs × {:.2} ms = {:.2} ms; scheduling and process handling {:.2} ms",
                fsync * 1e3,
                2.0 * fsync * 1e3,
                (overhead - 2.0 * fsync) * 1e3
            );
            per_stage_overhead = Some((overhead, overhead - 2.0 * fsync));
        }
        println!();
    }

    if std::env::var("BENCH_SKIP_HASH").is_err() {
        let big = work.path().join("1gib.bin");
        {
            use std::io::Write;
            let mut f = std::io::BufWriter::new(std::fs::File::create(&big).expect("create"));
            let mut block = vec![0u8; 1 << 20];
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            for _ in 0..1024 {
                for b in block.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
                }
                f.write_all(&block).expect("write");
            }
        }
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            orchestrator::objects::hash_file(&big).expect("hash");
            times.push(t.elapsed().as_secs_f64());
        }
        let h = stats(times);
        let gbs = (1u64 << 30) as f64 / h.median / 1e9;
        println!("hashing a 1 GiB file (blake3, warm page cache, 1 thread)");
        println!("  {:.3} s [{:.3}–{:.3}] = {:.2} GB/s", h.median, h.min, h.max, gbs);
        println!("  target ≥ 1.5 GB/s: {}", if gbs >= 1.5 { "met" } else { "MISSED" });
    }
    if let Some((total, scheduling)) = per_stage_overhead {
        println!(
            "overhead target < 2 ms per stage: scheduling {} ({:.2} ms); including the commit's fsyncs {} ({:.2} ms)",
            if scheduling < 0.002 { "met" } else { "MISSED" },
            scheduling * 1e3,
            if total < 0.002 { "met" } else { "MISSED" },
            total * 1e3
        );
    }
}
