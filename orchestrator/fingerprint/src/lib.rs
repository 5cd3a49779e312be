//! The implementation fingerprint of a workspace crate: what a stage's cache key must follow
//! so that results computed by older code are never served.
//!
//! A crate's fingerprint has one part per workspace crate it builds from (itself and every
//! workspace crate reachable through its normal `[dependencies]`): the blake3 of that crate's
//! files — `Cargo.toml`, `build.rs`, everything under `src/` and `assets/` except unit-test
//! files (`tests.rs`, anything under a `tests/` folder) — and one part, `external crates`, the
//! blake3 of the `name version` of every crates.io package it builds from, as `Cargo.lock`
//! pins them. The orchestrator's build script computes these for every stage crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The part that covers the locked external dependencies.
pub const EXTERNAL: &str = "external crates";

/// A workspace member: its package name, folder, and normal dependencies by name.
#[derive(Clone, Debug)]
struct Member {
    dir: PathBuf,
    deps: Vec<String>,
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

fn parse(path: &Path) -> Result<toml::Table, String> {
    read(path)?.parse::<toml::Table>().map_err(|e| format!("parsing {}: {e}", path.display()))
}

/// Every workspace member by package name.
fn members(root: &Path) -> Result<BTreeMap<String, Member>, String> {
    let manifest = parse(&root.join("Cargo.toml"))?;
    let list = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(toml::Value::as_array)
        .ok_or("the workspace Cargo.toml has no [workspace] members")?;
    let mut out = BTreeMap::new();
    for m in list.iter().filter_map(toml::Value::as_str) {
        let dir = root.join(m);
        let t = parse(&dir.join("Cargo.toml"))?;
        let name = t.get("package").and_then(|p| p.get("name")).and_then(toml::Value::as_str);
        let name = name.ok_or_else(|| format!("{m}/Cargo.toml has no package name"))?.to_string();
        let deps = t.get("dependencies").and_then(toml::Value::as_table).map(|d| d.keys().cloned().collect());
        out.insert(name, Member { dir, deps: deps.unwrap_or_default() });
    }
    Ok(out)
}

/// Files of a crate that shape what it does, relative to its folder, sorted.
fn source_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for top in ["Cargo.toml", "build.rs", "src", "assets"] {
        collect(dir, &dir.join(top), &mut out);
    }
    out.sort();
    out
}

fn collect(base: &Path, path: &Path, out: &mut Vec<PathBuf>) {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name == "tests.rs" || name == "tests" {
        return;
    }
    if path.is_dir() {
        for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
            collect(base, &e.path(), out);
        }
    } else if path.is_file() {
        out.push(path.strip_prefix(base).unwrap_or(path).to_path_buf());
    }
}

/// blake3 of a crate's files, each as its relative path and its bytes.
fn source_digest(dir: &Path) -> Result<String, String> {
    let mut h = blake3::Hasher::new();
    for rel in source_files(dir) {
        let bytes = std::fs::read(dir.join(&rel)).map_err(|e| format!("reading {}: {e}", rel.display()))?;
        h.update(rel.to_string_lossy().as_bytes());
        h.update(&[0]);
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Locked packages: name → [(version, dependency names)].
type Locked = BTreeMap<String, Vec<(String, Vec<String>)>>;

fn locked(root: &Path) -> Result<Locked, String> {
    let lock = parse(&root.join("Cargo.lock"))?;
    let mut out: Locked = BTreeMap::new();
    for p in lock.get("package").and_then(toml::Value::as_array).into_iter().flatten() {
        let field = |k: &str| p.get(k).and_then(toml::Value::as_str).unwrap_or_default().to_string();
        // A dependency is written `name` or `name version` when two versions are locked.
        let deps = p.get("dependencies").and_then(toml::Value::as_array).into_iter().flatten();
        let deps = deps.filter_map(toml::Value::as_str).map(|d| d.split(' ').next().unwrap_or(d).to_string());
        out.entry(field("name")).or_default().push((field("version"), deps.collect()));
    }
    Ok(out)
}

/// Every workspace crate `name` builds from (itself included), and its direct external deps.
fn closure(name: &str, members: &BTreeMap<String, Member>) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut ws, mut ext) = (BTreeSet::new(), BTreeSet::new());
    let mut stack = vec![name.to_string()];
    while let Some(n) = stack.pop() {
        if !ws.insert(n.clone()) {
            continue;
        }
        for d in members.get(&n).map(|m| m.deps.as_slice()).unwrap_or(&[]) {
            if members.contains_key(d) {
                stack.push(d.clone());
            } else {
                ext.insert(d.clone());
            }
        }
    }
    (ws, ext)
}

/// blake3 of `name version` of every locked package reachable from `direct`, sorted.
fn external_digest(direct: &BTreeSet<String>, lock: &Locked) -> String {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut stack: Vec<String> = direct.iter().cloned().collect();
    while let Some(n) = stack.pop() {
        for (version, deps) in lock.get(&n).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(format!("{n} {version}")) {
                stack.extend(deps.iter().cloned());
            }
        }
    }
    let text: Vec<String> = seen.into_iter().collect();
    blake3::hash(text.join("\n").as_bytes()).to_hex().to_string()
}

/// The fingerprint of each crate in `crates`: part name → digest.
pub fn fingerprints(root: &Path, crates: &[&str]) -> Result<BTreeMap<String, BTreeMap<String, String>>, String> {
    let members = members(root)?;
    let lock = locked(root)?;
    let mut digests: BTreeMap<String, String> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for name in crates {
        if !members.contains_key(*name) {
            return Err(format!("`{name}` is not a workspace member"));
        }
        let (ws, ext) = closure(name, &members);
        let mut parts = BTreeMap::new();
        for w in ws {
            if !digests.contains_key(&w) {
                digests.insert(w.clone(), source_digest(&members[&w].dir)?);
            }
            parts.insert(w.clone(), digests[&w].clone());
        }
        parts.insert(EXTERNAL.to_string(), external_digest(&ext, &lock));
        out.insert(name.to_string(), parts);
    }
    Ok(out)
}

/// Every file and folder the fingerprints of `crates` read (for `rerun-if-changed`).
pub fn inputs(root: &Path, crates: &[&str]) -> Result<Vec<PathBuf>, String> {
    let members = members(root)?;
    let mut dirs = BTreeSet::new();
    for name in crates {
        dirs.extend(closure(name, &members).0.into_iter().filter_map(|w| members.get(&w).map(|m| m.dir.clone())));
    }
    let mut out = vec![root.join("Cargo.toml"), root.join("Cargo.lock")];
    for d in dirs {
        out.extend(["Cargo.toml", "build.rs", "src", "assets"].map(|f| d.join(f)).into_iter().filter(|p| p.exists()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
