//! `replay`: re-execute cached stages from their cached inputs in a scratch store and prove the
//! outputs are bit-identical.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::dag::Dag;
use crate::objects::{Entry, ObjKind, ObjectStore};
use crate::pipeline::Pipeline;
use crate::runner::{self, key_for, short, StageFailure};
use crate::store::Store;

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

#[derive(Debug, Serialize)]
pub struct ReplayReport {
    pub rows: Vec<ReplayRow>,
    /// A deterministic stage differed, failed to replay, or was not cached.
    pub failed: bool,
}

pub async fn replay(p: &Pipeline, dag: &Dag, store: &Store, only: Option<&[usize]>, cores: u32) -> std::io::Result<ReplayReport> {
    let scratch_root = store.objects.tmp_path("replay");
    let scratch = Arc::new(ObjectStore::open(&scratch_root).map_err(std::io::Error::other)?);
    let (_tx, rx) = watch::channel(false);
    let mut known: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
    let mut rows = Vec::new();
    let mut failed = false;
    for &i in &dag.order {
        let st = &p.stages[i];
        let selected = only.is_none_or(|o| o.contains(&i));
        let upstream = |stage: &str, output: &str| known.get(stage).and_then(|o| o.get(output)).cloned();
        let cached = match key_for(store, st, &upstream) {
            Ok((ki, sources)) => store.lookup(&ki.key()).ok().flatten().map(|(_, m)| (m, sources)),
            Err(_) => None,
        };
        let Some((m, sources)) = cached else {
            if selected {
                failed = true;
                rows.push(ReplayRow {
                    stage: st.name.clone(),
                    output: "-".into(),
                    cached: None,
                    replayed: None,
                    identical: false,
                    deterministic: st.deterministic,
                    note: Some("not cached: run the pipeline first".into()),
                });
            }
            continue;
        };
        known.insert(st.name.clone(), m.outputs.clone());
        if !selected {
            continue;
        }
        let threads = st.threads.min(cores).max(1);
        // The run description the stage was first handed, so a report replays to the same bytes.
        let run_metadata = m.run_metadata.as_ref().map(|d| Entry {
            digest: d.clone(),
            kind: ObjKind::File,
            size: std::fs::metadata(store.objects.path(d)).map(|md| md.len()).unwrap_or(0),
        });
        let result = runner::run_stage(store.objects.clone(), scratch.clone(), st, &sources, run_metadata.as_ref(), threads, rx.clone(), None).await;
        match result {
            Ok(run) => {
                for (name, cached_entry) in &m.outputs {
                    let replayed = run.outputs.get(name);
                    let identical = replayed.is_some_and(|r| r.digest == cached_entry.digest);
                    let volatile = st.volatile_outputs.contains(name);
                    let must_match = st.deterministic && !volatile;
                    if !identical && must_match {
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
                            (false, true, false) => None,
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
                rows.push(ReplayRow {
                    stage: st.name.clone(),
                    output: "-".into(),
                    cached: None,
                    replayed: None,
                    identical: false,
                    deterministic: st.deterministic,
                    note: Some(note),
                });
            }
        }
    }
    let _ = crate::store::remove_dir_all_writable(&scratch_root);
    Ok(ReplayReport { rows, failed })
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
