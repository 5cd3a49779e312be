//! Rebuilding the index from `objects/`: `verify` (re-hash every object, quarantine corrupt
//! ones, check or repair index entries), opening a store whose index is broken, and the
//! read-only snapshot a verb opens while another process holds the store.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::names::RunName;
use super::{index_path, now_unix, open_db, Manifest, Result, RunRecord, Store, StoreLock, MANIFEST_TAG, RUN_TAG};
use crate::objects::{self, tagged, ObjectStore};

/// What `verify` found and did.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub objects_checked: usize,
    pub bytes_checked: u64,
    /// (digest, path moved to) of objects whose content did not match their name.
    pub corrupt: Vec<(String, String)>,
    /// Index entries whose manifest or outputs are gone (removed when repairing).
    pub dangling: Vec<Dangling>,
    pub index_rebuilt: bool,
    pub manifests_indexed: usize,
    pub runs_indexed: usize,
}

/// An index entry that names a result the store no longer holds whole.
#[derive(Debug, Serialize)]
pub struct Dangling {
    pub key: String,
    /// The stage and pipeline of the result, when its manifest is still there.
    pub stage: Option<String>,
    pub pipeline: Option<String>,
    /// What is gone: `manifest <digest>`, or each missing output by name.
    pub missing: Vec<String>,
}

impl Store {
    /// The index entry `key` → manifest `digest`, if the result is not whole.
    fn dangling(&self, key: String, digest: &str) -> Option<Dangling> {
        let Ok(m) = self.load_manifest(digest) else {
            return Some(Dangling { key, stage: None, pipeline: None, missing: vec![format!("manifest {digest}")] });
        };
        let missing: Vec<String> = (m.outputs.iter())
            .filter(|(_, e)| !self.objects.present(e))
            .map(|(name, e)| format!("output `{name}` ({})", &e.digest[..e.digest.len().min(12)]))
            .collect();
        (!missing.is_empty()).then_some(Dangling { key, stage: Some(m.stage), pipeline: Some(m.pipeline), missing })
    }

    /// The store as its objects say, for a verb that only reads while another process holds
    /// the lock: no lock taken, and an index rebuilt from `objects/` into a temporary sled
    /// (as `verify --repair` rebuilds it), so the holder's index is never opened. Objects are
    /// installed whole and never change, so what is read is consistent; anything written to
    /// the temporary index (the stat cache) is gone when the snapshot drops.
    pub fn open_snapshot(root: &Path) -> Result<Store> {
        let root = &objects::io_ctx(std::path::absolute(root), || format!("resolving {}", root.display()))?;
        // No objects/ folder: a store not made yet, seen as empty.
        let objects = ObjectStore::open_existing(root).unwrap_or_else(|| ObjectStore::absent(root));
        let db = sled::Config::new().temporary(true).flush_every_ms(None).open()?;
        let store = Self::assemble(root, objects, db, None)?;
        store.rebuild_index(&mut VerifyReport::default())?;
        Ok(store)
    }

    /// Re-hash every object; quarantine corrupt ones; check index entries; optionally rebuild
    /// the index from the manifests and run records found in `objects/`.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let quarantine = self.root.join("quarantine");
        for (name, path) in self.objects.list()? {
            report.objects_checked += 1;
            let (actual, size) = objects::hash_file(&path).unwrap_or_default();
            report.bytes_checked += size;
            if actual != name {
                objects::io_ctx(fs::create_dir_all(&quarantine), || format!("creating {}", quarantine.display()))?;
                let dest = quarantine.join(format!("{name}.{}", (now_unix() * 1000.0) as u64));
                objects::io_ctx(fs::rename(&path, &dest), || format!("quarantining {}", path.display()))?;
                report.corrupt.push((name, dest.display().to_string()));
            }
        }
        if repair {
            self.rebuild_index(&mut report)?;
        }
        for kv in self.cache.iter() {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).into_owned();
            if let Some(d) = self.dangling(key, &String::from_utf8_lossy(&v)) {
                report.dangling.push(d);
                if repair {
                    self.cache.remove(k)?;
                }
            }
        }
        if report.index_rebuilt {
            // What the index holds once the dangling entries are gone.
            report.manifests_indexed = self.cache.len();
        }
        self.flush()?;
        Ok(report)
    }

    fn rebuild_index(&self, report: &mut VerifyReport) -> Result<()> {
        self.cache.clear()?;
        self.last.clear()?;
        self.runs.clear()?;
        self.names.clear()?;
        let mut namings: HashMap<String, (f64, String)> = HashMap::new();
        let mut by_key: HashMap<String, (f64, String)> = HashMap::new();
        let mut by_stage: HashMap<Vec<u8>, (f64, String)> = HashMap::new();
        for (name, path) in self.objects.list()? {
            let mut head = [0u8; 32];
            let n = File::open(&path).and_then(|mut f| f.read(&mut head)).unwrap_or(0);
            if !head[..n].starts_with(b"{\"orchestrate\":\"") {
                continue;
            }
            let Ok(bytes) = fs::read(&path) else { continue };
            if let Some(m) = tagged::<Manifest>(&bytes, MANIFEST_TAG) {
                let newer = |e: &(f64, String)| m.started_at > e.0;
                if by_key.get(&m.key).is_none_or(newer) {
                    by_key.insert(m.key.clone(), (m.started_at, name.clone()));
                }
                let lk = Self::last_key(&m.pipeline, &m.stage);
                if by_stage.get(&lk).is_none_or(newer) {
                    by_stage.insert(lk, (m.started_at, name.clone()));
                }
            } else if let Some(r) = tagged::<RunRecord>(&bytes, RUN_TAG) {
                self.runs.insert(((r.started_at * 1e9) as u128).to_be_bytes(), name.as_bytes())?;
                report.runs_indexed += 1;
            } else if let Some(n) = RunName::parse(&bytes) {
                if namings.get(&n.run).is_none_or(|e| n.at > e.0) {
                    namings.insert(n.run.clone(), (n.at, name.clone()));
                }
            }
        }
        for (run, (_, d)) in &namings {
            self.names.insert(run.as_bytes(), d.as_bytes())?;
        }
        for (k, (_, d)) in &by_key {
            self.cache.insert(k.as_bytes(), d.as_bytes())?;
        }
        for (k, (_, d)) in by_stage {
            self.last.insert(k, d.as_bytes())?;
        }
        report.manifests_indexed = by_key.len();
        report.index_rebuilt = true;
        Ok(())
    }
}

/// Open the store's index when it cannot be opened normally: move the broken index aside.
pub fn open_for_repair(root: &Path, wait: bool) -> Result<(Store, Option<PathBuf>)> {
    objects::io_ctx(fs::create_dir_all(root), || format!("creating store {}", root.display()))?;
    let root = &objects::io_ctx(std::path::absolute(root), || format!("resolving {}", root.display()))?;
    let lock = StoreLock::acquire(root, "verify --repair", wait)?;
    let objects = ObjectStore::open(root)?;
    match open_db(root) {
        Ok(db) => Ok((Store::assemble(root, objects, db, Some(lock))?, None)),
        Err(_) => {
            let aside = root.join("quarantine").join(format!("index.sled.{}", (now_unix() * 1000.0) as u64));
            objects::io_ctx(fs::create_dir_all(root.join("quarantine")), || "creating quarantine".into())?;
            objects::io_ctx(fs::rename(index_path(root), &aside), || "moving the broken index aside".into())?;
            let db = open_db(root)?;
            Ok((Store::assemble(root, objects, db, Some(lock))?, Some(aside)))
        }
    }
}
