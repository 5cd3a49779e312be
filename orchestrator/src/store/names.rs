//! Names given to runs after they ran (`orchestrate name RUN NAME`).
//!
//! A run record is an object named by its digest, which is the run's id, so it cannot change.
//! A name given later is an object of its own, a [`RunName`]: the run it names, the name (or
//! none, to take a name away) and when. The index keeps each run's newest one (the `names`
//! tree: run id → naming's digest); the web view, which reads `objects/` alone, finds them
//! there. A name means the run that took it last: the newest of `run --name` (named when it
//! started) and `orchestrate name` (named when that ran).

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use super::{now_unix, Result, RunRecord, Store};
use crate::objects::{tagged, ObjectError};

pub const NAME_TAG: &str = "run-name";

/// One naming of a run, stored as an object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunName {
    pub orchestrate: String,
    pub format: u32,
    /// The run's id (its record's digest).
    pub run: String,
    /// `None`: the run's name was taken away.
    pub name: Option<String>,
    /// Unix seconds.
    pub at: f64,
}

impl RunName {
    pub fn parse(bytes: &[u8]) -> Option<RunName> {
        tagged(bytes, NAME_TAG)
    }

    /// The record as this naming leaves it.
    pub fn apply(&self, r: &mut RunRecord) {
        r.name = self.name.clone();
        r.renamed_at = Some(self.at);
    }
}

impl RunRecord {
    /// When the run took its name: given later, then; else when it started (`run --name`).
    pub fn named_at(&self) -> f64 {
        self.renamed_at.unwrap_or(self.started_at)
    }
}

/// Give each run in `runs` its newest naming among `names`.
pub fn apply_names<'a>(runs: &mut [(String, RunRecord)], names: impl IntoIterator<Item = &'a RunName>) {
    let mut newest: HashMap<&str, &RunName> = HashMap::new();
    for n in names {
        let slot = newest.entry(n.run.as_str()).or_insert(n);
        if n.at > slot.at {
            *slot = n;
        }
    }
    for (id, r) in runs.iter_mut() {
        if let Some(n) = newest.get(id.as_str()) {
            n.apply(r);
        }
    }
}

/// The run `name` means among `runs` (newest first): the one that took it last.
pub fn holder<'r>(runs: &'r [(String, RunRecord)], name: &str) -> Option<&'r (String, RunRecord)> {
    let named = runs.iter().filter(|(_, r)| r.name.as_deref() == Some(name));
    named.fold(None, |best: Option<&(String, RunRecord)>, run| match best {
        Some(b) if b.1.named_at() >= run.1.named_at() => Some(b),
        _ => Some(run),
    })
}

/// The runs the names mean, one per name.
pub fn name_holders(runs: &[(String, RunRecord)]) -> HashSet<&str> {
    let names: BTreeSet<&str> = runs.iter().filter_map(|(_, r)| r.name.as_deref()).collect();
    names.into_iter().filter_map(|n| holder(runs, n)).map(|(id, _)| id.as_str()).collect()
}

impl Store {
    /// Name run `id` (`None`: take its name away), as of now.
    pub fn name_run(&self, id: &str, name: Option<&str>) -> Result<()> {
        let naming = RunName {
            orchestrate: NAME_TAG.into(),
            format: 1,
            run: id.into(),
            name: name.map(Into::into),
            at: now_unix(),
        };
        let bytes = serde_json::to_vec(&naming).map_err(|e| ObjectError::Invalid(e.to_string()))?;
        let digest = self.objects.put_bytes(&bytes)?;
        self.names.insert(id.as_bytes(), digest.as_bytes())?;
        self.flush()
    }

    /// Take a naming made elsewhere (`pull`), given its bytes: it becomes the run's naming if
    /// it is newer than the one this store has. Whether it did.
    pub fn adopt_naming(&self, bytes: &[u8], naming: &RunName) -> Result<bool> {
        if self.naming(&naming.run).is_some_and(|(_, mine)| mine.at >= naming.at) {
            return Ok(false);
        }
        let digest = self.objects.put_bytes(bytes)?;
        self.names.insert(naming.run.as_bytes(), digest.as_bytes())?;
        self.flush()?;
        Ok(true)
    }

    /// The newest naming of run `id`, with its object's digest.
    pub fn naming(&self, id: &str) -> Option<(String, RunName)> {
        let digest = String::from_utf8_lossy(&self.names.get(id.as_bytes()).ok()??).into_owned();
        let naming = RunName::parse(&self.objects.read_verified(&digest, "run name").ok()?)?;
        Some((digest, naming))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(started_at: f64, name: Option<&str>) -> RunRecord {
        let r = serde_json::json!({"orchestrate": "run", "format": 1, "pipeline": "p", "pipeline_file": "p.yaml",
            "started_at": started_at, "finished_at": started_at + 1.0, "status": "ok", "manifests": {}, "name": name});
        serde_json::from_value(r).unwrap()
    }

    fn naming(run: &str, name: Option<&str>, at: f64) -> RunName {
        RunName { orchestrate: NAME_TAG.into(), format: 1, run: run.into(), name: name.map(Into::into), at }
    }

    #[test]
    fn the_newest_naming_of_a_run_wins_and_sets_when_it_was_named() {
        let mut runs = vec![("a".to_string(), record(10.0, Some("first"))), ("b".to_string(), record(20.0, None))];
        let names = [naming("a", Some("baseline"), 30.0), naming("a", None, 40.0), naming("b", Some("baseline"), 35.0)];
        apply_names(&mut runs, &names);
        assert_eq!((runs[0].1.name.as_deref(), runs[0].1.named_at()), (None, 40.0));
        assert_eq!((runs[1].1.name.as_deref(), runs[1].1.named_at()), (Some("baseline"), 35.0));
    }

    #[test]
    fn a_name_means_the_run_that_took_it_last() {
        // Newest first: c and b took `base` with `run --name` (at their start), a later.
        let mut runs = vec![
            ("c".to_string(), record(30.0, Some("base"))),
            ("b".to_string(), record(20.0, Some("base"))),
            ("a".to_string(), record(10.0, None)),
        ];
        assert_eq!(holder(&runs, "base").map(|r| r.0.as_str()), Some("c"));
        apply_names(&mut runs, &[naming("a", Some("base"), 40.0)]);
        assert_eq!(holder(&runs, "base").map(|r| r.0.as_str()), Some("a"));
        assert_eq!(name_holders(&runs), HashSet::from(["a"]));
        assert_eq!(holder(&runs, "other"), None);
    }
}
