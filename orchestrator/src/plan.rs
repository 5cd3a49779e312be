//! Dry run: for every stage, cached or will run, and why.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::cache_key::{explain, stage_key, KeyError, KeyInput, Upstream};
use crate::dag::Dag;
use crate::pipeline::Pipeline;
use crate::store::{Manifest, Store};

#[derive(Debug, Clone, Serialize)]
pub struct PlanEntry {
    pub stage: String,
    /// `cached`, `remote` (in the remote cache, not here), `run`, or `error` (an input
    /// cannot be read).
    pub status: String,
    pub key: Option<String>,
    /// Digest of the cached manifest, when cached (also for a `--rerun` stage, whose cached
    /// result its rerun replaces).
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
        None => vec!["not in this store: never run here, or removed by gc".to_string()],
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

/// What a remote cache holds under a key (for `plan --remote` and `pull`).
pub enum RemoteAnswer {
    /// The manifest's digest and the manifest.
    Has(String, Box<Manifest>),
    Absent,
    /// The remote could not answer, or what it holds cannot be used.
    Error(String),
}

/// Which stages a run takes (`--target`) and which it executes although cached (`--rerun`).
#[derive(Debug, Default)]
pub struct Scope {
    /// Stage indices the run takes, upstream-closed; `None`: every stage.
    pub only: Option<HashSet<usize>>,
    pub rerun: HashSet<usize>,
}

/// Plan every stage against the store without running anything.
pub fn plan(p: &Pipeline, dag: &Dag, store: &Store) -> Vec<PlanEntry> {
    plan_with_remote(p, dag, store, &Scope::default(), &mut |_| RemoteAnswer::Absent)
}

/// Plan the stages in `scope` against the store and, for keys the store lacks, a remote cache:
/// a stage the remote has is `remote`, and its outputs there make its dependents' keys known.
pub fn plan_with_remote(
    p: &Pipeline,
    dag: &Dag,
    store: &Store,
    scope: &Scope,
    remote: &mut dyn FnMut(&str) -> RemoteAnswer,
) -> Vec<PlanEntry> {
    let mut known: BTreeMap<String, Manifest> = BTreeMap::new();
    let mut will_run: BTreeSet<String> = BTreeSet::new();
    // Cached stages a rerun may still change: each with the rerun stages it depends on.
    let mut unsettled: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for &i in dag.order.iter().filter(|&&i| scope.only.as_ref().is_none_or(|o| o.contains(&i))) {
        let st = &p.stages[i];
        let upstream = |stage: &str, output: &str| known.get(stage).and_then(|m| m.outputs.get(output)).cloned();
        let metric = |stage: &str, name: &str| known.get(stage).and_then(|m| m.metrics.get(name)?.as_f64());
        let up = Upstream { output: &upstream, metric: &metric };
        let rerun = scope.rerun.contains(&i);
        let entry = match stage_key(store, st, &up) {
            Err(KeyError::Pending(up)) => {
                let verb = if will_run.contains(&up) { "will" } else { "cannot" };
                PlanEntry::new(&st.name, "run", None, None, vec![format!("upstream `{up}` {verb} run")])
            }
            Err(KeyError::Input(msg)) => PlanEntry::new(&st.name, "error", None, None, vec![msg]),
            Ok((ki, _)) => {
                let key = ki.key();
                match store.lookup(&key) {
                    Ok(Some((digest, m))) => {
                        known.insert(st.name.clone(), m);
                        let entry = PlanEntry::new(&st.name, "cached", Some(key), Some(digest), vec![]);
                        settle(entry, i, rerun, dag, &mut unsettled)
                    }
                    // `run --rerun` does not pull a stage it is told to execute.
                    _ if rerun => PlanEntry::new(
                        &st.name,
                        "run",
                        Some(key.clone()),
                        None,
                        reasons_to_run(store, p, &st.name, &key, &ki),
                    ),
                    _ => match remote(&key) {
                        RemoteAnswer::Has(digest, m) => {
                            known.insert(st.name.clone(), *m);
                            let why = vec!["in the remote cache".to_string()];
                            PlanEntry::new(&st.name, "remote", Some(key), Some(digest), why)
                        }
                        answer => {
                            let mut reasons = reasons_to_run(store, p, &st.name, &key, &ki);
                            if let RemoteAnswer::Error(e) = answer {
                                reasons.push(format!("the remote cache could not supply it: {e}"));
                            }
                            PlanEntry::new(&st.name, "run", Some(key), None, reasons)
                        }
                    },
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

/// A cached stage's entry under `--rerun`: a stage to rerun will run; a stage downstream of
/// one stays cached unless the rerun gives other outputs, and says which reruns those are.
fn settle(
    mut e: PlanEntry,
    i: usize,
    rerun: bool,
    dag: &Dag,
    unsettled: &mut BTreeMap<usize, BTreeSet<String>>,
) -> PlanEntry {
    let roots: BTreeSet<String> = dag.upstream(i).iter().filter_map(|u| unsettled.get(u)).flatten().cloned().collect();
    if rerun {
        unsettled.insert(i, BTreeSet::from([e.stage.clone()]));
        e.status = "run".into();
        e.reasons
            .push("--rerun: executed again although cached; what reads it reruns only if its outputs change".into());
    } else if !roots.is_empty() {
        let names = roots.iter().map(|r| format!("`{r}`")).collect::<Vec<_>>().join(", ");
        e.reasons.push(format!("unless {names}, run again, gives other outputs"));
        unsettled.insert(i, roots);
    }
    e
}

/// The manifest a stage has for the pipeline as it is now, if cached.
pub fn current_manifest(p: &Pipeline, dag: &Dag, store: &Store, stage: &str) -> Option<(String, Manifest)> {
    let entries = plan(p, dag, store);
    let e = entries.iter().find(|e| e.stage == stage)?;
    let d = e.manifest.clone()?;
    store.load_manifest(&d).ok().map(|m| (d, m))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::cache_key::{stage_key, InputSource, Upstream};
    use crate::objects::{Entry, ObjKind};
    use crate::registry::Registry;

    const PIPELINE: &str = r#"name: study
stages:
  cmd: {kind: command, cmd: "echo hi > ${outputs.o}", outputs: [o]}
  corpus: {kind: corpus, params: {source: builtin, documents: 40}}
  vocab: {kind: vocab, inputs: {text: corpus.train.txt, valid: corpus.valid.txt}, params: {type: char}}
  train:
    kind: train
    inputs: {train: corpus.train.txt, valid: corpus.valid.txt, tokenizer: vocab.tokenizer.json}
    params: {model: itera_lite, preset: micro, steps: 2}
"#;

    /// A stored result for `st` with `ki`, its outputs small objects of the store.
    fn stored(store: &Store, p: &Pipeline, st: &crate::pipeline::StageInstance, ki: KeyInput) -> Manifest {
        let outputs = (st.outputs.iter())
            .map(|o| {
                let bytes = format!("{}.{o}", st.name);
                let digest = store.objects.put_bytes(bytes.as_bytes()).unwrap();
                (o.clone(), Entry { digest, kind: ObjKind::File, size: bytes.len() as u64 })
            })
            .collect();
        let m = Manifest::for_test(&p.name, &st.name, ki, outputs);
        store.commit(&m).unwrap();
        m
    }

    /// Every stage ran once under a build whose models library differed: `plan` reruns the
    /// stages that build from it and says why, and keeps `command`, `corpus` and `vocab` cached.
    #[test]
    fn plan_names_an_implementation_change_and_keeps_other_stages_cached() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("study.yaml");
        std::fs::write(&file, PIPELINE).unwrap();
        let p = crate::pipeline::load(&file, &[], &Registry::builtin()).unwrap();
        let dag = Dag::build(&p).unwrap();
        let store = Store::open(&dir.path().join("store"), "test", false).unwrap();
        let mut known: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
        for &i in &dag.order {
            let st = &p.stages[i];
            let upstream = |s: &str, o: &str| known.get(s).and_then(|m| m.get(o)).cloned();
            let up = Upstream { output: &upstream, metric: &|_, _| None };
            let (mut ki, _): (KeyInput, BTreeMap<String, InputSource>) = stage_key(&store, st, &up).unwrap();
            if let Some(models) = ki.implementation.get_mut("itera-models") {
                *models = "an older build of itera-models".into();
            }
            let m = stored(&store, &p, st, ki);
            known.insert(st.name.clone(), m.outputs);
        }
        let entries = plan(&p, &dag, &store);
        let of = |s: &str| entries.iter().find(|e| e.stage == s).unwrap();
        for s in ["cmd", "corpus", "vocab"] {
            assert_eq!(of(s).status, "cached", "{s}: {:?}", of(s).reasons);
        }
        assert_eq!(of("train").status, "run");
        assert_eq!(of("train").reasons, vec!["implementation of `train` changed (itera-models)".to_string()]);
    }
}
