//! Dry run: for every stage, cached or will run, and why.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::cache_key::{explain, stage_key, KeyError, KeyInput};
use crate::dag::Dag;
use crate::objects::Entry;
use crate::pipeline::Pipeline;
use crate::store::{Manifest, Store};

#[derive(Debug, Clone, Serialize)]
pub struct PlanEntry {
    pub stage: String,
    /// `cached`, `run`, or `error` (an input cannot be read).
    pub status: String,
    pub key: Option<String>,
    /// Digest of the cached manifest, when cached.
    pub manifest: Option<String>,
    pub reasons: Vec<String>,
}

impl PlanEntry {
    fn new(stage: &str, status: &str, key: Option<String>, manifest: Option<String>, reasons: Vec<String>) -> Self {
        PlanEntry { stage: stage.to_string(), status: status.into(), key, manifest, reasons }
    }
}

/// Why a stage whose key is not in the cache will run, against what it last ran with.
fn reasons_to_run(store: &Store, p: &Pipeline, stage: &str, key: &str, ki: &KeyInput) -> Vec<String> {
    match store.last_manifest(&p.name, stage) {
        None => vec!["never run".to_string()],
        Some(last) if last.key == key => vec!["its stored outputs are missing (removed by gc or verify)".to_string()],
        Some(last) => {
            let r = explain(&last.key_input, ki);
            if r.is_empty() {
                vec!["not in the cache".to_string()]
            } else {
                r
            }
        }
    }
}

/// Plan every stage against the store without running anything.
pub fn plan(p: &Pipeline, dag: &Dag, store: &Store) -> Vec<PlanEntry> {
    let mut known: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
    let mut will_run: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for &i in &dag.order {
        let st = &p.stages[i];
        let upstream = |stage: &str, output: &str| known.get(stage).and_then(|o| o.get(output)).cloned();
        let entry = match stage_key(store, st, &upstream) {
            Err(KeyError::Pending(up)) => {
                let verb = if will_run.contains(&up) { "will" } else { "cannot" };
                PlanEntry::new(&st.name, "run", None, None, vec![format!("upstream `{up}` {verb} run")])
            }
            Err(KeyError::Input(msg)) => PlanEntry::new(&st.name, "error", None, None, vec![msg]),
            Ok((ki, _)) => {
                let key = ki.key();
                match store.lookup(&key) {
                    Ok(Some((digest, m))) => {
                        known.insert(st.name.clone(), m.outputs);
                        PlanEntry::new(&st.name, "cached", Some(key), Some(digest), vec![])
                    }
                    _ => {
                        let reasons = reasons_to_run(store, p, &st.name, &key, &ki);
                        PlanEntry::new(&st.name, "run", Some(key), None, reasons)
                    }
                }
            }
        };
        if entry.status == "run" {
            will_run.insert(st.name.clone());
        }
        out.push(entry);
    }
    out
}

/// The manifest a stage has for the pipeline as it is now, if cached.
pub fn current_manifest(p: &Pipeline, dag: &Dag, store: &Store, stage: &str) -> Option<(String, Manifest)> {
    let entries = plan(p, dag, store);
    let e = entries.iter().find(|e| e.stage == stage)?;
    let d = e.manifest.clone()?;
    store.load_manifest(&d).ok().map(|m| (d, m))
}
