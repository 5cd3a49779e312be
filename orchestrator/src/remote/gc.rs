//! `gc --remote`: delete from a remote cache what its newest runs and its named runs do not use.
//!
//! As the store's gc, a remote keeps the results of the newest N runs of its history and of the
//! run each name means, and lets the rest go: `ac/` entries, run and naming entries, blobs.
//! Whatever was written within a grace period stays, with everything it needs — a push in
//! flight uploads its blobs before its entries, and results pushed without a run (`push
//! --no-runs`) live that long. Entries are deleted before blobs, so a gc that stops half-way
//! never leaves an entry naming a deleted blob.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::Serialize;

use super::transfer::roots;
use super::{Remote, RemoteError, Result, CHECKS_IN_FLIGHT};
use crate::objects::{tagged, ObjKind};
use crate::store::names::name_holders;
use crate::store::{Manifest, RunRecord, MANIFEST_TAG};

/// What a remote gc did (or, dry, would do).
#[derive(Debug, Default, Serialize)]
pub struct RemoteGcReport {
    pub runs_kept: usize,
    /// Of the kept runs, those kept for a name alone (older than the newest N).
    pub named_kept: usize,
    pub runs_removed: usize,
    /// `ac/`, `runs/` and `names/` entries removed.
    pub entries_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    pub blobs_kept: usize,
    /// Blobs kept only for being written, or named by an entry written, within the grace period.
    pub recent_kept: usize,
}

/// Everything on the remote, by kind: path and metadata.
#[derive(Default)]
struct Listing {
    ac: Vec<ObjectMeta>,
    runs: Vec<ObjectMeta>,
    names: Vec<ObjectMeta>,
    cas: Vec<ObjectMeta>,
}

/// What was written after this many seconds since the epoch is young: it stays.
struct Young(f64);

impl Young {
    fn holds(&self, meta: &ObjectMeta) -> bool {
        meta.last_modified.timestamp() as f64 > self.0
    }
}

fn name_of(meta: &ObjectMeta) -> String {
    meta.location.filename().unwrap_or_default().to_string()
}

impl Remote {
    async fn list_all(&self) -> Result<Listing> {
        let mut listing = self.store.list(None);
        let mut all = Listing::default();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.transfer_error("listing", &ObjPath::from(""), e))?;
            let first = meta.location.parts().next().map(|p| p.as_ref().to_string()).unwrap_or_default();
            match first.as_str() {
                "ac" => all.ac.push(meta),
                "runs" => all.runs.push(meta),
                "names" => all.names.push(meta),
                "cas" => all.cas.push(meta),
                _ => {}
            }
        }
        Ok(all)
    }

    /// The small blob `digest` (a record, a manifest, a tree), if the remote has it.
    async fn read_kept(&self, digest: &str, what: &str) -> Result<Option<Vec<u8>>> {
        match self.get_small(digest, what).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(RemoteError::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Add manifest `digest` and every blob its result is made of to `keep` (trees read from
    /// the remote); a manifest the remote lacks adds only itself.
    async fn keep_result(&self, digest: &str, keep: &mut HashSet<String>) -> Result<()> {
        if !keep.insert(digest.to_string()) {
            return Ok(());
        }
        let Some(bytes) = self.read_kept(digest, "manifest").await? else { return Ok(()) };
        let Some(m) = tagged::<Manifest>(&bytes, MANIFEST_TAG) else { return Ok(()) };
        let mut level = roots(&m);
        while let Some((e, what)) = level.pop() {
            if !keep.insert(e.digest.clone()) || e.kind != ObjKind::Tree {
                continue;
            }
            let Some(bytes) = self.read_kept(&e.digest, &what).await? else { continue };
            let tree: crate::objects::Tree = serde_json::from_slice(&bytes)
                .map_err(|err| RemoteError::Invalid { path: Self::cas(&e.digest).to_string(), why: err.to_string() })?;
            level.extend(tree.entries.into_iter().map(|c| {
                let what = format!("{what}/{}", c.name);
                (crate::objects::Entry { digest: c.digest, kind: c.kind, size: c.size }, what)
            }));
        }
        Ok(())
    }

    /// Delete what the newest `keep_last` runs and the named runs do not use, and what is
    /// older than `grace`; with `dry_run`, only count it.
    pub async fn gc(&self, keep_last: usize, grace: Duration, dry_run: bool) -> Result<RemoteGcReport> {
        self.probe().await?;
        let mut errors = Vec::new();
        let h = self.history(&mut errors).await?;
        if let Some(first) = errors.first() {
            return Err(RemoteError::Setup(format!(
                "the remote's run history cannot be read whole, so what its runs use is not known; nothing was \
                 deleted: {first}"
            )));
        }
        let all = self.list_all().await?;
        // Seconds since the epoch: the remote's clock stamps what it stores, ours sets the bound.
        let young = Young(crate::store::now_unix() - grace.as_secs_f64());
        let mut report = RemoteGcReport::default();
        let (mut keep, kept_ids) = self.kept_by_runs(&h.runs, keep_last, &mut report).await?;
        let used = keep.clone();
        self.keep_young_runs(&all.runs, &h.runs, &young, &mut keep).await?;
        let mut doomed = self.sort_ac(all.ac, &young, &mut keep).await?;
        for meta in all.runs.iter().filter(|m| !kept_ids.contains(&name_of(m)) && !young.holds(m)) {
            report.runs_removed += 1;
            doomed.push(meta.location.clone());
        }
        // A naming stays if it is young or names a kept run.
        for meta in &all.names {
            let digest = name_of(meta);
            let run = h.namings.get(&digest).map(|(_, n)| n.run.as_str());
            if young.holds(meta) || run.is_some_and(|r| kept_ids.contains(r)) {
                keep.insert(digest);
            } else {
                doomed.push(meta.location.clone());
            }
        }
        report.entries_removed = doomed.len();
        let mut blobs: Vec<ObjPath> = Vec::new();
        for meta in &all.cas {
            let digest = name_of(meta);
            if keep.contains(&digest) || young.holds(meta) {
                report.blobs_kept += 1;
                report.recent_kept += usize::from(!used.contains(&digest));
            } else {
                report.blobs_removed += 1;
                report.bytes_freed += meta.size;
                blobs.push(meta.location.clone());
            }
        }
        if !dry_run {
            // Entries first: no entry may outlive a blob it names.
            self.delete_all(doomed).await?;
            self.delete_all(blobs).await?;
        }
        Ok(report)
    }

    /// The newest `keep_last` runs and the run each name means: every blob they use, and
    /// their ids.
    async fn kept_by_runs(
        &self,
        runs: &[(String, RunRecord)],
        keep_last: usize,
        report: &mut RemoteGcReport,
    ) -> Result<(HashSet<String>, HashSet<String>)> {
        let holders = name_holders(runs);
        let kept: Vec<&(String, RunRecord)> = (runs.iter().enumerate())
            .filter(|(i, (id, _))| *i < keep_last || holders.contains(id.as_str()))
            .map(|(_, r)| r)
            .collect();
        report.runs_kept = kept.len();
        report.named_kept = kept.len().saturating_sub(keep_last.min(runs.len()));
        let mut keep = HashSet::new();
        for (id, r) in &kept {
            keep.insert(id.clone());
            for d in r.manifests.values() {
                self.keep_result(d, &mut keep).await?;
            }
        }
        Ok((keep, kept.iter().map(|(id, _)| id.clone()).collect()))
    }

    /// Runs pushed within the grace period keep their records and results (`runs`: the
    /// history already read).
    async fn keep_young_runs(
        &self,
        entries: &[ObjectMeta],
        runs: &[(String, RunRecord)],
        young: &Young,
        keep: &mut HashSet<String>,
    ) -> Result<()> {
        for meta in entries.iter().filter(|m| young.holds(m)) {
            let id = name_of(meta);
            for (_, r) in runs.iter().filter(|(run, _)| *run == id) {
                for d in r.manifests.values() {
                    self.keep_result(d, keep).await?;
                }
            }
            keep.insert(id);
        }
        Ok(())
    }

    /// An `ac/` entry stays if it is young or names a kept result, and what it names stays
    /// with it; the others are returned, to delete.
    async fn sort_ac(&self, ac: Vec<ObjectMeta>, young: &Young, keep: &mut HashSet<String>) -> Result<Vec<ObjPath>> {
        let digests: Vec<(ObjectMeta, Result<String>)> = stream::iter(ac)
            .map(|meta| async move {
                let d = self.read_entry(&meta.location).await.map(Option::unwrap_or_default);
                (meta, d)
            })
            .buffer_unordered(CHECKS_IN_FLIGHT)
            .collect()
            .await;
        let (mut named, mut doomed) = (BTreeSet::new(), Vec::new());
        for (meta, digest) in digests {
            let digest = digest?;
            if young.holds(&meta) || keep.contains(&digest) {
                named.insert(digest);
            } else {
                doomed.push(meta.location);
            }
        }
        for digest in &named {
            self.keep_result(digest, keep).await?;
        }
        Ok(doomed)
    }

    async fn delete_all(&self, paths: Vec<ObjPath>) -> Result<()> {
        let done: Vec<Result<()>> = stream::iter(paths)
            .map(|path| async move {
                match self.store.delete(&path).await {
                    Ok(()) => Ok(()),
                    Err(e) if Self::not_found(&e) => Ok(()),
                    Err(e) => Err(self.transfer_error("deleting", &path, e)),
                }
            })
            .buffer_unordered(CHECKS_IN_FLIGHT)
            .collect()
            .await;
        done.into_iter().collect()
    }
}
