//! `orchestrate push`: upload cached results to a remote cache.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use super::{
    folder_of, human_bytes, print_errors, print_json, runtime, stage_index, Env, Failure, PipelineArgs, RemoteArgs,
    SelectArgs,
};
use crate::remote::{Access, PushReport, Remote, RunsPushed, Transfer};
use crate::store::{RunRecord, Store};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// The pipeline whose current results to push (default: every result in the store).
    pipeline: Option<PathBuf>,
    /// Override a value of the pipeline, as for `run`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Only these stages' results.
    #[arg(long = "stage", value_name = "STAGE")]
    stages: Vec<String>,
    /// Only these stages and what they need, as `run --target` takes them: what a teammate's
    /// `run --target` or `pull --target` of them then finds on the remote.
    #[arg(long = "target", value_name = "STAGE", requires = "pipeline")]
    targets: Vec<String>,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Print the result as JSON on stdout (for scripts).
    #[arg(long)]
    json: bool,
    /// Upload every blob of these results again, overwriting the remote's: for blobs deleted or
    /// damaged there (pull names them), which a plain push skips as already pushed.
    #[arg(long)]
    repair: bool,
    /// Keep run history local: push no run records or run names (by default the runs whose
    /// results are all on the remote are shared, for a teammate's `runs` and `compare`).
    #[arg(long)]
    no_runs: bool,
}

/// What to push: results as (cache key, manifest digest), and the pipeline they are of.
struct Selection {
    results: Vec<(String, String)>,
    pipeline: Option<String>,
}

/// What to push: the pipeline's cached stages, or everything.
fn select(env: &Env, a: &Args, store: &Store) -> Result<Selection, Failure> {
    let Some(file) = &a.pipeline else {
        if !a.stages.is_empty() {
            return Err(Failure::Invalid(crate::diag::Diagnostic::new("E-CLI", "--stage needs a pipeline file")));
        }
        return Ok(Selection { results: store.results()?, pipeline: None });
    };
    let (p, dag) = env.load(&PipelineArgs { pipeline: file.clone(), sets: a.sets.clone() })?;
    for s in &a.stages {
        stage_index(&p, s)?;
    }
    let scope = SelectArgs { targets: a.targets.clone(), reruns: Vec::new() }.scope(&p, &dag)?;
    let in_scope =
        |stage: &str| scope.only.as_ref().is_none_or(|only| p.index_of(stage).is_some_and(|i| only.contains(&i)));
    let entries = crate::plan::plan(&p, &dag, store);
    let results = (entries.into_iter())
        .filter(|e| (a.stages.is_empty() || a.stages.contains(&e.stage)) && in_scope(&e.stage))
        .filter_map(|e| Some((e.key?, e.manifest?)))
        .collect();
    Ok(Selection { results, pipeline: Some(p.name.clone()) })
}

/// Push `results`, then share `runs` (when given) whose results are all on the remote.
pub(super) async fn push_with_runs(
    remote: &Remote,
    store: &Store,
    results: &[(String, String)],
    runs: Option<&[(String, RunRecord)]>,
    t: &Transfer,
) -> crate::remote::Result<PushReport> {
    let mut report = remote.push(store, results, t).await?;
    if let Some(runs) = runs {
        // The results are up by now: a history that cannot follow is an error to report
        // beside them, not one that hides what was pushed.
        let mut errors = Vec::new();
        match remote.push_runs(store, runs, &report.on_remote, &mut errors).await {
            Ok(shared) => report.runs = Some(shared),
            Err(e) => errors.push(format!("sharing run history: {e}")),
        }
        report.errors.extend(errors);
    }
    Ok(report)
}

pub(super) fn push(env: &Env, a: Args) -> Result<i32, Failure> {
    let near = a.pipeline.as_deref().map(folder_of).unwrap_or_else(|| PathBuf::from("."));
    let Some(mut remote) = a.remote.open(&near, true, Access::Write)? else { return Ok(2) };
    remote.repair = a.repair;
    let store = env.open_reader()?;
    let Selection { results, pipeline } = select(env, &a, &store)?;
    // The runs of this pipeline (of any, without a file), newest first.
    let runs: Option<Vec<_>> = (!a.no_runs).then(|| {
        let mut runs = store.runs();
        runs.retain(|(_, r)| pipeline.as_ref().is_none_or(|p| *p == r.pipeline));
        runs
    });
    let t0 = Instant::now();
    let transfer = Transfer::new("push", !a.json && std::io::stderr().is_terminal());
    let rt = runtime()?;
    let report = rt.block_on(async {
        tokio::select! {
            r = push_with_runs(&remote, &store, &results, runs.as_deref(), &transfer) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        }
    });
    transfer.finish();
    let Some(report) = report else {
        eprintln!("interrupted: entries are written only after their blobs, so the remote shows no partial result");
        return Ok(130);
    };
    let report = report.map_err(|e| anyhow::anyhow!("pushing to {}: {e}", remote.shown))?;
    print_report(&remote, &report, t0.elapsed().as_secs_f64(), a.json)?;
    Ok(if report.errors.is_empty() { 0 } else { 1 })
}

pub(super) fn print_report(remote: &Remote, r: &PushReport, secs: f64, json: bool) -> Result<(), Failure> {
    if json {
        return print_json(r);
    }
    print_errors(&r.errors);
    let not_pushed = match r.results.saturating_sub(r.published + r.already) {
        0 => String::new(),
        n => format!(", {n} not pushed"),
    };
    eprintln!(
        "pushed to {}: {} results ({} {}, {} already there{not_pushed}); {} blobs checked, {} uploaded ({}) in {secs:.2}s",
        remote.shown,
        r.results,
        r.published,
        if remote.repair { "written again" } else { "new" },
        r.already,
        r.blobs_checked,
        r.blobs_uploaded,
        human_bytes(r.bytes_uploaded)
    );
    if let Some(runs) = &r.runs {
        print_runs(runs);
    }
    Ok(())
}

/// `1 run`, `2 runs`.
pub(super) fn runs(n: usize) -> String {
    if n == 1 {
        "1 run".into()
    } else {
        format!("{n} runs")
    }
}

/// `, N run names` for a history line, or nothing.
pub(super) fn and_names(n: usize) -> String {
    match n {
        0 => String::new(),
        1 => ", 1 run name".into(),
        n => format!(", {n} run names"),
    }
}

fn print_runs(r: &RunsPushed) {
    let names = and_names(r.names);
    let left = match r.not_shared.len() {
        0 => String::new(),
        n => format!("; {n} kept local, since a result they name is not on the remote (push it first):"),
    };
    eprintln!("run history: {} shared, {} already there{names}{left}", runs(r.shared), r.already);
    for line in &r.not_shared {
        eprintln!("  {line}");
    }
}
