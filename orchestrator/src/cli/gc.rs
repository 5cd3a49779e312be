//! `orchestrate gc`: delete objects no recent run uses.

use super::{human_bytes, Env, Failure};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// Keep what the newest N runs used (and the run each name means: `run --name`,
    /// `orchestrate name`); delete every other object and cache entry.
    #[arg(long, value_name = "N", default_value_t = 1)]
    keep_last: usize,
    /// Say what would be removed, and remove nothing.
    #[arg(long)]
    dry_run: bool,
}

pub(super) fn gc(env: &Env, a: Args) -> Result<i32, Failure> {
    let store = env.open_existing()?;
    let r = store.gc(a.keep_last, a.dry_run)?;
    println!(
        "{} {} objects ({}){}; kept {} objects used by the last {} run(s){}",
        if a.dry_run { "would remove" } else { "removed" },
        r.objects_removed,
        human_bytes(r.bytes_freed),
        if a.dry_run { " (dry run)" } else { "" },
        r.objects_kept,
        r.runs_kept - r.named_kept,
        match r.named_kept {
            0 => String::new(),
            n => format!(" and {n} older named run(s) (`run --name`, `orchestrate name`)"),
        }
    );
    if r.runs_removed > 0 {
        // The history shortens too: say so, since `runs` and `compare` no longer see them.
        let verb = if a.dry_run { "would leave" } else { "left" };
        println!("{} older run record(s) {verb} the history (`orchestrate runs`)", r.runs_removed);
    }
    if r.scratch_removed > 0 {
        let verb = if a.dry_run { "would remove" } else { "removed" };
        println!("{verb} {} cluster job scratch folder(s) that no run committed (artifacts/slurm/)", r.scratch_removed);
    }
    Ok(0)
}
