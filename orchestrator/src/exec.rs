//! Running one stage out of process: `orchestrate exec-stage SPEC RESULT`.
//!
//! The child is the same binary. It gets its own process group so a timeout or cancel kills
//! the stage and everything it started; it dies with the scheduler (PR_SET_PDEATHSIG), and it
//! reports metrics, CPU time and peak memory (getrusage, including its children) in RESULT.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::{RunSpec, StageContext};
use tokio::sync::watch;

use crate::registry::Registry;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChildResult {
    pub ok: bool,
    pub error: Option<String>,
    pub metrics: BTreeMap<String, Value>,
    pub cpu_s: f64,
    pub peak_rss_bytes: u64,
}

#[derive(Debug)]
pub enum Outcome {
    Done(ChildResult),
    Failed { message: String, cpu_s: f64, peak_rss_bytes: u64 },
    TimedOut(Duration),
    Cancelled,
}

fn rusage(who: libc::c_int) -> (f64, u64) {
    // SAFETY: getrusage fills the zeroed struct we pass; no other memory is touched.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return (0.0, 0);
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime) + t(ru.ru_stime), (ru.ru_maxrss.max(0) as u64) * 1024)
}

extern "C" fn kill_own_group(_: libc::c_int) {
    // SAFETY: kill is async-signal-safe; 0 = our process group (the stage and its children).
    unsafe {
        libc::kill(0, libc::SIGKILL);
    }
}

/// Entry point of the hidden `exec-stage` subcommand. Returns the process exit code.
pub fn exec_stage_main(spec_path: &Path, result_path: &Path) -> i32 {
    // When the scheduler dies (even by SIGKILL) the kernel sends us SIGTERM; take the whole
    // process group down so no orphaned stage keeps writing.
    // SAFETY: installing a handler that only calls kill(2).
    unsafe {
        libc::signal(libc::SIGTERM, kill_own_group as *const () as libc::sighandler_t);
    }
    let result = run_in_child(spec_path);
    let (self_cpu, self_rss) = rusage(libc::RUSAGE_SELF);
    let (kids_cpu, kids_rss) = rusage(libc::RUSAGE_CHILDREN);
    let mut r = match result {
        Ok(metrics) => ChildResult { ok: true, error: None, metrics, ..Default::default() },
        Err(e) => ChildResult { ok: false, error: Some(e), ..Default::default() },
    };
    r.cpu_s = self_cpu + kids_cpu;
    r.peak_rss_bytes = self_rss.max(kids_rss);
    let ok = r.ok;
    let written = serde_json::to_vec(&r).ok().and_then(|b| std::fs::write(result_path, b).ok());
    if written.is_none() {
        eprintln!("exec-stage: could not write {}", result_path.display());
        return 3;
    }
    if ok {
        0
    } else {
        1
    }
}

fn run_in_child(spec_path: &Path) -> Result<BTreeMap<String, Value>, String> {
    let text = std::fs::read(spec_path).map_err(|e| format!("reading {}: {e}", spec_path.display()))?;
    let spec: RunSpec = serde_json::from_slice(&text).map_err(|e| format!("bad stage spec {}: {e}", spec_path.display()))?;
    let registry = Registry::builtin();
    let stage = registry.get(&spec.kind).ok_or_else(|| format!("unknown stage kind `{}`", spec.kind))?;
    let mut ctx = StageContext::new(spec, Arc::new(AtomicBool::new(false)));
    ctx.on_progress(|m| eprintln!("[progress] {m}"));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage.run(&mut ctx)));
    match outcome {
        Ok(Ok(())) => Ok(ctx.into_metrics()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("the stage panicked: {msg}"))
        }
    }
}

/// The last lines of a stage's log, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn kill_group(pid: u32) {
    // SAFETY: signalling a process group we created; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
    }
}

/// Run a stage in a child process and wait for it, a timeout, or a cancel.
pub async fn run_child(
    spec: &RunSpec,
    scratch: &Path,
    timeout: Option<Duration>,
    mut cancel: watch::Receiver<bool>,
) -> std::io::Result<(Outcome, PathBuf)> {
    let spec_path = scratch.join("spec.json");
    let result_path = scratch.join("result.json");
    let log_path = scratch.join("log.txt");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?)?;
    let _ = std::fs::remove_file(&result_path);
    let log = File::create(&log_path)?;
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("exec-stage")
        .arg(&spec_path)
        .arg(&result_path)
        .current_dir(&spec.work_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl in the forked child before exec; it touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
            Ok(())
        });
    }
    if *cancel.borrow() {
        return Ok((Outcome::Cancelled, log_path));
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);
    let started = Instant::now();
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let status = tokio::select! {
        s = child.wait() => s?,
        _ = &mut deadline => {
            kill_group(pid);
            let _ = child.wait().await;
            return Ok((Outcome::TimedOut(started.elapsed()), log_path));
        }
        _ = async { let _ = cancel.wait_for(|c| *c).await; } => {
            kill_group(pid);
            let _ = child.wait().await;
            return Ok((Outcome::Cancelled, log_path));
        }
    };
    // Anything the stage left running in its group goes too.
    kill_group(pid);
    let result: Option<ChildResult> =
        std::fs::read(&result_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    Ok(match result {
        Some(r) if r.ok && status.success() => (Outcome::Done(r), log_path),
        Some(r) => (
            Outcome::Failed {
                message: r.error.unwrap_or_else(|| format!("stage process exited with {status}")),
                cpu_s: r.cpu_s,
                peak_rss_bytes: r.peak_rss_bytes,
            },
            log_path,
        ),
        None => {
            let message = match (status.code(), status.signal()) {
                (_, Some(9)) => "the stage process was killed by SIGKILL (out of memory?)".to_string(),
                (_, Some(6)) => "the stage process aborted (SIGABRT)".to_string(),
                (_, Some(s)) => format!("the stage process was killed by signal {s}"),
                (Some(c), _) => format!("the stage process exited with status {c} without a result"),
                _ => "the stage process ended abnormally".to_string(),
            };
            (Outcome::Failed { message, cpu_s: 0.0, peak_rss_bytes: 0 }, log_path)
        }
    })
}
