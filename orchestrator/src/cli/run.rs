//! `orchestrate run`: run what is not cached, within a CPU budget.

use std::sync::Arc;

use super::{cores_arg, folder_of, print_json, runtime, Env, Failure, PipelineArgs, RemoteArgs, SelectArgs};
use crate::deliver;
use crate::diag::Diagnostic;
use crate::events::{RunSummary, Status};
use crate::executor::{Executor, Slurm};
use crate::live::{Both, LiveFile};
use crate::pipeline::Pipeline;
use crate::progress::Progress;
use crate::remote::{Access, Remote, Transfer};
use crate::sched::{self, RunOptions};
use crate::store::Store;

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    pub(super) p: PipelineArgs,
    #[command(flatten)]
    select: SelectArgs,
    /// A name for this run (letters, digits, `.`, `_`, `-`, not only hex digits): `compare`,
    /// `runs` and the web view take it for the run that took it last, e.g. a team's `baseline`
    /// (`orchestrate name` names a run after it ran).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
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
    /// Where stages run: `local` (child processes on this machine) or `slurm` (one `sbatch`
    /// job per stage; the store must be on a filesystem the cluster's nodes share).
    #[arg(long, value_enum, default_value_t = ExecutorArg::Local)]
    executor: ExecutorArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ExecutorArg {
    Local,
    Slurm,
}

pub(super) fn run(env: &Env, a: Args) -> Result<i32, Failure> {
    if let Some(name) = &a.name {
        crate::history::check_name(name).map_err(|e| Diagnostic::new("E-CLI", format!("--name {name}: {e}")))?;
    }
    let (p, dag) = env.load(&a.p)?;
    // On a cluster the budget is what may be queued at once; Slurm itself fits jobs to nodes.
    let cores = match (a.executor, a.cores) {
        (ExecutorArg::Slurm, None) => sched::CLUSTER_BUDGET,
        _ => cores_arg(a.cores)?,
    };
    let scope = a.select.scope(&p, &dag)?;
    if a.push && a.remote.remote.is_none() {
        return Err(crate::diag::Diagnostic::new("E-CLI", "--push needs --remote REMOTE").into());
    }
    let access = if a.push { Access::Write } else { Access::Read };
    let remote = a.remote.open(&folder_of(&a.p.pipeline), false, access)?.map(Arc::new);
    let store = Arc::new(env.open_store()?);
    store.clean_tmp();
    let rt = runtime()?;
    let executor = match a.executor {
        ExecutorArg::Local => Executor::Local,
        ExecutorArg::Slurm => Executor::Slurm(Arc::new(open_slurm(&rt, &p, &store)?)),
    };
    let mut progress = Progress::new(a.json);
    let mut live = LiveFile::new(&store.root, &p, &dag);
    let mut events = Both(&mut progress, &mut live);
    let opts = RunOptions {
        cores,
        keep_going: a.keep_going,
        only: scope.only,
        rerun: scope.rerun,
        name: a.name,
        targets: a.select.targets(),
        remote: remote.clone(),
        executor: executor.clone(),
    };
    let mut summary = rt.block_on(sched::run(&p, &dag, store.clone(), opts, &mut events));
    if let Executor::Slurm(s) = &executor {
        eprintln!("slurm: {} status queries", s.status_queries());
    }
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

/// Connect to the cluster the `executor:` block describes, before anything is submitted: its
/// commands, slurmctld and every partition the pipeline names are checked (exit 2 if not).
fn open_slurm(rt: &tokio::runtime::Runtime, p: &Pipeline, store: &Store) -> Result<Slurm, Failure> {
    let e = &p.executor;
    let defaults = orchestrate_slurm::Config::default();
    let cfg = orchestrate_slurm::Config {
        partition: e.partition.clone(),
        account: e.account.clone(),
        qos: e.qos.clone(),
        sbatch_args: e.sbatch_args.clone(),
        poll: e.poll.unwrap_or(defaults.poll),
        max_poll: e.max_poll.unwrap_or(defaults.max_poll.max(e.poll.unwrap_or_default())),
    };
    let slurm_error = |msg: String| {
        Failure::Invalid(
            Diagnostic::new("E-SLURM", format!("cannot use the Slurm cluster: {msg}"))
                .help("check `sinfo` works on this machine (SLURM_CONF, munge, slurmctld); nothing was submitted"),
        )
    };
    let (slurm, stale) = rt.block_on(Slurm::open(cfg, &store.root)).map_err(slurm_error)?;
    let known = slurm.partitions();
    let mut named: Vec<(&str, String, crate::yaml::Pos)> = Vec::new();
    if let Some(part) = &e.partition {
        named.push((part, "the `executor:` block".into(), e.partition_pos));
    }
    for st in &p.stages {
        if let Some(part) = &st.resources.partition {
            named.push((part, format!("stage `{}`", st.name), st.resources.partition_pos));
        }
    }
    if let Some((part, who, pos)) = named.into_iter().find(|(part, _, _)| !known.iter().any(|k| k == part)) {
        let msg = format!("{who} names partition `{part}`, which the cluster does not have");
        return Err(p
            .diag(Diagnostic::new("E-SLURM", msg).at(pos))
            .help(format!("its partitions: {}", known.join(", ")))
            .into());
    }
    // Slurm counts time limits in whole minutes and enforces them on its own schedule: a
    // shorter limit would act as one of a minute or two, unlike the same stage run locally.
    for st in p.stages.iter().filter(|st| st.resources.time.or(st.timeout).is_some_and(|t| t.as_secs() < 60)) {
        eprintln!(
            "slurm: warning: stage `{}` has a time limit under a minute; Slurm counts limits in whole minutes and \
             enforces them late, so on the cluster it may run a minute or two before it is stopped",
            st.name
        );
    }
    if stale > 0 {
        eprintln!("slurm: cancelled {stale} job(s) a previous run on this store left queued or running (its coordinator is gone)");
    }
    Ok(slurm)
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
    // The run's own record, shared once its results are all on the remote.
    let run = summary.run.as_ref().and_then(|id| Some((id.clone(), crate::store::load_run(&store.objects, id)?)));
    let runs: Vec<_> = run.into_iter().collect();
    match rt.block_on(super::push::push_with_runs(remote, store, &results, Some(&runs), &transfer)) {
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
