//! Moving blobs between the local store and a remote: existence checks, streamed and hashed
//! downloads, uploads (multipart for large files), and the per-result pull and push.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use super::runs::{RunsPulled, RunsPushed};
use super::{Remote, RemoteError, Result, CHECKS_IN_FLIGHT, TRANSFERS_IN_FLIGHT};
use crate::objects::{hash_bytes, is_digest, Entry, ObjKind, ObjectStore};
use crate::store::{Manifest, Store, MANIFEST_TAG};

/// Files up to this size are uploaded in one request; larger ones in parts of at least this
/// size, read from disk as they go, so memory stays bounded whatever the file's size.
const PART: usize = 8 << 20;
/// S3 allows at most 10,000 parts per upload.
const MAX_PARTS: u64 = 9_000;
/// Parts of one file in flight at once.
const PARTS_IN_FLIGHT: usize = 2;
/// Manifests and trees are read whole; anything bigger than this is not one of ours.
const SMALL_LIMIT: u64 = 256 << 20;

/// Progress and byte counts of one push or pull, shared by its concurrent transfers.
pub struct Transfer {
    bar: ProgressBar,
    bytes: AtomicU64,
    blobs: AtomicU64,
}

impl Transfer {
    /// `show`: draw a bar on stderr (only if it is a terminal).
    pub fn new(verb: &str, show: bool) -> Transfer {
        let target = if show { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = ProgressBar::with_draw_target(Some(0), target);
        let style = ProgressStyle::with_template(&format!(
            "{verb:>8} [{{bar:30}}] {{bytes}}/{{total_bytes}}  {{bytes_per_sec}}  {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style.progress_chars("=> "));
        Transfer { bar, bytes: AtomicU64::new(0), blobs: AtomicU64::new(0) }
    }

    fn expect(&self, bytes: u64) {
        self.bar.inc_length(bytes);
    }

    fn moved(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.bar.inc(bytes);
    }

    fn blob_done(&self) {
        self.blobs.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes and blobs moved so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.bytes.load(Ordering::Relaxed), self.blobs.load(Ordering::Relaxed))
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// What a push did.
#[derive(Debug, Default, Serialize)]
pub struct PushReport {
    pub results: usize,
    /// Results whose `ac/` entry already named the same manifest: nothing to check or send.
    pub already: usize,
    /// `ac/` entries written by this push.
    pub published: usize,
    pub blobs_checked: usize,
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    /// One line per blob or entry that could not be sent.
    pub errors: Vec<String>,
    /// Manifests whose result the remote holds after this push (its `ac/` entry names them).
    #[serde(skip)]
    pub on_remote: HashSet<String>,
    /// What the push did with run history (absent with `--no-runs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs: Option<RunsPushed>,
}

/// What a pull did.
#[derive(Debug, Default, Serialize)]
pub struct PullReport {
    /// Stage (or key) → `pulled`, `local` (already here), `absent` (not on the remote),
    /// `failed` (on it, but a blob was corrupt or unreadable: see `errors`) or `blocked` (its
    /// key follows from an upstream result that is neither here nor pulled).
    pub results: BTreeMap<String, String>,
    pub blobs_downloaded: u64,
    pub bytes_downloaded: u64,
    /// One line per result that could not be pulled.
    pub errors: Vec<String>,
    /// What the pull did with run history (absent with `--no-runs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs: Option<RunsPulled>,
}

/// (digest, size) of each blob a result is made of.
type Blobs = Vec<(String, u64)>;

/// A blob to download: its entry and what it is, for messages (`train.best/config.json`).
pub(super) type Wanted = (Entry, String);

fn file_entry(digest: &str, size: u64) -> Entry {
    Entry { digest: digest.to_string(), kind: ObjKind::File, size }
}

/// The blobs a stored result is made of besides its manifest: outputs, log, run description.
pub(super) fn roots(m: &Manifest) -> Vec<Wanted> {
    let mut out: Vec<Wanted> = (m.outputs.iter()).map(|(o, e)| (e.clone(), format!("{}.{o}", m.stage))).collect();
    // Sizes of the log and run description are not recorded; 0 means "unknown" below.
    out.extend(m.log.iter().map(|d| (file_entry(d, 0), format!("{} log", m.stage))));
    out.extend(m.run_description.iter().map(|d| (file_entry(d, 0), format!("{} run description", m.stage))));
    out
}

impl Remote {
    /// The key is not there. S3 answers a bucket that does not exist with a 404 too; that one
    /// is an error to report, not a miss.
    pub(super) fn not_found(e: &object_store::Error) -> bool {
        matches!(e, object_store::Error::NotFound { .. }) && !e.to_string().contains("NoSuchBucket")
    }

    /// One read before any transfer, so a remote that cannot be used is reported once, with
    /// what to do, rather than once per result or blob: a key no result has must come back
    /// "not found", not "no such bucket", refused credentials or no answer.
    pub async fn probe(&self) -> Result<()> {
        let path = Self::ac("orchestrate-probe");
        match self.store.get(&path).await {
            Ok(_) => Ok(()),
            Err(e) if Self::not_found(&e) => Ok(()),
            Err(e) => Err(self.transfer_error("reading", &path, e)),
        }
    }

    /// The digest of the manifest cached under `key` on the remote, if any.
    pub async fn lookup(&self, key: &str) -> Result<Option<String>> {
        let path = Self::ac(key);
        let Some(digest) = self.read_entry(&path).await? else { return Ok(None) };
        if !is_digest(&digest) {
            return Err(RemoteError::Invalid {
                path: path.to_string(),
                why: "it does not hold a blake3 digest".into(),
            });
        }
        Ok(Some(digest))
    }

    /// The text an entry (`ac/`, `runs/`, `names/`) holds, trimmed; `None` if it is not there.
    pub(super) async fn read_entry(&self, path: &ObjPath) -> Result<Option<String>> {
        let got = match self.store.get(path).await {
            Ok(g) => g,
            Err(e) if Self::not_found(&e) => return Ok(None),
            Err(e) => return Err(self.transfer_error("reading", path, e)),
        };
        let bytes = got.bytes().await.map_err(|e| self.transfer_error("reading", path, e))?;
        Ok(Some(String::from_utf8_lossy(&bytes).trim().to_string()))
    }

    /// Start reading blob `digest`; a missing one is `Missing`, naming `what` it is.
    async fn get_blob(&self, digest: &str, what: &str) -> Result<(ObjPath, object_store::GetResult)> {
        let path = Self::cas(digest);
        match self.store.get(&path).await {
            Ok(g) => Ok((path, g)),
            Err(e) if Self::not_found(&e) => Err(RemoteError::Missing { path: path.to_string(), what: what.into() }),
            Err(e) => Err(self.transfer_error("reading", &path, e)),
        }
    }

    /// A manifest or tree, read whole and hash-checked.
    pub(super) async fn get_small(&self, digest: &str, what: &str) -> Result<Vec<u8>> {
        let (path, got) = self.get_blob(digest, what).await?;
        if got.meta.size > SMALL_LIMIT {
            return Err(RemoteError::Invalid { path: path.to_string(), why: format!("{what} is too large") });
        }
        let bytes = got.bytes().await.map_err(|e| self.transfer_error("reading", &path, e))?.to_vec();
        let actual = hash_bytes(&bytes);
        if actual != digest {
            self.mark_corrupt(digest);
            return Err(RemoteError::Corrupt { path: path.to_string(), what: what.into(), actual });
        }
        Ok(bytes)
    }

    /// The manifest cached under `key` on the remote (digest, manifest, its bytes), without
    /// fetching any output.
    pub async fn manifest(&self, key: &str) -> Result<Option<(String, Manifest, Vec<u8>)>> {
        let Some(digest) = self.lookup(key).await? else { return Ok(None) };
        let bytes = self.get_small(&digest, "manifest").await?;
        let invalid = |why: &str| RemoteError::Invalid { path: Self::cas(&digest).to_string(), why: why.into() };
        let m: Manifest = crate::objects::tagged(&bytes, MANIFEST_TAG).ok_or_else(|| invalid("not a manifest"))?;
        if m.key != key {
            return Err(invalid("it is the manifest of another cache key"));
        }
        Ok(Some((digest, m, bytes)))
    }

    /// Download the result cached under `key` into the local store and index it there.
    /// `Ok(None)`: the remote does not have it. A blob that is missing or corrupt on the remote
    /// is an error, and nothing of the result is indexed locally.
    pub async fn fetch(&self, local: &Store, key: &str, t: &Transfer) -> Result<Option<(String, Manifest)>> {
        let Some((digest, m, bytes)) = self.manifest(key).await? else { return Ok(None) };
        self.download_result(local, &m, &bytes, t).await?;
        local.adopt(&digest, &m)?;
        Ok(Some((digest, m)))
    }

    /// Download the result whose manifest is blob `digest` (a past run's: its key's `ac/`
    /// entry may name a newer one) into the local store, and index it where the store has no
    /// result of its key yet (`Store::adopt_past`).
    pub async fn fetch_manifest(&self, local: &Store, digest: &str, t: &Transfer) -> Result<Manifest> {
        let bytes = self.get_small(digest, "manifest").await?;
        let m: Manifest = crate::objects::tagged(&bytes, MANIFEST_TAG).ok_or_else(|| RemoteError::Invalid {
            path: Self::cas(digest).to_string(),
            why: "it is not a manifest".into(),
        })?;
        self.download_result(local, &m, &bytes, t).await?;
        local.adopt_past(digest, &m)?;
        Ok(m)
    }

    /// A result's blobs, then its manifest (`bytes`), into the local store.
    async fn download_result(&self, local: &Store, m: &Manifest, bytes: &[u8], t: &Transfer) -> Result<()> {
        self.download_all(&local.objects, roots(m), t).await?;
        local.objects.put_bytes(bytes)?;
        // The manifest is a blob too, counted as push counts it.
        t.moved(bytes.len() as u64);
        t.blob_done();
        Ok(())
    }

    /// Download every blob under `level` (trees level by level) that the local store lacks.
    async fn download_all(&self, local: &ObjectStore, mut level: Vec<Wanted>, t: &Transfer) -> Result<()> {
        while !level.is_empty() {
            // A blob named twice in a level (a training stage's `best` and `model` are often one
            // tree) would be fetched twice at once, since neither copy is local yet.
            let mut seen = HashSet::new();
            level.retain(|(e, _)| seen.insert(e.digest.clone()));
            t.expect(level.iter().filter(|(e, _)| !local.has(&e.digest)).map(|(e, _)| e.size).sum());
            let next: Vec<Result<Vec<Wanted>>> = stream::iter(level)
                .map(|(e, what)| self.download_one(local, e, what, t))
                .buffer_unordered(TRANSFERS_IN_FLIGHT)
                .collect()
                .await;
            level = Vec::new();
            for r in next {
                level.extend(r?);
            }
        }
        Ok(())
    }

    /// One blob; for a tree, its entries are returned to be downloaded next.
    async fn download_one(&self, local: &ObjectStore, e: Entry, what: String, t: &Transfer) -> Result<Vec<Wanted>> {
        match e.kind {
            ObjKind::File => {
                if !local.has(&e.digest) {
                    self.download_file(local, &e.digest, &what, t).await?;
                }
                Ok(Vec::new())
            }
            ObjKind::Tree => {
                if !local.has(&e.digest) {
                    let bytes = self.get_small(&e.digest, &what).await?;
                    local.put_bytes(&bytes)?;
                    // Counted as push counts it, and as `expect` announced it.
                    t.moved(bytes.len() as u64);
                    t.blob_done();
                }
                let tree = local.read_tree(&e.digest, &what)?;
                Ok(tree
                    .entries
                    .into_iter()
                    .map(|c| {
                        let what = format!("{what}/{}", c.name);
                        (Entry { digest: c.digest, kind: c.kind, size: c.size }, what)
                    })
                    .collect())
            }
        }
    }

    /// Stream a file blob into `tmp/`, hashing as it comes; install it only if the hash matches.
    async fn download_file(&self, local: &ObjectStore, digest: &str, what: &str, t: &Transfer) -> Result<()> {
        let (path, got) = self.get_blob(digest, what).await?;
        let staged = local.tmp_path("pull");
        let written = self.stream_to(got.into_stream(), &staged, &path, t).await;
        let outcome = match written {
            Ok(actual) if actual == digest => local.install_verified(&staged, digest).map_err(RemoteError::from),
            Ok(actual) => {
                self.mark_corrupt(digest);
                Err(RemoteError::Corrupt { path: path.to_string(), what: what.into(), actual })
            }
            Err(e) => Err(e),
        };
        if outcome.is_err() {
            let _ = std::fs::remove_file(&staged);
        }
        t.blob_done();
        outcome
    }

    /// Write a byte stream to `dest`; the blake3 of what was written.
    async fn stream_to(
        &self,
        mut body: futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
        dest: &std::path::Path,
        path: &ObjPath,
        t: &Transfer,
    ) -> Result<String> {
        let local_err = |e: std::io::Error| {
            RemoteError::from(crate::objects::ObjectError::Io {
                context: format!("writing {}", dest.display()),
                source: e,
            })
        };
        let mut out = tokio::fs::File::create(dest).await.map_err(local_err)?;
        let mut h = blake3::Hasher::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.transfer_error("reading", path, e))?;
            h.update(&chunk);
            out.write_all(&chunk).await.map_err(local_err)?;
            t.moved(chunk.len() as u64);
        }
        out.flush().await.map_err(local_err)?;
        Ok(h.finalize().to_hex().to_string())
    }

    /// Whether the remote has a blob of this size (a known-corrupt one counts as absent, and
    /// every one when repairing: a damaged blob can have the right size).
    async fn has_blob(&self, digest: &str, size: u64) -> Result<bool> {
        if self.repair || self.known_corrupt(digest) {
            return Ok(false);
        }
        let path = Self::cas(digest);
        match self.store.head(&path).await {
            Ok(meta) => Ok(meta.size == size),
            Err(e) if Self::not_found(&e) => Ok(false),
            Err(e) => Err(self.transfer_error("checking", &path, e)),
        }
    }

    /// Upload one local blob, checking its hash on the way so a corrupt local object is never
    /// sent.
    async fn upload(&self, local: &ObjectStore, digest: &str, size: u64, t: &Transfer) -> Result<()> {
        let path = Self::cas(digest);
        if size as usize <= PART {
            let bytes = local.read_verified(digest, "blob")?;
            let n = bytes.len() as u64;
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map_err(|e| self.transfer_error("writing", &path, e))?;
            t.moved(n);
        } else {
            self.upload_parts(local, digest, size, &path, t).await?;
        }
        t.blob_done();
        Ok(())
    }

    async fn upload_parts(
        &self,
        local: &ObjectStore,
        digest: &str,
        size: u64,
        path: &ObjPath,
        t: &Transfer,
    ) -> Result<()> {
        let file = local.path(digest);
        let io = |e: std::io::Error| {
            RemoteError::from(crate::objects::ObjectError::Io {
                context: format!("reading {}", file.display()),
                source: e,
            })
        };
        let mut f = File::open(&file).map_err(io)?;
        let upload = self.store.put_multipart(path).await.map_err(|e| self.transfer_error("writing", path, e))?;
        let part = PART.max(size.div_ceil(MAX_PARTS) as usize);
        let mut w = WriteMultipart::new_with_chunk_size(upload, part);
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match f.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(io(e));
                }
            };
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                return Err(self.transfer_error("writing", path, e));
            }
            w.write(&buf[..n]);
            t.moved(n as u64);
        }
        let actual = h.finalize().to_hex().to_string();
        if actual != digest {
            let _ = w.abort().await;
            return Err(
                crate::objects::ObjectError::Corrupt { digest: digest.into(), what: "blob".into(), actual }.into()
            );
        }
        w.finish().await.map_err(|e| self.transfer_error("writing", path, e))?;
        Ok(())
    }

    /// Every blob a local result needs on the remote: (digest, size), manifest included.
    fn blobs_of(local: &Store, digest: &str) -> Result<Blobs> {
        let bytes = local.objects.read_verified(digest, "manifest")?;
        let m: Manifest = crate::objects::tagged(&bytes, MANIFEST_TAG)
            .ok_or_else(|| crate::objects::ObjectError::Invalid(format!("object {digest} is not a manifest")))?;
        let mut out = vec![(digest.to_string(), bytes.len() as u64)];
        let mut level: Vec<Wanted> = roots(&m);
        while let Some((e, what)) = level.pop() {
            let size = match e.kind {
                ObjKind::File if e.size > 0 => e.size,
                _ => std::fs::metadata(local.objects.path(&e.digest)).map(|m| m.len()).map_err(|_| {
                    crate::objects::ObjectError::Missing { digest: e.digest.clone(), what: what.clone() }
                })?,
            };
            if e.kind == ObjKind::Tree {
                let tree = local.objects.read_tree(&e.digest, &what)?;
                level.extend(tree.entries.into_iter().map(|c| {
                    let what = format!("{what}/{}", c.name);
                    (Entry { digest: c.digest, kind: c.kind, size: c.size }, what)
                }));
            }
            out.push((e.digest, size));
        }
        Ok(out)
    }

    /// The results whose `ac/` entry does not already name their manifest, with their blobs.
    async fn not_yet_pushed<'r>(
        &self,
        local: &Store,
        results: &'r [(String, String)],
        report: &mut PushReport,
    ) -> Result<Vec<(&'r String, &'r String, Blobs)>> {
        if self.repair {
            return results.iter().map(|(k, d)| Ok((k, d, Self::blobs_of(local, d)?))).collect();
        }
        let current: Vec<_> = stream::iter(results)
            .map(|(key, digest)| async move { (key, digest, self.lookup(key).await) })
            .buffer_unordered(CHECKS_IN_FLIGHT)
            .collect()
            .await;
        let mut todo = Vec::new();
        for (key, digest, on_remote) in current {
            match on_remote {
                Ok(Some(d)) if d == *digest && !self.known_corrupt(&d) => {
                    report.already += 1;
                    report.on_remote.insert(d);
                }
                Ok(_) => todo.push((key, digest, Self::blobs_of(local, digest)?)),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        Ok(todo)
    }

    /// Upload what the local results `(key, manifest digest)` need, then their `ac/` entries.
    /// Blobs already on the remote are not sent again (with [`Remote::repair`], every blob is);
    /// an entry is written only once every blob of its result is there.
    pub async fn push(&self, local: &Store, results: &[(String, String)], t: &Transfer) -> Result<PushReport> {
        self.probe().await?;
        let mut report = PushReport { results: results.len(), ..Default::default() };
        let todo = self.not_yet_pushed(local, results, &mut report).await?;
        let mut wanted: Vec<(String, u64)> = todo.iter().flat_map(|(_, _, b)| b.iter().cloned()).collect();
        wanted.sort();
        wanted.dedup();
        report.blobs_checked = wanted.len();
        let checks: Vec<_> = stream::iter(wanted)
            .map(|(d, size)| async move {
                let has = self.has_blob(&d, size).await;
                (d, size, has)
            })
            .buffer_unordered(CHECKS_IN_FLIGHT)
            .collect()
            .await;
        let mut missing = Vec::new();
        // Blobs that are not known to be on the remote after this push: no entry may name them.
        let mut failed: HashSet<String> = HashSet::new();
        for (d, size, has) in checks {
            match has {
                Ok(true) => {}
                Ok(false) => missing.push((d, size)),
                Err(e) => {
                    report.errors.push(e.to_string());
                    failed.insert(d);
                }
            }
        }
        t.expect(missing.iter().map(|(_, s)| *s).sum());
        let uploads: Vec<_> = stream::iter(missing)
            .map(|(d, size)| async move {
                let r = self.upload(&local.objects, &d, size, t).await;
                (d, r)
            })
            .buffer_unordered(TRANSFERS_IN_FLIGHT)
            .collect()
            .await;
        for (d, r) in uploads {
            if let Err(e) = r {
                report.errors.push(e.to_string());
                failed.insert(d);
            }
        }
        for (key, digest, blobs) in todo {
            if blobs.iter().any(|(d, _)| failed.contains(d)) {
                continue;
            }
            let path = Self::ac(key);
            match self.store.put(&path, PutPayload::from(digest.clone().into_bytes())).await {
                Ok(_) => {
                    report.published += 1;
                    report.on_remote.insert(digest.clone());
                }
                Err(e) => report.errors.push(self.transfer_error("writing", &path, e).to_string()),
            }
        }
        (report.bytes_uploaded, report.blobs_uploaded) = t.totals();
        Ok(report)
    }

    /// Every cache key the remote has an `ac/` entry for.
    pub async fn keys(&self) -> Result<Vec<String>> {
        self.listed("ac").await
    }
}
