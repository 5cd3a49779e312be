//! Running one stage out of process.
//!
//! A stage that is one external program (the `command` stage) is spawned directly; any other
//! stage runs as `orchestrate exec-stage SPEC RESULT`, the same binary in a child process. Either
//! way the child gets its own process group, so a timeout or cancel kills the stage and all it
//! started; it dies with the scheduler (PR_SET_PDEATHSIG, relayed to the whole group); and its
//! CPU time and peak memory come from the kernel (wait4's rusage).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::{External, RunSpec, StageContext};
use tokio::sync::watch;

use crate::registry::Registry;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChildResult {
    pub ok: bool,
    pub error: Option<String>,
    pub metrics: BTreeMap<String, Value>,
    /// CPU time and peak memory: measured by the scheduler (wait4) for a local child; for a
    /// cluster job, by `exec-stage` itself (its own and its children's rusage).
    pub cpu_s: f64,
    pub peak_rss_bytes: u64,
    /// Digest of each output as `exec-stage` left it, so a coordinator that finds the result
    /// later (a cluster job adopted after a crash) can tell the outputs are whole and unchanged.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// The machine `exec-stage` ran on (`stage_api::host::describe`), for provenance.
    #[serde(default)]
    pub host: Option<Value>,
    /// Where it ran, when not here: `slurm job 42 on node03`.
    #[serde(default)]
    pub ran_on: Option<String>,
}

#[derive(Debug)]
pub enum Outcome {
    Done(ChildResult),
    Failed { message: String, cpu_s: f64, peak_rss_bytes: u64 },
    TimedOut(Duration),
    Cancelled,
}

extern "C" fn kill_own_group(_: libc::c_int) {
    // SAFETY: kill is async-signal-safe; 0 = our process group (the stage and its children).
    unsafe {
        libc::kill(0, libc::SIGKILL);
    }
}

/// The scheduler's pid, given to `exec-stage` children so they can tell it is still there.
const PARENT_ENV: &str = "ORCHESTRATE_SCHEDULER_PID";

/// Entry point of the hidden `exec-stage` subcommand. Returns the process exit code.
pub fn exec_stage_main(spec_path: &Path, result_path: &Path) -> i32 {
    // First, before any thread: the stage's memory on huge pages (this process again, by exec).
    itera_models::measure::run_on_huge_pages();
    // When the scheduler dies (even by SIGKILL) the kernel sends us SIGTERM; take the whole
    // process group down so no orphaned stage keeps writing.
    // SAFETY: installing a handler that only calls kill(2), and a prctl on ourselves.
    unsafe {
        libc::signal(libc::SIGTERM, kill_own_group as *const () as libc::sighandler_t);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
    }
    // Training allocates and frees megabyte-sized tensors hundreds of times a step; keep freed
    // memory in this short-lived process rather than fault it back in page by page (~10 %).
    itera_models::measure::keep_freed_memory();
    // The scheduler may have died before the prctl took effect.
    let parent = std::env::var(PARENT_ENV).ok().and_then(|p| p.parse::<libc::pid_t>().ok());
    // SAFETY: getppid has no preconditions.
    if parent.is_some_and(|p| p != unsafe { libc::getppid() }) {
        eprintln!("exec-stage: the scheduler is gone; not running");
        return 4;
    }
    // A local child's outputs are hashed once, by the scheduler that stores them; a cluster
    // job (no scheduler parent) records their digests for the coordinator to check.
    let record_digests = parent.is_none();
    let mut r = match run_in_child(spec_path, record_digests) {
        Ok((metrics, outputs)) => ChildResult { ok: true, metrics, outputs, ..Default::default() },
        Err(e) => ChildResult { ok: false, error: Some(e), ..Default::default() },
    };
    (r.cpu_s, r.peak_rss_bytes) = own_usage();
    let mut host = stage_api::host::describe();
    if let Some(name) = crate::store::hostname() {
        host["hostname"] = Value::String(name);
    }
    r.host = Some(host);
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

/// CPU-seconds and peak RSS of this process and every child it waited for.
fn own_usage() -> (f64, u64) {
    let usage = |who| {
        // SAFETY: getrusage writes into the zeroed struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        ru
    };
    let (me, kids) = (usage(libc::RUSAGE_SELF), usage(libc::RUSAGE_CHILDREN));
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    let cpu = t(me.ru_utime) + t(me.ru_stime) + t(kids.ru_utime) + t(kids.ru_stime);
    (cpu, (me.ru_maxrss.max(kids.ru_maxrss).max(0) as u64) * 1024)
}

type Produced = (BTreeMap<String, Value>, BTreeMap<String, String>);

/// Run the stage; its metrics and, if asked, the digest of each output it wrote.
fn run_in_child(spec_path: &Path, record_digests: bool) -> Result<Produced, String> {
    let text = std::fs::read(spec_path).map_err(|e| format!("reading {}: {e}", spec_path.display()))?;
    let spec: RunSpec =
        serde_json::from_slice(&text).map_err(|e| format!("bad stage spec {}: {e}", spec_path.display()))?;
    let registry = Registry::builtin();
    let stage = registry.get(&spec.kind).ok_or_else(|| format!("unknown stage kind `{}`", spec.kind))?;
    let mut ctx = StageContext::new(spec, Arc::new(AtomicBool::new(false)));
    ctx.on_progress(|m| eprintln!("[progress] {m}"));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stage.run(&mut ctx)));
    let outputs = ctx.spec().outputs.clone();
    match outcome {
        Ok(Ok(())) => {
            let mut digests = BTreeMap::new();
            for (name, path) in outputs.into_iter().filter(|_| record_digests) {
                // A missing output is the coordinator's to report (it names the stage's duty).
                if let Ok(e) = crate::objects::digest_path(&path) {
                    digests.insert(name, e.digest);
                }
            }
            Ok((ctx.into_metrics(), digests))
        }
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

/// How a child ended, with what the kernel measured.
struct Exit {
    code: Option<i32>,
    signal: Option<i32>,
    cpu_s: f64,
    peak_rss_bytes: u64,
}

impl Exit {
    fn success(&self) -> bool {
        self.code == Some(0)
    }
    fn describe(&self) -> String {
        match (self.code, self.signal) {
            (_, Some(9)) => "was killed by SIGKILL (out of memory?)".to_string(),
            (_, Some(6)) => "aborted (SIGABRT)".to_string(),
            (_, Some(s)) => format!("was killed by signal {s}"),
            // The shell's own codes for a program it could not run (POSIX `sh`, "Exit Status").
            (Some(127), _) => "exited with status 127: the program was not found (is it installed and on PATH?)".into(),
            (Some(126), _) => "exited with status 126: the program could not be executed (is it executable?)".into(),
            (Some(c), _) => format!("exited with status {c}"),
            _ => "ended abnormally".to_string(),
        }
    }
}

/// Block until `pid` ends; its rusage covers it and every descendant it waited for.
fn wait4(pid: u32) -> std::io::Result<Exit> {
    let mut status: libc::c_int = 0;
    // SAFETY: wait4 writes into the two locals we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
        if rc == pid as libc::pid_t {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    Ok(Exit {
        code,
        signal,
        cpu_s: t(ru.ru_utime) + t(ru.ru_stime),
        peak_rss_bytes: (ru.ru_maxrss.max(0) as u64) * 1024,
    })
}

/// Run an external program under a `sh` guard. The guard's stdin is a pipe whose write end
/// only the scheduler holds: a watcher job blocks reading it, and when the scheduler dies (even
/// by SIGKILL) the read hits end-of-file and the watcher kills the whole process group. This
/// needs no `pre_exec`, so the spawn stays a cheap `posix_spawn` instead of a `fork`.
fn guarded(ext: &External) -> std::process::Command {
    let mut c = std::process::Command::new("sh");
    // Background jobs of a non-interactive sh get /dev/null as stdin unless redirected, so the
    // watcher reads the pipe through fd 3.
    let watch = "exec 3<&0; ( read _ <&3; kill -KILL 0 ) & exec 3<&-;";
    if ext.program == "sh" && ext.args.len() == 2 && ext.args[0] == "-c" {
        // A shell script: eval it in the guard's own background subshell (a fork, no exec).
        c.arg("-c")
            .arg(format!("{watch} s=$1; shift; eval \"$s\" </dev/null & wait $!"))
            .arg("orchestrate-guard")
            .arg(&ext.args[1]);
    } else {
        c.arg("-c")
            .arg(format!("{watch} \"$@\" </dev/null & wait $!"))
            .arg("orchestrate-guard")
            .arg(&ext.program)
            .args(&ext.args);
    }
    c.envs(ext.env.iter().cloned());
    c
}

/// Aborts the progress watcher when the child is done, however `run_child` returns.
pub(crate) struct AbortOnDrop(pub(crate) Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

/// Where a running stage's progress messages go: (stage name, message).
pub type ProgressSink = tokio::sync::mpsc::UnboundedSender<(String, String)>;

/// The last `[progress] ...` line a stage wrote to its log, if any.
fn last_progress(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(log).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut tail = String::new();
    f.read_to_string(&mut tail).ok()?;
    tail.lines().rev().find_map(|l| l.strip_prefix("[progress] ").map(str::to_string))
}

/// How a stage's child is started: directly as its external program under the `sh` guard, or
/// as `orchestrate exec-stage SPEC RESULT`.
struct Launch {
    cmd: std::process::Command,
    external: Option<External>,
    /// Held until the child ends; dropping it (or dying) is what the guard watches for.
    lifeline: Option<std::io::PipeWriter>,
}

/// The command for `spec`, or the reason it cannot run (an unknown kind, a bad external spec).
fn launch(spec: &RunSpec, scratch: &Path, result_path: &Path) -> std::io::Result<Result<Launch, String>> {
    let registry = Registry::builtin();
    let Some(stage) = registry.get(&spec.kind) else {
        return Ok(Err(format!("unknown stage kind `{}`", spec.kind)));
    };
    // ORCHESTRATE_STAGE_PROTOCOL=process sends every stage through `exec-stage`, the path all
    // non-command stages take (for diagnosing a stage, and so tests cover that path too).
    let direct_allowed = std::env::var("ORCHESTRATE_STAGE_PROTOCOL").map(|v| v != "process").unwrap_or(true);
    let external = match stage.external(spec) {
        Ok(e) if direct_allowed => e,
        Ok(_) => None,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if let Some(ext) = external {
        let (reader, writer) = std::io::pipe()?;
        let mut cmd = guarded(&ext);
        cmd.stdin(reader);
        return Ok(Ok(Launch { cmd, external: Some(ext), lifeline: Some(writer) }));
    }
    let spec_path = scratch.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?)?;
    let _ = std::fs::remove_file(result_path);
    let mut cmd = std::process::Command::new(self_exe()?);
    cmd.arg("exec-stage").arg(&spec_path).arg(result_path).stdin(std::process::Stdio::null());
    cmd.env(PARENT_ENV, std::process::id().to_string());
    // candle (rayon) and BLAS-style libraries size their pools from these at start-up.
    cmd.env("RAYON_NUM_THREADS", spec.threads.to_string()).env("OMP_NUM_THREADS", spec.threads.to_string());
    Ok(Ok(Launch { cmd, external: None, lifeline: None }))
}

/// Forward the newest `[progress] …` line of the stage's log to `sink`, twice a second.
pub(crate) fn watch_progress(sink: ProgressSink, log: PathBuf, name: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = None;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = last_progress(&log);
            if now.is_some() && now != last {
                if sink.send((name.clone(), now.clone().unwrap_or_default())).is_err() {
                    break;
                }
                last = now;
            }
        }
    })
}

/// Run a stage in a child process and wait for it, a timeout, or a cancel.
pub async fn run_child(
    spec: &RunSpec,
    scratch: &Path,
    timeout: Option<Duration>,
    mut cancel: watch::Receiver<bool>,
    progress: Option<ProgressSink>,
) -> std::io::Result<(Outcome, PathBuf)> {
    let log_path = scratch.join("log.txt");
    let result_path = scratch.join("result.json");
    let Launch { mut cmd, external, lifeline } = match launch(spec, scratch, &result_path)? {
        Ok(l) => l,
        Err(message) => return Ok((Outcome::Failed { message, cpu_s: 0.0, peak_rss_bytes: 0 }, log_path)),
    };
    let log = File::create(&log_path)?;
    cmd.current_dir(&spec.work_dir).stdout(log.try_clone()?).stderr(log).process_group(0);
    if *cancel.borrow() {
        return Ok((Outcome::Cancelled, log_path));
    }
    let child = cmd.spawn()?;
    let pid = child.id();
    drop(child); // reaped by wait4 below
    let started = Instant::now();
    let mut waiter = tokio::task::spawn_blocking(move || wait4(pid));
    let watcher = progress.map(|sink| watch_progress(sink, log_path.clone(), spec.stage_name.clone()));
    let _stop_watching = AbortOnDrop(watcher);
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let exit = tokio::select! {
        r = &mut waiter => r.map_err(std::io::Error::other)??,
        _ = &mut deadline => {
            kill_group(pid);
            let _ = waiter.await;
            return Ok((Outcome::TimedOut(started.elapsed()), log_path));
        }
        _ = async { let _ = cancel.wait_for(|c| *c).await; } => {
            kill_group(pid);
            let _ = waiter.await;
            return Ok((Outcome::Cancelled, log_path));
        }
    };
    // Anything the stage left running in its group goes too (the guard's watcher included).
    kill_group(pid);
    drop(lifeline);
    Ok((outcome(&exit, external.as_ref(), &result_path), log_path))
}

/// What the child's exit means: for an external program its exit status and metrics file, for
/// `exec-stage` the result file it wrote.
fn outcome(exit: &Exit, external: Option<&External>, result_path: &Path) -> Outcome {
    let (cpu_s, peak_rss_bytes) = (exit.cpu_s, exit.peak_rss_bytes);
    let failed = |message: String| Outcome::Failed { message, cpu_s, peak_rss_bytes };
    let done = |metrics| Outcome::Done(ChildResult { ok: true, metrics, cpu_s, peak_rss_bytes, ..Default::default() });
    match external {
        Some(ext) if exit.success() => {
            match ext.metrics_file.as_deref().map(stage_api::read_metrics_file).transpose() {
                Ok(metrics) => done(metrics.unwrap_or_default()),
                Err(e) => failed(e.to_string()),
            }
        }
        Some(_) => failed(format!("command {}", exit.describe())),
        None => {
            let result: Option<ChildResult> =
                std::fs::read(result_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
            match result {
                Some(mut r) if r.ok && exit.success() => {
                    r.cpu_s = cpu_s;
                    r.peak_rss_bytes = peak_rss_bytes;
                    Outcome::Done(r)
                }
                Some(r) => failed(r.error.unwrap_or_else(|| format!("the stage process {}", exit.describe()))),
                None => failed(format!("the stage process {} without a result", exit.describe())),
            }
        }
    }
}

/// The running binary, for `exec-stage` children. On Linux `/proc/self/exe` still names the
/// running program after its file was replaced or deleted (a `cargo build` during a long run),
/// where the path `current_exe` returns would then point at a different or missing file.
fn self_exe() -> std::io::Result<std::path::PathBuf> {
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe.to_path_buf());
    }
    std::env::current_exe()
}
