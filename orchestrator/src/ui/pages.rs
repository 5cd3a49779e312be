//! The history pages: the run list, a run (its graph, stages, metrics, sweeps, reports), a
//! stage, `compare` of two runs, a sweep table, and stored objects.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use minijinja::context;
use serde::{Deserialize, Serialize};

use super::graph::{svg, GraphNode};
use super::{PageError, PageResult, Shared, Ui};
use crate::history::{self, resolve, short, Run, RunLine};
use crate::objects::{is_digest, ObjKind};
use crate::pipeline::split_instance;
use crate::store::{load_manifest, Manifest, RunStage};

/// Everything but unreserved characters and `@` (kept readable in stage names like `vocab@384`).
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~').remove(b'@');

/// A path segment or query value for a URL (stage names carry `@`, `=`, `+`).
pub fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

fn find_run(runs: &[Run], id: &str) -> Result<Run, PageError> {
    resolve(runs, id).cloned().map_err(PageError::NotFound)
}

/// The stages of a run as recorded; for records older than that, the stages with a manifest.
fn stages_of(run: &Run) -> Vec<RunStage> {
    if !run.1.stages.is_empty() {
        return run.1.stages.clone();
    }
    let ran = run.1.ran.clone().unwrap_or_default();
    (run.1.manifests.keys())
        .map(|name| RunStage {
            name: name.clone(),
            status: if ran.contains(name) { "ran" } else { "cached" }.into(),
            needs: vec![],
            error: None,
            log_tail: None,
        })
        .collect()
}

#[derive(Deserialize)]
pub struct RunsQuery {
    pipeline: Option<String>,
    /// A column of this STAGE.METRIC (`:min`/`:max` for a `foreach` stage's best variant).
    metric: Option<String>,
}

/// A listed run, with the asked metric's value and the variant it comes from.
#[derive(Serialize)]
struct RunsRow {
    #[serde(flatten)]
    line: RunLine,
    value: Option<f64>,
    from: Option<String>,
}

pub async fn runs(State(ui): State<Shared>, Query(q): Query<RunsQuery>) -> PageResult {
    let metric = q.metric.as_deref().map(str::trim).filter(|m| !m.is_empty());
    if let Some(m) = metric {
        crate::pipeline::metrics::Better::split(m).map_err(|e| PageError::BadRequest(format!("metric {e}")))?;
    }
    let runs = ui.runs()?;
    let rows: Vec<RunsRow> = (runs.iter())
        .filter(|(_, r)| q.pipeline.as_ref().is_none_or(|p| *p == r.pipeline))
        .map(|run| {
            let (value, from) =
                metric.and_then(|m| history::run_metric(&|d| load_manifest(&ui.objects, d).ok(), &run.1, m)).unzip();
            RunsRow { line: RunLine::among(run, &runs), value, from: from.flatten() }
        })
        .collect();
    // The metrics the listed runs' pipelines declare, offered in the metric field.
    let declared: BTreeSet<String> = (runs.iter())
        .filter(|(_, r)| q.pipeline.as_ref().is_none_or(|p| *p == r.pipeline))
        .flat_map(|(_, r)| r.metrics.iter().map(|d| d.name()))
        .collect();
    let live = super::live_view::state_of(&ui.root);
    let store = ui.root.display().to_string();
    // Who ran each run only when more than one person or machine did (runs pulled from a team).
    let show_by = rows.iter().map(|r| r.line.by.as_deref()).collect::<BTreeSet<_>>().len() > 1;
    ui.render(
        "runs.html",
        context! { runs => rows, live => live, store => store, pipeline => q.pipeline, metric => metric, declared => declared, show_by => show_by },
    )
}

#[derive(Serialize)]
struct StageRow {
    name: String,
    href: String,
    status: String,
    kind: Option<String>,
    duration_s: Option<f64>,
    error: Option<String>,
}

#[derive(Serialize)]
struct MetricCell {
    name: String,
    value: Option<f64>,
    better: crate::pipeline::metrics::Better,
}

/// The declared metrics' values in this run, stage by stage.
fn declared_metrics(run: &Run, manifests: &BTreeMap<String, Manifest>) -> Vec<MetricCell> {
    let mut out = Vec::new();
    for d in &run.1.metrics {
        for (stage, m) in manifests.iter().filter(|(s, _)| d.covers(s)) {
            out.push(MetricCell {
                name: format!("{stage}.{}", d.metric),
                value: m.metrics.get(&d.metric).and_then(|v| v.as_f64()),
                better: d.better,
            });
        }
    }
    out
}

/// The report stages of a run whose output folder holds a `report.md`.
fn reports(ui: &Ui, manifests: &BTreeMap<String, Manifest>) -> Vec<String> {
    (manifests.iter()).filter(|(_, m)| super::report::report_md(ui, m).is_some()).map(|(s, _)| s.clone()).collect()
}

pub async fn run(State(ui): State<Shared>, Path(id): Path<String>) -> PageResult {
    let runs = ui.runs()?;
    let run = find_run(&runs, &id)?;
    let manifests = history::manifests(&ui.objects, &run).map_err(PageError::Internal)?;
    let stages = stages_of(&run);
    let base = format!("/runs/{}", short(&run.0));
    let nodes: Vec<GraphNode> =
        stages.iter().map(|s| GraphNode { name: &s.name, status: &s.status, needs: &s.needs }).collect();
    let graph = svg(&nodes, |name| format!("{base}/stages/{}", seg(name)));
    let rows: Vec<StageRow> = (stages.iter())
        .map(|s| StageRow {
            name: s.name.clone(),
            href: format!("{base}/stages/{}", seg(&s.name)),
            status: s.status.clone(),
            kind: manifests.get(&s.name).map(|m| m.key_input.kind.clone()),
            duration_s: manifests.get(&s.name).map(|m| m.duration_s),
            error: s.error.clone(),
        })
        .collect();
    let swept: BTreeSet<&str> = (stages.iter())
        .filter_map(|s| match split_instance(&s.name) {
            (decl, Some(_)) => Some(decl),
            _ => None,
        })
        .collect();
    // Each sweep with its table, or why there is none (no declared metric to rank by).
    let sweeps: Vec<(&str, Option<String>)> =
        (swept.into_iter()).map(|decl| (decl, history::sweep(&ui.objects, &run, decl, None).err())).collect();
    let previous = (runs.iter())
        .filter(|(_, r)| r.pipeline == run.1.pipeline && r.started_at < run.1.started_at)
        .map(|(id, _)| short(id).to_string())
        .next();
    let provenance = run.1.provenance.as_ref().map(|p| (p.build(), p.machine()));
    ui.render(
        "run.html",
        context! {
            run => RunLine::among(&run, &runs), full_id => &run.0, record => &run.1, graph => graph, stages => rows,
            metrics => declared_metrics(&run, &manifests), sweeps => sweeps,
            reports => reports(&ui, &manifests), previous => previous, provenance => provenance,
            base => base,
        },
    )
}

#[derive(Serialize)]
struct OutputRow {
    name: String,
    digest: String,
    kind: String,
    size: u64,
    href: String,
}

/// A stored log, at most its last 256 KiB (a stage's log can be long; its end says why).
fn log_text(ui: &Ui, digest: &str) -> Option<(String, bool)> {
    const MAX: usize = 256 * 1024;
    let bytes = ui.objects.read_verified(digest, "log").ok()?;
    let cut = bytes.len() > MAX;
    let tail = &bytes[bytes.len().saturating_sub(MAX)..];
    Some((String::from_utf8_lossy(tail).into_owned(), cut))
}

fn pretty(v: &BTreeMap<String, serde_json::Value>) -> Vec<(String, String)> {
    v.iter().map(|(k, v)| (k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_string))).collect()
}

pub async fn stage(State(ui): State<Shared>, Path((id, stage)): Path<(String, String)>) -> PageResult {
    let run = find_run(&ui.runs()?, &id)?;
    let recorded = stages_of(&run).into_iter().find(|s| s.name == stage);
    let manifest = match run.1.manifests.get(&stage) {
        Some(d) => Some(load_manifest(&ui.objects, d).map_err(|e| PageError::Internal(e.to_string()))?),
        None => None,
    };
    let Some(recorded) = recorded else {
        let names: Vec<String> = stages_of(&run).into_iter().map(|s| s.name).collect();
        return Err(PageError::NotFound(format!(
            "run {} has no stage `{stage}` (its stages: {})",
            short(&run.0),
            names.join(", ")
        )));
    };
    let base = format!("/runs/{}", short(&run.0));
    let ctx = match &manifest {
        Some(m) => {
            let outputs: Vec<OutputRow> = (m.outputs.iter())
                .map(|(name, e)| OutputRow {
                    name: name.clone(),
                    digest: e.digest.clone(),
                    kind: if e.kind == ObjKind::Tree { "folder" } else { "file" }.into(),
                    size: e.size,
                    href: format!("/objects/{}?name={}", e.digest, seg(name)),
                })
                .collect();
            let inputs: Vec<(String, String, bool)> =
                (m.key_input.inputs.iter()).map(|(n, d)| (n.clone(), d.clone(), ui.objects.has(d))).collect();
            // Rounded as the tables round them; the exact value shows on hover.
            let metrics: Vec<(&String, String, String)> =
                (m.metrics.iter()).map(|(k, v)| (k, history::shown_value(v), v.to_string())).collect();
            let log = m.log.as_deref().and_then(|d| log_text(&ui, d));
            let prov = m.provenance.as_ref().map(|p| (p.build(), p.machine(), p.simd_path.clone(), p.ran_on.clone()));
            context! {
                manifest => m, outputs => outputs, inputs => inputs, metrics => metrics,
                params => pretty(&m.key_input.params), fields => pretty(&m.key_input.fields),
                log => log, provenance => prov, curves => !super::curves::curve_outputs(&ui, m).is_empty(),
                computed_here => m.started_at >= run.1.started_at && recorded.status == "ran",
            }
        }
        None => context! {},
    };
    let pipeline_file = run.1.pipeline_file.clone();
    ui.render(
        "stage.html",
        context! { run => RunLine::of(&run), stage => recorded, base => base, pipeline_file => pipeline_file, ..ctx },
    )
}

#[derive(Deserialize)]
pub struct CompareQuery {
    a: Option<String>,
    b: Option<String>,
    all: Option<String>,
}

pub async fn compare(State(ui): State<Shared>, Query(q): Query<CompareQuery>) -> PageResult {
    let runs = ui.runs()?;
    let rows: Vec<RunLine> = runs.iter().map(RunLine::of).collect();
    if runs.len() < 2 && q.a.is_none() && q.b.is_none() {
        return ui.render("compare.html", context! { runs => rows, comparison => (), a => "", b => "" });
    }
    let bad = |m: String| PageError::BadRequest(format!("compare: {m}"));
    let b = resolve(&runs, q.b.as_deref().unwrap_or("latest")).map_err(bad)?;
    // Without A, B's pipeline's run before it, as on the command line; none: the empty form.
    let a = match q.a.as_deref() {
        Some(spec) => resolve(&runs, spec).map_err(bad)?,
        None => match history::base_before(&runs, b) {
            Ok(a) => a,
            Err(_) => return ui.render("compare.html", context! { runs => rows, comparison => (), a => "", b => "" }),
        },
    };
    let all = q.all.as_deref().is_some_and(|v| !v.is_empty() && v != "0");
    let mut c = history::compare(&ui.objects, a, b, all).map_err(PageError::BadRequest)?;
    (c.a.name_moved, c.b.name_moved) = (history::name_moved(a, &runs), history::name_moved(b, &runs));
    let curves = super::curves::compared(&ui, a, b, all);
    ui.render(
        "compare.html",
        context! { runs => rows, comparison => c, a => short(&a.0), b => short(&b.0), all => all, curves => curves },
    )
}

#[derive(Deserialize)]
pub struct SweepQuery {
    by: Option<String>,
}

pub async fn sweep(
    State(ui): State<Shared>,
    Path((id, stage)): Path<(String, String)>,
    Query(q): Query<SweepQuery>,
) -> PageResult {
    let run = find_run(&ui.runs()?, &id)?;
    let sw = history::sweep(&ui.objects, &run, &stage, q.by.as_deref()).map_err(PageError::NotFound)?;
    let base = format!("/runs/{}", short(&run.0));
    ui.render("sweep.html", context! { run => RunLine::of(&run), sweep => sw, base => base })
}

#[derive(Deserialize)]
pub struct ObjectQuery {
    name: Option<String>,
}

/// The media type a stored file is served with, from the name it was stored under.
fn media_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext.to_ascii_lowercase()).as_deref() {
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("csv") => "text/csv; charset=utf-8",
        Some("md" | "txt" | "log" | "yaml" | "yml" | "j2") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A name safe inside a `Content-Disposition` header.
fn file_name(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_graphic() && *c != '"' && *c != '\\' && *c != '/').collect()
}

/// A stored file's bytes (checked against its digest), with its media type.
pub fn file_response(ui: &Ui, digest: &str, name: &str) -> PageResult {
    let bytes = ui.objects.read_verified(digest, name).map_err(|e| match e {
        crate::objects::ObjectError::Missing { .. } => {
            PageError::NotFound(format!("object {digest} is not in the store (a `file:` input is read in place, not stored; `gc` may have deleted it)"))
        }
        other => PageError::Internal(other.to_string()),
    })?;
    let disposition = format!("inline; filename=\"{}\"", file_name(name));
    Ok(([(header::CONTENT_TYPE, media_type(name).to_string()), (header::CONTENT_DISPOSITION, disposition)], bytes)
        .into_response())
}

pub async fn object(State(ui): State<Shared>, Path(digest): Path<String>, Query(q): Query<ObjectQuery>) -> PageResult {
    if !is_digest(&digest) {
        return Err(PageError::NotFound(format!("`{digest}` is not an object digest (64 hex characters)")));
    }
    let name = q.name.unwrap_or_else(|| digest.clone());
    let is_tree = super::catalog::tagged_as(&ui.objects.path(&digest), crate::objects::TREE_TAG);
    if let Some(tree) = is_tree.then(|| ui.objects.read_tree(&digest, &name).ok()).flatten() {
        let entries: Vec<OutputRow> = (tree.entries.iter())
            .map(|e| OutputRow {
                name: e.name.clone(),
                digest: e.digest.clone(),
                kind: if e.kind == ObjKind::Tree { "folder" } else { "file" }.into(),
                size: e.size,
                href: format!("/objects/{}?name={}", e.digest, seg(&e.name)),
            })
            .collect();
        return ui.render("tree.html", context! { name => name, digest => digest, entries => entries });
    }
    file_response(&ui, &digest, &name)
}
