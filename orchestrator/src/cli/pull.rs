//! `orchestrate pull`: download results from a remote cache into the store, running nothing.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{
    folder_of, human_bytes, print_errors, print_json, runtime, Env, Failure, PipelineArgs, RemoteArgs, SelectArgs,
};
use crate::history::short;
use crate::plan::{plan_with_remote, RemoteAnswer};
use crate::remote::{Access, PullReport, Remote, RunsPulled, Transfer};
use crate::store::Store;

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// The pipeline whose results to download (default: every result on the remote).
    pipeline: Option<PathBuf>,
    /// Override a value of the pipeline, as for `run`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Only these stages and what they need, as `run --target` takes them (their upstream
    /// results too: a stage's key follows from theirs).
    #[arg(long = "target", value_name = "STAGE", requires = "pipeline")]
    targets: Vec<String>,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Print the result as JSON on stdout (for scripts).
    #[arg(long)]
    json: bool,
    /// One run of the remote's history (`latest`, `latest~N`, a name, an id prefix) with every
    /// result it recorded — e.g. a teammate's `baseline`, to compare against.
    #[arg(long, value_name = "RUN", conflicts_with_all = ["pipeline", "targets", "no_runs"])]
    run: Option<String>,
    /// Take no run history: no run records or run names (by default the remote's runs, of
    /// this pipeline if one is given, whose results are all in the store join `runs`).
    #[arg(long)]
    no_runs: bool,
}

/// Pull the pipeline's stages in DAG order: a stage pulled makes its dependents' keys known.
fn pull_pipeline(
    env: &Env,
    a: &Args,
    file: &Path,
    store: &Store,
    remote: &Remote,
    t: &Transfer,
) -> Result<(PullReport, String), Failure> {
    let (p, dag) = env.load(&PipelineArgs { pipeline: file.to_path_buf(), sets: a.sets.clone() })?;
    let select = SelectArgs { targets: a.targets.clone(), reruns: Vec::new() };
    let scope = select.scope(&p, &dag)?;
    let rt = runtime()?;
    let mut report = PullReport::default();
    let entries =
        plan_with_remote(&p, &dag, store, &scope, &mut |key| match rt.block_on(remote.fetch(store, key, t)) {
            Ok(Some((d, m))) => RemoteAnswer::Has(d, Box::new(m)),
            Ok(None) => RemoteAnswer::Absent,
            Err(e) => RemoteAnswer::Error(e.to_string()),
        });
    for e in entries {
        let unusable = e.reasons.iter().find(|r| r.starts_with("the remote cache could not supply it"));
        let status = match (e.status.as_str(), unusable) {
            ("cached", _) => "local",
            ("remote", _) => "pulled",
            (_, Some(why)) => {
                report.errors.push(format!("{}: {why}", e.stage));
                "failed"
            }
            // Its key follows from an upstream result that is neither here nor pulled.
            _ if e.reasons.iter().any(|r| r.starts_with("upstream `")) => "blocked",
            _ => "absent",
        };
        report.results.insert(e.stage, status.to_string());
    }
    Ok((report, p.name.clone()))
}

/// Pull every result the remote has.
fn pull_all(store: &Store, remote: &Remote, t: &Transfer) -> Result<PullReport, Failure> {
    let rt = runtime()?;
    let mut report = PullReport::default();
    let keys = rt.block_on(remote.keys()).map_err(|e| anyhow::anyhow!("listing {}: {e}", remote.shown))?;
    for key in keys {
        if store.lookup(&key)?.is_some() {
            report.results.insert(key, "local".into());
            continue;
        }
        match rt.block_on(remote.fetch(store, &key, t)) {
            Ok(_) => report.results.insert(key, "pulled".into()),
            Err(e) => {
                report.errors.push(format!("{key}: {e}"));
                report.results.insert(key, "failed".into())
            }
        };
    }
    Ok(report)
}

pub(super) fn pull(env: &Env, a: Args) -> Result<i32, Failure> {
    let near = a.pipeline.as_deref().map(folder_of).unwrap_or_else(|| PathBuf::from("."));
    let Some(remote) = a.remote.open(&near, true, Access::Read)? else { return Ok(2) };
    let store = env.open_store()?;
    store.clean_tmp();
    runtime()?.block_on(remote.probe()).map_err(|e| anyhow::anyhow!("pulling from {}: {e}", remote.shown))?;
    let t0 = Instant::now();
    let transfer = Transfer::new("pull", !a.json && std::io::stderr().is_terminal());
    // Interrupting is safe at any point: blobs land in tmp/ and move in whole once their hash
    // matches, and a result is indexed only after all its blobs are in.
    if let Some(spec) = &a.run {
        let mut report = PullReport::default();
        let pulled = runtime()?.block_on(remote.pull_run(&store, spec, &transfer, &mut report.errors));
        transfer.finish();
        let (id, results) = pulled.map_err(|e| anyhow::anyhow!("pulling run `{spec}` from {}: {e}", remote.shown))?;
        (report.bytes_downloaded, report.blobs_downloaded) = transfer.totals();
        report.results = results;
        report.runs = Some(RunsPulled { pulled: 1, run: Some(id), ..Default::default() });
        return finish(&remote, report, t0.elapsed().as_secs_f64(), a.json);
    }
    let work = match &a.pipeline {
        Some(file) => pull_pipeline(env, &a, file, &store, &remote, &transfer).map(|(r, p)| (r, Some(p))),
        None => pull_all(&store, &remote, &transfer).map(|r| (r, None)),
    };
    transfer.finish();
    let (mut report, pipeline) = work?;
    (report.bytes_downloaded, report.blobs_downloaded) = transfer.totals();
    // After the results: a run joins the history only once every result it names is here.
    if !a.no_runs {
        let mut errors = Vec::new();
        match runtime()?.block_on(remote.pull_runs(&store, pipeline.as_deref(), &mut errors)) {
            Ok(runs) => report.runs = Some(runs),
            Err(e) => errors.push(format!("pulling run history: {e}")),
        }
        report.errors.extend(errors);
    }
    finish(&remote, report, t0.elapsed().as_secs_f64(), a.json)
}

/// Print what the pull did; exit 1 if anything could not be pulled.
fn finish(remote: &Remote, report: PullReport, secs: f64, json: bool) -> Result<i32, Failure> {
    if json {
        print_json(&report)?;
    } else {
        print_report(remote, &report, secs);
    }
    Ok(if report.errors.is_empty() { 0 } else { 1 })
}

fn print_report(remote: &Remote, r: &PullReport, secs: f64) {
    print_errors(&r.errors);
    let count = |s: &str| r.results.values().filter(|v| *v == s).count();
    let also = |n: usize, what: &str| if n > 0 { format!(", {n} {what}") } else { String::new() };
    eprintln!(
        "pulled from {}: {} results downloaded, {} already here, {} not on the remote{}{}; {} blobs ({}) in {secs:.2}s",
        remote.shown,
        count("pulled"),
        count("local"),
        count("absent"),
        also(count("failed"), "on it but unusable"),
        also(count("blocked"), "not looked up (an upstream result is missing)"),
        r.blobs_downloaded,
        human_bytes(r.bytes_downloaded)
    );
    if let Some(runs) = &r.runs {
        let names = super::push::and_names(runs.names);
        let waiting = match runs.waiting {
            0 => String::new(),
            n => format!(
                "; {n} more on the remote name results not here (`orchestrate pull` without a pipeline file takes every result)"
            ),
        };
        let which = runs.run.as_deref().map(|id| format!(" ({})", short(id))).unwrap_or_default();
        eprintln!("run history: {} pulled{which}{names}{waiting}", super::push::runs(runs.pulled));
    }
}
