//! `orchestrate runs`: the run history, newest first.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::{print_json, Env, Failure, PipelineArgs};
use crate::history::{Run, RunLine};
use crate::source::SourceRev;
use crate::store::{RunRecord, Store};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// Only runs of this pipeline.
    pipeline: Option<PathBuf>,
    /// At most this many runs.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Add this metric of each run (STAGE.METRIC) as a column; for a `foreach` stage, its best
    /// variant's by the pipeline's `metrics:` direction.
    #[arg(long, value_name = "STAGE.METRIC")]
    metric: Option<String>,
    /// Draw the metric across the listed runs as a PNG bar chart (needs --metric).
    #[arg(long, value_name = "OUT.png", requires = "metric")]
    plot: Option<PathBuf>,
    /// Print the result as JSON on stdout (for scripts).
    #[arg(long)]
    json: bool,
}

/// A listed run, and the asked metric of it.
#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    line: RunLine,
    #[serde(skip_serializing_if = "Option::is_none")]
    metric: Option<f64>,
    /// For a `foreach` stage's metric: the variant whose value it is, the best by the
    /// pipeline's `metrics:` direction.
    #[serde(skip_serializing_if = "Option::is_none")]
    metric_from: Option<String>,
}

/// `STAGE.METRIC` of a run, if that stage is in it and recorded the metric.
fn metric_of(store: &Store, r: &RunRecord, spec: &str) -> Option<f64> {
    let (stage, digest) =
        (r.manifests.iter()).filter(|(s, _)| spec.starts_with(&format!("{s}."))).max_by_key(|(s, _)| s.len())?;
    let m = store.load_manifest(digest).ok()?;
    m.metrics.get(&spec[stage.len() + 1..])?.as_f64()
}

/// `SWEEP.METRIC` of a run for a `foreach` stage SWEEP whose metric the run's `metrics:`
/// declares: the best variant's value, and that variant (ties: the first by name). Variants
/// that did not record the metric are left out.
fn best_of_sweep(store: &Store, r: &RunRecord, spec: &str) -> Option<(f64, String)> {
    let (stage, metric) = spec.split_once('.')?;
    let decl = r.metrics.iter().find(|d| d.stage == stage && d.metric == metric)?;
    let values: BTreeMap<&str, f64> = (r.manifests.iter())
        .filter(|(s, _)| crate::pipeline::is_variant_of(s, stage))
        .filter_map(|(s, digest)| Some((s.as_str(), store.load_manifest(digest).ok()?.metrics.get(metric)?.as_f64()?)))
        .collect();
    let variants: Vec<String> = values.keys().map(|s| s.to_string()).collect();
    let value = |v: &str, _: &str| values.get(v).copied();
    let best = crate::cache_key::best_variant(&value, spec, &variants, metric, decl.better).ok()?;
    Some((*values.get(best.as_str())?, best))
}

impl Row {
    fn of(store: &Store, run: &Run, metric: Option<&str>) -> Row {
        let line = RunLine::of(run);
        let Some(spec) = metric else { return Row { line, metric: None, metric_from: None } };
        match metric_of(store, &run.1, spec) {
            Some(v) => Row { line, metric: Some(v), metric_from: None },
            None => {
                let (metric, from) = best_of_sweep(store, &run.1, spec).unzip();
                Row { line, metric, metric_from: from }
            }
        }
    }
}

pub(super) fn runs(env: &Env, a: Args) -> Result<i32, Failure> {
    let name = match &a.pipeline {
        Some(file) => Some(env.load(&PipelineArgs { pipeline: file.clone(), sets: vec![] })?.0.name),
        None => None,
    };
    let store = env.open_reader()?;
    let rows: Vec<Row> = (store.runs().iter())
        .filter(|(_, r)| name.as_ref().is_none_or(|n| *n == r.pipeline))
        .take(a.limit)
        .map(|run| Row::of(&store, run, a.metric.as_deref()))
        .collect();
    if let (Some(metric), Some(png)) = (&a.metric, &a.plot) {
        plot(&rows, metric, png)?;
    }
    if let Some(metric) = a.metric.as_deref().filter(|_| !rows.is_empty() && rows.iter().all(|r| r.metric.is_none())) {
        eprintln!(
            "note: no listed run recorded `{metric}` (`orchestrate show P STAGE` lists a stage's metrics; a \
             `foreach` stage's metric needs a `metrics:` direction to pick its best variant)"
        );
    }
    if a.json {
        print_json(&rows)?;
    } else if rows.is_empty() {
        println!("no runs recorded{}", name.map(|n| format!(" for pipeline `{n}`")).unwrap_or_default());
    } else {
        print_table(&rows, a.metric.as_deref());
    }
    Ok(0)
}

/// The metric across the listed runs, oldest at the top.
fn plot(rows: &[Row], metric: &str, png: &std::path::Path) -> Result<(), Failure> {
    let with: Vec<&Row> = rows.iter().rev().filter(|r| r.metric.is_some()).collect();
    if with.is_empty() {
        let msg = format!("no listed run recorded `{metric}`; `orchestrate show` lists a stage's metrics");
        return Err(Failure::Invalid(crate::diag::Diagnostic::new("E-RUNS", msg)));
    }
    let labels: Vec<String> = with.iter().map(|r| format!("{} {}", r.line.id, r.line.sets.join(" "))).collect();
    let values: Vec<f64> = with.iter().filter_map(|r| r.metric).collect();
    crate::registry::report_templates::bars(png, &format!("{metric} across runs"), &labels, &values, metric, "run")
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", png.display()))?;
    eprintln!("plot: {}", png.display());
    Ok(())
}

fn print_table(rows: &[Row], metric: Option<&str>) {
    let count = |n: Option<usize>| n.map_or("?".to_string(), |n| n.to_string());
    // A sweep's metric is its best variant's, named beside the value.
    let from_width = rows.iter().filter_map(|r| r.metric_from.as_ref()).map(|f| f.len() + 3).max().unwrap_or(0);
    let width = metric.map_or(0, |m| m.len().max(12 + from_width));
    let metric_head = metric.map(|m| format!("  {m:>width$}")).unwrap_or_default();
    // A name column only when a listed run has a name.
    let name_width = rows.iter().filter_map(|r| r.line.name.as_ref()).map(|n| n.len().max(4)).max();
    let name_of = |n: Option<&str>| name_width.map(|w| format!("{:<w$}  ", n.unwrap_or("-"))).unwrap_or_default();
    println!(
        "{:<12}  {}{:<20}  {:<12}  {:<13}  {:<12}  {:<9}  {:>9}  {:>4}  {:>6}{metric_head}  set",
        "id",
        name_of(Some("name")),
        "when",
        "pipeline",
        "source",
        "orchestrate",
        "status",
        "duration",
        "ran",
        "reused"
    );
    for r in rows {
        let value = match (metric, r.metric) {
            (None, _) => String::new(),
            (Some(_), v) => {
                let from = r.metric_from.as_ref().map(|f| format!(" ({f})")).unwrap_or_default();
                format!("  {:>width$}", v.map_or("—".to_string(), |x| format!("{x:.6}{from}")))
            }
        };
        let r = &r.line;
        println!(
            "{:<12}  {}{:<20}  {:<12}  {:<13}  {:<12}  {:<9}  {:>8.1}s  {:>4}  {:>6}{value}  {}",
            r.id,
            name_of(r.name.as_deref()),
            r.started_at,
            r.pipeline,
            r.source.as_ref().map_or("-".to_string(), SourceRev::short),
            r.commit.as_deref().unwrap_or("-"),
            r.status,
            r.duration_s,
            count(r.ran),
            count(r.reused),
            r.sets.join(" ")
        );
    }
    if rows.iter().any(|r| r.line.source.as_ref().is_some_and(|s| s.dirty)) {
        println!("* the pipeline's repository had uncommitted changes to tracked files when the run started");
    }
}
