//! The store: objects + a sled index + a single-writer lock.
//!
//! sled holds only the index (cache key → manifest digest, last manifest per stage, run
//! records, runs' newest namings, a stat cache for input files). Manifests, run records and
//! namings are objects too, so the whole index can be rebuilt from `objects/` (`orchestrate
//! verify --repair`).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

mod gc;
pub mod names;
mod repair;

pub use gc::GcReport;
pub use repair::{open_for_repair, VerifyReport};

use crate::cache_key::{FileDigests, KeyInput};
use crate::objects::{self, tagged, Entry, ObjKind, ObjectError, ObjectStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("the store {path} is in use by {holder}")]
    Locked { path: PathBuf, holder: String },
    #[error("the index {path} cannot be opened: {message}")]
    Index { path: PathBuf, message: String },
    #[error("index write failed: {0}")]
    Sled(#[from] sled::Error),
}

pub type Result<T> = std::result::Result<T, StoreError>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub orchestrate: String,
    pub format: u32,
    pub pipeline: String,
    pub stage: String,
    pub key: String,
    pub key_input: KeyInput,
    pub outputs: BTreeMap<String, Entry>,
    pub metrics: BTreeMap<String, Value>,
    pub deterministic: bool,
    pub threads: u32,
    /// Unix seconds.
    pub started_at: f64,
    pub duration_s: f64,
    pub cpu_s: f64,
    pub peak_rss_bytes: u64,
    /// Digest of the stage's captured stdout+stderr.
    pub log: Option<String>,
    /// Digest of the run description the stage was handed (`Stage::wants_run_description`); not
    /// part of the key, kept so `replay` can hand the stage the same file.
    #[serde(default, alias = "run_metadata", skip_serializing_if = "Option::is_none")]
    pub run_description: Option<String>,
    /// Absent in manifests written before provenance was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// Where and by what a result was computed, recorded with it (`show` prints it, reports cite it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// orchestrate's version.
    pub orchestrate: String,
    /// The git commit the binary was built from, and whether the tree had uncommitted changes.
    pub commit: Option<String>,
    pub dirty: bool,
    pub rustc: String,
    /// The CPU model, core count and SIMD flags of the machine that ran the stage.
    pub cpu: Option<String>,
    pub cores: u64,
    pub cpu_flags: Vec<String>,
    /// The SIMD code the stage's kernels ran (the stage's `simd_path` metric), if it says.
    pub simd_path: Option<String>,
    /// Where the stage ran when not on the coordinator's machine: `slurm job 42 on node03`
    /// (the CPU fields above then describe that node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran_on: Option<String>,
}

impl Provenance {
    /// This binary on this machine; `simd_path` as the stage reported it.
    pub fn here(simd_path: Option<String>) -> Provenance {
        static HOST: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
        Provenance::on(HOST.get_or_init(stage_api::host::describe), simd_path)
    }

    /// This binary on the machine `host` describes (`stage_api::host::describe`).
    pub fn on(host: &Value, simd_path: Option<String>) -> Provenance {
        let commit = env!("ORCHESTRATE_GIT_COMMIT");
        Provenance {
            orchestrate: env!("CARGO_PKG_VERSION").into(),
            commit: (!commit.is_empty()).then(|| commit.to_string()),
            dirty: env!("ORCHESTRATE_GIT_DIRTY") == "true",
            rustc: env!("ORCHESTRATE_RUSTC").into(),
            cpu: host["cpu"].as_str().map(str::to_string),
            cores: host["cores"].as_u64().unwrap_or(0),
            cpu_flags: host["simd"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str())
                .map(str::to_string)
                .collect(),
            simd_path,
            ran_on: None,
        }
    }

    /// Whether `other` ran on the same CPU and SIMD code: floating-point results from either
    /// should then be the same bytes.
    pub fn same_kernels(&self, other: &Provenance) -> bool {
        self.cpu == other.cpu && self.cpu_flags == other.cpu_flags && self.simd_path == other.simd_path
    }

    /// The machine in a few words: `Intel Xeon … (2 cores; avx2 fma avx512_vnni)`.
    pub fn machine(&self) -> String {
        format!("{} ({} cores; {})", self.cpu.as_deref().unwrap_or("unknown CPU"), self.cores, self.cpu_flags.join(" "))
    }

    /// The build in a few words: `orchestrate 0.1.0, commit 0041932abcde (dirty), rustc 1.95.0`.
    pub fn build(&self) -> String {
        let commit = match &self.commit {
            Some(c) => {
                format!(", commit {}{}", &c[..c.len().min(12)], if self.dirty { " (uncommitted changes)" } else { "" })
            }
            None => String::new(),
        };
        format!("orchestrate {}{commit}, {}", self.orchestrate, self.rustc)
    }
}

pub const MANIFEST_TAG: &str = "manifest";

/// The machine's host name (Linux), as the kernel has it.
pub fn hostname() -> Option<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_string()).filter(|n| !n.is_empty())
}

/// `user@host` of this process (`$USER`, else `$LOGNAME`), or what of it is known.
pub fn user_at_host() -> Option<String> {
    let user = ["USER", "LOGNAME"].iter().find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()));
    match (user, hostname()) {
        (Some(u), Some(h)) => Some(format!("{u}@{h}")),
        (u, h) => u.or(h),
    }
}

#[cfg(test)]
impl Manifest {
    /// A stored result for tests: `key_input`'s key, these outputs, no metrics or provenance.
    pub(crate) fn for_test(pipeline: &str, stage: &str, key_input: KeyInput, outputs: BTreeMap<String, Entry>) -> Self {
        Manifest {
            orchestrate: MANIFEST_TAG.into(),
            format: 1,
            pipeline: pipeline.into(),
            stage: stage.into(),
            key: key_input.key(),
            key_input,
            outputs,
            metrics: BTreeMap::new(),
            deterministic: true,
            threads: 1,
            started_at: 1.0,
            duration_s: 0.1,
            cpu_s: 0.0,
            peak_rss_bytes: 0,
            log: None,
            run_description: None,
            provenance: None,
        }
    }
}
pub const RUN_TAG: &str = "run";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub orchestrate: String,
    pub format: u32,
    pub pipeline: String,
    pub pipeline_file: String,
    pub started_at: f64,
    pub finished_at: f64,
    pub status: String,
    /// Stage → manifest digest, for every stage that is done (ran or cached).
    pub manifests: BTreeMap<String, String>,
    /// The `--set` overrides the run was given. Absent in records older than run history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<String>,
    /// The stages `--target` limited the run to (with what they need); empty: every stage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// The stages that executed in this run (the rest of `manifests` were reused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran: Option<Vec<String>>,
    /// The stages downloaded from a remote cache in this run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pulled: Vec<String>,
    /// The pipeline's `metrics:` declarations when it ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<crate::pipeline::metrics::MetricDecl>,
    /// The name the run was given (`run --name`, or later `orchestrate name`: then set when the
    /// record is read); `compare` and the web view take it for the run that took it last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The revision of the pipeline file's git repository when the run started. Absent outside
    /// a repository, and in run records written before runs kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<crate::source::SourceRev>,
    /// The binary and machine that ran the run (each stage's own is in its manifest).
    /// Absent in run records written before provenance was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
    /// Every stage the run considered, in the order it took them: how it ended and which
    /// stages it reads from (the graph `dag` prints), so a view can draw the run as it was.
    /// Absent in run records written before runs kept it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<RunStage>,
    /// Who ran it and where, `user@host`: runs travel between stores (`push`, `pull`). Absent
    /// in run records written before runs kept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// When `name` was given after the run (`orchestrate name`; see [`names`]), not stored here.
    #[serde(skip)]
    pub renamed_at: Option<f64>,
}

/// One stage in a [`RunRecord`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunStage {
    pub name: String,
    /// `ran`, `cached`, `pulled`, `failed`, `skipped` or `cancelled`.
    pub status: String,
    /// The stages whose outputs it reads.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last lines of a failed stage's log (a failed stage stores no manifest or log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
}

impl RunRecord {
    /// Whether `--target` left `stage` out of this run (so its absence says nothing of the
    /// pipeline).
    pub fn left_out(&self, stage: &str) -> bool {
        !self.targets.is_empty() && !self.stages.iter().any(|s| s.name == stage)
    }

    /// `--target A --target B`, as the run was limited.
    pub fn targets_shown(&self) -> String {
        self.targets.iter().map(|t| format!("--target {t}")).collect::<Vec<_>>().join(" ")
    }
}

impl RunStage {
    /// Whether the run ended the stage with a result (it ran, was cached or was pulled).
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "ran" | "cached" | "pulled")
    }
}

/// The manifest stored as object `digest`. Objects never change once written, so this needs
/// neither the index nor the lock (`orchestrate ui` reads a store a run is writing).
pub fn load_manifest(objects: &ObjectStore, digest: &str) -> Result<Manifest> {
    let bytes = objects.read_verified(digest, "manifest")?;
    tagged::<Manifest>(&bytes, MANIFEST_TAG)
        .ok_or_else(|| StoreError::Object(ObjectError::Invalid(format!("object {digest} is not a manifest"))))
}

/// The run record stored as object `digest`, if it is one.
pub fn load_run(objects: &ObjectStore, digest: &str) -> Option<RunRecord> {
    tagged::<RunRecord>(&objects.read_verified(digest, "run record").ok()?, RUN_TAG)
}

pub fn now_unix() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// `2026-11-27T03:04:05Z` from unix seconds (UTC), without a date crate.
pub fn iso8601(unix: f64) -> String {
    let secs = unix.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Holds `<store>/LOCK` with an exclusive flock for as long as it lives.
pub struct StoreLock {
    _file: File,
}

fn describe_holder(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => format!(
            "`orchestrate {}` (pid {}) since {}",
            v["command"].as_str().unwrap_or("?"),
            v["pid"],
            v["since"].as_str().unwrap_or("?")
        ),
        Err(_) => "another orchestrate process".to_string(),
    }
}

impl StoreLock {
    pub fn acquire(root: &Path, command: &str, wait: bool) -> Result<StoreLock> {
        let path = root.join("LOCK");
        let mut file = objects::io_ctx(
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path),
            || format!("opening {}", path.display()),
        )?;
        // SAFETY: flock on a file descriptor we own; no memory is touched.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = describe_holder(&text);
            if !wait {
                return Err(StoreError::Locked { path: root.to_path_buf(), holder });
            }
            eprintln!("waiting for the store {} held by {holder} ...", root.display());
            // SAFETY: as above; blocking variant.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc != 0 {
                return Err(StoreError::Object(ObjectError::Io {
                    context: format!("locking {}", path.display()),
                    source: std::io::Error::last_os_error(),
                }));
            }
        }
        let info = serde_json::json!({"pid": std::process::id(), "command": command, "since": iso8601(now_unix())});
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = file.write_all(info.to_string().as_bytes());
        let _ = file.sync_data();
        Ok(StoreLock { _file: file })
    }
}

pub struct Store {
    pub objects: std::sync::Arc<ObjectStore>,
    pub root: PathBuf,
    db: sled::Db,
    cache: sled::Tree,
    last: sled::Tree,
    runs: sled::Tree,
    /// Names given to runs later: run id → its newest naming's digest ([`names`]).
    names: sled::Tree,
    stat: sled::Tree,
    /// Copies of outputs placed outside `objects/` (`deliver`): destination → digest.
    delivered: sled::Tree,
    /// `None` for a snapshot ([`Store::open_snapshot`]), which holds no lock.
    _lock: Option<StoreLock>,
}

#[derive(Serialize, Deserialize)]
struct StatEntry {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    digest: String,
}

/// `path` made absolute with its existing part's symbolic links resolved (the rest need not
/// exist yet); `.` and `..` are taken lexically first.
fn resolved(dest: &Path) -> Option<PathBuf> {
    let mut path = PathBuf::new();
    for c in std::path::absolute(dest).ok()?.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                path.pop();
            }
            other => path.push(other),
        }
    }
    let mut existing = path.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = fs::canonicalize(existing) {
            return Some(rest.iter().rev().fold(real, |p, c| p.join(c)));
        }
        rest.push(existing.file_name()?.to_owned());
        existing = existing.parent()?;
    }
}

pub fn index_path(root: &Path) -> PathBuf {
    root.join("index.sled")
}

fn open_db(root: &Path) -> Result<sled::Db> {
    let path = index_path(root);
    // We flush at every commit ourselves; sled's background flusher would only add a thread.
    sled::Config::new()
        .path(&path)
        .flush_every_ms(None)
        .open()
        .map_err(|e| StoreError::Index { path, message: e.to_string() })
}

impl Store {
    /// Open (creating if needed) the store at `root`, taking the writer lock.
    pub fn open(root: &Path, command: &str, wait: bool) -> Result<Store> {
        if root.exists() && !root.is_dir() {
            let e = std::io::Error::new(std::io::ErrorKind::NotADirectory, "a store is a folder, and this is a file");
            objects::io_ctx::<()>(Err(e), || format!("opening the store {} (--store takes a folder)", root.display()))?;
        }
        objects::io_ctx(fs::create_dir_all(root), || format!("creating store {}", root.display()))?;
        // Stages run in scratch folders, so every path handed to them must be absolute.
        let root = &objects::io_ctx(std::path::absolute(root), || format!("resolving {}", root.display()))?;
        let lock = StoreLock::acquire(root, command, wait)?;
        let objects = ObjectStore::open(root)?;
        let db = open_db(root)?;
        Self::assemble(root, objects, db, Some(lock))
    }

    fn assemble(root: &Path, objects: ObjectStore, db: sled::Db, lock: Option<StoreLock>) -> Result<Store> {
        Ok(Store {
            cache: db.open_tree("cache")?,
            last: db.open_tree("last")?,
            runs: db.open_tree("runs")?,
            names: db.open_tree("names")?,
            stat: db.open_tree("stat")?,
            delivered: db.open_tree("delivered")?,
            db,
            objects: std::sync::Arc::new(objects),
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// Remove leftovers of runs that were killed; we hold the lock so none of it is live.
    pub fn clean_tmp(&self) {
        if let Ok(rd) = fs::read_dir(self.objects.tmp_dir()) {
            for e in rd.flatten() {
                let p = e.path();
                let _ = if p.is_dir() { remove_dir_all_writable(&p) } else { fs::remove_file(&p) };
            }
        }
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn last_key(pipeline: &str, stage: &str) -> Vec<u8> {
        format!("{pipeline}\0{stage}").into_bytes()
    }

    pub fn load_manifest(&self, digest: &str) -> Result<Manifest> {
        load_manifest(&self.objects, digest)
    }

    /// The manifest cached under `key`, if it and every output are present.
    pub fn lookup(&self, key: &str) -> Result<Option<(String, Manifest)>> {
        let Some(d) = self.cache.get(key.as_bytes())? else { return Ok(None) };
        let digest = String::from_utf8_lossy(&d).into_owned();
        let m = match self.load_manifest(&digest) {
            Ok(m) => m,
            Err(_) => return Ok(None),
        };
        if m.key != key || !m.outputs.values().all(|e| self.objects.present(e)) {
            return Ok(None);
        }
        Ok(Some((digest, m)))
    }

    /// The last manifest recorded for a stage of a pipeline (for `plan`'s "why" and `show`).
    pub fn last_manifest(&self, pipeline: &str, stage: &str) -> Option<Manifest> {
        let d = self.last.get(Self::last_key(pipeline, stage)).ok()??;
        self.load_manifest(&String::from_utf8_lossy(&d)).ok()
    }

    /// Commit a finished stage: manifest object, then index entries, then flush.
    pub fn commit(&self, m: &Manifest) -> Result<String> {
        let bytes = serde_json::to_vec(m).map_err(|e| ObjectError::Invalid(e.to_string()))?;
        let digest = self.objects.put_bytes(&bytes)?;
        self.cache.insert(m.key.as_bytes(), digest.as_bytes())?;
        self.last.insert(Self::last_key(&m.pipeline, &m.stage), digest.as_bytes())?;
        self.flush()?;
        Ok(digest)
    }

    /// Make the stored manifest `digest` the last result of `stage` in `pipeline` (a cache hit).
    pub fn set_last(&self, pipeline: &str, stage: &str, digest: &str) -> Result<()> {
        self.last.insert(Self::last_key(pipeline, stage), digest.as_bytes())?;
        Ok(())
    }

    /// Index a manifest that is already an object (fetched from a remote, its outputs present).
    pub fn adopt(&self, digest: &str, m: &Manifest) -> Result<()> {
        self.cache.insert(m.key.as_bytes(), digest.as_bytes())?;
        self.last.insert(Self::last_key(&m.pipeline, &m.stage), digest.as_bytes())?;
        self.flush()
    }

    /// Index a past run's result (pulled with its run): under its key only if the store has
    /// no result of that key (a nondeterministic stage may have two), and as its stage's last
    /// only if the stage has none — so `plan` keeps explaining against what ran here.
    pub fn adopt_past(&self, digest: &str, m: &Manifest) -> Result<()> {
        if self.cache.get(m.key.as_bytes())?.is_none() {
            self.cache.insert(m.key.as_bytes(), digest.as_bytes())?;
        }
        let last = Self::last_key(&m.pipeline, &m.stage);
        if self.last.get(&last)?.is_none() {
            self.last.insert(last, digest.as_bytes())?;
        }
        self.flush()
    }

    /// Every cached result in the index: (cache key, manifest digest), by key.
    pub fn results(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for kv in self.cache.iter() {
            let (k, v) = kv?;
            out.push((String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    pub fn record_run(&self, r: &RunRecord) -> Result<String> {
        let bytes = serde_json::to_vec(r).map_err(|e| ObjectError::Invalid(e.to_string()))?;
        let digest = self.objects.put_bytes(&bytes)?;
        let k = ((r.started_at * 1e9) as u128).to_be_bytes();
        self.runs.insert(k, digest.as_bytes())?;
        self.flush()?;
        Ok(digest)
    }

    /// Index a run record made elsewhere (`pull`), given its bytes: filed by its start like
    /// the store's own, one nanosecond later if a run of this store started at that instant.
    pub fn adopt_run(&self, bytes: &[u8], r: &RunRecord) -> Result<String> {
        let digest = self.objects.put_bytes(bytes)?;
        let mut at = (r.started_at * 1e9) as u128;
        while let Some(held) = self.runs.get(at.to_be_bytes())? {
            if *held == *digest.as_bytes() {
                return Ok(digest);
            }
            at += 1;
        }
        self.runs.insert(at.to_be_bytes(), digest.as_bytes())?;
        self.flush()?;
        Ok(digest)
    }

    /// The ids of the runs this store has a record of.
    pub fn run_ids(&self) -> std::collections::HashSet<String> {
        self.runs.iter().flatten().map(|(_, v)| String::from_utf8_lossy(&v).into_owned()).collect()
    }

    /// Digest of an input file, reusing the last hash when size, times and inode are unchanged
    /// and the file was not modified within a second of that hash (mtime granularity).
    pub fn input_digest(&self, path: &Path) -> Result<Entry> {
        let meta = objects::io_ctx(fs::metadata(path), || format!("stat {}", path.display()))?;
        if !meta.is_file() {
            return Ok(objects::digest_path(path)?);
        }
        let key = path.to_string_lossy().into_owned().into_bytes();
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        let ctime_ns = i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec());
        if let Ok(Some(v)) = self.stat.get(&key) {
            if let Ok(s) = serde_json::from_slice::<StatEntry>(&v) {
                if s.size == meta.len() && s.mtime_ns == mtime_ns && s.ctime_ns == ctime_ns && s.ino == meta.ino() {
                    return Ok(Entry { digest: s.digest, kind: ObjKind::File, size: s.size });
                }
            }
        }
        let (digest, size) = objects::hash_file(path)?;
        let now_ns = (now_unix() * 1e9) as i128;
        if now_ns - mtime_ns.max(ctime_ns) > 1_000_000_000 {
            let s = StatEntry { size, mtime_ns, ctime_ns, ino: meta.ino(), digest: digest.clone() };
            if let Ok(b) = serde_json::to_vec(&s) {
                let _ = self.stat.insert(key, b);
            }
        }
        Ok(Entry { digest, kind: ObjKind::File, size })
    }

    /// The store's own folder that `dest` lies in, if any: objects, the index, scratch,
    /// quarantine and the final outputs' copies are written by orchestrate alone (a file put
    /// in `objects/` is taken for a corrupt object). Symbolic links are followed as far as
    /// `dest` exists.
    pub fn managed_folder_of(&self, dest: &Path) -> Option<PathBuf> {
        let root = fs::canonicalize(&self.root).ok()?;
        let dest = resolved(dest)?;
        ["objects", "index.sled", "tmp", "quarantine", "outputs"]
            .iter()
            .map(|f| root.join(f))
            .find(|f| dest.starts_with(f))
    }

    /// Copy a stored output to `to` (a new path; its parent folders are created). `what`
    /// names the output in errors, e.g. `train.best`.
    pub fn export(&self, entry: &Entry, to: &Path, what: &str) -> std::result::Result<(), String> {
        if let Some(folder) = self.managed_folder_of(to) {
            return Err(format!(
                "{} is inside the store's {}, which only orchestrate writes; export somewhere outside it",
                to.display(),
                folder.display()
            ));
        }
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        if to.exists() {
            return Err(format!("{} already exists; remove it or pick another destination", to.display()));
        }
        self.objects.materialize(entry, to, what).map_err(|e| format!("exporting {what}: {e}"))
    }

    /// The digest last copied to `dest` by `deliver`, if orchestrate put something there.
    pub fn delivered(&self, dest: &Path) -> Option<String> {
        let v = self.delivered.get(dest.as_os_str().as_encoded_bytes()).ok()??;
        Some(String::from_utf8_lossy(&v).into_owned())
    }

    /// Record that `dest` now holds a copy of `digest`.
    pub fn record_delivered(&self, dest: &Path, digest: &str) -> Result<()> {
        self.delivered.insert(dest.as_os_str().as_encoded_bytes(), digest.as_bytes())?;
        self.flush()
    }

    /// Run records, newest first.
    pub fn runs(&self) -> Vec<(String, RunRecord)> {
        let mut out = Vec::new();
        for kv in self.runs.iter().rev().flatten() {
            let d = String::from_utf8_lossy(&kv.1).into_owned();
            if let Some(mut r) = load_run(&self.objects, &d) {
                if let Some((_, n)) = self.naming(&d) {
                    n.apply(&mut r);
                }
                out.push((d, r));
            }
        }
        out
    }
}

impl FileDigests for Store {
    fn file_digest(&self, path: &Path) -> std::result::Result<Entry, String> {
        self.input_digest(path).map_err(|e| e.to_string())
    }
}

/// `remove_dir_all` that first makes read-only folders writable (stage outputs may be 0555).
pub fn remove_dir_all_writable(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if fs::remove_dir_all(p).is_ok() {
        return Ok(());
    }
    if let Ok(rd) = fs::read_dir(p) {
        let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o755));
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let _ = remove_dir_all_writable(&e.path());
            }
        }
    }
    fs::remove_dir_all(p)
}

#[cfg(test)]
mod tests;
