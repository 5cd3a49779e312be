//! Immutable, content-addressed objects: `objects/<2 hex>/<64 hex blake3>`.
//!
//! Files are stored as-is; a directory is a tree object (canonical JSON listing its entries).
//! Every write goes tmp → fsync → rename → fsync(dir), so a crash leaves nothing or a whole object.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("object {digest} ({what}) is corrupt: its content hashes to {actual}")]
    Corrupt { digest: String, what: String, actual: String },
    #[error("object {digest} ({what}) is missing from the store")]
    Missing { digest: String, what: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ObjectError>;

pub(crate) fn io_ctx<T>(r: io::Result<T>, context: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|source| ObjectError::Io { context: context(), source })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjKind {
    File,
    Tree,
}

/// One stage output (or input) as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub digest: String,
    #[serde(rename = "type")]
    pub kind: ObjKind,
    /// Total bytes of the file, or of every file under the tree.
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ObjKind,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exec: bool,
}

/// A directory: its entries sorted by name. The first field doubles as a type tag.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub orchestrate: String,
    pub format: u32,
    pub entries: Vec<TreeEntry>,
}

pub const TREE_TAG: &str = "tree";

const BUF: usize = 1 << 20;

/// blake3 of a file's bytes, streaming, and its size.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = io_ctx(File::open(path), || format!("opening {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; BUF];
    let mut size = 0u64;
    loop {
        let n = io_ctx(f.read(&mut buf), || format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((h.finalize().to_hex().to_string(), size))
}

pub fn hash_bytes(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_exec(meta: &fs::Metadata) -> bool {
    meta.permissions().mode() & 0o111 != 0
}

fn validate_entry_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(ObjectError::Invalid(format!("tree entry name `{name}` would escape its folder")));
    }
    Ok(())
}

pub struct ObjectStore {
    pub root: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    counter: AtomicU64,
}

impl ObjectStore {
    pub fn open(root: &Path) -> Result<ObjectStore> {
        let objects = root.join("objects");
        let tmp = root.join("tmp");
        for d in [&objects, &tmp] {
            io_ctx(fs::create_dir_all(d), || format!("creating {}", d.display()))?;
        }
        Ok(ObjectStore { root: root.to_path_buf(), objects, tmp, counter: AtomicU64::new(0) })
    }

    /// An existing store's objects, for reading only: nothing is created.
    pub fn open_existing(root: &Path) -> Option<ObjectStore> {
        let objects = root.join("objects");
        objects.is_dir().then(|| ObjectStore {
            root: root.to_path_buf(),
            objects,
            tmp: root.join("tmp"),
            counter: AtomicU64::new(0),
        })
    }

    /// The objects of a store that does not exist yet: none, and nothing is created.
    pub fn absent(root: &Path) -> ObjectStore {
        ObjectStore {
            root: root.to_path_buf(),
            objects: root.join("objects"),
            tmp: root.join("tmp"),
            counter: AtomicU64::new(0),
        }
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }
    pub fn objects_dir(&self) -> &Path {
        &self.objects
    }

    pub fn path(&self, digest: &str) -> PathBuf {
        self.objects.join(&digest[..2.min(digest.len())]).join(digest)
    }

    pub fn has(&self, digest: &str) -> bool {
        is_digest(digest) && self.path(digest).is_file()
    }

    /// A fresh path under `tmp/` for staging a write.
    pub fn tmp_path(&self, hint: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{hint}-{}-{n}", std::process::id()))
    }

    /// Move a finished file into place (it must live on the same filesystem, under `tmp/`).
    fn install(&self, staged: &Path, digest: &str, sync: bool) -> Result<()> {
        let dest = self.path(digest);
        if dest.exists() {
            let _ = fs::remove_file(staged);
            return Ok(());
        }
        let dir = dest.parent().map(Path::to_path_buf).unwrap_or_else(|| self.objects.clone());
        io_ctx(fs::create_dir_all(&dir), || format!("creating {}", dir.display()))?;
        if sync {
            let f = io_ctx(File::open(staged), || format!("opening {}", staged.display()))?;
            io_ctx(f.sync_all(), || format!("fsync {}", staged.display()))?;
        }
        let mut perm = io_ctx(fs::metadata(staged), || format!("stat {}", staged.display()))?.permissions();
        // Objects are read-only; keep the exec bit so restored programs still run.
        perm.set_mode(if perm.mode() & 0o111 != 0 { 0o555 } else { 0o444 });
        io_ctx(fs::set_permissions(staged, perm), || format!("chmod {}", staged.display()))?;
        // No fsync of the folder: if a crash loses this rename, the index may name an object
        // that is not there, and `Store::lookup` treats that as a miss and recomputes. The
        // file's own fsync above is what guarantees an object never has the wrong bytes.
        io_ctx(fs::rename(staged, &dest), || format!("moving {} into the store", staged.display()))?;
        Ok(())
    }

    /// Install a file staged under `tmp/` whose content the caller has hashed to `digest`.
    pub fn install_verified(&self, staged: &Path, digest: &str) -> Result<()> {
        self.install(staged, digest, true)
    }

    /// Store a manifest, tree or run record. These are only ever read back hash-checked
    /// (`read_verified`), so they skip the fsync: after a crash a torn one reads as missing,
    /// which makes the stage that needs it a cache miss, never wrong data.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<String> {
        let digest = hash_bytes(bytes);
        if self.has(&digest) {
            return Ok(digest);
        }
        let staged = self.tmp_path("obj");
        let mut f = io_ctx(File::create(&staged), || format!("creating {}", staged.display()))?;
        io_ctx(f.write_all(bytes), || format!("writing {}", staged.display()))?;
        drop(f);
        self.install(&staged, &digest, false)?;
        Ok(digest)
    }

    /// Store a file that already sits under `tmp/` by moving it (no copy).
    pub fn put_file_move(&self, path: &Path) -> Result<Entry> {
        let (digest, size) = hash_file(path)?;
        self.install(path, &digest, true)?;
        Ok(Entry { digest, kind: ObjKind::File, size })
    }

    /// Store a file or a directory that sits under `tmp/`, moving its files into place.
    pub fn put_path_move(&self, path: &Path) -> Result<Entry> {
        let meta = io_ctx(fs::symlink_metadata(path), || format!("stat {}", path.display()))?;
        if meta.file_type().is_symlink() {
            return Err(ObjectError::Invalid(format!(
                "{} is a symbolic link; outputs must be regular files or folders",
                path.display()
            )));
        }
        if meta.is_file() {
            return self.put_file_move(path);
        }
        if !meta.is_dir() {
            return Err(ObjectError::Invalid(format!("{} is neither a file nor a folder", path.display())));
        }
        let mut names: Vec<(String, PathBuf)> = Vec::new();
        for e in io_ctx(fs::read_dir(path), || format!("listing {}", path.display()))? {
            let e = io_ctx(e, || format!("listing {}", path.display()))?;
            let name = e
                .file_name()
                .into_string()
                .map_err(|n| ObjectError::Invalid(format!("file name {n:?} in {} is not UTF-8", path.display())))?;
            names.push((name, e.path()));
        }
        names.sort();
        let mut entries = Vec::with_capacity(names.len());
        let mut total = 0;
        for (name, p) in names {
            let exec = fs::symlink_metadata(&p).map(|m| m.is_file() && is_exec(&m)).unwrap_or(false);
            let e = self.put_path_move(&p)?;
            total += e.size;
            entries.push(TreeEntry { name, kind: e.kind, digest: e.digest, size: e.size, exec });
        }
        let tree = Tree { orchestrate: TREE_TAG.into(), format: 1, entries };
        let bytes = serde_json::to_vec(&tree).map_err(|e| ObjectError::Invalid(e.to_string()))?;
        let digest = self.put_bytes(&bytes)?;
        Ok(Entry { digest, kind: ObjKind::Tree, size: total })
    }

    /// Read an object fully, checking its hash.
    pub fn read_verified(&self, digest: &str, what: &str) -> Result<Vec<u8>> {
        let p = self.path(digest);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ObjectError::Missing { digest: digest.into(), what: what.into() })
            }
            Err(e) => return Err(ObjectError::Io { context: format!("reading {}", p.display()), source: e }),
        };
        let actual = hash_bytes(&bytes);
        if actual != digest {
            return Err(ObjectError::Corrupt { digest: digest.into(), what: what.into(), actual });
        }
        Ok(bytes)
    }

    pub fn read_tree(&self, digest: &str, what: &str) -> Result<Tree> {
        let bytes = self.read_verified(digest, what)?;
        let tree: Tree = serde_json::from_slice(&bytes)
            .map_err(|e| ObjectError::Invalid(format!("object {digest} ({what}) is not a tree: {e}")))?;
        for e in &tree.entries {
            validate_entry_name(&e.name)?;
        }
        Ok(tree)
    }

    /// Cheap presence check (no hashing): the object and, for a tree, everything under it.
    pub fn present(&self, entry: &Entry) -> bool {
        match entry.kind {
            ObjKind::File => fs::metadata(self.path(&entry.digest)).map(|m| m.len() == entry.size).unwrap_or(false),
            ObjKind::Tree => match self.read_tree(&entry.digest, "tree") {
                Ok(t) => t
                    .entries
                    .iter()
                    .all(|e| self.present(&Entry { digest: e.digest.clone(), kind: e.kind, size: e.size })),
                Err(_) => false,
            },
        }
    }

    /// Copy an object out to `dest` (a file, or a folder for a tree), hashing as it copies so
    /// a corrupt object is never handed on.
    pub fn materialize(&self, entry: &Entry, dest: &Path, what: &str) -> Result<()> {
        match entry.kind {
            ObjKind::File => {
                let src = self.path(&entry.digest);
                let mut input = match File::open(&src) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(ObjectError::Missing { digest: entry.digest.clone(), what: what.into() })
                    }
                    Err(e) => return Err(ObjectError::Io { context: format!("opening {}", src.display()), source: e }),
                };
                let mut out = io_ctx(File::create(dest), || format!("creating {}", dest.display()))?;
                let mut h = blake3::Hasher::new();
                let mut buf = vec![0u8; BUF];
                loop {
                    let n = io_ctx(input.read(&mut buf), || format!("reading {}", src.display()))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    io_ctx(out.write_all(&buf[..n]), || format!("writing {}", dest.display()))?;
                }
                let actual = h.finalize().to_hex().to_string();
                if actual != entry.digest {
                    drop(out);
                    let _ = fs::remove_file(dest);
                    return Err(ObjectError::Corrupt { digest: entry.digest.clone(), what: what.into(), actual });
                }
                let mode = fs::metadata(&src).map(|m| m.permissions().mode()).unwrap_or(0o444);
                let _ = fs::set_permissions(
                    dest,
                    fs::Permissions::from_mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 }),
                );
                Ok(())
            }
            ObjKind::Tree => {
                let tree = self.read_tree(&entry.digest, what)?;
                io_ctx(fs::create_dir_all(dest), || format!("creating {}", dest.display()))?;
                for e in tree.entries {
                    let child = Entry { digest: e.digest, kind: e.kind, size: e.size };
                    self.materialize(&child, &dest.join(&e.name), &format!("{what}/{}", e.name))?;
                }
                Ok(())
            }
        }
    }

    /// Every digest an entry reaches (itself, and for a tree all descendants).
    pub fn reachable(&self, entry: &Entry, out: &mut std::collections::HashSet<String>) {
        if !out.insert(entry.digest.clone()) {
            return;
        }
        if entry.kind == ObjKind::Tree {
            if let Ok(t) = self.read_tree(&entry.digest, "tree") {
                for e in t.entries {
                    self.reachable(&Entry { digest: e.digest, kind: e.kind, size: e.size }, out);
                }
            }
        }
    }

    /// Every object file as (digest, path); names that are not digests are reported as such.
    pub fn list(&self) -> Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        if !self.objects.exists() {
            return Ok(out);
        }
        for shard in io_ctx(fs::read_dir(&self.objects), || format!("listing {}", self.objects.display()))? {
            let shard = io_ctx(shard, || "listing objects".into())?;
            if !shard.path().is_dir() {
                continue;
            }
            for f in io_ctx(fs::read_dir(shard.path()), || format!("listing {}", shard.path().display()))? {
                let f = io_ctx(f, || "listing objects".into())?;
                out.push((f.file_name().to_string_lossy().into_owned(), f.path()));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Digest of a file or folder outside the store (a `file:` input), with the same tree format
/// as stored trees, without storing anything.
pub fn digest_path(path: &Path) -> Result<Entry> {
    let meta = io_ctx(fs::metadata(path), || format!("stat {}", path.display()))?;
    if meta.is_file() {
        let (digest, size) = hash_file(path)?;
        return Ok(Entry { digest, kind: ObjKind::File, size });
    }
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for e in io_ctx(fs::read_dir(path), || format!("listing {}", path.display()))? {
        let e = io_ctx(e, || format!("listing {}", path.display()))?;
        names.push((e.file_name().to_string_lossy().into_owned(), e.path()));
    }
    names.sort();
    let mut entries = Vec::new();
    let mut total = 0;
    for (name, p) in names {
        let exec = fs::metadata(&p).map(|m| m.is_file() && is_exec(&m)).unwrap_or(false);
        let e = digest_path(&p)?;
        total += e.size;
        entries.push(TreeEntry { name, kind: e.kind, digest: e.digest, size: e.size, exec });
    }
    let tree = Tree { orchestrate: TREE_TAG.into(), format: 1, entries };
    let bytes = serde_json::to_vec(&tree).map_err(|e| ObjectError::Invalid(e.to_string()))?;
    Ok(Entry { digest: hash_bytes(&bytes), kind: ObjKind::Tree, size: total })
}

/// How our tagged JSON objects start: `{"orchestrate":"<tag>"`.
pub fn tag_prefix(tag: &str) -> String {
    format!("{{\"orchestrate\":\"{tag}\"")
}

/// Parse a JSON object only if it carries our tag (`{"orchestrate":"<tag>",...}`).
pub fn tagged<T: for<'de> Deserialize<'de>>(bytes: &[u8], tag: &str) -> Option<T> {
    if !bytes.starts_with(tag_prefix(tag).as_bytes()) {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// `1.5 MiB`, `12 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub type Metrics = BTreeMap<String, serde_json::Value>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_trees_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        let staged = store.tmp_path("t");
        fs::create_dir_all(staged.join("sub")).unwrap();
        fs::write(staged.join("a.txt"), "alpha").unwrap();
        fs::write(staged.join("sub/b.txt"), "beta").unwrap();
        let expected = digest_path(&staged).unwrap();
        let e = store.put_path_move(&staged.join("sub/b.txt")).unwrap();
        assert_eq!(e.digest, hash_bytes(b"beta"));
        fs::write(staged.join("sub/b.txt"), "beta").unwrap();
        let tree = store.put_path_move(&staged).unwrap();
        assert_eq!(tree, expected, "stored tree digest equals the out-of-store digest");
        assert_eq!(tree.size, 9);
        assert!(store.present(&tree));
        let out = dir.path().join("restored");
        store.materialize(&tree, &out, "t").unwrap();
        assert_eq!(fs::read_to_string(out.join("sub/b.txt")).unwrap(), "beta");
    }

    #[test]
    fn corrupt_object_is_never_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        let d = store.put_bytes(b"hello").unwrap();
        let p = store.path(&d);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&p, "jello").unwrap();
        let e = Entry { digest: d.clone(), kind: ObjKind::File, size: 5 };
        let dest = dir.path().join("x");
        let err = store.materialize(&e, &dest, "a.out").unwrap_err();
        assert!(matches!(err, ObjectError::Corrupt { .. }), "{err}");
        assert!(!dest.exists());
        assert!(store.read_verified(&d, "a.out").is_err());
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::open(dir.path()).unwrap();
        let staged = store.tmp_path("l");
        fs::create_dir_all(&staged).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", staged.join("p")).unwrap();
        assert!(store.put_path_move(&staged).is_err());
    }
}
