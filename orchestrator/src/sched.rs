//! The scheduler: a tokio loop over the DAG that admits ready stages while their threads fit
//! the CPU budget, short-circuits cache hits, stops admitting stages after a failure (those
//! running finish), and stops running ones on a signal.
//!
//! [`run`] is the loop; [`RunLoop`] holds the state of every stage and has one method per
//! thing that can happen: settle what needs no running ([`RunLoop::admit_ready`]), a stage
//! task ends ([`RunLoop::complete`]), a signal arrives ([`RunLoop::interrupt`]), the run ends
//! ([`RunLoop::finish`]). Everything the user sees goes out through [`RunEvents`].
//!
//! The work per stage does not grow with the pipeline: a stage is looked at when its last
//! upstream stage settles (a count per stage), decided once (skip, cache hit, or run), and a
//! stage that must run but finds no free threads waits, with its key already built, in a queue
//! taken in DAG order as threads free up.

mod record;
mod rerun;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::cache_key::{stage_key, InputSource, KeyError, KeyInput, Upstream};
use crate::dag::Dag;
use crate::events::{RunEvents, RunSummary, StageOutcome, Status};
use crate::exec::ProgressSink;
use crate::executor::Executor;
use crate::objects::{Entry, ObjKind};
use crate::pipeline::{Pipeline, StageInstance};
use crate::remote::{Remote, RemoteError, Transfer};
use crate::runner::{self, StageFailure, StageJob, StageRun};
use crate::source::SourceRev;
use crate::store::{now_unix, Manifest, Provenance, Store, MANIFEST_TAG};

pub struct RunOptions {
    pub cores: u32,
    pub keep_going: bool,
    /// Only these stage indices (and nothing else) are considered; `None` = all.
    pub only: Option<HashSet<usize>>,
    /// Stage indices that execute even when a result for their key is cached here or on the
    /// remote (`run --rerun`); the new result replaces the cached one under that key.
    pub rerun: HashSet<usize>,
    /// The name the run record gets (`run --name`).
    pub name: Option<String>,
    /// The stages named with `--target` (and `--rerun` beside it), for the run record.
    pub targets: Vec<String>,
    /// A remote cache to look a stage up in when the local store misses (`run --remote`).
    pub remote: Option<Arc<Remote>>,
    /// Where stages run: here, or as cluster jobs.
    pub executor: Executor,
}

/// The budget a cluster run gets without `--cores`: what may be queued at once (the cluster
/// fits jobs to nodes itself).
pub const CLUSTER_BUDGET: u32 = 100_000;

/// Stages fetched from the remote at once (each moves several blobs concurrently itself).
const FETCHES_IN_FLIGHT: usize = 8;

#[derive(Clone)]
enum State {
    Waiting,
    Running,
    Done { manifest: String, outputs: BTreeMap<String, Entry>, cached: bool },
    Failed,
    Skipped,
    Cancelled,
}

/// What a stage task hands back to the loop.
struct TaskDone {
    index: usize,
    key: String,
    key_input: KeyInput,
    result: Result<StageRun, StageFailure>,
    /// Digest of the run description the stage was handed, if it asked for one.
    run_description: Option<String>,
    wall_s: f64,
}

/// How looking a stage up in the remote cache ended.
enum Fetched {
    Hit(String, Box<Manifest>),
    Miss,
    /// The remote could not supply it (a blob missing or corrupt): run it here. `unreachable`:
    /// requests failed even after retries, so the rest of the run does not ask it again.
    Failed {
        why: String,
        unreachable: bool,
    },
    Cancelled,
}

/// What a remote lookup task hands back to the loop.
struct FetchDone {
    index: usize,
    blocked: Blocked,
    fetched: Fetched,
    bytes: u64,
}

/// Every task the loop waits on.
enum Finished {
    Stage(TaskDone),
    Fetch(FetchDone),
}

/// What can be decided about a waiting stage without running anything.
enum Decision {
    /// Its upstream is not done yet.
    NotReady,
    Skip(String),
    /// A `file:` input cannot be read.
    BadInput(String),
    Hit {
        key: String,
        digest: String,
        manifest: Box<Manifest>,
    },
    Run {
        key: String,
        key_input: KeyInput,
        sources: BTreeMap<String, InputSource>,
    },
}

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

/// Run the pipeline: every considered stage ends cached, ran, failed, skipped or cancelled.
pub async fn run(
    p: &Pipeline,
    dag: &Dag,
    store: Arc<Store>,
    opts: RunOptions,
    events: &mut dyn RunEvents,
) -> RunSummary {
    let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<(String, String)>();
    let mut r = RunLoop::new(p, dag, store, opts, progress_tx);
    events.begin(r.considered_count());
    let signal = termination();
    tokio::pin!(signal);
    loop {
        if !r.stopping {
            r.admit_ready(events);
        }
        if r.tasks.is_empty() {
            break;
        }
        tokio::select! {
            joined = r.tasks.join_next() => match joined {
                Some(Ok(Finished::Stage(done))) => r.complete(done, events),
                Some(Ok(Finished::Fetch(done))) => r.fetched(done, events),
                Some(Err(e)) => tracing::error!("a stage task ended abnormally: {e}"),
                None => {}
            },
            Some((stage, message)) = progress_rx.recv() => events.progress(&stage, &message),
            _ = &mut signal, if !r.interrupted => r.interrupt(events),
        }
    }
    r.finish(events)
}

/// A stage decided to run, waiting for threads: its key, key input and inputs.
type Blocked = (String, KeyInput, BTreeMap<String, InputSource>);

struct RunLoop<'a> {
    p: &'a Pipeline,
    dag: &'a Dag,
    store: Arc<Store>,
    opts: RunOptions,
    t0: Instant,
    started_at: f64,
    /// The pipeline repository's revision as the run started.
    source: Option<SourceRev>,
    state: Vec<State>,
    outcomes: Vec<Option<StageOutcome>>,
    /// Stage index → its position in `dag.order`, the order stages are taken in.
    pos: Vec<usize>,
    /// Per stage, how many of its upstream stages have not settled yet.
    unsettled_ups: Vec<usize>,
    /// Positions of stages whose upstream has all settled and that are not decided yet.
    fresh: BTreeSet<usize>,
    /// Positions of stages decided to run, waiting for free threads.
    blocked: BTreeMap<usize, Blocked>,
    tasks: JoinSet<Finished>,
    fetch_slots: Arc<Semaphore>,
    cancel_tx: watch::Sender<bool>,
    progress_tx: ProgressSink,
    free: u32,
    stopping: bool,
    interrupted: bool,
    failed_any: bool,
}

impl<'a> RunLoop<'a> {
    fn new(p: &'a Pipeline, dag: &'a Dag, store: Arc<Store>, opts: RunOptions, progress_tx: ProgressSink) -> Self {
        let n = p.stages.len();
        let free = opts.cores;
        let mut pos = vec![0; n];
        for (k, &i) in dag.order.iter().enumerate() {
            pos[i] = k;
        }
        let unsettled_ups: Vec<usize> = (0..n).map(|i| dag.upstream(i).len()).collect();
        let considered = |i: usize| opts.only.as_ref().is_none_or(|s| s.contains(&i));
        let fresh = (0..n).filter(|&i| unsettled_ups[i] == 0 && considered(i)).map(|i| pos[i]).collect();
        RunLoop {
            p,
            dag,
            store,
            opts,
            t0: Instant::now(),
            started_at: now_unix(),
            source: SourceRev::of(&p.dir),
            state: vec![State::Waiting; n],
            outcomes: vec![None; n],
            pos,
            unsettled_ups,
            fresh,
            blocked: BTreeMap::new(),
            tasks: JoinSet::new(),
            fetch_slots: Arc::new(Semaphore::new(FETCHES_IN_FLIGHT)),
            cancel_tx: watch::channel(false).0,
            progress_tx,
            free,
            stopping: false,
            interrupted: false,
            failed_any: false,
        }
    }

    fn considered(&self, i: usize) -> bool {
        self.opts.only.as_ref().is_none_or(|s| s.contains(&i))
    }

    fn considered_count(&self) -> usize {
        self.opts.only.as_ref().map_or(self.p.stages.len(), HashSet::len)
    }

    /// Threads a stage gets: what it asks for, within the budget.
    fn threads_of(&self, st: &StageInstance) -> u32 {
        st.threads.min(self.opts.cores).max(1)
    }

    fn stop(&mut self) {
        self.stopping = true;
        let _ = self.cancel_tx.send(true);
    }

    /// After a failure (without `--keep-going`): nothing new starts, but stages already running
    /// finish and are stored, as `make` and Snakemake do, so the next run does not redo them.
    fn halt(&mut self, events: &mut dyn RunEvents) {
        self.stopping = true;
        let running: Vec<String> = (0..self.state.len())
            .filter(|&i| matches!(self.state[i], State::Running))
            .map(|i| format!("`{}`", self.p.stages[i].name))
            .collect();
        let (what, them) = match running.as_slice() {
            [] => return,
            [one] => (one.clone(), "its result is kept (Ctrl-C stops it now)"),
            [a, b] => (format!("{a} and {b}"), "their results are kept (Ctrl-C stops them now)"),
            [a, b, rest @ ..] => {
                (format!("{a}, {b} and {} more", rest.len()), "their results are kept (Ctrl-C stops them now)")
            }
        };
        events.note(&format!("nothing new starts after the failure; waiting for {what} to finish so {them}"));
    }

    /// Decide every stage whose upstream has settled (cache hits and skips settle at once and
    /// can make their dependents ready in turn), then start waiting stages, in DAG order, while
    /// their threads fit.
    fn admit_ready(&mut self, events: &mut dyn RunEvents) {
        while let Some(p) = self.fresh.pop_first() {
            let i = self.dag.order[p];
            if matches!(self.state[i], State::Waiting) {
                self.settle(i, events);
            }
            if self.stopping {
                return;
            }
        }
        let mut free = self.free;
        let mut fits = Vec::new();
        for &p in self.blocked.keys() {
            if free == 0 {
                break;
            }
            let threads = self.threads_of(&self.p.stages[self.dag.order[p]]);
            if threads <= free {
                fits.push(p);
                free -= threads;
            }
        }
        for p in fits {
            if let Some((key, key_input, sources)) = self.blocked.remove(&p) {
                self.start(self.dag.order[p], key, key_input, sources, events);
            }
        }
    }

    /// Act on what can be decided about waiting stage `i`.
    fn settle(&mut self, i: usize, events: &mut dyn RunEvents) {
        let name = self.p.stages[i].name.clone();
        match self.decide(i) {
            Decision::NotReady => {}
            Decision::Skip(why) => {
                events.skipped(&name, &why);
                self.set(i, State::Skipped, StageOutcome::new(&name, Status::Skipped).error(Some(why)));
            }
            Decision::BadInput(msg) => {
                events.failed(&name, &msg, "");
                self.set(i, State::Failed, StageOutcome::new(&name, Status::Failed).error(Some(msg)));
                self.failed_any = true;
                if !self.opts.keep_going {
                    self.halt(events);
                }
            }
            Decision::Hit { key, digest, manifest } => {
                events.cached(&name);
                self.reuse(i, key, digest, *manifest, Status::Cached);
            }
            Decision::Run { key, key_input, sources } => match self.opts.remote.clone() {
                Some(remote) if !self.opts.rerun.contains(&i) => self.fetch(i, remote, (key, key_input, sources)),
                _ => {
                    self.blocked.insert(self.pos[i], (key, key_input, sources));
                }
            },
        }
    }

    /// Stage `i` is done without running: its result (under `key`) was found.
    fn reuse(&mut self, i: usize, key: String, digest: String, manifest: Manifest, status: Status) {
        self.record_hit(i, &digest, &manifest);
        let outcome = StageOutcome::new(&self.p.stages[i].name, status)
            .key(Some(key))
            .manifest(Some(digest.clone()))
            .duration(manifest.duration_s)
            .outputs(manifest.outputs.clone());
        self.set(i, State::Done { manifest: digest, outputs: manifest.outputs, cached: true }, outcome);
    }

    /// Look stage `i` up in the remote cache in a task; it runs here if the remote misses.
    fn fetch(&mut self, i: usize, remote: Arc<Remote>, blocked: Blocked) {
        self.state[i] = State::Running;
        let (store, slots, mut cancel) = (self.store.clone(), self.fetch_slots.clone(), self.cancel_tx.subscribe());
        self.tasks.spawn(async move {
            let t = Transfer::new("pull", false);
            let fetched = tokio::select! {
                r = async {
                    let _slot = slots.acquire_owned().await;
                    remote.fetch(&store, &blocked.0, &t).await
                } => match r {
                    Ok(Some((digest, m))) => Fetched::Hit(digest, Box::new(m)),
                    Ok(None) => Fetched::Miss,
                    Err(e) => Fetched::Failed {
                        unreachable: matches!(e, RemoteError::Transfer { .. }),
                        why: e.to_string(),
                    },
                },
                _ = cancel.wait_for(|stop| *stop) => Fetched::Cancelled,
            };
            Finished::Fetch(FetchDone { index: i, blocked, fetched, bytes: t.totals().0 })
        });
    }

    /// A remote lookup ended: the stage is done (pulled), or waits to run here.
    fn fetched(&mut self, done: FetchDone, events: &mut dyn RunEvents) {
        let i = done.index;
        let name = self.p.stages[i].name.clone();
        match done.fetched {
            Fetched::Hit(digest, manifest) => {
                events.pulled(&name, done.bytes);
                self.reuse(i, done.blocked.0, digest, *manifest, Status::Pulled);
            }
            Fetched::Cancelled => {
                events.cancelled(&name);
                self.set(i, State::Cancelled, StageOutcome::new(&name, Status::Cancelled).key(Some(done.blocked.0)));
            }
            Fetched::Miss | Fetched::Failed { .. } => {
                match &done.fetched {
                    Fetched::Failed { why, unreachable: true } if self.opts.remote.is_some() => {
                        events.warning(&format!("the remote cache failed ({why}); running without it"));
                        self.opts.remote = None;
                    }
                    Fetched::Failed { why, unreachable: false } => {
                        events.warning(&format!("`{name}` could not be pulled ({why}); running it here"));
                    }
                    _ => {}
                }
                self.state[i] = State::Waiting;
                self.blocked.insert(self.pos[i], done.blocked);
            }
        }
    }

    /// Stage `i` has settled (done, failed, skipped or cancelled): record it, and make each
    /// dependent whose last upstream this was ready to be decided.
    fn set(&mut self, i: usize, state: State, outcome: StageOutcome) {
        self.state[i] = state;
        self.outcomes[i] = Some(outcome);
        for j in self.dag.downstream(i) {
            self.unsettled_ups[j] = self.unsettled_ups[j].saturating_sub(1);
            if self.unsettled_ups[j] == 0 && self.considered(j) && matches!(self.state[j], State::Waiting) {
                self.fresh.insert(self.pos[j]);
            }
        }
    }

    fn decide(&self, i: usize) -> Decision {
        let ups = self.dag.upstream(i);
        let not_finished = |u: &usize| matches!(self.state[*u], State::Failed | State::Skipped | State::Cancelled);
        if let Some(&bad) = ups.iter().find(|u| not_finished(u)) {
            return Decision::Skip(format!("`{}` did not finish", self.p.stages[bad].name));
        }
        if !ups.iter().all(|&u| matches!(self.state[u], State::Done { .. })) {
            return Decision::NotReady;
        }
        let st = &self.p.stages[i];
        let upstream = |stage: &str, output: &str| -> Option<Entry> {
            match &self.state[self.p.index_of(stage)?] {
                State::Done { outputs, .. } => outputs.get(output).cloned(),
                _ => None,
            }
        };
        let metric = |stage: &str, metric: &str| -> Option<f64> {
            match &self.state[self.p.index_of(stage)?] {
                State::Done { manifest, .. } => self.store.load_manifest(manifest).ok()?.metrics.get(metric)?.as_f64(),
                _ => None,
            }
        };
        let up = Upstream { output: &upstream, metric: &metric };
        let (key_input, sources) = match stage_key(self.store.as_ref(), st, &up) {
            Ok(x) => x,
            Err(KeyError::Pending(_)) => return Decision::NotReady,
            Err(KeyError::Input(msg)) => return Decision::BadInput(msg),
        };
        let key = key_input.key();
        if self.opts.rerun.contains(&i) {
            return Decision::Run { key, key_input, sources };
        }
        match self.store.lookup(&key) {
            Ok(Some((digest, m))) => return Decision::Hit { key, digest, manifest: Box::new(m) },
            Ok(None) => {}
            Err(e) => tracing::warn!("index lookup failed for {}: {e}; running the stage", st.name),
        }
        Decision::Run { key, key_input, sources }
    }

    /// A hit becomes the stage's last result, which `plan` explains a rerun against and `show`
    /// falls back to: after switching back to a cached configuration, the next change is told
    /// against that one, not against the last that had to execute. A hit produced under another
    /// pipeline or stage name is recorded under this one too.
    fn record_hit(&self, i: usize, digest: &str, m: &Manifest) {
        let st = &self.p.stages[i];
        let recorded = if m.pipeline != self.p.name || m.stage != st.name {
            let mut mine = m.clone();
            mine.pipeline = self.p.name.clone();
            mine.stage = st.name.clone();
            self.store.commit(&mine).map(drop)
        } else {
            self.store.set_last(&self.p.name, &st.name, digest)
        };
        // Only an explanation depends on it; the run goes on.
        if let Err(e) = recorded {
            tracing::warn!("recording {}'s cached result as its last: {e}", st.name);
        }
    }

    /// Start stage `i` (its threads fit the free budget).
    fn start(
        &mut self,
        i: usize,
        key: String,
        key_input: KeyInput,
        sources: BTreeMap<String, InputSource>,
        events: &mut dyn RunEvents,
    ) {
        let st = &self.p.stages[i];
        let threads = self.threads_of(st);
        if st.threads > self.opts.cores {
            tracing::info!(stage = %st.name, "wants {} threads; running with the budget of {}", st.threads, self.opts.cores);
        }
        // Which upstream results this run computed and which it reused, as the stage will be
        // told; stored (and any failure reported) by the task.
        let described = st.wants_run_description.then(|| (self.p.clone(), self.upstream_status(i)));
        self.free -= threads;
        self.state[i] = State::Running;
        events.started(&st.name, threads);
        tracing::debug!(stage = %st.name, "admitted");
        let (store, st, rx, sink) =
            (self.store.clone(), st.clone(), self.cancel_tx.subscribe(), self.progress_tx.clone());
        let executor = self.opts.executor.clone();
        self.tasks.spawn(async move {
            let t = Instant::now();
            let done = |result, run_description| TaskDone {
                index: i,
                key: key.clone(),
                key_input: key_input.clone(),
                result,
                run_description,
                wall_s: t.elapsed().as_secs_f64(),
            };
            let description = match described.map(|(p, ups)| describe_run(&p, &store, &ups)).transpose() {
                Ok(d) => d,
                Err(message) => {
                    return Finished::Stage(done(Err(StageFailure::Failed { message, log_tail: String::new() }), None))
                }
            };
            let job = StageJob {
                input_store: store.objects.clone(),
                output_store: store.objects.clone(),
                stage: &st,
                sources: &sources,
                run_description: description.as_ref(),
                threads,
                cancel: rx,
                progress: Some(sink),
                executor,
                key: &key,
            };
            let r = runner::run_stage(job).await;
            Finished::Stage(done(r, description.map(|e| e.digest)))
        });
    }

    /// Every stage `i` depends on, in DAG order: (name, manifest digest, reused from the cache).
    fn upstream_status(&self, i: usize) -> Vec<(String, String, bool)> {
        let upstream = self.dag.with_upstream(i);
        self.dag
            .order
            .iter()
            .filter(|&&j| j != i && upstream.contains(&j))
            .filter_map(|&j| match &self.state[j] {
                State::Done { manifest, cached, .. } => {
                    Some((self.p.stages[j].name.clone(), manifest.clone(), *cached))
                }
                _ => None,
            })
            .collect()
    }

    /// A stage task ended: store its result, or record how it failed.
    fn complete(&mut self, done: TaskDone, events: &mut dyn RunEvents) {
        let i = done.index;
        let name = self.p.stages[i].name.clone();
        self.free += self.threads_of(&self.p.stages[i]);
        let failed =
            |msg: String| StageOutcome::new(&name, Status::Failed).key(Some(done.key.clone())).error(Some(msg));
        match done.result {
            Ok(run) => {
                let m = self.manifest(i, &done.key, done.key_input, &run, done.run_description);
                if let Some(w) = self.rerun_differs(i, &m) {
                    events.warning(&w);
                }
                match self.store.commit(&m) {
                    Ok(digest) => {
                        tracing::debug!(stage = %name, "committed");
                        events.done(&name, run.duration_s);
                        let outcome = StageOutcome::new(&name, Status::Ran)
                            .key(Some(done.key.clone()))
                            .manifest(Some(digest.clone()))
                            .duration(run.duration_s)
                            .outputs(run.outputs.clone());
                        self.set(i, State::Done { manifest: digest, outputs: run.outputs, cached: false }, outcome);
                    }
                    Err(e) => {
                        let msg = format!("storing the result failed: {e}");
                        events.failed(&name, &msg, "");
                        self.set(i, State::Failed, failed(msg).duration(done.wall_s));
                        self.failed_any = true;
                    }
                }
            }
            Err(StageFailure::Cancelled) => {
                events.cancelled(&name);
                let outcome = StageOutcome::new(&name, Status::Cancelled).key(Some(done.key.clone()));
                self.set(i, State::Cancelled, outcome.duration(done.wall_s));
            }
            Err(StageFailure::Failed { message, log_tail }) => {
                events.failed(&name, &message, &log_tail);
                self.set(i, State::Failed, failed(message).log_tail(&log_tail).duration(done.wall_s));
                self.failed_any = true;
            }
        }
        if self.failed_any && !self.opts.keep_going && !self.stopping {
            self.halt(events);
        }
    }

    fn manifest(&self, i: usize, key: &str, key_input: KeyInput, run: &StageRun, desc: Option<String>) -> Manifest {
        let st = &self.p.stages[i];
        Manifest {
            orchestrate: MANIFEST_TAG.into(),
            format: 1,
            pipeline: self.p.name.clone(),
            stage: st.name.clone(),
            key: key.to_string(),
            key_input,
            outputs: run.outputs.clone(),
            metrics: run.result.metrics.clone(),
            deterministic: st.deterministic,
            threads: self.threads_of(st),
            started_at: run.started_at,
            duration_s: run.duration_s,
            cpu_s: run.result.cpu_s,
            peak_rss_bytes: run.result.peak_rss_bytes,
            log: run.log.clone(),
            run_description: desc,
            provenance: Some(provenance(&run.result)),
        }
    }

    fn interrupt(&mut self, events: &mut dyn RunEvents) {
        self.interrupted = true;
        events.note("interrupted: stopping running stages; nothing partial is stored");
        self.stop();
    }

    /// Give every stage that never ended an outcome, record the run, and summarize it.
    fn finish(mut self, events: &mut dyn RunEvents) -> RunSummary {
        for i in 0..self.state.len() {
            if self.outcomes[i].is_none() && self.considered(i) {
                let status = if self.interrupted { Status::Cancelled } else { Status::Skipped };
                let why = matches!(self.state[i], State::Waiting).then(|| "the run stopped before it started".into());
                self.outcomes[i] = Some(StageOutcome::new(&self.p.stages[i].name, status).error(why));
            }
        }
        let status = match (self.interrupted, self.failed_any) {
            (true, _) => "cancelled",
            (false, true) => "failed",
            (false, false) => "ok",
        };
        let run = self.record(status);
        let summary = RunSummary {
            run,
            pipeline: self.p.name.clone(),
            status: status.into(),
            wall_s: self.t0.elapsed().as_secs_f64(),
            cores: self.opts.cores,
            stages: self.dag.order.iter().filter_map(|&i| self.outcomes[i].clone()).collect(),
            outputs: Vec::new(),
        };
        events.finish(&summary);
        summary
    }
}

/// Where and by what the result was computed: this machine, or the node a cluster job ran on.
fn provenance(r: &crate::exec::ChildResult) -> Provenance {
    let simd = r.metrics.get("simd_path").and_then(|v| v.as_str()).map(str::to_string);
    match (&r.ran_on, &r.host) {
        (Some(ran_on), Some(host)) => Provenance { ran_on: Some(ran_on.clone()), ..Provenance::on(host, simd) },
        _ => Provenance::here(simd),
    }
}

/// Store the run description a stage asked for (see `run_description`).
fn describe_run(p: &Pipeline, store: &Store, upstream: &[(String, String, bool)]) -> Result<Entry, String> {
    let mut stages = Vec::new();
    for (name, manifest, cached) in upstream {
        let m = store
            .load_manifest(manifest)
            .map_err(|e| format!("reading the result of `{name}` for the run description: {e}"))?;
        stages.push(crate::run_description::stage_entry(name, &m, *cached));
    }
    let run = crate::run_description::describe(p, stages, "this run's report stage");
    let bytes = serde_json::to_vec_pretty(&run).map_err(|e| format!("encoding the run description: {e}"))?;
    let digest = store.objects.put_bytes(&bytes).map_err(|e| format!("storing the run description: {e}"))?;
    Ok(Entry { digest, kind: ObjKind::File, size: bytes.len() as u64 })
}
