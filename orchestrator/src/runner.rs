//! Running one stage instance end to end: inputs in, child process, outputs checked and stored.
//! Shared by `run` (commits into the store) and `replay` (stores into a scratch object store).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use stage_api::RunSpec;
use tokio::sync::watch;

use crate::exec::{self, ChildResult, Outcome};
use crate::objects::{self, Entry, ObjectError, ObjectStore};
use crate::pipeline::{InputRef, StageInstance};
use crate::store::{KeyInput, Store, KEY_FORMAT};

/// Where an input's bytes come from when the stage runs.
#[derive(Clone, Debug)]
pub enum InputSource {
    /// A `file:` input: handed over in place (read-only by contract), re-hashed afterwards.
    File { path: PathBuf, entry: Entry },
    /// Another stage's output: copied out of the store with its hash checked.
    Object(Entry),
}

impl InputSource {
    pub fn entry(&self) -> &Entry {
        match self {
            InputSource::File { entry, .. } | InputSource::Object(entry) => entry,
        }
    }
}

#[derive(Debug)]
pub enum KeyError {
    /// An upstream stage has no result yet.
    Pending(String),
    Input(String),
}

/// Resolve a stage's inputs and its cache key. `upstream(stage, output)` gives the stored
/// entry of another stage's output, when known.
pub fn key_for(
    store: &Store,
    st: &StageInstance,
    upstream: &dyn Fn(&str, &str) -> Option<Entry>,
) -> Result<(KeyInput, BTreeMap<String, InputSource>), KeyError> {
    let mut sources = BTreeMap::new();
    for (name, r) in &st.inputs {
        let src = match r {
            InputRef::File { path, written } => {
                let entry = store
                    .input_digest(path)
                    .map_err(|e| KeyError::Input(format!("input `{name}` (file:{written}): {e}")))?;
                InputSource::File { path: path.clone(), entry }
            }
            InputRef::Stage { stage, output } => {
                InputSource::Object(upstream(stage, output).ok_or_else(|| KeyError::Pending(stage.clone()))?)
            }
        };
        sources.insert(name.clone(), src);
    }
    let key_input = KeyInput {
        format: KEY_FORMAT,
        kind: st.kind.clone(),
        version: st.version,
        fields: st.params.fields.clone(),
        params: st.params.params.clone(),
        inputs: sources.iter().map(|(k, v)| (k.clone(), v.entry().digest.clone())).collect(),
        outputs: st.outputs.clone(),
    };
    Ok((key_input, sources))
}

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

/// Run `st` once (with its retries) and store its outputs in `output_store`. `run_metadata` is
/// the stored run description handed to a stage that asks for one.
#[allow(clippy::too_many_arguments)]
pub async fn run_stage(
    input_store: Arc<ObjectStore>,
    output_store: Arc<ObjectStore>,
    st: &StageInstance,
    sources: &BTreeMap<String, InputSource>,
    run_metadata: Option<&Entry>,
    threads: u32,
    cancel: watch::Receiver<bool>,
    progress: Option<crate::exec::ProgressSink>,
) -> Result<StageRun, StageFailure> {
    let scratch = output_store.tmp_path(&format!("stage-{}", st.name.replace(['@', '/'], "_")));
    let result = run_in_scratch(&input_store, &output_store, st, sources, run_metadata, threads, cancel, progress, &scratch).await;
    let _ = crate::store::remove_dir_all_writable(&scratch);
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_in_scratch(
    input_store: &Arc<ObjectStore>,
    output_store: &Arc<ObjectStore>,
    st: &StageInstance,
    sources: &BTreeMap<String, InputSource>,
    run_metadata: Option<&Entry>,
    threads: u32,
    cancel: watch::Receiver<bool>,
    progress: Option<crate::exec::ProgressSink>,
    scratch: &Path,
) -> Result<StageRun, StageFailure> {
    let io_fail = |what: &str, e: std::io::Error| StageFailure::msg(format!("{what}: {e}"));
    tracing::debug!(stage = %st.name, "preparing");
    let in_dir = scratch.join("in");
    let out_dir = scratch.join("out");
    let work_dir = scratch.join("work");
    let has_object_inputs = sources.values().any(|s| matches!(s, InputSource::Object(_)));
    for d in [&work_dir, &out_dir].into_iter().chain(has_object_inputs.then_some(&in_dir)) {
        std::fs::create_dir_all(d).map_err(|e| io_fail(&format!("creating {}", d.display()), e))?;
    }
    let mut inputs = BTreeMap::new();
    for (name, src) in sources {
        match src {
            InputSource::File { path, .. } => {
                inputs.insert(name.clone(), path.clone());
            }
            InputSource::Object(entry) => {
                let dest = in_dir.join(name);
                let what = format!("input `{name}` of `{}`", st.name);
                // Small inputs are copied in place; a thread hand-off would cost more than the copy.
                let r = if entry.size < (1 << 20) {
                    input_store.materialize(entry, &dest, &what)
                } else {
                    let store = input_store.clone();
                    let (entry2, dest2) = (entry.clone(), dest.clone());
                    tokio::task::spawn_blocking(move || store.materialize(&entry2, &dest2, &what))
                        .await
                        .map_err(|e| StageFailure::msg(format!("copying inputs: {e}")))?
                };
                match r {
                    Ok(()) => {}
                    Err(ObjectError::Corrupt { digest, what, actual }) => {
                        quarantine(input_store, &digest);
                        return Err(StageFailure::msg(format!(
                            "{what}: object {digest} is corrupt (its content hashes to {actual}); it was moved to quarantine/ \
                             and was not handed to the stage. Run again to recompute the stage that produced it."
                        )));
                    }
                    Err(e) => return Err(StageFailure::msg(format!("preparing input `{name}`: {e}"))),
                }
                inputs.insert(name.clone(), dest);
            }
        }
    }
    let run_metadata = match run_metadata {
        Some(entry) => {
            let dest = scratch.join("run.json");
            input_store
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
        threads,
        seed: st.seed,
        run_metadata,
    };
    tracing::debug!(stage = %st.name, "inputs ready");
    let started_at = crate::store::now_unix();
    let t0 = Instant::now();
    let mut attempts = 0;
    let (result, log_path) = loop {
        attempts += 1;
        for p in outputs.values() {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io_fail("creating output folder", e))?;
            }
        }
        let (outcome, log_path) = exec::run_child(&spec, scratch, st.timeout, cancel.clone(), progress.clone())
            .await
            .map_err(|e| io_fail("starting the stage process", e))?;
        let failure = match outcome {
            Outcome::Done(r) => break (r, log_path),
            Outcome::Cancelled => return Err(StageFailure::Cancelled),
            Outcome::TimedOut(d) => format!("timed out after {:.1}s (timeout {:?})", d.as_secs_f64(), st.timeout.unwrap_or_default()),
            Outcome::Failed { message, .. } => message,
        };
        if attempts > st.retries {
            let log_tail = exec::log_tail(&log_path, 15);
            let tries = if attempts > 1 { format!(" (after {attempts} attempts)") } else { String::new() };
            return Err(StageFailure::Failed { message: format!("{failure}{tries}"), log_tail });
        }
        tracing::warn!(stage = %st.name, attempt = attempts, "stage failed: {failure}; retrying");
        // A retry starts from empty outputs and a clean working folder.
        for d in [&out_dir, &work_dir] {
            let _ = crate::store::remove_dir_all_writable(d);
            let _ = std::fs::create_dir_all(d);
        }
    };
    let duration_s = t0.elapsed().as_secs_f64();
    tracing::debug!(stage = %st.name, duration_s, "stage process finished");

    // A `file:` input edited while the stage ran would make the result unattributable.
    for (name, src) in sources {
        if let InputSource::File { path, entry } = src {
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
    }
    let store = output_store.clone();
    let outs = outputs.clone();
    let log_copy = log_path.clone();
    let stored = tokio::task::spawn_blocking(move || -> Result<(BTreeMap<String, Entry>, Option<String>), String> {
        let mut entries = BTreeMap::new();
        for (name, path) in &outs {
            if std::fs::symlink_metadata(path).is_err() {
                return Err(format!(
                    "declared output `{name}` was not written (expected at {}); the stage must create it",
                    path.display()
                ));
            }
            let e = store.put_path_move(path).map_err(|e| format!("storing output `{name}`: {e}"))?;
            entries.insert(name.clone(), e);
        }
        let has_log = std::fs::metadata(&log_copy).map(|m| m.len() > 0).unwrap_or(false);
        let log = if has_log { store.put_file_move(&log_copy).ok().map(|e| e.digest) } else { None };
        Ok((entries, log))
    })
    .await
    .map_err(|e| StageFailure::msg(format!("storing outputs: {e}")))?;
    let (outputs, log) = stored.map_err(StageFailure::msg)?;
    tracing::debug!(stage = %st.name, "outputs stored");
    Ok(StageRun { outputs, result, log, started_at, duration_s, attempts })
}

pub fn short(d: &str) -> &str {
    &d[..d.len().min(12)]
}
