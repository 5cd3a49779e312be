//! Final outputs a person can open after a successful run: read-only copies, never links, so
//! editing them cannot reach the store.
//!
//! Which outputs: the pipeline's `publish:` entries, copied to their destinations in the
//! working tree; without `publish:`, every output of the stages nothing else in the run
//! depends on, copied under `<store>/outputs/<pipeline>/<stage>/<output>`. A copy is made only
//! when its destination does not already hold that output (the store remembers what it put
//! where), so a cached rerun costs one index read per output. A destination orchestrate did not
//! create is never overwritten.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::dag::Dag;
use crate::events::{DeliveredOutput, RunSummary, StageOutcome};
use crate::objects::Entry;
use crate::pipeline::Pipeline;
use crate::store::{remove_dir_all_writable, Store};

/// One output to copy: (stage, output, entry, destination, from `publish:`).
type Delivery = (String, String, Entry, PathBuf, bool);

/// Copy the run's final outputs into place and say where they are.
pub fn deliver(p: &Pipeline, dag: &Dag, store: &Store, run: &RunSummary) -> Result<Vec<DeliveredOutput>, String> {
    let mut out = Vec::new();
    for (stage, output, entry, dest, published) in deliveries(p, dag, store, run) {
        place(store, &entry, &dest, &format!("{stage}.{output}"), !published)?;
        out.push(DeliveredOutput { stage, output, path: dest.display().to_string(), published });
    }
    Ok(out)
}

/// `publish:` entries whose stage is done, or else every output of the final stages.
fn deliveries(p: &Pipeline, dag: &Dag, store: &Store, run: &RunSummary) -> Vec<Delivery> {
    let outcomes: HashMap<&str, &StageOutcome> = run.stages.iter().map(|s| (s.stage.as_str(), s)).collect();
    let done = |stage: &str| outcomes.get(stage).copied().filter(|s| !s.outputs.is_empty());
    if !p.publish.is_empty() {
        return (p.publish.iter())
            .filter_map(|pb| {
                let entry = done(&pb.stage)?.outputs.get(&pb.output)?.clone();
                Some((pb.stage.clone(), pb.output.clone(), entry, pb.dest.clone(), true))
            })
            .collect();
    }
    // The stages of a run are closed under "needs", so a stage is final when none of its
    // direct dependents took part.
    let is_final = |i: usize| !dag.downstream(i).iter().any(|&j| outcomes.contains_key(p.stages[j].name.as_str()));
    let views = store.root.join("outputs").join(&p.name);
    let mut list = Vec::new();
    for &i in &dag.order {
        let name = &p.stages[i].name;
        let Some(s) = done(name).filter(|_| is_final(i)) else { continue };
        for (output, entry) in &s.outputs {
            list.push((name.clone(), output.clone(), entry.clone(), views.join(name).join(output), false));
        }
    }
    list
}

/// Put a read-only copy of `entry` at `dest`, unless it already holds it. `ours`: the
/// destination is inside the store, so whatever is there may be replaced.
fn place(store: &Store, entry: &Entry, dest: &Path, what: &str, ours: bool) -> Result<(), String> {
    if let Some(folder) = store.managed_folder_of(dest).filter(|_| !ours) {
        return Err(format!(
            "`publish:` puts `{what}` at {}, inside the store's {}, which only orchestrate writes; publish it \
             somewhere outside it",
            dest.display(),
            folder.display()
        ));
    }
    let previous = store.delivered(dest);
    let exists = dest.symlink_metadata().is_ok();
    if exists && previous.as_deref() == Some(entry.digest.as_str()) {
        return Ok(());
    }
    if exists && previous.is_none() && !ours {
        return Err(format!(
            "{} already exists and was not published by orchestrate, so it is left alone; \
             move it away or publish `{what}` somewhere else",
            dest.display()
        ));
    }
    let parent = dest.parent().ok_or_else(|| format!("{} has no parent folder", dest.display()))?;
    std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.orchestrate-{}", std::process::id()));
    let _ = remove_dir_all_writable(&tmp).or_else(|_| std::fs::remove_file(&tmp));
    store.objects.materialize(entry, &tmp, what).map_err(|e| format!("copying {what}: {e}"))?;
    read_only(&tmp);
    if exists {
        let removed = if dest.is_dir() { remove_dir_all_writable(dest) } else { std::fs::remove_file(dest) };
        removed.map_err(|e| format!("replacing {}: {e}", dest.display()))?;
    }
    std::fs::rename(&tmp, dest).map_err(|e| format!("moving the copy to {}: {e}", dest.display()))?;
    store.record_delivered(dest, &entry.digest).map_err(|e| e.to_string())
}

/// Files read-only (folders stay writable, so a later copy can replace them).
fn read_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = path.symlink_metadata() else { return };
    if meta.is_dir() {
        for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
            read_only(&e.path());
        }
    } else {
        let mode = if meta.permissions().mode() & 0o111 != 0 { 0o555 } else { 0o444 };
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
    }
}

/// `path` relative to the current folder when it is inside it, as a person would type it.
pub fn shown(path: &str) -> String {
    let p = Path::new(path);
    std::env::current_dir()
        .ok()
        .and_then(|cwd| p.strip_prefix(&cwd).ok().map(|r| r.display().to_string()))
        .unwrap_or_else(|| path.to_string())
}

/// What a delivered path holds, in a few words: `file` or `folder of 5 entries`.
pub fn describe(path: &str) -> String {
    match std::fs::read_dir(path) {
        Ok(d) => {
            let n = d.count();
            format!("folder of {n} entr{}", if n == 1 { "y" } else { "ies" })
        }
        Err(_) => "file".to_string(),
    }
}
