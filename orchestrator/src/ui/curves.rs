//! Training curves: a stage's metrics CSVs (rows with `tokens` and `train_loss` or `val_loss`,
//! as the train and distill stages write them, or any stage that writes such a file) drawn with
//! the report stage's plot — on the stage's page, and on the compare page for a stage of both
//! runs whose curves differ, the two runs in one chart.

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{PageError, PageResult, Shared, Ui};
use crate::history::{resolve, short, Run};
use crate::objects::ObjKind;
use crate::registry::report_templates;
use crate::store::{load_manifest, Manifest};

/// Larger CSVs are not drawn (a training log of a million steps is not a curve to render per
/// page view).
const MAX_CSV_BYTES: u64 = 8 << 20;

/// At most this many charts on a compare page.
pub const MAX_COMPARED: usize = 8;

/// One output of a stage that is a training curve, read once.
pub struct Curve {
    name: String,
    digest: String,
    rows: Value,
}

/// The stage's outputs that are training curves, by output name.
pub fn curve_outputs(ui: &Ui, m: &Manifest) -> Vec<Curve> {
    (m.outputs.iter())
        .filter(|(name, e)| e.kind == ObjKind::File && name.ends_with(".csv") && e.size <= MAX_CSV_BYTES)
        .filter_map(|(name, e)| {
            let rows = rows(ui, &e.digest, name).ok().filter(is_curve)?;
            Some(Curve { name: name.clone(), digest: e.digest.clone(), rows })
        })
        .collect()
}

/// A stored CSV as rows (checked against its digest first, as every file the view serves).
fn rows(ui: &Ui, digest: &str, name: &str) -> Result<Value, String> {
    let bytes = ui.objects.read_verified(digest, name).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{name} is not UTF-8 text"))?;
    Ok(report_templates::csv_rows(&text))
}

fn is_curve(rows: &Value) -> bool {
    let first = rows.as_array().and_then(|r| r.first());
    first.is_some_and(|r| r["tokens"].is_number() && (r["train_loss"].is_number() || r["val_loss"].is_number()))
}

fn manifest_of(ui: &Ui, run: &Run, stage: &str) -> Result<Manifest, PageError> {
    let digest = run
        .1
        .manifests
        .get(stage)
        .ok_or_else(|| PageError::NotFound(format!("run {} has no stored result of `{stage}`", short(&run.0))))?;
    load_manifest(&ui.objects, digest).map_err(|e| PageError::Internal(e.to_string()))
}

/// The curves of `stage` in `run`, each labelled `prefix` (if any) and, when the stage has
/// several or no prefix is given, which: the stage for its `metrics.csv` (a distill stage's
/// student), else the output's name without `.csv` (its `control`).
fn series_of(ui: &Ui, run: &Run, stage: &str, prefix: &str, into: &mut Map<String, Value>) -> Result<(), PageError> {
    let outputs = curve_outputs(ui, &manifest_of(ui, run, stage)?);
    let several = outputs.len() > 1;
    for Curve { name, rows, .. } in outputs {
        let which = match name.trim_end_matches(".csv") {
            "metrics" => stage,
            other => other,
        };
        let label = match (prefix.is_empty(), several) {
            (true, _) => which.to_string(),
            (false, true) => format!("{prefix} {which}"),
            (false, false) => prefix.to_string(),
        };
        into.insert(label, rows);
    }
    Ok(())
}

/// The chart as PNG bytes, drawn off the async workers.
async fn png(series: Map<String, Value>, what: String) -> PageResult {
    if series.is_empty() {
        return Err(PageError::NotFound(format!(
            "{what} has no training curves (a CSV output with `tokens` and a loss column)"
        )));
    }
    let drawn = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = dir.path().join("curves.png");
        report_templates::training_curves(&file, &Value::Object(series))?;
        std::fs::read(&file).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| PageError::Internal(e.to_string()))?;
    let bytes = drawn.map_err(|e| PageError::Internal(format!("drawing the curves of {what}: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
}

/// `/runs/{id}/stages/{stage}/curves.png`.
pub async fn stage_png(State(ui): State<Shared>, Path((id, stage)): Path<(String, String)>) -> PageResult {
    let runs = ui.runs()?;
    let run = resolve(&runs, &id).map_err(PageError::NotFound)?;
    let mut series = Map::new();
    series_of(&ui, run, &stage, "", &mut series)?;
    png(series, format!("`{stage}` in run {}", short(&run.0))).await
}

#[derive(Deserialize)]
pub struct CompareCurves {
    a: String,
    b: String,
    stage: String,
}

/// `/compare/curves.png?a=A&b=B&stage=STAGE`: the stage's curves in both runs.
pub async fn compare_png(State(ui): State<Shared>, Query(q): Query<CompareCurves>) -> PageResult {
    let runs = ui.runs()?;
    let bad = |m: String| PageError::BadRequest(format!("compare: {m}"));
    let (a, b) = (resolve(&runs, &q.a).map_err(bad)?, resolve(&runs, &q.b).map_err(bad)?);
    let mut series = Map::new();
    series_of(&ui, a, &q.stage, &format!("A {}", short(&a.0)), &mut series)?;
    series_of(&ui, b, &q.stage, &format!("B {}", short(&b.0)), &mut series)?;
    png(series, format!("`{}` in runs {} and {}", q.stage, short(&a.0), short(&b.0))).await
}

/// The stages of both runs whose curves differ (every one with curves when `all`), by name, at
/// most [`MAX_COMPARED`].
pub fn compared(ui: &Ui, a: &Run, b: &Run, all: bool) -> Vec<String> {
    let curves = |run: &Run, stage: &str| -> Vec<(String, String)> {
        (run.1.manifests.get(stage))
            .and_then(|d| load_manifest(&ui.objects, d).ok())
            .map(|m| curve_outputs(ui, &m).into_iter().map(|c| (c.name, c.digest)).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for stage in b.1.manifests.keys().filter(|s| a.1.manifests.contains_key(*s)) {
        let (in_a, in_b) = (curves(a, stage), curves(b, stage));
        if !in_a.is_empty() && !in_b.is_empty() && (all || in_a != in_b) {
            out.push(stage.clone());
        }
        if out.len() == MAX_COMPARED {
            break;
        }
    }
    out
}
