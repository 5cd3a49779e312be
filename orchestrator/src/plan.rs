//! Dry run: for every stage, cached or will run, and why.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::dag::Dag;
use crate::objects::Entry;
use crate::pipeline::Pipeline;
use crate::runner::{key_for, short, KeyError};
use crate::store::{KeyInput, Manifest, Store};

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

fn brief(v: &Value) -> String {
    let s = match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(59).collect::<String>())
    } else {
        s
    }
}

/// Both sides of a change, cut to the region where two long strings first differ.
fn change(a: &Value, b: &Value) -> (String, String) {
    if let (Value::String(x), Value::String(y)) = (a, b) {
        let (xc, yc): (Vec<char>, Vec<char>) = (x.chars().collect(), y.chars().collect());
        if xc.len() > 60 || yc.len() > 60 {
            let at = xc.iter().zip(&yc).take_while(|(p, q)| p == q).count();
            let cut = |c: &[char]| {
                let from = at.saturating_sub(20);
                let to = (at + 25).min(c.len());
                let mut s: String = c[from.min(to)..to].iter().collect();
                if from > 0 {
                    s.insert(0, '…');
                }
                if to < c.len() {
                    s.push('…');
                }
                format!("{s:?}")
            };
            return (cut(&xc), cut(&yc));
        }
    }
    (brief(a), brief(b))
}

fn diff_maps(what: &str, old: &BTreeMap<String, Value>, new: &BTreeMap<String, Value>, out: &mut Vec<String>) {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for k in keys {
        match (old.get(k), new.get(k)) {
            (Some(a), Some(b)) if a != b => {
                let (x, y) = change(a, b);
                out.push(format!("{what}{k} changed: {x} → {y}"))
            }
            (None, Some(b)) => out.push(format!("{what}{k} added: {}", brief(b))),
            (Some(a), None) => out.push(format!("{what}{k} removed (was {})", brief(a))),
            _ => {}
        }
    }
}

/// Why `new` differs from what the stage last ran with.
pub fn explain(old: &KeyInput, new: &KeyInput) -> Vec<String> {
    let mut out = Vec::new();
    if old.format != new.format {
        out.push(format!("cache format {} → {}", old.format, new.format));
    }
    if old.kind != new.kind {
        out.push(format!("kind changed: {} → {}", old.kind, new.kind));
    } else if old.version != new.version {
        out.push(format!("stage `{}` version {} → {}", new.kind, old.version, new.version));
    }
    diff_maps("", &old.fields, &new.fields, &mut out);
    diff_maps("params.", &old.params, &new.params, &mut out);
    let names: BTreeSet<&String> = old.inputs.keys().chain(new.inputs.keys()).collect();
    for n in names {
        match (old.inputs.get(n), new.inputs.get(n)) {
            (Some(a), Some(b)) if a != b => out.push(format!("input `{n}` changed: {} → {}", short(a), short(b))),
            (None, Some(b)) => out.push(format!("input `{n}` added ({})", short(b))),
            (Some(_), None) => out.push(format!("input `{n}` removed")),
            _ => {}
        }
    }
    if old.outputs != new.outputs {
        out.push(format!("outputs changed: [{}] → [{}]", old.outputs.join(", "), new.outputs.join(", ")));
    }
    out
}

/// Plan every stage (or only `only`) against the store without running anything.
pub fn plan(p: &Pipeline, dag: &Dag, store: &Store) -> Vec<PlanEntry> {
    let mut known: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
    let mut will_run: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for &i in &dag.order {
        let st = &p.stages[i];
        let upstream = |stage: &str, output: &str| known.get(stage).and_then(|o| o.get(output)).cloned();
        let entry = match key_for(store, st, &upstream) {
            Err(KeyError::Pending(up)) => {
                let reason = if will_run.contains(&up) {
                    format!("upstream `{up}` will run")
                } else {
                    format!("upstream `{up}` cannot run")
                };
                PlanEntry { stage: st.name.clone(), status: "run".into(), key: None, manifest: None, reasons: vec![reason] }
            }
            Err(KeyError::Input(msg)) => {
                PlanEntry { stage: st.name.clone(), status: "error".into(), key: None, manifest: None, reasons: vec![msg] }
            }
            Ok((ki, _)) => {
                let key = ki.key();
                match store.lookup(&key) {
                    Ok(Some((digest, m))) => {
                        known.insert(st.name.clone(), m.outputs);
                        PlanEntry { stage: st.name.clone(), status: "cached".into(), key: Some(key), manifest: Some(digest), reasons: vec![] }
                    }
                    _ => {
                        let reasons = match store.last_manifest(&p.name, &st.name) {
                            None => vec!["never run".to_string()],
                            Some(last) if last.key == key => vec!["its stored outputs are missing (removed by gc or verify)".to_string()],
                            Some(last) => {
                                let r = explain(&last.key_input, &ki);
                                if r.is_empty() { vec!["not in the cache".to_string()] } else { r }
                            }
                        };
                        PlanEntry { stage: st.name.clone(), status: "run".into(), key: Some(key), manifest: None, reasons }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ki(params: Value, input: &str) -> KeyInput {
        KeyInput {
            format: 1,
            kind: "command".into(),
            version: 1,
            fields: BTreeMap::from([("cmd".to_string(), Value::from("x"))]),
            params: params.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            inputs: BTreeMap::from([("i".to_string(), input.to_string())]),
            outputs: vec!["o".into()],
        }
    }

    #[test]
    fn explains_param_and_input_changes() {
        let a = ki(serde_json::json!({"x": 3}), "aaaaaaaaaaaaaaaa");
        let b = ki(serde_json::json!({"x": 4, "y": 1}), "bbbbbbbbbbbbbbbb");
        let r = explain(&a, &b);
        assert_eq!(r, vec![
            "params.x changed: 3 → 4".to_string(),
            "params.y added: 1".to_string(),
            "input `i` changed: aaaaaaaaaaaa → bbbbbbbbbbbb".to_string(),
        ]);
        assert!(explain(&a, &a).is_empty());
    }
}
