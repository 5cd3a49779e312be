//! `gc`: delete what the last runs did not use — objects, their index entries, and cluster
//! jobs' leftover scratch folders.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use serde::Serialize;

use super::names::name_holders;
use super::{remove_dir_all_writable, Result, Store};
use crate::objects;

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub runs_kept: usize,
    /// Of `runs_kept`, those older than the last N, kept because a name means them (the run
    /// that took each name last, by `run --name` or `orchestrate name`).
    pub named_kept: usize,
    /// Older run records removed: they leave the history (`orchestrate runs`).
    pub runs_removed: usize,
    pub objects_kept: usize,
    pub objects_removed: usize,
    /// Cluster jobs' scratch folders removed (`slurm/`: results no run committed).
    pub scratch_removed: usize,
    pub bytes_freed: u64,
}

impl Store {
    /// Cluster jobs' scratch folders (`slurm/`). Only a run holding this store's lock has live
    /// jobs, and gc holds it, so every folder there is what a run that is gone left: a result
    /// a later cluster run could have adopted, or a job's partial work. A job still running
    /// there is cancelled by the next cluster run, not by gc.
    fn gc_cluster_scratch(&self, report: &mut GcReport, dry_run: bool) -> Result<()> {
        let dir = self.root.join("slurm");
        let Ok(entries) = fs::read_dir(&dir) else { return Ok(()) };
        for e in entries.flatten() {
            let path = e.path();
            report.scratch_removed += 1;
            report.bytes_freed += tree_bytes(&path);
            if !dry_run {
                objects::io_ctx(remove_dir_all_writable(&path), || format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Keep what the last `keep_last` runs used, and what the run each name means used (with
    /// its naming), which `compare NAME` reads; delete every other object and index entry.
    pub fn gc(&self, keep_last: usize, dry_run: bool) -> Result<GcReport> {
        let runs = self.runs();
        let mut keep: HashSet<String> = HashSet::new();
        let mut kept_manifests: HashSet<String> = HashSet::new();
        let holders = name_holders(&runs);
        let mut named_kept = 0;
        for (i, (d, r)) in runs.iter().enumerate() {
            // The run a name means keeps its results.
            let named = holders.contains(d.as_str());
            if i >= keep_last && !named {
                continue;
            }
            named_kept += usize::from(i >= keep_last);
            keep.insert(d.clone());
            keep.extend(self.naming(d).map(|(digest, _)| digest));
            for md in r.manifests.values() {
                kept_manifests.insert(md.clone());
            }
        }
        for md in &kept_manifests {
            keep.insert(md.clone());
            if let Ok(m) = self.load_manifest(md) {
                for e in m.outputs.values() {
                    self.objects.reachable(e, &mut keep);
                }
                keep.extend(m.log.iter().chain(&m.run_description).cloned());
            }
        }
        let runs_kept = runs.len().min(keep_last) + named_kept;
        let mut report = GcReport { runs_kept, named_kept, runs_removed: runs.len() - runs_kept, ..Default::default() };
        for (name, path) in self.objects.list()? {
            if keep.contains(&name) {
                report.objects_kept += 1;
                continue;
            }
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            report.objects_removed += 1;
            report.bytes_freed += size;
            if !dry_run {
                objects::io_ctx(fs::remove_file(&path), || format!("removing {}", path.display()))?;
            }
        }
        self.gc_cluster_scratch(&mut report, dry_run)?;
        if !dry_run {
            for tree in [&self.cache, &self.last] {
                for kv in tree.iter() {
                    let (k, v) = kv?;
                    if !kept_manifests.contains(&*String::from_utf8_lossy(&v)) {
                        tree.remove(k)?;
                    }
                }
            }
            for kv in self.runs.iter() {
                let (k, v) = kv?;
                if !keep.contains(&*String::from_utf8_lossy(&v)) {
                    self.runs.remove(k)?;
                }
            }
            for kv in self.names.iter() {
                let (k, _) = kv?;
                if !keep.contains(&*String::from_utf8_lossy(&k)) {
                    self.names.remove(k)?;
                }
            }
            self.flush()?;
        }
        Ok(report)
    }
}

/// Bytes of the files under `path` (symbolic links not followed).
fn tree_bytes(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path).into_iter().flatten().flatten().map(|e| tree_bytes(&e.path())).sum()
}
