//! Running one stage instance end to end: inputs in, child process, outputs checked and stored.
//! Shared by `run` (commits into the store) and `replay` (stores into a scratch object store).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use stage_api::RunSpec;
use tokio::sync::watch;

use crate::cache_key::{short, InputSource};
use crate::exec::{self, ChildResult, Outcome, ProgressSink};
use crate::executor::Executor;
use crate::objects::{self, Entry, ObjectError, ObjectStore};
use crate::pipeline::StageInstance;

#[derive(Debug)]
pub enum StageFailure {
    Failed { message: String, log_tail: String },
    Cancelled,
}

impl StageFailure {
    fn msg(message: impl Into<String>) -> Self {
        StageFailure::Failed { message: message.into(), log_tail: String::new() }
    }
}

pub struct StageRun {
    pub outputs: BTreeMap<String, Entry>,
    pub result: ChildResult,
    pub log: Option<String>,
    pub started_at: f64,
    pub duration_s: f64,
    pub attempts: u32,
}

fn quarantine(input_store: &ObjectStore, digest: &str) {
    let q = input_store.root.join("quarantine");
    let _ = std::fs::create_dir_all(&q);
    let _ = std::fs::rename(input_store.path(digest), q.join(format!("{digest}.{}", std::process::id())));
}

/// One stage to run: where its inputs come from and its outputs go, and how it runs.
pub struct StageJob<'a> {
    pub input_store: Arc<ObjectStore>,
    pub output_store: Arc<ObjectStore>,
    pub stage: &'a StageInstance,
    pub sources: &'a BTreeMap<String, InputSource>,
    /// The stored run description handed to a stage that asks for one.
    pub run_description: Option<&'a Entry>,
    pub threads: u32,
    pub cancel: watch::Receiver<bool>,
    pub progress: Option<ProgressSink>,
    pub executor: Executor,
    /// The stage's cache key (a cluster job's scratch folder is named by it).
    pub key: &'a str,
}

/// Run the job's stage once (with its retries) and store its outputs in `output_store`.
pub async fn run_stage(job: StageJob<'_>) -> Result<StageRun, StageFailure> {
    let hint = format!("stage-{}", job.stage.name.replace(['@', '/'], "_"));
    let scratch = job.executor.scratch(|| job.output_store.tmp_path(&hint), job.key, &job.stage.name);
    if let Some(adopted) = job.executor.adopt(&scratch, &job.stage.outputs) {
        let result = adopt(&job, &scratch, adopted).await;
        let _ = crate::store::remove_dir_all_writable(&scratch);
        return result;
    }
    // What a job that never finished left behind is not reused.
    let _ = crate::store::remove_dir_all_writable(&scratch);
    let result = run_in_scratch(&job, &scratch).await;
    let _ = crate::store::remove_dir_all_writable(&scratch);
    result
}

/// Store what a previous cluster job of this stage finished (its digests already checked).
async fn adopt(job: &StageJob<'_>, scratch: &Path, result: ChildResult) -> Result<StageRun, StageFailure> {
    tracing::info!(stage = %job.stage.name, "adopting the result a previous run's job finished");
    let outputs: BTreeMap<String, PathBuf> =
        job.stage.outputs.iter().map(|o| (o.clone(), scratch.join("out").join(o))).collect();
    let started_at = crate::store::now_unix();
    let (outputs, log) = store_outputs(job.output_store.clone(), outputs, scratch.join("log.txt")).await?;
    check_digests(&result, &outputs)?;
    Ok(StageRun { outputs, result, log, started_at, duration_s: 0.0, attempts: 1 })
}

/// The stored outputs are what `exec-stage` hashed when it finished (a cluster job's outputs
/// cross a shared filesystem before the coordinator reads them).
fn check_digests(result: &ChildResult, stored: &BTreeMap<String, Entry>) -> Result<(), StageFailure> {
    for (name, digest) in &result.outputs {
        if let Some(e) = stored.get(name).filter(|e| &e.digest != digest) {
            return Err(StageFailure::msg(format!(
                "output `{name}` changed after the stage wrote it (digest {} when written, {} when stored); not committed",
                short(digest),
                short(&e.digest)
            )));
        }
    }
    Ok(())
}

fn io_fail(what: &str, e: std::io::Error) -> StageFailure {
    StageFailure::msg(format!("{what}: {e}"))
}

async fn run_in_scratch(job: &StageJob<'_>, scratch: &Path) -> Result<StageRun, StageFailure> {
    let st = job.stage;
    tracing::debug!(stage = %st.name, "preparing");
    let (out_dir, work_dir) = (scratch.join("out"), scratch.join("work"));
    for d in [&work_dir, &out_dir] {
        std::fs::create_dir_all(d).map_err(|e| io_fail(&format!("creating {}", d.display()), e))?;
    }
    let inputs = prepare_inputs(job, &scratch.join("in")).await?;
    let run_description = match job.run_description {
        Some(entry) => {
            let dest = scratch.join("run.json");
            (job.input_store)
                .materialize(entry, &dest, &format!("the run description for `{}`", st.name))
                .map_err(|e| StageFailure::msg(format!("preparing the run description: {e}")))?;
            Some(dest)
        }
        None => None,
    };
    let outputs: BTreeMap<String, PathBuf> = st.outputs.iter().map(|o| (o.clone(), out_dir.join(o))).collect();
    let spec = RunSpec {
        stage_name: st.name.clone(),
        kind: st.kind.clone(),
        params: crate::pipeline::params_for_run(st),
        inputs,
        outputs: outputs.clone(),
        work_dir: work_dir.clone(),
        threads: job.threads,
        seed: st.seed,
        run_description,
    };
    tracing::debug!(stage = %st.name, "inputs ready");
    let started_at = crate::store::now_unix();
    let t0 = Instant::now();
    let (result, log_path, attempts) = run_attempts(job, &spec, scratch).await?;
    let duration_s = t0.elapsed().as_secs_f64();
    tracing::debug!(stage = %st.name, duration_s, "stage process finished");
    check_file_inputs_unchanged(job.sources)?;
    let (outputs, log) = store_outputs(job.output_store.clone(), outputs, log_path).await?;
    check_digests(&result, &outputs)?;
    tracing::debug!(stage = %st.name, "outputs stored");
    Ok(StageRun { outputs, result, log, started_at, duration_s, attempts })
}

/// Input name → path the stage reads: `file:` inputs in place, stage outputs copied into
/// `in_dir` with their hashes checked (a corrupt object is quarantined, not handed over).
async fn prepare_inputs(job: &StageJob<'_>, in_dir: &Path) -> Result<BTreeMap<String, PathBuf>, StageFailure> {
    if job.sources.values().any(|s| matches!(s, InputSource::Object(_))) {
        std::fs::create_dir_all(in_dir).map_err(|e| io_fail(&format!("creating {}", in_dir.display()), e))?;
    }
    let mut inputs = BTreeMap::new();
    for (name, src) in job.sources {
        let entry = match src {
            InputSource::File { path, .. } => {
                inputs.insert(name.clone(), path.clone());
                continue;
            }
            InputSource::Object(entry) => entry,
        };
        let dest = in_dir.join(name);
        let what = format!("input `{name}` of `{}`", job.stage.name);
        // Small inputs are copied in place; a thread hand-off would cost more than the copy.
        let r = if entry.size < (1 << 20) {
            job.input_store.materialize(entry, &dest, &what)
        } else {
            let store = job.input_store.clone();
            let (entry2, dest2) = (entry.clone(), dest.clone());
            tokio::task::spawn_blocking(move || store.materialize(&entry2, &dest2, &what))
                .await
                .map_err(|e| StageFailure::msg(format!("copying inputs: {e}")))?
        };
        match r {
            Ok(()) => {}
            Err(ObjectError::Corrupt { digest, what, actual }) => {
                quarantine(&job.input_store, &digest);
                return Err(StageFailure::msg(format!(
                    "{what}: object {digest} is corrupt (its content hashes to {actual}); it was moved to \
                     quarantine/ and was not handed to the stage. Run again to recompute the stage that produced it."
                )));
            }
            Err(e) => return Err(StageFailure::msg(format!("preparing input `{name}`: {e}"))),
        }
        inputs.insert(name.clone(), dest);
    }
    Ok(inputs)
}

/// Run the child until it succeeds or its retries are used up; a retry starts from empty
/// outputs and a clean working folder. Returns the result, the log's path and the attempts.
async fn run_attempts(
    job: &StageJob<'_>,
    spec: &RunSpec,
    scratch: &Path,
) -> Result<(ChildResult, PathBuf, u32), StageFailure> {
    let st = job.stage;
    let mut attempts = 0;
    loop {
        attempts += 1;
        for p in spec.outputs.values() {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io_fail("creating output folder", e))?;
            }
        }
        let (outcome, log_path) = (job.executor)
            .run(spec, scratch, st, job.cancel.clone(), job.progress.clone())
            .await
            .map_err(|e| io_fail("starting the stage process", e))?;
        let failure = match outcome {
            Outcome::Done(r) => return Ok((r, log_path, attempts)),
            Outcome::Cancelled => return Err(StageFailure::Cancelled),
            Outcome::TimedOut(d) => {
                format!("timed out after {:.1}s (timeout {:?})", d.as_secs_f64(), st.timeout.unwrap_or_default())
            }
            Outcome::Failed { message, .. } => message,
        };
        if attempts > st.retries {
            let log_tail = exec::log_tail(&log_path, 15);
            let tries = if attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() };
            return Err(StageFailure::Failed { message: format!("{failure}{tries}"), log_tail });
        }
        tracing::warn!(stage = %st.name, attempt = attempts, "stage failed: {failure}; retrying");
        for d in [scratch.join("out"), spec.work_dir.clone()] {
            let _ = crate::store::remove_dir_all_writable(&d);
            let _ = std::fs::create_dir_all(&d);
        }
    }
}

/// A `file:` input edited while the stage ran would make the result unattributable.
fn check_file_inputs_unchanged(sources: &BTreeMap<String, InputSource>) -> Result<(), StageFailure> {
    for (name, src) in sources {
        let InputSource::File { path, entry } = src else { continue };
        let now = objects::digest_path(path).map(|e| e.digest).unwrap_or_default();
        if now != entry.digest {
            return Err(StageFailure::msg(format!(
                "input `{name}` ({}) changed while the stage ran (digest {} before, {} after); nothing was stored",
                path.display(),
                short(&entry.digest),
                if now.is_empty() { "unreadable".to_string() } else { short(&now).to_string() }
            )));
        }
    }
    Ok(())
}

/// Move every declared output (and the log, when not empty) into the object store.
async fn store_outputs(
    store: Arc<ObjectStore>,
    outputs: BTreeMap<String, PathBuf>,
    log_path: PathBuf,
) -> Result<(BTreeMap<String, Entry>, Option<String>), StageFailure> {
    let stored = tokio::task::spawn_blocking(move || -> Result<(BTreeMap<String, Entry>, Option<String>), String> {
        let mut entries = BTreeMap::new();
        for (name, path) in &outputs {
            if std::fs::symlink_metadata(path).is_err() {
                // The scratch folder is gone by the time anyone reads this: say where a
                // command writes the output, not the absolute path it had.
                return Err(format!(
                    "declared output `{name}` was not written: the stage ended without creating it (a `command` \
                     writes it at ${{outputs.{name}}})"
                ));
            }
            let e = store.put_path_move(path).map_err(|e| format!("storing output `{name}`: {e}"))?;
            entries.insert(name.clone(), e);
        }
        let has_log = std::fs::metadata(&log_path).map(|m| m.len() > 0).unwrap_or(false);
        let log = if has_log { store.put_file_move(&log_path).ok().map(|e| e.digest) } else { None };
        Ok((entries, log))
    })
    .await
    .map_err(|e| StageFailure::msg(format!("storing outputs: {e}")))?;
    stored.map_err(StageFailure::msg)
}
