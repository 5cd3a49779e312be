//! `orchestrate run`: run what is not cached, within a CPU budget.

use std::collections::HashSet;
use std::sync::Arc;

use super::{cores_arg, folder_of, print_json, runtime, stage_index, Env, Failure, PipelineArgs, RemoteArgs};
use crate::deliver;
use crate::events::{RunSummary, Status};
use crate::progress::Progress;
use crate::remote::{Remote, Transfer};
use crate::sched::{self, RunOptions};
use crate::store::Store;

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    pub(super) p: PipelineArgs,
    /// Run only these stages and what they need.
    #[arg(long = "target", value_name = "STAGE")]
    targets: Vec<String>,
    /// CPU budget: the sum of running stages' threads stays within it (default: all cores).
    #[arg(long)]
    cores: Option<u32>,
    /// After a failure, finish every branch that does not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Look stages missing here up in this remote cache and download them instead of running.
    #[command(flatten)]
    remote: RemoteArgs,
    /// After the run, upload its results to the remote (needs --remote).
    #[arg(long)]
    push: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(env: &Env, a: Args) -> Result<i32, Failure> {
    let (p, dag) = env.load(&a.p)?;
    let cores = cores_arg(a.cores)?;
    let only = if a.targets.is_empty() {
        None
    } else {
        let mut set = HashSet::new();
        for t in &a.targets {
            set.extend(dag.with_upstream(stage_index(&p, t)?));
        }
        Some(set)
    };
    if a.push && a.remote.remote.is_none() {
        return Err(crate::diag::Diagnostic::new("E-CLI", "--push needs --remote REMOTE").into());
    }
    let remote = a.remote.open(&folder_of(&a.p.pipeline), false)?.map(Arc::new);
    let store = Arc::new(env.open_store()?);
    store.clean_tmp();
    let mut progress = Progress::new(a.json);
    let opts = RunOptions { cores, keep_going: a.keep_going, only, remote: remote.clone() };
    let rt = runtime()?;
    let mut summary = rt.block_on(sched::run(&p, &dag, store.clone(), opts, &mut progress));
    // Every result is stored by now; only copying the final ones out can still fail.
    let delivered = if summary.status == "ok" { deliver::deliver(&p, &dag, &store, &summary) } else { Ok(vec![]) };
    if let Ok(outputs) = &delivered {
        summary.outputs = outputs.clone();
    }
    if a.json {
        print_json(&summary)?;
    } else {
        print_outputs(&summary, &a.p);
    }
    let pushed = match (&remote, a.push) {
        (Some(remote), true) => push_results(&rt, remote, &store, &summary),
        _ => true,
    };
    match delivered {
        Ok(_) if !pushed => Ok(1),
        Ok(_) => Ok(summary.exit_code()),
        Err(e) => {
            eprintln!("error: every stage finished and is stored, but copying the final outputs failed: {e}");
            Ok(1)
        }
    }
}

/// Upload what this run ran or found cached (the remote skips what it has); false on failure.
/// The report goes to stderr, so `--json` keeps stdout for the run summary.
fn push_results(rt: &tokio::runtime::Runtime, remote: &Remote, store: &Store, summary: &RunSummary) -> bool {
    let results: Vec<(String, String)> = (summary.stages.iter())
        .filter(|s| matches!(s.status, Status::Ran | Status::Cached))
        .filter_map(|s| Some((s.key.clone()?, s.manifest.clone()?)))
        .collect();
    let t0 = std::time::Instant::now();
    let transfer = Transfer::new("push", false);
    match rt.block_on(remote.push(store, &results, &transfer)) {
        Ok(r) => {
            let _ = super::push::print_report(remote, &r, t0.elapsed().as_secs_f64(), false);
            r.errors.is_empty()
        }
        Err(e) => {
            eprintln!("error: every stage finished and is stored here, but pushing to {} failed: {e}", remote.shown);
            false
        }
    }
}

/// Where the final outputs are, and how to copy any output elsewhere.
fn print_outputs(summary: &RunSummary, p: &PipelineArgs) {
    if summary.outputs.is_empty() {
        return;
    }
    let published = summary.outputs.iter().all(|o| o.published);
    eprintln!("{}", if published { "published (read-only copies):" } else { "outputs (read-only copies):" });
    let width = summary.outputs.iter().map(|o| o.stage.len() + o.output.len() + 1).max().unwrap_or(0);
    for o in &summary.outputs {
        let name = format!("{}.{}", o.stage, o.output);
        eprintln!("  {name:<width$}  {}  ({})", deliver::shown(&o.path), deliver::describe(&o.path));
    }
    eprintln!("copy any output elsewhere with `orchestrate export {} STAGE.OUTPUT DEST`", p.pipeline.display());
}
