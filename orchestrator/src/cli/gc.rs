//! `orchestrate gc`: delete objects no recent run uses.

use super::{human_bytes, runtime, Env, Failure, RemoteArgs};
use crate::diag::Diagnostic;
use crate::remote::Access;

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// Keep what the newest N runs used (and the run each name means: `run --name`,
    /// `orchestrate name`); delete every other object and cache entry. Default 1 for the
    /// store; a remote's gc needs it given.
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Say what would be removed, and remove nothing.
    #[arg(long)]
    dry_run: bool,
    // --remote: collect a remote cache instead of the store (its runs are those pushed to it).
    #[command(flatten)]
    remote: RemoteArgs,
    /// With --remote: keep whatever was written to the remote within this long (`12h`, `7d`),
    /// with everything it names: pushes in flight, results pushed without a run. Best run when
    /// no one is pushing: a push that saw an old blob just before may publish an entry naming
    /// it after it went (a pull then says so; `push --repair` mends it).
    #[arg(long, value_name = "DURATION", default_value = "1d", requires = "remote")]
    keep_newer: String,
}

pub(super) fn gc(env: &Env, a: Args) -> Result<i32, Failure> {
    if a.remote.remote.is_some() {
        return gc_remote(a);
    }
    let store = env.open_existing()?;
    let keep_last = a.keep_last.unwrap_or(1);
    let r = store.gc(keep_last, a.dry_run)?;
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

/// `gc --remote R --keep-last N`.
fn gc_remote(a: Args) -> Result<i32, Failure> {
    let invalid = |msg: String| Failure::Invalid(Diagnostic::new("E-CLI", msg));
    let Some(keep_last) = a.keep_last else {
        return Err(invalid(
            "gc --remote needs --keep-last N: a remote holds the team's runs, so how many to keep is not assumed \
             (--dry-run shows what would go)"
                .into(),
        ));
    };
    let grace = crate::pipeline::parse_duration(&a.keep_newer)
        .ok_or_else(|| invalid(format!("--keep-newer {}: not a duration; write e.g. 12h, 7d, 30m", a.keep_newer)))?;
    let Some(remote) = a.remote.open(std::path::Path::new("."), false, Access::Read)? else { return Ok(2) };
    let r = runtime()?
        .block_on(remote.gc(keep_last, grace, a.dry_run))
        .map_err(|e| anyhow::anyhow!("collecting {}: {e}", remote.shown))?;
    let verb = if a.dry_run { "would remove" } else { "removed" };
    println!(
        "{} {verb} {} blobs ({}) and {} entries{}; kept {} blobs used by the last {} run(s){}{}",
        remote.shown,
        r.blobs_removed,
        human_bytes(r.bytes_freed),
        r.entries_removed,
        if a.dry_run { " (dry run)" } else { "" },
        r.blobs_kept,
        r.runs_kept - r.named_kept,
        match r.named_kept {
            0 => String::new(),
            n => format!(" and {n} older named run(s)"),
        },
        match r.recent_kept {
            0 => String::new(),
            n => format!(" ({n} of them only for being written within the last {})", a.keep_newer),
        }
    );
    if r.runs_removed > 0 {
        let verb = if a.dry_run { "would leave" } else { "left" };
        println!("{} older run(s) {verb} the remote's history", r.runs_removed);
    }
    Ok(0)
}
