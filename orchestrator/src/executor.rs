//! Where a stage's process runs: here (`exec`), or as a Slurm job (`run --executor slurm`).
//!
//! The scheduler decides cache hits, admission, cancellation and commits the same way for
//! both; an executor only runs one attempt of a stage and says how it ended. A Slurm job runs
//! the same `orchestrate exec-stage SPEC RESULT` a local child does, in a scratch folder inside
//! the store — which is why the store must sit on a filesystem the nodes share. The job writes
//! its outputs and `result.json` (with each output's digest) there and, last, an `exit` file;
//! only the coordinator hashes the outputs into `objects/` and touches the sled index.
//!
//! Job names are `orc-<store tag>-<run tag>-<stage>`: one `squeue` per poll interval finds
//! every job of the run, and a run that starts on a store whose last coordinator died finds
//! that run's jobs by the store tag and cancels them, while results they finished are adopted
//! from their scratch folders (digests checked) instead of being computed again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use orchestrate_slurm::{Cluster, JobEnd, JobId, JobRequest, JobState, Monitor};
use stage_api::RunSpec;
use tokio::sync::watch;

use crate::exec::{self, ChildResult, Outcome, ProgressSink};
use crate::pipeline::StageInstance;

/// How stages run.
#[derive(Clone, Default)]
pub enum Executor {
    #[default]
    Local,
    Slurm(Arc<Slurm>),
}

/// How often a running job's `exit` file is looked for (a `stat` on the shared store).
const EXIT_FILE_CHECK: Duration = Duration::from_millis(200);

/// How long a completed job's `exit` file may take to become visible here.
const SHARED_FS_LATENCY: Duration = Duration::from_secs(10);

/// Wait until `path` exists.
async fn appears(path: &Path, every: Duration) {
    while !path.exists() {
        tokio::time::sleep(every).await;
    }
}

/// How long a job whose exit file reports a failure waits for Slurm to say how it ended: a
/// job Slurm ended (time limit, memory) can write its exit file before `squeue` shows why.
const FAILED_STATE_WAIT: Duration = Duration::from_secs(30);

/// The exit code the job script gives when it cannot see the store.
const STORE_NOT_SHARED: i32 = 97;

/// How much later than Slurm's own limit the coordinator gives up on a job (Slurm checks time
/// limits on its own schedule: a 1-minute job can run 70 s and more).
const LIMIT_GRACE: Duration = Duration::from_secs(180);

impl Executor {
    /// The folder one attempt of the stage works in: a fresh one under `tmp/` here; for a
    /// cluster job one named by the cache key under `slurm/`, which survives the coordinator
    /// so a later run can adopt what the job finished.
    pub fn scratch(&self, tmp: impl FnOnce() -> PathBuf, key: &str, stage: &str) -> PathBuf {
        match self {
            Executor::Local => tmp(),
            Executor::Slurm(s) => {
                s.store_root.join("slurm").join(format!("{}-{}", &key[..key.len().min(16)], safe(stage)))
            }
        }
    }

    /// A finished result a previous job left in `scratch` (all outputs whole and as the job
    /// hashed them), to store instead of running the stage again.
    pub fn adopt(&self, scratch: &Path, outputs: &[String]) -> Option<ChildResult> {
        let Executor::Slurm(_) = self else { return None };
        adoptable(scratch, outputs)
    }

    /// Run one attempt of the stage.
    pub async fn run(
        &self,
        spec: &RunSpec,
        scratch: &Path,
        st: &StageInstance,
        cancel: watch::Receiver<bool>,
        progress: Option<ProgressSink>,
    ) -> std::io::Result<(Outcome, PathBuf)> {
        match self {
            Executor::Local => exec::run_child(spec, scratch, st.timeout, cancel, progress).await,
            Executor::Slurm(s) => s.run(spec, scratch, st, cancel, progress).await,
        }
    }
}

/// A job name part: Slurm-safe characters only.
fn safe(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._=@-".contains(c) { c } else { '_' }).collect()
}

/// The Slurm executor of one run.
pub struct Slurm {
    cluster: Arc<Cluster>,
    monitor: Monitor,
    /// `orc-<store tag>-<run tag>-`: this run's jobs.
    run_tag: String,
    store_root: PathBuf,
    binary: PathBuf,
    partitions: Vec<String>,
}

impl Slurm {
    /// Check the cluster (its commands, slurmctld), cancel jobs a dead
    /// coordinator of this store left queued or running, and start watching. Returns the
    /// executor and how many such jobs were cancelled.
    pub async fn open(cfg: orchestrate_slurm::Config, store_root: &Path) -> Result<(Slurm, usize), String> {
        let cluster = Arc::new(Cluster::new(cfg));
        let known = cluster.preflight().await.map_err(|e| e.to_string())?;
        let root = store_root.canonicalize().unwrap_or_else(|_| store_root.to_path_buf());
        let hash = blake3::hash(root.to_string_lossy().as_bytes()).to_hex();
        let store_tag = format!("orc-{}-", &hash[..8]);
        let run_seed = format!("{}-{}", std::process::id(), crate::store::now_unix());
        let run_tag = format!("{store_tag}{}-", &blake3::hash(run_seed.as_bytes()).to_hex()[..6]);
        let stale: Vec<JobId> = (cluster.list(&store_tag).await.map_err(|e| e.to_string())?.into_iter())
            .filter(|j| !j.state.is_end())
            .map(|j| j.id)
            .collect();
        cluster.cancel(&stale).await.map_err(|e| e.to_string())?;
        wait_gone(&cluster, &store_tag, &stale).await;
        let binary = std::env::current_exe()
            .and_then(|p| p.canonicalize())
            .map_err(|e| format!("locating this program: {e}"))?;
        let monitor = Monitor::start(cluster.clone(), run_tag.clone());
        Ok((Slurm { cluster, monitor, run_tag, store_root: root, binary, partitions: known }, stale.len()))
    }

    /// The cluster's partitions, as `sinfo` listed them.
    pub fn partitions(&self) -> &[String] {
        &self.partitions
    }

    /// Status queries (`squeue`, `sacct`) this run made.
    pub fn status_queries(&self) -> u64 {
        self.cluster.status_queries()
    }

    async fn run(
        &self,
        spec: &RunSpec,
        scratch: &Path,
        st: &StageInstance,
        mut cancel: watch::Receiver<bool>,
        progress: Option<ProgressSink>,
    ) -> std::io::Result<(Outcome, PathBuf)> {
        let log_path = scratch.join("log.txt");
        let (result_path, exit_path) = (scratch.join("result.json"), scratch.join("exit"));
        let spec_path = scratch.join("spec.json");
        for p in [&result_path, &exit_path, &log_path] {
            let _ = std::fs::remove_file(p);
        }
        std::fs::write(&spec_path, serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?)?;
        if *cancel.borrow() {
            return Ok((Outcome::Cancelled, log_path));
        }
        let limit = st.resources.time.or(st.timeout);
        let job = JobRequest {
            name: format!("{}{}", self.run_tag, safe(&st.name)),
            script: self.script(spec, scratch),
            workdir: spec.work_dir.clone(),
            log: log_path.clone(),
            cpus: spec.threads,
            time: limit,
            mem: st.resources.mem.clone(),
            partition: st.resources.partition.clone(),
        };
        let id = match self.cluster.submit(&job).await {
            Ok(id) => id,
            Err(e) => {
                let message = format!("the cluster refused the job: {e}");
                return Ok((Outcome::Failed { message, cpu_s: 0.0, peak_rss_bytes: 0 }, log_path));
            }
        };
        tracing::debug!(stage = %st.name, job = %id, "submitted");
        let watcher = progress.map(|sink| exec::watch_progress(sink, log_path.clone(), spec.stage_name.clone()));
        let _stop_watching = exec::AbortOnDrop(watcher);
        let backstop = async {
            match limit {
                Some(t) => tokio::time::sleep(t + LIMIT_GRACE).await,
                None => std::future::pending().await,
            }
        };
        let end = tokio::select! {
            end = self.monitor.wait(&id) => end,
            // The job's own record that it finished, read from the shared store: no request to
            // slurmctld, and no poll interval between a stage ending and the next starting.
            _ = appears(&exit_path, EXIT_FILE_CHECK) => JobEnd { state: None, reason: "it wrote its exit file".into() },
            _ = backstop => {
                self.monitor.cancel(&id);
                let _ = tokio::time::timeout(Duration::from_secs(60), self.monitor.wait(&id)).await;
                return Ok((Outcome::TimedOut(limit.unwrap_or_default() + LIMIT_GRACE), log_path));
            }
            _ = async { let _ = cancel.wait_for(|c| *c).await; } => {
                self.monitor.cancel(&id);
                // Wait until the cluster has it ended, so a cancelled run leaves nothing queued.
                let _ = tokio::time::timeout(Duration::from_secs(60), self.monitor.wait(&id)).await;
                return Ok((Outcome::Cancelled, log_path));
            }
        };
        // A failure the job reported itself may be Slurm's doing (the time limit's SIGTERM lets
        // `exec-stage` write its result): the cluster's state says which, so ask for it.
        let end = match (&end.state, read_exit(scratch)) {
            (None, Some(code)) if code != 0 => {
                tokio::time::timeout(FAILED_STATE_WAIT, self.monitor.wait(&id)).await.unwrap_or(end)
            }
            _ => end,
        };
        if end.state == Some(JobState::Completed) {
            // A shared filesystem may show the job's last writes a little after Slurm says it
            // completed (NFS attribute caching).
            let _ = tokio::time::timeout(SHARED_FS_LATENCY, appears(&exit_path, EXIT_FILE_CHECK)).await;
        }
        Ok((judge(&id, &end, scratch, &log_path, st), log_path))
    }

    /// The batch script: check the store is visible, run `exec-stage`, then write `exit`.
    fn script(&self, spec: &RunSpec, scratch: &Path) -> String {
        let q = |p: &Path| shell_quote(&p.to_string_lossy());
        let (spec_path, result) = (scratch.join("spec.json"), scratch.join("result.json"));
        let (exit_tmp, exit) = (scratch.join("exit.tmp"), scratch.join("exit"));
        format!(
            "#!/bin/sh\n\
             # orchestrate: stage `{name}` of store {store}\n\
             if [ ! -f {spec} ]; then\n  \
               echo \"orchestrate: {spec} is not visible on $(hostname): the store must be on a filesystem every node shares\" >&2\n  \
               exit {not_shared}\n\
             fi\n\
             export RAYON_NUM_THREADS={t} OMP_NUM_THREADS={t}\n\
             {bin} exec-stage {spec} {result}\n\
             code=$?\n\
             echo \"$code\" > {exit_tmp} && mv {exit_tmp} {exit}\n\
             exit \"$code\"\n",
            name = spec.stage_name.replace('\n', " "),
            store = self.store_root.display(),
            spec = q(&spec_path),
            not_shared = STORE_NOT_SHARED,
            t = spec.threads.max(1),
            bin = q(&self.binary),
            result = q(&result),
            exit_tmp = q(&exit_tmp),
            exit = q(&exit),
        )
    }
}

/// Wait (up to a minute) until the cluster has ended the cancelled jobs `ids`, so a run that
/// cancelled a dead coordinator's jobs leaves none of them running.
async fn wait_gone(cluster: &Cluster, tag: &str, ids: &[JobId]) {
    let t0 = std::time::Instant::now();
    while !ids.is_empty() && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(cluster.cfg.poll).await;
        match cluster.list(tag).await {
            Ok(jobs) if jobs.iter().any(|j| ids.contains(&j.id) && !j.state.is_end()) => {}
            _ => return,
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn read_exit(scratch: &Path) -> Option<i32> {
    std::fs::read_to_string(scratch.join("exit")).ok()?.trim().parse().ok()
}

fn read_result(scratch: &Path) -> Option<ChildResult> {
    serde_json::from_slice(&std::fs::read(scratch.join("result.json")).ok()?).ok()
}

/// A result in `scratch` that can be stored as is: the job exited 0 and every output is there
/// with the digest the job recorded.
fn adoptable(scratch: &Path, outputs: &[String]) -> Option<ChildResult> {
    if read_exit(scratch)? != 0 {
        return None;
    }
    let r = read_result(scratch).filter(|r| r.ok)?;
    let whole = outputs.iter().all(|o| {
        let on_disk = crate::objects::digest_path(&scratch.join("out").join(o)).ok().map(|e| e.digest);
        on_disk.is_some() && r.outputs.get(o) == on_disk.as_ref()
    });
    whole.then_some(r)
}

/// Whether the job's log shows Slurm killed it for memory (a cluster enforcing memory through
/// job accounting, `OverMemoryKill`, reports FAILED; through cgroups, OUT_OF_MEMORY).
fn memory_kill_in_log(log: &Path) -> bool {
    let tail = exec::log_tail(log, 40);
    tail.contains("exceeded memory limit") || tail.contains("Exceeded job memory limit") || tail.contains("oom-kill")
}

/// What a job's end means for the stage.
fn judge(id: &JobId, end: &JobEnd, scratch: &Path, log: &Path, st: &StageInstance) -> Outcome {
    let (exit, result) = (read_exit(scratch), read_result(scratch));
    let (cpu_s, peak_rss_bytes) = result.as_ref().map_or((0.0, 0), |r| (r.cpu_s, r.peak_rss_bytes));
    let failed = |message: String| Outcome::Failed { message, cpu_s, peak_rss_bytes };
    let state = end.state.as_ref();
    let host = result.as_ref().and_then(|r| r.host.as_ref()).and_then(|h| h["hostname"].as_str().map(str::to_string));
    let ran_on = format!("slurm job {id}{}", host.map(|h| format!(" on {h}")).unwrap_or_default());
    let succeeded = exit == Some(0) && result.as_ref().is_some_and(|r| r.ok);
    let oom = matches!(state, Some(JobState::OutOfMemory)) || (!succeeded && memory_kill_in_log(log));
    match (state, exit, result) {
        (Some(JobState::Completed) | None, Some(0), Some(mut r)) if r.ok => {
            r.ran_on = Some(ran_on);
            Outcome::Done(r)
        }
        _ if oom => {
            let asked = st.resources.mem.as_deref().map(|m| format!(" (it asked for {m})")).unwrap_or_default();
            failed(format!("Slurm job {id} OUT_OF_MEMORY: {}{asked}", JobState::OutOfMemory.explain()))
        }
        (Some(JobState::Timeout), _, _) => {
            let limit = st.resources.time.or(st.timeout).map(|t| format!(" of {}", orchestrate_slurm::time_limit(t)));
            failed(format!(
                "Slurm job {id} TIMEOUT: hit its time limit{} (raise the stage's `timeout` or `resources.time`)",
                limit.unwrap_or_default()
            ))
        }
        (Some(
            s @ (JobState::NodeFail
            | JobState::Preempted
            | JobState::BootFail
            | JobState::Deadline
            | JobState::Cancelled
            | JobState::OtherEnd(_)),
        ), _, _) => failed(format!("Slurm job {id} {}: {}", s.name(), s.explain())),
        (Some(JobState::Pending), _, _) => failed(format!(
            "the cluster will never start Slurm job {id} (pending, reason {}): it asks for more than the partition \
             or the account allows ({} CPUs{}{}); it was cancelled",
            end.reason,
            st.threads,
            st.resources.mem.as_deref().map(|m| format!(", {m} memory")).unwrap_or_default(),
            st.resources.time.or(st.timeout).map(|t| format!(", {}", orchestrate_slurm::time_limit(t))).unwrap_or_default(),
        )),
        (_, Some(STORE_NOT_SHARED), _) => failed(format!(
            "Slurm job {id}: the node could not see the store's scratch folder {}; the store must be on a filesystem every node shares",
            scratch.display()
        )),
        // The stage's own error says how it failed; exec-stage's exit code only that it did.
        (_, Some(_), Some(r)) if !r.ok => {
            let why = r.error.unwrap_or_else(|| "the stage failed".into());
            failed(format!("{why} (Slurm job {id} FAILED)"))
        }
        (_, Some(code), _) => failed(format!("Slurm job {id} FAILED: the stage process exited with status {code}")),
        (state, None, _) => {
            let how = state.map(|s| s.name().to_string()).unwrap_or_else(|| end.reason.clone());
            failed(format!(
                "Slurm job {id} ended ({how}) without leaving its result in {}: if the job ran, the store is not on a \
                 filesystem this machine shares with the nodes (see the log below, and README: Running on a Slurm cluster)",
                scratch.display()
            ))
        }
    }
}
