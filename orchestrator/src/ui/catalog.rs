//! The run history read from `objects/` alone. The index (sled) is opened by one process at a
//! time and a run holds it for as long as it goes, so the view cannot use it; run records are
//! objects too (and so are names given to runs later), and objects never change once written,
//! so each is peeked at once and remembered.

use std::collections::{HashMap, HashSet};
use std::io::Read;

use crate::history::Run;
use crate::objects::{is_digest, ObjectStore};
use crate::store::names::{apply_names, RunName, NAME_TAG};
use crate::store::{load_run, RunRecord, RUN_TAG};

#[derive(Default)]
pub struct Catalog {
    /// Every object seen: what it is, if it is a run record or a run's naming.
    seen: HashMap<String, Seen>,
}

enum Seen {
    Run(Box<RunRecord>),
    Name(RunName),
    Other,
}

/// Whether the object at `path` starts like one of our tagged JSON objects (a run record, a
/// tree): only its first bytes are read, so a large model file costs one small read.
pub fn tagged_as(path: &std::path::Path, tag: &str) -> bool {
    let prefix = crate::objects::tag_prefix(tag);
    let mut head = vec![0u8; prefix.len()];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && head == prefix.as_bytes()
}

fn peek(objects: &ObjectStore, digest: &str, path: &std::path::Path) -> Seen {
    if tagged_as(path, RUN_TAG) {
        return load_run(objects, digest).map_or(Seen::Other, |r| Seen::Run(Box::new(r)));
    }
    if tagged_as(path, NAME_TAG) {
        let naming = objects.read_verified(digest, "run name").ok().and_then(|b| RunName::parse(&b));
        return naming.map_or(Seen::Other, Seen::Name);
    }
    Seen::Other
}

impl Catalog {
    /// The runs in the store now, newest first, with the names given them later. Objects `gc`
    /// deleted drop out.
    pub fn runs(&mut self, objects: &ObjectStore) -> Result<Vec<Run>, String> {
        let listed = objects.list().map_err(|e| e.to_string())?;
        let mut present = HashSet::with_capacity(listed.len());
        for (digest, path) in listed {
            if !is_digest(&digest) {
                continue;
            }
            if !self.seen.contains_key(&digest) {
                let seen = peek(objects, &digest, &path);
                self.seen.insert(digest.clone(), seen);
            }
            present.insert(digest);
        }
        self.seen.retain(|d, _| present.contains(d));
        let mut runs: Vec<Run> = (self.seen.iter())
            .filter_map(|(d, s)| match s {
                Seen::Run(r) => Some((d.clone(), (**r).clone())),
                _ => None,
            })
            .collect();
        runs.sort_by(|a, b| b.1.started_at.total_cmp(&a.1.started_at).then_with(|| a.0.cmp(&b.0)));
        let names = self.seen.values().filter_map(|s| match s {
            Seen::Name(n) => Some(n),
            _ => None,
        });
        apply_names(&mut runs, names);
        Ok(runs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(started_at: f64) -> Vec<u8> {
        let r = serde_json::json!({"orchestrate": "run", "format": 1, "pipeline": "p", "pipeline_file": "p.yaml",
            "started_at": started_at, "finished_at": started_at + 1.0, "status": "ok", "manifests": {}});
        // Through the struct: its fields serialize in declaration order, the tag first.
        let r: crate::store::RunRecord = serde_json::from_value(r).unwrap();
        serde_json::to_vec(&r).unwrap()
    }

    #[test]
    fn finds_run_records_newest_first_and_forgets_deleted_ones() {
        let dir = tempfile::tempdir().unwrap();
        let objects = ObjectStore::open(dir.path()).unwrap();
        let old = objects.put_bytes(&record(10.0)).unwrap();
        let new = objects.put_bytes(&record(20.0)).unwrap();
        objects.put_bytes(b"{\"orchestrate\":\"tree\",\"format\":1,\"entries\":[]}").unwrap();
        objects.put_bytes(b"model weights").unwrap();
        let mut catalog = Catalog::default();
        let ids: Vec<String> = catalog.runs(&objects).unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![new.clone(), old.clone()]);
        let path = objects.path(&old);
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&path, perms).unwrap();
        std::fs::remove_file(path).unwrap();
        let ids: Vec<String> = catalog.runs(&objects).unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![new]);
    }
}
