//! `orchestrate runs`: the run history, newest first.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;

use serde::Serialize;

use super::{folder_of, print_errors, print_json, runtime, Env, Failure, PipelineArgs, RemoteArgs};
use crate::history::{Run, RunLine};
use crate::pipeline::metrics::Better;
use crate::remote::{Access, Remote, RemoteError};
use crate::source::SourceRev;
use crate::store::{Manifest, RunRecord, Store};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// Only runs of this pipeline.
    pipeline: Option<PathBuf>,
    /// At most this many runs.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Add this metric of each run (STAGE.METRIC) as a column (repeatable: a column each); for
    /// a `foreach` stage, its best variant's by the pipeline's `metrics:` direction, or by the
    /// one given: STAGE.METRIC:min or :max.
    #[arg(long = "metric", value_name = "STAGE.METRIC")]
    metrics: Vec<String>,
    /// Draw the metric across the listed runs as a PNG bar chart (needs one --metric).
    #[arg(long, value_name = "OUT.png", requires = "metrics")]
    plot: Option<PathBuf>,
    /// Print the result as JSON on stdout (for scripts).
    #[arg(long)]
    json: bool,
    /// List the runs shared on this remote cache (a name from orchestrate.toml,
    /// s3://BUCKET/PREFIX, or a directory) instead of the store's, marking those already here;
    /// nothing is downloaded into the store.
    #[arg(long, value_name = "REMOTE")]
    remote: Option<String>,
}

/// A listed run, and the asked metrics of it.
#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    line: RunLine,
    /// `runs --remote`: whether the run is in this store too.
    #[serde(skip_serializing_if = "Option::is_none")]
    here: Option<bool>,
    /// The first asked metric's value (`cells` has every one).
    #[serde(skip_serializing_if = "Option::is_none")]
    metric: Option<f64>,
    /// Where the first asked metric comes from, for a `foreach` stage's.
    #[serde(skip_serializing_if = "Option::is_none")]
    metric_from: Option<String>,
    /// Every asked metric, by STAGE.METRIC.
    #[serde(rename = "metrics", skip_serializing_if = "BTreeMap::is_empty")]
    cells: BTreeMap<String, Cell>,
}

/// One asked metric of a run.
#[derive(Clone, Serialize)]
struct Cell {
    value: Option<f64>,
    /// For a `foreach` stage's metric: the variant whose value it is, the best by the
    /// pipeline's `metrics:` direction.
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<String>,
}

impl Cell {
    fn of(manifest: &Loader, r: &RunRecord, spec: &str) -> Cell {
        let (value, from) = crate::history::run_metric(manifest, r, spec).unzip();
        Cell { value, from: from.flatten() }
    }

    /// `0.50`, `0.50 (fit@lr=0.1)` or `—`, with `decimals` places.
    fn text(&self, decimals: usize) -> String {
        let from = self.from.as_ref().map(|f| format!(" ({f})")).unwrap_or_default();
        self.value.map_or("—".to_string(), |x| format!("{x:.decimals$}{from}"))
    }
}

/// Decimal places a column needs: the most any of its values shows (`history::shown`: 7
/// significant digits, at most 6 decimals), so the points line up and 17071 tok/s is not
/// printed as 17071.000000.
fn decimals(values: impl Iterator<Item = f64>) -> usize {
    let places = |x: f64| crate::history::shown(x).split_once('.').map_or(0, |(_, d)| d.len());
    values.map(places).max().unwrap_or(0)
}

impl Row {
    fn of(manifest: &Loader, run: &Run, all: &[Run], metrics: &[String]) -> Row {
        let cells: Vec<(String, Cell)> = metrics.iter().map(|m| (m.clone(), Cell::of(manifest, &run.1, m))).collect();
        let first = cells.first().map(|(_, c)| c.clone());
        Row {
            line: RunLine::among(run, all),
            here: None,
            metric: first.as_ref().and_then(|c| c.value),
            metric_from: first.and_then(|c| c.from),
            cells: cells.into_iter().collect(),
        }
    }

    fn value(&self, metric: &str) -> Option<f64> {
        self.cells.get(metric).and_then(|c| c.value)
    }
}

/// Reads a manifest by digest, for the metric columns.
type Loader<'a> = dyn Fn(&str) -> Option<Manifest> + 'a;

pub(super) fn runs(env: &Env, a: Args) -> Result<i32, Failure> {
    let name = match &a.pipeline {
        Some(file) => Some(env.load(&PipelineArgs { pipeline: file.clone(), sets: vec![] })?.0.name),
        None => None,
    };
    for m in &a.metrics {
        Better::split(m)
            .map_err(|e| Failure::Invalid(crate::diag::Diagnostic::new("E-CLI", format!("--metric {e}"))))?;
    }
    let store = env.open_reader()?;
    let local = |d: &str| store.load_manifest(d).ok();
    let of_pipeline = |(_, r): &&Run| name.as_ref().is_none_or(|n| *n == r.pipeline);
    let near = a.pipeline.as_deref().map(folder_of).unwrap_or_else(|| PathBuf::from("."));
    let mut errors = Vec::new();
    let (rows, place) = match (RemoteArgs { remote: a.remote.clone() }).open(&near, false, Access::Read)? {
        None => {
            let all = store.runs();
            let rows = all.iter().filter(of_pipeline).take(a.limit).map(|run| Row::of(&local, run, &all, &a.metrics));
            (rows.collect::<Vec<Row>>(), None)
        }
        Some(remote) => {
            let rows = remote_rows(&remote, &store, &a, &of_pipeline, &mut errors)?;
            (rows, Some(remote.shown))
        }
    };
    if let Some(png) = &a.plot {
        let [metric] = a.metrics.as_slice() else {
            let msg = "--plot draws one metric: give one --metric";
            return Err(Failure::Invalid(crate::diag::Diagnostic::new("E-CLI", msg)));
        };
        plot(&rows, metric, png)?;
    }
    for metric in a.metrics.iter().filter(|m| !rows.is_empty() && rows.iter().all(|r| r.value(m).is_none())) {
        eprintln!(
            "note: no listed run recorded `{metric}` (`orchestrate show P STAGE` lists a stage's metrics; a \
             `foreach` stage's metric needs a direction to pick its best variant: under `metrics:`, or \
             `--metric {metric}:min`)"
        );
    }
    print_errors(&errors);
    let of = name.map(|n| format!(" for pipeline `{n}`")).unwrap_or_default();
    if a.json {
        print_json(&rows)?;
    } else if rows.is_empty() {
        match &place {
            Some(remote) => println!("no runs shared on {remote}{of}"),
            None => println!("no runs recorded{of}"),
        }
    } else {
        print_table(&rows, &a.metrics);
        // The remote as the user named it (`team`, not the URL it resolves to).
        if let Some(given) = a.remote.as_deref().filter(|_| rows.iter().any(|r| r.here == Some(false))) {
            println!("here no: the run is not in this store; `orchestrate pull --run ID --remote {given}` brings it with its results");
        }
    }
    Ok(if errors.is_empty() { 0 } else { 1 })
}

/// `runs --remote`: the remote's runs as rows, each marked whether the store has it. The
/// metric columns read each manifest from the store, else from the remote (read, not kept).
fn remote_rows(
    remote: &Remote,
    store: &Store,
    a: &Args,
    of_pipeline: &dyn Fn(&&Run) -> bool,
    errors: &mut Vec<String>,
) -> Result<Vec<Row>, Failure> {
    let rt = runtime()?;
    let listing = |e: RemoteError| anyhow::anyhow!("listing the runs on {}: {e}", remote.shown);
    rt.block_on(remote.probe()).map_err(listing)?;
    let all = rt.block_on(remote.list_runs(errors)).map_err(listing)?;
    let listed: Vec<&Run> = all.iter().filter(of_pipeline).take(a.limit).collect();
    // First ask the metrics of the store alone, keeping what it holds and noting what it
    // lacks; fetch that; then ask again of both, reading no manifest twice.
    let (local, missing) = (RefCell::new(BTreeMap::new()), RefCell::new(BTreeSet::new()));
    let noting = |d: &str| {
        let m = store.load_manifest(d).ok();
        match &m {
            Some(m) => drop(local.borrow_mut().insert(d.to_string(), m.clone())),
            None => drop(missing.borrow_mut().insert(d.to_string())),
        }
        m
    };
    for run in &listed {
        a.metrics.iter().for_each(|m| drop(crate::history::run_metric(&noting, &run.1, m)));
    }
    let mut found = local.into_inner();
    found.extend(rt.block_on(remote.read_manifests(missing.into_inner().into_iter().collect(), errors)));
    let manifest = |d: &str| found.get(d).cloned();
    let here: HashSet<String> = store.runs().into_iter().map(|(id, _)| id).collect();
    let row = |run: &&Run| Row { here: Some(here.contains(&run.0)), ..Row::of(&manifest, run, &all, &a.metrics) };
    Ok(listed.iter().map(row).collect())
}

/// The metric across the listed runs, oldest at the top.
fn plot(rows: &[Row], metric: &str, png: &std::path::Path) -> Result<(), Failure> {
    let with: Vec<&Row> = rows.iter().rev().filter(|r| r.value(metric).is_some()).collect();
    if with.is_empty() {
        let msg = format!("no listed run recorded `{metric}`; `orchestrate show` lists a stage's metrics");
        return Err(Failure::Invalid(crate::diag::Diagnostic::new("E-RUNS", msg)));
    }
    let labels: Vec<String> = with.iter().map(|r| format!("{} {}", r.line.id, r.line.sets.join(" "))).collect();
    let values: Vec<f64> = with.iter().filter_map(|r| r.value(metric)).collect();
    crate::registry::report_templates::bars(png, &format!("{metric} across runs"), &labels, &values, metric, "run")
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", png.display()))?;
    eprintln!("plot: {}", png.display());
    Ok(())
}

fn print_table(rows: &[Row], metrics: &[String]) {
    let count = |n: Option<usize>| n.map_or("?".to_string(), |n| n.to_string());
    // A column per metric, as wide as its name or its widest value (a sweep's names the variant).
    let places: Vec<usize> =
        metrics.iter().map(|m| decimals(rows.iter().filter_map(|r| r.cells.get(m)?.value))).collect();
    let text = |r: &Row, k: usize| r.cells.get(&metrics[k]).map_or("—".to_string(), |c| c.text(places[k]));
    let widths: Vec<usize> = (0..metrics.len())
        .map(|k| rows.iter().map(|r| text(r, k).chars().count()).fold(metrics[k].len(), usize::max))
        .collect();
    let metric_head: String = metrics.iter().zip(&widths).map(|(m, w)| format!("  {m:>w$}")).collect();
    // A name column only when a listed run has a name.
    // A name that moved on to a run that took it later reads `(base)`.
    let named = |r: &RunLine| r.name.as_ref().map(|n| if r.name_moved { format!("({n})") } else { n.clone() });
    let name_width = rows.iter().filter_map(|r| named(&r.line)).map(|n| n.len().max(4)).max();
    let name_of = |n: Option<&str>| name_width.map(|w| format!("{:<w$}  ", n.unwrap_or("-"))).unwrap_or_default();
    // A `by` column only when the runs were made by more than one person or machine (pulled).
    let makers: std::collections::HashSet<_> = rows.iter().map(|r| r.line.by.as_deref()).collect();
    let by_width = (makers.len() > 1).then(|| makers.iter().flatten().map(|b| b.len()).fold(2, usize::max));
    let by_of = |b: Option<&str>| by_width.map(|w| format!("{:<w$}  ", b.unwrap_or("-"))).unwrap_or_default();
    // `runs --remote`: whether each run is in this store too.
    let here_of = |h: Option<&str>| h.map(|h| format!("{h:<4}  ")).unwrap_or_default();
    let here = |r: &Row| here_of(r.here.map(|h| if h { "yes" } else { "no" }));
    println!(
        "{:<12}  {}{}{:<20}  {}{:<12}  {:<13}  {:<13}  {:<9}  {:>9}  {:>4}  {:>6}{metric_head}  set",
        "id",
        here_of(rows.iter().any(|r| r.here.is_some()).then_some("here")),
        name_of(Some("name")),
        "when",
        by_of(Some("by")),
        "pipeline",
        "source",
        "orchestrate",
        "status",
        "duration",
        "ran",
        "reused"
    );
    for r in rows {
        let value: String = widths.iter().enumerate().map(|(k, w)| format!("  {:>w$}", text(r, k))).collect();
        let here = here(r);
        let r = &r.line;
        println!(
            "{:<12}  {}{}{:<20}  {}{:<12}  {:<13}  {:<13}  {:<9}  {:>8.1}s  {:>4}  {:>6}{value}  {}",
            r.id,
            here,
            name_of(named(r).as_deref()),
            r.started_at,
            by_of(r.by.as_deref()),
            r.pipeline,
            r.source.as_ref().map_or("-".to_string(), SourceRev::short),
            r.commit
                .as_ref()
                .map_or("-".to_string(), |c| SourceRev { commit: c.clone(), dirty: r.commit_dirty }.short()),
            r.status,
            r.duration_s,
            count(r.ran),
            count(r.reused),
            r.sets
                .iter()
                .cloned()
                .chain(r.targets.iter().map(|t| format!("--target {t}")))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    if rows.iter().any(|r| r.line.source.as_ref().is_some_and(|s| s.dirty)) {
        println!("* source: the pipeline's repository had uncommitted changes to tracked files when the run started");
    }
    if rows.iter().any(|r| r.line.name_moved) {
        println!("(name): the name now means a run that took it later (`orchestrate name`, `run --name`)");
    }
    if rows.iter().any(|r| r.line.commit_dirty) {
        println!("* orchestrate: the binary was built from a tree with uncommitted changes (`show` names its build)");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_column_takes_the_places_its_values_need() {
        let places = |v: &[f64]| super::decimals(v.iter().copied());
        assert_eq!(places(&[17071.0, 17373.0]), 0);
        assert_eq!(places(&[0.5, 2.25, 3.0]), 2);
        assert_eq!(places(&[0.1 + 0.2]), 1, "0.30000000000000004 is 0.3");
        assert_eq!(places(&[1.0 / 3.0]), 6, "at most 6, as compare rounds");
        assert_eq!(places(&[48417.860129, 105320.148567]), 2, "7 significant digits");
        assert_eq!(places(&[]), 0);
    }
}
