//! `orchestrate verify`: re-hash every object; `--repair` rebuilds the index from objects/.

use super::{human_bytes, print_json, Env, Failure};
use crate::store::{self, VerifyReport};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// Also drop index entries whose objects are gone, and rebuild an index that cannot be
    /// opened from the objects.
    #[arg(long)]
    repair: bool,
    /// Print the result as JSON on stdout (for scripts).
    #[arg(long)]
    json: bool,
}

pub(super) fn verify(env: &Env, a: Args) -> Result<i32, Failure> {
    if !env.has_store() {
        return Err(env.no_store("E-STORE").into());
    }
    let (store, moved) =
        if a.repair { store::open_for_repair(&env.root, env.wait)? } else { (env.open_store()?, None) };
    if let Some(m) = &moved {
        eprintln!("the index could not be opened; moved it to {} and rebuilt it", m.display());
    }
    let r = store.verify(a.repair)?;
    if a.json {
        print_json(&r)?;
    } else {
        print_report(&r, a.repair);
    }
    let problems = !r.corrupt.is_empty() || (!a.repair && !r.dangling.is_empty());
    Ok(if problems { 1 } else { 0 })
}

fn print_report(r: &VerifyReport, repair: bool) {
    println!("checked {} objects ({})", r.objects_checked, human_bytes(r.bytes_checked));
    for (d, to) in &r.corrupt {
        println!("CORRUPT  {d}  (moved to {to}; the next run recomputes what needs it)");
    }
    for d in &r.dangling {
        let what = if repair { "REMOVED " } else { "DANGLING" };
        let result = match (&d.stage, &d.pipeline) {
            (Some(s), Some(p)) => format!("`{s}` of pipeline `{p}`"),
            _ => "a result".to_string(),
        };
        let next = if repair { "" } else { "; the next run computes it again (`verify --repair` drops the entry now)" };
        println!("{what}  {result} (key {}): {} missing{next}", &d.key[..d.key.len().min(12)], d.missing.join(", "));
    }
    if r.index_rebuilt {
        println!("index rebuilt from objects/: {} cache entries, {} run records", r.manifests_indexed, r.runs_indexed);
    }
    if r.corrupt.is_empty() && r.dangling.is_empty() {
        println!("store OK");
    }
}
