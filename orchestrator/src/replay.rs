//! `replay`: re-execute cached stages from their cached inputs in a scratch store and prove the
//! outputs are bit-identical. Stages run side by side within the CPU budget.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::cache_key::{short, stage_key, InputSource, Upstream};
use crate::dag::Dag;
use crate::objects::{Entry, ObjKind, ObjectStore};
use crate::pipeline::{Pipeline, StageInstance};
use crate::runner::{self, StageFailure, StageJob};
use crate::store::{Manifest, Provenance, Store};

#[derive(Debug, Clone, Serialize)]
pub struct ReplayRow {
    pub stage: String,
    pub output: String,
    pub cached: Option<String>,
    pub replayed: Option<String>,
    pub identical: bool,
    pub deterministic: bool,
    pub note: Option<String>,
}

impl ReplayRow {
    /// The one row of a stage that produced nothing to compare.
    fn unreplayed(st: &StageInstance, note: String) -> Self {
        ReplayRow {
            stage: st.name.clone(),
            output: "-".into(),
            cached: None,
            replayed: None,
            identical: false,
            deterministic: st.deterministic,
            note: Some(note),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ReplayReport {
    pub rows: Vec<ReplayRow>,
    /// A deterministic stage differed, failed to replay, or was not cached.
    pub failed: bool,
}

/// A cached stage to replay: its row slot, index, cached manifest and cached inputs.
type Job = (usize, usize, Manifest, BTreeMap<String, InputSource>);

/// Replay the selected stages. Each is handed its *cached* inputs, so the stages do not depend
/// on each other here: they run side by side within the `cores` budget, as `run` would.
pub async fn replay(
    p: &Pipeline,
    dag: &Dag,
    store: &Store,
    only: Option<&[usize]>,
    cores: u32,
) -> std::io::Result<ReplayReport> {
    let scratch_root = store.objects.tmp_path("replay");
    let scratch = Arc::new(ObjectStore::open(&scratch_root).map_err(std::io::Error::other)?);
    let (mut rows_of, jobs) = cached_jobs(p, dag, store, only);
    let mut failed = rows_of.iter().any(|r| !r.is_empty());
    let (_tx, rx) = watch::channel(false);
    let mut free = cores.max(1);
    let mut pending = jobs.into_iter().peekable();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while let Some((_, i, _, _)) = pending.peek() {
            let threads = p.stages[*i].threads.min(cores).max(1);
            if threads > free {
                break;
            }
            let Some((slot, i, m, sources)) = pending.next() else { break };
            free -= threads;
            let (objects, scratch, rx, st) = (store.objects.clone(), scratch.clone(), rx.clone(), p.stages[i].clone());
            running.spawn(async move {
                let rows = replay_one(objects, scratch, &st, &m, &sources, threads, rx).await;
                (slot, threads, rows)
            });
        }
        let Some(done) = running.join_next().await else { break };
        let (slot, threads, (rows, bad)) = done.map_err(std::io::Error::other)?;
        free += threads;
        failed |= bad;
        rows_of[slot] = rows;
    }
    let _ = crate::store::remove_dir_all_writable(&scratch_root);
    Ok(ReplayReport { rows: rows_of.into_iter().flatten().collect(), failed })
}

/// Per stage in DAG order, its row slot (filled now for a selected stage that is not cached),
/// and the jobs of the selected cached ones.
fn cached_jobs(p: &Pipeline, dag: &Dag, store: &Store, only: Option<&[usize]>) -> (Vec<Vec<ReplayRow>>, Vec<Job>) {
    let mut known: BTreeMap<String, Manifest> = BTreeMap::new();
    let mut rows_of: Vec<Vec<ReplayRow>> = Vec::new();
    let mut jobs = Vec::new();
    for &i in &dag.order {
        let st = &p.stages[i];
        let selected = only.is_none_or(|o| o.contains(&i));
        let upstream = |stage: &str, output: &str| known.get(stage).and_then(|m| m.outputs.get(output)).cloned();
        let metric = |stage: &str, name: &str| known.get(stage).and_then(|m| m.metrics.get(name)?.as_f64());
        let up = Upstream { output: &upstream, metric: &metric };
        let cached = match stage_key(store, st, &up) {
            Ok((ki, sources)) => store.lookup(&ki.key()).ok().flatten().map(|(_, m)| (m, sources)),
            Err(_) => None,
        };
        let Some((m, sources)) = cached else {
            if selected {
                rows_of.push(vec![ReplayRow::unreplayed(st, "not cached: run the pipeline first".into())]);
            }
            continue;
        };
        known.insert(st.name.clone(), m.clone());
        if selected {
            jobs.push((rows_of.len(), i, m, sources));
            rows_of.push(Vec::new());
        }
    }
    (rows_of, jobs)
}

/// Run one stage again from its cached inputs into `scratch`, and compare with the cache.
async fn replay_one(
    objects: Arc<ObjectStore>,
    scratch: Arc<ObjectStore>,
    st: &StageInstance,
    m: &Manifest,
    sources: &BTreeMap<String, InputSource>,
    threads: u32,
    cancel: watch::Receiver<bool>,
) -> (Vec<ReplayRow>, bool) {
    // The run description the stage was first handed, so a report replays to the same bytes.
    let run_description = m.run_description.as_ref().map(|d| Entry {
        digest: d.clone(),
        kind: ObjKind::File,
        size: std::fs::metadata(objects.path(d)).map(|md| md.len()).unwrap_or(0),
    });
    let job = StageJob {
        input_store: objects,
        output_store: scratch,
        stage: st,
        sources,
        run_description: run_description.as_ref(),
        threads,
        cancel,
        progress: None,
        executor: crate::executor::Executor::Local,
        key: &m.key,
    };
    compare(st, m, runner::run_stage(job).await)
}

/// The rows for one replayed stage, and whether it failed the replay.
/// When the cached result was computed on other hardware or SIMD code than this replay runs
/// on: "recorded on X; replayed on Y". Floating-point results may then legitimately differ.
fn other_host(recorded: Option<&Provenance>, replayed: &Provenance) -> Option<String> {
    let r = recorded?;
    let same = r.same_kernels(replayed);
    let side = |p: &Provenance| {
        format!("{}{}", p.machine(), p.simd_path.as_ref().map(|s| format!(", {s}")).unwrap_or_default())
    };
    (!same).then(|| format!("recorded on {}; replayed on {}", side(r), side(replayed)))
}

fn compare(st: &StageInstance, m: &Manifest, result: Result<runner::StageRun, StageFailure>) -> (Vec<ReplayRow>, bool) {
    let cached = &m.outputs;
    let mut rows = Vec::new();
    let mut failed = false;
    match result {
        Ok(run) => {
            let here = Provenance::here(run.result.metrics.get("simd_path").and_then(|v| v.as_str()).map(String::from));
            let elsewhere = other_host(m.provenance.as_ref(), &here);
            for (name, cached_entry) in cached {
                let replayed = run.outputs.get(name);
                let identical = replayed.is_some_and(|r| r.digest == cached_entry.digest);
                let volatile = st.volatile_outputs.contains(name);
                let must_match = st.deterministic && !volatile;
                // A difference on other hardware is reported as such, not as nondeterminism.
                if !identical && must_match && elsewhere.is_none() {
                    failed = true;
                }
                rows.push(ReplayRow {
                    stage: st.name.clone(),
                    output: name.clone(),
                    cached: Some(cached_entry.digest.clone()),
                    replayed: replayed.map(|r| r.digest.clone()),
                    identical,
                    deterministic: must_match,
                    note: match (identical, st.deterministic, volatile) {
                        (true, _, _) => None,
                        (false, false, _) => Some("declared non-deterministic".to_string()),
                        (false, true, true) => Some("records timings; not compared".to_string()),
                        (false, true, false) => elsewhere.clone(),
                    },
                });
            }
        }
        Err(e) => {
            failed = true;
            let note = match e {
                StageFailure::Cancelled => "cancelled".to_string(),
                StageFailure::Failed { message, .. } => format!("replay failed: {message}"),
            };
            rows.push(ReplayRow::unreplayed(st, note));
        }
    }
    (rows, failed)
}

pub fn render_table(r: &ReplayReport) -> String {
    let mut out = format!("{:<24} {:<20} {:<13} {:<13} {}\n", "stage", "output", "cached", "replayed", "identical");
    for row in &r.rows {
        let ident = match (row.identical, row.deterministic, &row.note) {
            (true, _, _) => "yes".to_string(),
            (false, true, Some(n)) => format!("NO ({n})"),
            (false, true, None) => "NO".to_string(),
            (false, false, Some(n)) => format!("differs ({n})"),
            (false, false, None) => "differs".to_string(),
        };
        out.push_str(&format!(
            "{:<24} {:<20} {:<13} {:<13} {}\n",
            row.stage,
            row.output,
            row.cached.as_deref().map(short).unwrap_or("-"),
            row.replayed.as_deref().map(short).unwrap_or("-"),
            ident
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_from_other_hardware_is_named_as_such() {
        let here = Provenance::here(Some("f32 avx2+fma; int8/int4 vnni".into()));
        assert_eq!(other_host(Some(&here), &here), None);
        assert_eq!(other_host(None, &here), None, "no record: nothing to compare against");
        let mut zen = here.clone();
        zen.cpu = Some("AMD EPYC 9R14".into());
        zen.simd_path = Some("f32 avx2+fma; int8/int4 avx2".into());
        let note = other_host(Some(&zen), &here).unwrap();
        assert!(
            note.starts_with("recorded on AMD EPYC 9R14") && note.contains("int8/int4 avx2; replayed on"),
            "{note}"
        );
    }
}
