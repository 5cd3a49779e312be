//! Run history through a remote: the run records (`runs`, `compare`, the web view) and the
//! names given to runs after they ran travel with the results, so a teammate can compare
//! against a run made on another machine.
//!
//! Layout: a record is a blob like any other (`cas/<run id>`, the id being its digest), listed
//! by an entry `runs/<run id>` written after the blob; a naming is `cas/<digest>` listed by
//! `names/<digest>`. A run is pushed only once every result it names is on the remote (its
//! `ac/` entry names that very manifest), and pulled only once every one is in the local
//! store: a shared run never names a result its reader cannot have.

use std::collections::{BTreeMap, HashSet};

use futures::stream::{self, StreamExt};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};
use serde::Serialize;

use super::{Remote, RemoteError, Result, CHECKS_IN_FLIGHT, TRANSFERS_IN_FLIGHT};
use crate::history::{resolve_in, short};
use crate::objects::{is_digest, tagged};
use crate::store::names::{apply_names, RunName};
use crate::store::{Manifest, RunRecord, Store, MANIFEST_TAG, RUN_TAG};

/// What a push did with run history.
#[derive(Debug, Default, Serialize)]
pub struct RunsPushed {
    /// Records this push put on the remote.
    pub shared: usize,
    /// Records the remote had already.
    pub already: usize,
    /// Namings (`orchestrate name`) this push put on the remote.
    pub names: usize,
    /// One line per run left local: a result it names is not on the remote.
    pub not_shared: Vec<String>,
}

/// What a pull did with run history.
#[derive(Debug, Default, Serialize)]
pub struct RunsPulled {
    /// Records this pull added to the store.
    pub pulled: usize,
    /// Records on the remote (of this pipeline) that name a result the store does not hold.
    pub waiting: usize,
    /// Namings taken: newer than the store's own for their run.
    pub names: usize,
    /// `pull --run`: the id of the run pulled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

/// What pushing one run did.
enum Shared {
    /// Left local: why.
    Not(String),
    /// Its record went up now; `named`: and its naming.
    Now { named: bool },
    /// The remote had its record.
    Before { named: bool },
}

/// The remote's run history, read whole.
pub(super) struct History {
    /// Newest first, named as the remote's namings say.
    pub(super) runs: Vec<(String, RunRecord)>,
    /// Each record's bytes, by run id.
    records: BTreeMap<String, Vec<u8>>,
    /// Each naming with its bytes, by its digest.
    pub(super) namings: BTreeMap<String, (Vec<u8>, RunName)>,
}

fn run_entry(id: &str) -> ObjPath {
    ObjPath::from(format!("runs/{id}"))
}

fn name_entry(digest: &str) -> ObjPath {
    ObjPath::from(format!("names/{digest}"))
}

impl Remote {
    /// Whether the remote has an entry at `path`.
    async fn has_entry(&self, path: &ObjPath) -> Result<bool> {
        match self.store.head(path).await {
            Ok(_) => Ok(true),
            Err(e) if Self::not_found(&e) => Ok(false),
            Err(e) => Err(self.transfer_error("checking", path, e)),
        }
    }

    /// Upload local object `digest` (`what` it is, for messages), then the entry listing it.
    async fn publish(&self, local: &Store, digest: &str, entry: &ObjPath, what: &str) -> Result<()> {
        let bytes = local.objects.read_verified(digest, what)?;
        let blob = Self::cas(digest);
        let put = |path: ObjPath, body: Vec<u8>| async move {
            self.store.put(&path, PutPayload::from(body)).await.map_err(|e| self.transfer_error("writing", &path, e))
        };
        put(blob, bytes).await?;
        put(entry.clone(), digest.as_bytes().to_vec()).await?;
        Ok(())
    }

    /// Of the manifests `runs` name, those whose result is on the remote. `known`: manifests
    /// this push just found or put there; the others are looked up by their cache key.
    async fn results_on_remote(
        &self,
        local: &Store,
        runs: &[(String, RunRecord)],
        known: &HashSet<String>,
    ) -> Result<HashSet<String>> {
        let mut ask: Vec<&String> = runs.iter().flat_map(|(_, r)| r.manifests.values()).collect();
        ask.retain(|d| !known.contains(*d));
        ask.sort();
        ask.dedup();
        let answers: Vec<Result<Option<String>>> = stream::iter(ask)
            .map(|digest| async move {
                let Ok(m) = local.load_manifest(digest) else { return Ok(None) };
                Ok(self.lookup(&m.key).await?.filter(|on| on == digest))
            })
            .buffer_unordered(CHECKS_IN_FLIGHT)
            .collect()
            .await;
        let mut on_remote = known.clone();
        for a in answers {
            on_remote.extend(a?);
        }
        Ok(on_remote)
    }

    /// Share `runs` (id, record) whose results are all on the remote, with their namings. A
    /// run that cannot be shared for an error adds a line to `errors`; the others still go.
    pub async fn push_runs(
        &self,
        local: &Store,
        runs: &[(String, RunRecord)],
        known: &HashSet<String>,
        errors: &mut Vec<String>,
    ) -> Result<RunsPushed> {
        let on_remote = &self.results_on_remote(local, runs, known).await?;
        let outcomes: Vec<Result<Shared>> = stream::iter(runs)
            .map(|(id, r)| self.share_run(local, id, r, on_remote))
            // In order: the lines of runs left local read newest first, as `runs` lists them.
            .buffered(CHECKS_IN_FLIGHT)
            .collect()
            .await;
        let mut report = RunsPushed::default();
        for ((id, _), outcome) in runs.iter().zip(outcomes) {
            match outcome {
                Ok(Shared::Not(why)) => report.not_shared.push(why),
                Ok(Shared::Now { named }) => {
                    report.shared += 1;
                    report.names += usize::from(named);
                }
                Ok(Shared::Before { named }) => {
                    report.already += 1;
                    report.names += usize::from(named);
                }
                Err(e) => errors.push(format!("run {}: {e}", short(id))),
            }
        }
        Ok(report)
    }

    /// Share one run, if every result it names is in `on_remote`, and its newest naming.
    async fn share_run(&self, local: &Store, id: &str, r: &RunRecord, on_remote: &HashSet<String>) -> Result<Shared> {
        if let Some((stage, _)) = r.manifests.iter().find(|(_, d)| !on_remote.contains(*d)) {
            let (run, pipeline) = (short(id), &r.pipeline);
            return Ok(Shared::Not(format!(
                "run {run} ({pipeline}): the result of stage `{stage}` is not on the remote"
            )));
        }
        let entry = run_entry(id);
        let before = !self.repair && self.has_entry(&entry).await?;
        if !before {
            self.publish(local, id, &entry, "run record").await?;
        }
        let mut named = false;
        if let Some((digest, _)) = local.naming(id) {
            let entry = name_entry(&digest);
            if self.repair || !self.has_entry(&entry).await? {
                self.publish(local, &digest, &entry, "run name").await?;
                named = true;
            }
        }
        Ok(if before { Shared::Before { named } } else { Shared::Now { named } })
    }

    /// The digests listed under `prefix/` (`ac`: cache keys; `runs`, `names`), sorted.
    pub(super) async fn listed(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = ObjPath::from(prefix);
        let mut listing = self.store.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.transfer_error("listing", &prefix, e))?;
            out.extend(meta.location.filename().filter(|n| is_digest(n)).map(str::to_string));
        }
        out.sort();
        Ok(out)
    }

    /// The blobs `digests` (each `what`), read and hash-checked; one error line per failure.
    async fn blobs(&self, digests: Vec<String>, what: &str, errors: &mut Vec<String>) -> BTreeMap<String, Vec<u8>> {
        let got: Vec<(String, Result<Vec<u8>>)> = stream::iter(digests)
            .map(|d| async move {
                let r = self.get_small(&d, what).await;
                (d, r)
            })
            .buffer_unordered(TRANSFERS_IN_FLIGHT)
            .collect()
            .await;
        let mut out = BTreeMap::new();
        for (d, r) in got {
            match r {
                Ok(bytes) => {
                    out.insert(d, bytes);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        out
    }

    /// Take the remote's runs (of `pipeline`, if given) whose results the store holds, and the
    /// namings of the store's runs. A record or naming that cannot be read (corrupt, not one)
    /// adds a line to `errors` and is left out.
    pub async fn pull_runs(
        &self,
        local: &Store,
        pipeline: Option<&str>,
        errors: &mut Vec<String>,
    ) -> Result<RunsPulled> {
        let mut report = RunsPulled::default();
        let mut mine = local.run_ids();
        let new: Vec<String> = self.listed("runs").await?.into_iter().filter(|id| !mine.contains(id)).collect();
        for (id, bytes) in self.blobs(new, "run record", errors).await {
            let Some(r) = tagged::<RunRecord>(&bytes, RUN_TAG) else {
                let why = "it is not a run record".to_string();
                errors.push(RemoteError::Invalid { path: Self::cas(&id).to_string(), why }.to_string());
                continue;
            };
            if pipeline.is_some_and(|p| p != r.pipeline) {
                continue;
            }
            if !r.manifests.values().all(|d| local.objects.has(d)) {
                report.waiting += 1;
                continue;
            }
            local.adopt_run(&bytes, &r)?;
            mine.insert(id);
            report.pulled += 1;
        }
        let new: Vec<String> = self.listed("names").await?.into_iter().filter(|d| !local.objects.has(d)).collect();
        for (digest, bytes) in self.blobs(new, "run name", errors).await {
            match RunName::parse(&bytes) {
                Some(n) if mine.contains(&n.run) => report.names += usize::from(local.adopt_naming(&bytes, &n)?),
                Some(_) => {}
                None => {
                    let why = "it is not a run name".to_string();
                    errors.push(RemoteError::Invalid { path: Self::cas(&digest).to_string(), why }.to_string());
                }
            }
        }
        Ok(report)
    }

    /// Every run on the remote, newest first, with the remote's namings applied. Unreadable
    /// records and namings add a line to `errors`.
    pub(super) async fn history(&self, errors: &mut Vec<String>) -> Result<History> {
        let records = self.blobs(self.listed("runs").await?, "run record", errors).await;
        let mut runs: Vec<(String, RunRecord)> = Vec::new();
        for (id, bytes) in &records {
            match tagged::<RunRecord>(bytes, RUN_TAG) {
                Some(r) => runs.push((id.clone(), r)),
                None => errors.push(format!("remote blob {} is not a run record", Self::cas(id))),
            }
        }
        runs.sort_by(|a, b| b.1.started_at.total_cmp(&a.1.started_at));
        let namings = self.blobs(self.listed("names").await?, "run name", errors).await;
        let namings: BTreeMap<String, (Vec<u8>, RunName)> =
            namings.into_iter().filter_map(|(d, b)| RunName::parse(&b).map(|n| (d, (b, n)))).collect();
        apply_names(&mut runs, namings.values().map(|(_, n)| n));
        Ok(History { runs, records, namings })
    }

    /// `runs --remote`: the remote's runs, newest first, named as its namings say. Unreadable
    /// records and namings add a line to `errors`.
    pub async fn list_runs(&self, errors: &mut Vec<String>) -> Result<Vec<(String, RunRecord)>> {
        Ok(self.history(errors).await?.runs)
    }

    /// The manifests `digests`, read and hash-checked but not stored: what `runs --remote
    /// --metric` reads of runs whose results are not here. One error line per failure.
    pub async fn read_manifests(&self, digests: Vec<String>, errors: &mut Vec<String>) -> BTreeMap<String, Manifest> {
        let mut out = BTreeMap::new();
        for (digest, bytes) in self.blobs(digests, "manifest", errors).await {
            match tagged::<Manifest>(&bytes, MANIFEST_TAG) {
                Some(m) => {
                    out.insert(digest, m);
                }
                None => {
                    let why = "it is not a manifest".to_string();
                    errors.push(RemoteError::Invalid { path: Self::cas(&digest).to_string(), why }.to_string());
                }
            }
        }
        out
    }

    /// `pull --run SPEC`: the run SPEC names among the remote's (`latest~N`, a name, an id
    /// prefix), with every result it names — the very manifests it recorded, whatever the
    /// `ac/` entries name now. Returns the run's id and, per stage, `pulled` or `local`.
    pub async fn pull_run(
        &self,
        local: &Store,
        spec: &str,
        t: &super::Transfer,
        errors: &mut Vec<String>,
    ) -> Result<(String, BTreeMap<String, String>)> {
        let h = self.history(errors).await?;
        let place = format!("the remote {}", self.shown);
        let (id, r) = resolve_in(&h.runs, spec, &place).map_err(RemoteError::Setup)?;
        let mut results = BTreeMap::new();
        for (stage, digest) in &r.manifests {
            let status = if local.objects.has(digest) {
                "local"
            } else {
                self.fetch_manifest(local, digest, t).await?;
                "pulled"
            };
            results.insert(stage.clone(), status.to_string());
        }
        // Only now, with every result in: the run never names what the store lacks.
        if let Some(bytes) = h.records.get(id) {
            local.adopt_run(bytes, r)?;
        }
        for (bytes, n) in h.namings.values().filter(|(_, n)| n.run == *id) {
            local.adopt_naming(bytes, n)?;
        }
        Ok((id.clone(), results))
    }
}
