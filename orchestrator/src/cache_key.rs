//! The cache key of a stage instance: what it is computed from ([`KeyInput`]), how it is
//! built ([`stage_key`]) and hashed ([`KeyInput::key`]), and how two keys' inputs differ
//! ([`explain`], which `plan` prints as the reason a stage will run).
//!
//! A key is blake3 of the canonical JSON of a `KeyInput`: the stage's kind and implementation
//! fingerprint (a digest of the code it runs, computed at build time), its
//! kind-specific fields and `params:` exactly as resolved from the pipeline file (paths of
//! `file:` params as written, so moving the project keeps hits), every input's content digest
//! by name, and the declared output names. Anything that can change a stage's output bytes
//! must be in here; anything that cannot (threads, timeout, retries, where the store lives)
//! must not, or identical work would miss the cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::objects::{self, Entry};
use crate::pipeline::metrics::Better;
use crate::pipeline::{InputRef, StageInstance};

/// Bump to invalidate every key of every stage kind (e.g. when `KeyInput` changes shape).
pub const KEY_FORMAT: u32 = 2;

/// What the cache key is computed from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyInput {
    pub format: u32,
    pub kind: String,
    /// The kind's implementation fingerprint: workspace crate → digest of its sources, and
    /// `external crates` → digest of the locked external dependencies (`registry`).
    pub implementation: BTreeMap<String, String>,
    pub fields: BTreeMap<String, Value>,
    pub params: BTreeMap<String, Value>,
    /// Input name → content digest, in name order.
    pub inputs: BTreeMap<String, String>,
    pub outputs: Vec<String>,
    /// For each `best_of` input, the instance that won (absent when there is none, so keys of
    /// stages without one are unchanged).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selected: BTreeMap<String, String>,
}

impl KeyInput {
    /// The key: blake3 of the canonical JSON (serde_json maps are `BTreeMap`s here, without
    /// `preserve_order`, so keys serialize sorted).
    pub fn key(&self) -> String {
        objects::hash_bytes(&serde_json::to_vec(self).unwrap_or_default())
    }
}

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
    /// The named upstream stage has no result yet.
    Pending(String),
    /// A `file:` input cannot be read.
    Input(String),
}

/// Digests of `file:` inputs. The store answers from its stat cache; tests answer directly.
pub trait FileDigests {
    fn file_digest(&self, path: &Path) -> Result<Entry, String>;
}

/// What the key builder may ask about other stages' results, when known: an output's stored
/// entry, and a recorded metric (for `best_of` inputs).
pub struct Upstream<'a> {
    pub output: &'a dyn Fn(&str, &str) -> Option<Entry>,
    pub metric: &'a dyn Fn(&str, &str) -> Option<f64>,
}

/// The winner among `variants` by `metric` (ties: the first); every variant must have
/// recorded it. `input` names the input in errors.
pub fn best_variant(
    metric_of: &dyn Fn(&str, &str) -> Option<f64>,
    input: &str,
    variants: &[String],
    metric: &str,
    better: Better,
) -> Result<String, KeyError> {
    let mut best: Option<(&String, f64)> = None;
    for v in variants {
        let Some(x) = metric_of(v, metric) else {
            return Err(KeyError::Input(format!(
                "input `{input}`: `{v}` did not record the metric `{metric}` ({})",
                crate::pipeline::metrics::HOW_TO_RECORD
            )));
        };
        if best.is_none_or(|(_, b)| better.judge(b, x) == Some(true)) {
            best = Some((v, x));
        }
    }
    best.map(|(v, _)| v.clone()).ok_or_else(|| KeyError::Input(format!("input `{input}`: no variants")))
}

/// Resolve a stage's inputs and build its key input from what is known upstream.
pub fn stage_key(
    files: &dyn FileDigests,
    st: &StageInstance,
    up: &Upstream,
) -> Result<(KeyInput, BTreeMap<String, InputSource>), KeyError> {
    let mut sources = BTreeMap::new();
    let mut selected = BTreeMap::new();
    for (name, r) in &st.inputs {
        let src = match r {
            InputRef::File { path, written } => {
                let entry = files
                    .file_digest(path)
                    .map_err(|e| KeyError::Input(format!("input `{name}` (file:{written}): {e}")))?;
                InputSource::File { path: path.clone(), entry }
            }
            InputRef::Stage { stage, output } => {
                InputSource::Object((up.output)(stage, output).ok_or_else(|| KeyError::Pending(stage.clone()))?)
            }
            InputRef::Best { variants, metric, better, output, .. } => {
                if let Some(v) = variants.iter().find(|v| (up.output)(v, output).is_none()) {
                    return Err(KeyError::Pending(v.clone()));
                }
                let winner = best_variant(up.metric, name, variants, metric, *better)?;
                let entry = (up.output)(&winner, output).ok_or_else(|| KeyError::Pending(winner.clone()))?;
                selected.insert(name.clone(), winner);
                InputSource::Object(entry)
            }
        };
        sources.insert(name.clone(), src);
    }
    let key_input = KeyInput {
        format: KEY_FORMAT,
        kind: st.kind.clone(),
        implementation: st.implementation.clone(),
        fields: st.params.fields.clone(),
        params: st.params.params.clone(),
        inputs: sources.iter().map(|(k, v)| (k.clone(), v.entry().digest.clone())).collect(),
        outputs: st.outputs.clone(),
        selected,
    };
    Ok((key_input, sources))
}

/// The first 12 hex digits of a digest, for messages.
pub fn short(d: &str) -> &str {
    &d[..d.len().min(12)]
}

/// A value on one line of at most 60 characters (strings quoted, so a newline reads `\n`).
pub fn brief(v: &Value) -> String {
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
pub fn change(a: &Value, b: &Value) -> (String, String) {
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

fn diff_inputs(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>, out: &mut Vec<String>) {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for n in names {
        match (old.get(n), new.get(n)) {
            (Some(a), Some(b)) if a != b => out.push(format!("input `{n}` changed: {} → {}", short(a), short(b))),
            (None, Some(b)) => out.push(format!("input `{n}` added ({})", short(b))),
            (Some(_), None) => out.push(format!("input `{n}` removed")),
            _ => {}
        }
    }
}

/// Why `new` differs from what the stage last ran with, one phrase per difference.
pub fn explain(old: &KeyInput, new: &KeyInput) -> Vec<String> {
    let mut out = Vec::new();
    if old.format != new.format {
        out.push(format!("cache format {} → {}", old.format, new.format));
    }
    if old.kind != new.kind {
        out.push(format!("kind changed: {} → {}", old.kind, new.kind));
    } else if old.implementation != new.implementation {
        let parts: BTreeSet<&String> = old.implementation.keys().chain(new.implementation.keys()).collect();
        let changed: Vec<&str> = (parts.into_iter())
            .filter(|p| old.implementation.get(*p) != new.implementation.get(*p))
            .map(String::as_str)
            .collect();
        out.push(format!("implementation of `{}` changed ({})", new.kind, changed.join(", ")));
    }
    diff_maps("", &old.fields, &new.fields, &mut out);
    diff_maps("params.", &old.params, &new.params, &mut out);
    for (input, winner) in &new.selected {
        match old.selected.get(input) {
            Some(was) if was != winner => out.push(format!("input `{input}` now from `{winner}` (was `{was}`)")),
            _ => {}
        }
    }
    diff_inputs(&old.inputs, &new.inputs, &mut out);
    if old.outputs != new.outputs {
        out.push(format!("outputs changed: [{}] → [{}]", old.outputs.join(", "), new.outputs.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests;
