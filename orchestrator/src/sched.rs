//! The scheduler: a tokio loop over the DAG that admits ready stages while their threads fit
//! the CPU budget, short-circuits cache hits, and stops cleanly on failure or a signal.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::dag::Dag;
use crate::objects::Entry;
use crate::pipeline::Pipeline;
use crate::progress::Reporter;
use crate::runner::{self, key_for, KeyError, StageFailure};
use crate::store::{now_unix, Manifest, RunRecord, Store, MANIFEST_TAG, RUN_TAG};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Cached,
    Ran,
    Failed,
    /// Not run because something it needs failed (or the run stopped first).
    Skipped,
    Cancelled,
}

#[derive(Clone, Debug, Serialize)]
pub struct StageReport {
    pub stage: String,
    pub status: Status,
    pub key: Option<String>,
    pub manifest: Option<String>,
    pub duration_s: f64,
    pub error: Option<String>,
    #[serde(skip)]
    pub outputs: BTreeMap<String, Entry>,
}

#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub pipeline: String,
    pub status: String,
    pub wall_s: f64,
    pub cores: u32,
    pub stages: Vec<StageReport>,
}

impl RunSummary {
    pub fn exit_code(&self) -> i32 {
        match self.status.as_str() {
            "ok" => 0,
            "cancelled" => 130,
            _ => 1,
        }
    }
}

pub struct RunOptions {
    pub cores: u32,
    pub keep_going: bool,
    /// Only these stage indices (and nothing else) are considered; `None` = all.
    pub only: Option<HashSet<usize>>,
}

#[derive(Clone)]
enum State {
    Waiting,
    Running,
    Done { manifest: String, outputs: BTreeMap<String, Entry>, cached: bool },
    Failed,
    Skipped,
    Cancelled,
}

type TaskResult = (usize, String, Result<runner::StageRun, StageFailure>, crate::store::KeyInput, Option<String>, f64);

/// Wait for Ctrl-C or SIGTERM.
async fn termination() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub async fn run(p: &Pipeline, dag: &Dag, store: Arc<Store>, opts: RunOptions, reporter: &mut Reporter) -> RunSummary {
    let t0 = Instant::now();
    let started_at = now_unix();
    let n = p.stages.len();
    let mut state: Vec<State> = vec![State::Waiting; n];
    let mut reports: Vec<Option<StageReport>> = vec![None; n];
    let considered = |i: usize| opts.only.as_ref().is_none_or(|s| s.contains(&i));
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let mut tasks: JoinSet<TaskResult> = JoinSet::new();
    let mut free = opts.cores;
    let mut stopping = false;
    let mut interrupted = false;
    let mut failed_any = false;
    let objects = store.objects.clone();
    reporter.begin(opts.only.as_ref().map_or(n, HashSet::len));

    let signal = termination();
    tokio::pin!(signal);
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();

    loop {
        // Settle every stage we can decide without running anything (cache hits, skips),
        // and admit runnable ones while their threads fit.
        if !stopping {
            let mut progressed = true;
            while progressed {
                progressed = false;
                for &i in &dag.order {
                    if !matches!(state[i], State::Waiting) || !considered(i) {
                        continue;
                    }
                    let ups = dag.upstream(i);
                    if let Some(&bad) = ups.iter().find(|&&u| matches!(state[u], State::Failed | State::Skipped | State::Cancelled)) {
                        state[i] = State::Skipped;
                        let why = format!("`{}` did not finish", p.stages[bad].name);
                        reporter.skipped(&p.stages[i].name, &why);
                        reports[i] = Some(report(&p.stages[i].name, Status::Skipped, None, None, 0.0, Some(why)));
                        progressed = true;
                        continue;
                    }
                    if !ups.iter().all(|&u| matches!(state[u], State::Done { .. })) {
                        continue;
                    }
                    let st = &p.stages[i];
                    let upstream = |stage: &str, output: &str| -> Option<Entry> {
                        let j = p.index_of(stage)?;
                        match &state[j] {
                            State::Done { outputs, .. } => outputs.get(output).cloned(),
                            _ => None,
                        }
                    };
                    let (key_input, sources) = match key_for(&store, st, &upstream) {
                        Ok(x) => x,
                        Err(KeyError::Pending(_)) => continue,
                        Err(KeyError::Input(msg)) => {
                            state[i] = State::Failed;
                            failed_any = true;
                            reporter.failed(&st.name, &msg, "");
                            reports[i] = Some(report(&st.name, Status::Failed, None, None, 0.0, Some(msg)));
                            progressed = true;
                            if !opts.keep_going {
                                stopping = true;
                                let _ = cancel_tx.send(true);
                                break;
                            }
                            continue;
                        }
                    };
                    let key = key_input.key();
                    match store.lookup(&key) {
                        Ok(Some((digest, m))) => {
                            // Record it under this pipeline/stage name too, so `plan` and `show`
                            // find it even when another pipeline produced it.
                            if m.pipeline != p.name || m.stage != st.name {
                                let mut mine = m.clone();
                                mine.pipeline = p.name.clone();
                                mine.stage = st.name.clone();
                                let _ = store.commit(&mine);
                            }
                            reporter.cached(&st.name);
                            let mut r = report(&st.name, Status::Cached, Some(key), Some(digest.clone()), m.duration_s, None);
                            r.outputs = m.outputs.clone();
                            reports[i] = Some(r);
                            state[i] = State::Done { manifest: digest, outputs: m.outputs, cached: true };
                            progressed = true;
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!("index lookup failed for {}: {e}; running the stage", st.name),
                    }
                    let threads = st.threads.min(opts.cores).max(1);
                    if threads > free {
                        continue;
                    }
                    if st.threads > opts.cores {
                        tracing::info!(stage = %st.name, "wants {} threads; running with the budget of {}", st.threads, opts.cores);
                    }
                    // Which upstream results this run computed and which it reused, as the
                    // stage will be told; stored (and any failure reported) by the task.
                    let described = st.wants_run_metadata.then(|| (p.clone(), upstream_status(p, dag, &state, i)));
                    free -= threads;
                    state[i] = State::Running;
                    reporter.started(&st.name, threads);
                    tracing::debug!(stage = %st.name, "admitted");
                    let (inputs_store, out_store) = (objects.clone(), objects.clone());
                    let st2 = st.clone();
                    let rx = cancel_rx.clone();
                    let sink = progress_tx.clone();
                    let store2 = store.clone();
                    tasks.spawn(async move {
                        let t = Instant::now();
                        let run_metadata = match described.map(|(p, ups)| describe_run(&p, &store2, &ups)).transpose() {
                            Ok(m) => m,
                            Err(message) => return (i, key, Err(StageFailure::Failed { message, log_tail: String::new() }), key_input, None, 0.0),
                        };
                        let r = runner::run_stage(inputs_store, out_store, &st2, &sources, run_metadata.as_ref(), threads, rx, Some(sink)).await;
                        (i, key, r, key_input, run_metadata.map(|e| e.digest), t.elapsed().as_secs_f64())
                    });
                }
            }
        }
        if tasks.is_empty() {
            break;
        }
        tokio::select! {
            joined = tasks.join_next() => {
                let Some(joined) = joined else { continue };
                let (i, key, result, key_input, run_metadata, wall) = match joined {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::error!("a stage task ended abnormally: {e}");
                        continue;
                    }
                };
                let st = &p.stages[i];
                free += st.threads.min(opts.cores).max(1);
                match result {
                    Ok(run) => {
                        let m = Manifest {
                            orchestrate: MANIFEST_TAG.into(),
                            format: 1,
                            pipeline: p.name.clone(),
                            stage: st.name.clone(),
                            key: key.clone(),
                            key_input,
                            outputs: run.outputs.clone(),
                            metrics: run.result.metrics.clone(),
                            deterministic: st.deterministic,
                            threads: st.threads.min(opts.cores).max(1),
                            started_at: run.started_at,
                            duration_s: run.duration_s,
                            cpu_s: run.result.cpu_s,
                            peak_rss_bytes: run.result.peak_rss_bytes,
                            log: run.log.clone(),
                            run_metadata,
                        };
                        match store.commit(&m) {
                            Ok(digest) => {
                                tracing::debug!(stage = %st.name, "committed");
                                reporter.done(&st.name, run.duration_s);
                                let mut r = report(&st.name, Status::Ran, Some(key), Some(digest.clone()), run.duration_s, None);
                                r.outputs = run.outputs.clone();
                                reports[i] = Some(r);
                                state[i] = State::Done { manifest: digest, outputs: run.outputs, cached: false };
                            }
                            Err(e) => {
                                let msg = format!("storing the result failed: {e}");
                                reporter.failed(&st.name, &msg, "");
                                reports[i] = Some(report(&st.name, Status::Failed, Some(key), None, wall, Some(msg)));
                                state[i] = State::Failed;
                                failed_any = true;
                            }
                        }
                    }
                    Err(StageFailure::Cancelled) => {
                        reporter.cancelled(&st.name);
                        reports[i] = Some(report(&st.name, Status::Cancelled, Some(key), None, wall, None));
                        state[i] = State::Cancelled;
                    }
                    Err(StageFailure::Failed { message, log_tail }) => {
                        reporter.failed(&st.name, &message, &log_tail);
                        reports[i] = Some(report(&st.name, Status::Failed, Some(key), None, wall, Some(message)));
                        state[i] = State::Failed;
                        failed_any = true;
                    }
                }
                if failed_any && !opts.keep_going && !stopping {
                    stopping = true;
                    let _ = cancel_tx.send(true);
                }
            }
            Some((stage, message)) = progress_rx.recv() => {
                reporter.progress(&stage, &message);
            }
            _ = &mut signal, if !interrupted => {
                interrupted = true;
                stopping = true;
                reporter.note("interrupted: stopping running stages; nothing partial is stored");
                let _ = cancel_tx.send(true);
            }
        }
    }

    for (i, s) in state.iter().enumerate() {
        if reports[i].is_none() && considered(i) {
            let status = if interrupted { Status::Cancelled } else { Status::Skipped };
            let why = if matches!(s, State::Waiting) { Some("the run stopped before it started".to_string()) } else { None };
            reports[i] = Some(report(&p.stages[i].name, status, None, None, 0.0, why));
        }
    }
    let status = if interrupted {
        "cancelled"
    } else if failed_any {
        "failed"
    } else {
        "ok"
    };
    let manifests: BTreeMap<String, String> = state
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            State::Done { manifest, .. } => Some((p.stages[i].name.clone(), manifest.clone())),
            _ => None,
        })
        .collect();
    let record = RunRecord {
        orchestrate: RUN_TAG.into(),
        format: 1,
        pipeline: p.name.clone(),
        pipeline_file: p.file.display().to_string(),
        started_at,
        finished_at: now_unix(),
        status: status.into(),
        manifests,
    };
    if let Err(e) = store.record_run(&record) {
        tracing::warn!("could not record the run: {e}");
    }
    let cached = state.iter().filter(|s| matches!(s, State::Done { cached: true, .. })).count();
    let summary = RunSummary {
        pipeline: p.name.clone(),
        status: status.into(),
        wall_s: t0.elapsed().as_secs_f64(),
        cores: opts.cores,
        stages: dag.order.iter().filter_map(|&i| reports[i].clone()).collect(),
    };
    reporter.finish(&summary, cached);
    summary
}

/// Every stage `i` depends on, in DAG order: (name, manifest digest, reused from the cache).
fn upstream_status(p: &Pipeline, dag: &Dag, state: &[State], i: usize) -> Vec<(String, String, bool)> {
    let upstream = dag.with_upstream(i);
    dag.order
        .iter()
        .filter(|&&j| j != i && upstream.contains(&j))
        .filter_map(|&j| match &state[j] {
            State::Done { manifest, cached, .. } => Some((p.stages[j].name.clone(), manifest.clone(), *cached)),
            _ => None,
        })
        .collect()
}

/// Store the run description a stage asked for (see `runmeta`).
fn describe_run(p: &Pipeline, store: &Store, upstream: &[(String, String, bool)]) -> Result<Entry, String> {
    let mut stages = Vec::new();
    for (name, manifest, cached) in upstream {
        let m = store.load_manifest(manifest).map_err(|e| format!("reading the result of `{name}` for the run description: {e}"))?;
        stages.push(crate::runmeta::stage_entry(name, &m, *cached));
    }
    let run = crate::runmeta::describe(p, stages, "this run's report stage");
    let bytes = serde_json::to_vec_pretty(&run).map_err(|e| format!("encoding the run description: {e}"))?;
    let digest = store.objects.put_bytes(&bytes).map_err(|e| format!("storing the run description: {e}"))?;
    Ok(Entry { digest, kind: crate::objects::ObjKind::File, size: bytes.len() as u64 })
}

fn report(name: &str, status: Status, key: Option<String>, manifest: Option<String>, d: f64, error: Option<String>) -> StageReport {
    StageReport { stage: name.into(), status, key, manifest, duration_s: d, error, outputs: BTreeMap::new() }
}
