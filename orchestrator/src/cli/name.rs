//! `orchestrate name RUN NAME`: name a run after it ran (as `run --name` names it as it starts),
//! or take its name away (`--clear`).

use super::{Env, Failure};
use crate::diag::Diagnostic;
use crate::history::{check_name, resolve, short};
use crate::store::names::holder;

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// The run: `latest`, `latest~N`, a name, or 4+ characters of its id (`orchestrate runs`).
    run: String,
    /// The name (letters, digits, `.`, `_`, `-`, not only hex digits). From now on `compare`,
    /// `runs`, the web view and gc's keeping of named runs take it for this run.
    #[arg(required_unless_present = "clear")]
    name: Option<String>,
    /// Take the run's name away instead.
    #[arg(long, conflicts_with = "name")]
    clear: bool,
}

pub(super) fn name(env: &Env, a: Args) -> Result<i32, Failure> {
    let invalid = |msg: String| Failure::Invalid(Diagnostic::new("E-NAME", msg));
    if let Some(n) = &a.name {
        check_name(n).map_err(|e| invalid(format!("`{n}`: {e}")))?;
    }
    let store = env.open_existing()?;
    let runs = store.runs();
    let (id, run) = resolve(&runs, &a.run).map_err(invalid)?;
    let before = a.name.as_deref().and_then(|n| holder(&runs, n)).filter(|(other, _)| other != id);
    let what = format!("run {} ({}, {})", short(id), crate::store::iso8601(run.started_at), run.pipeline);
    if a.name == run.name && before.is_none() {
        match &a.name {
            Some(n) => println!("{what} is named `{n}` already"),
            None => println!("{what} has no name; nothing changed"),
        }
        return Ok(0);
    }
    store.name_run(id, a.name.as_deref())?;
    match (&a.name, &run.name) {
        (Some(n), _) => {
            println!("{what} is named `{n}`");
            if let Some((other, _)) = before {
                println!("`{n}` meant run {} until now; `runs` shows that one as `({n})`", short(other));
            }
        }
        (None, old) => println!("{what} is no longer named `{}`", old.as_deref().unwrap_or_default()),
    }
    Ok(0)
}
