//! Run history: runs found by id (`latest`, `latest~N`, or a digest prefix) and two runs
//! compared — params, metrics (judged by the pipeline's `metrics:` directions), which stages
//! reran and why, which artifacts changed.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::cache_key::explain;
use crate::objects::ObjectStore;
use crate::pipeline::metrics::{Band, Better, MetricDecl};
use crate::pipeline::{is_variant_of, split_instance};
use crate::source::SourceRev;
use crate::store::{iso8601, load_manifest, Manifest, RunRecord};

mod gate;
pub use gate::{Gate, Verdict};

/// A run: the digest of its record (its id) and the record.
pub type Run = (String, RunRecord);

/// The id people type: the first 12 characters of the record's digest.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// A run in one line: what `orchestrate runs` lists and the web view's run list shows.
#[derive(Debug, Serialize)]
pub struct RunLine {
    /// The short id.
    pub id: String,
    /// The name given with `run --name` or later with `orchestrate name`.
    pub name: Option<String>,
    /// Whether the name has moved on: it now means a run that took it later.
    pub name_moved: bool,
    pub started_at: String,
    pub pipeline: String,
    /// The revision of the pipeline's git repository as the run started.
    pub source: Option<SourceRev>,
    /// The commit orchestrate was built from.
    pub commit: Option<String>,
    /// Whether orchestrate was built from a tree with uncommitted changes.
    pub commit_dirty: bool,
    pub sets: Vec<String>,
    /// The stages `--target` limited the run to; empty: every stage.
    pub targets: Vec<String>,
    pub status: String,
    pub duration_s: f64,
    /// Unknown (`null`) for runs recorded before run history kept it.
    pub ran: Option<usize>,
    pub reused: Option<usize>,
    pub pulled: usize,
    /// Who ran it and where (`user@host`), if the record says.
    pub by: Option<String>,
}

impl RunLine {
    /// The line of `run` among `runs` (all of the store's): its name marked if it moved on.
    pub fn among(run: &Run, runs: &[Run]) -> RunLine {
        RunLine { name_moved: name_moved(run, runs), ..RunLine::of(run) }
    }

    pub fn of((id, r): &Run) -> RunLine {
        let ran = r.ran.as_ref().map(Vec::len);
        RunLine {
            id: short(id).to_string(),
            name: r.name.clone(),
            name_moved: false,
            started_at: iso8601(r.started_at),
            pipeline: r.pipeline.clone(),
            source: r.source.clone(),
            commit: r.provenance.as_ref().and_then(|p| p.commit.clone()).map(|c| c[..c.len().min(12)].to_string()),
            commit_dirty: r.provenance.as_ref().is_some_and(|p| p.dirty),
            sets: r.sets.clone(),
            targets: r.targets.clone(),
            status: r.status.clone(),
            duration_s: r.finished_at - r.started_at,
            reused: ran.map(|n| r.manifests.len().saturating_sub(n + r.pulled.len())),
            ran,
            pulled: r.pulled.len(),
            by: r.by.clone(),
        }
    }
}

/// Whether `run`'s name has moved on among `runs`: it now means a run that took it later.
pub fn name_moved(run: &Run, runs: &[Run]) -> bool {
    let holder = run.1.name.as_deref().and_then(|n| crate::store::names::holder(runs, n));
    holder.is_some_and(|(id, _)| *id != run.0)
}

/// Why `name` cannot name a run, if it cannot: a name must not read as a run id or as
/// `latest~N`, and must fit in a table and a URL.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("a run name has 1 to 64 characters".into());
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err("a run name has only letters, digits, `.`, `_` and `-`".into());
    }
    if name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a run name of hex digits only would read as a run id; add another letter".into());
    }
    if name.starts_with("latest") {
        return Err("`latest…` already names runs by their age".into());
    }
    Ok(())
}

/// `latest`, `latest~N`, the name of a run (`run --name` or `orchestrate name`; the run that
/// took it last), or a unique prefix (4+ characters) of a run id, among `runs` (newest first).
pub fn resolve<'r>(runs: &'r [Run], spec: &str) -> Result<&'r Run, String> {
    resolve_in(runs, spec, "the store")
}

/// [`resolve`] among the runs of `place` (`the store`, `the remote …`), which messages name.
pub fn resolve_in<'r>(runs: &'r [Run], spec: &str, place: &str) -> Result<&'r Run, String> {
    let back = match spec.strip_prefix("latest") {
        Some("") => Some(0),
        Some(rest) => match rest.strip_prefix('~').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => Some(n),
            None => return Err(format!("`{spec}`: write `latest` or `latest~N` (N runs before the latest)")),
        },
        None => None,
    };
    let local = place == "the store";
    if let Some(n) = back {
        return runs.get(n).ok_or_else(|| match runs.len() {
            0 if local => format!("`{spec}`: the store has no runs yet (`orchestrate run` records one)"),
            0 => format!("`{spec}`: {place} has no runs yet"),
            1 => format!("`{spec}`: {place} has only 1 run (`latest`)"),
            k => format!("`{spec}`: {place} has only {k} runs (`latest~{}` is the oldest)", k - 1),
        });
    }
    if let Some(named) = crate::store::names::holder(runs, spec) {
        return Ok(named);
    }
    // A teammate's run is on the remote until pulled: say how to see and fetch it.
    let team = if local {
        "; a teammate's run: `orchestrate runs --remote R` lists the remote's, `orchestrate pull --run RUN` brings one"
    } else {
        ""
    };
    if spec.len() < 4 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "no run is named `{spec}` in {place}, and it is not a run id: give `latest`, `latest~N`, a name from \
             `orchestrate runs`, or 4+ hex characters of an id{team}"
        ));
    }
    let found: Vec<&Run> = runs.iter().filter(|(id, _)| id.starts_with(&spec.to_ascii_lowercase())).collect();
    match found.as_slice() {
        [one] => Ok(one),
        [] if local => Err(format!("no run `{spec}` in the store; `orchestrate runs` lists them{team}")),
        [] => Err(format!("no run `{spec}` in {place}")),
        many => Err(format!(
            "`{spec}` matches {} runs ({}); give more characters",
            many.len(),
            many.iter().map(|(id, _)| short(id)).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The default base run of a comparison with `b`: the run before it (newest first in `runs`)
/// of `b`'s own pipeline, so that another pipeline's run in between is not taken.
pub fn base_before<'r>(runs: &'r [Run], b: &Run) -> Result<&'r Run, String> {
    let mut older = runs.iter().skip_while(|r| r.0 != b.0).skip(1);
    older.find(|r| r.1.pipeline == b.1.pipeline).ok_or_else(|| {
        format!("run {} is the oldest run of pipeline `{}` here: name the base run A", short(&b.0), b.1.pipeline)
    })
}

/// One side of a comparison, in short.
#[derive(Debug, Serialize)]
pub struct Side {
    pub id: String,
    pub name: Option<String>,
    /// Whether the name has moved on to a run that took it later (set by the caller, who
    /// has the store's runs).
    pub name_moved: bool,
    pub pipeline: String,
    pub started_at: f64,
    /// The pipeline repository's revision as the run started.
    pub source: Option<SourceRev>,
    /// The commit orchestrate was built from.
    pub commit: Option<String>,
    /// Whether orchestrate was built from a tree with uncommitted changes.
    pub commit_dirty: bool,
    pub sets: Vec<String>,
    /// The stages `--target` limited the run to; empty: every stage.
    pub targets: Vec<String>,
    pub status: String,
    /// Who ran it and where (`user@host`), if the record says.
    pub by: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ParamRow {
    pub name: String,
    pub a: Option<Value>,
    pub b: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct MetricRow {
    pub name: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    pub delta: Option<f64>,
    pub delta_pct: Option<f64>,
    /// The declared direction, if the pipeline declares this metric.
    pub better: Option<Better>,
    /// `better`, `worse`, `same`, or `noise` (a change within the declared `within:` band),
    /// when declared and present in both runs.
    pub verdict: Option<String>,
    /// The declared band within which a change is noise.
    pub within: Option<Band>,
    /// The stage (instance) that records it, and the metric's own name (`name` is the two
    /// joined by a dot; instance names may contain dots, so it is not split back).
    #[serde(skip)]
    pub stage: String,
    #[serde(skip)]
    pub metric: String,
}

#[derive(Debug, Serialize)]
pub struct StageRow {
    pub stage: String,
    /// `reran` (by B), `changed` (B reused a result that differs from A's), `added`, `removed`,
    /// `left out` (by one run's `--target`) or `same`.
    pub change: String,
    pub reasons: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ArtifactRow {
    pub name: String,
    pub a: Option<(String, u64)>,
    pub b: Option<(String, u64)>,
}

#[derive(Debug, Serialize)]
pub struct Comparison {
    pub a: Side,
    pub b: Side,
    pub params: Vec<ParamRow>,
    pub metrics: Vec<MetricRow>,
    pub stages: Vec<StageRow>,
    pub artifacts: Vec<ArtifactRow>,
}

fn side(run: &Run) -> Side {
    let (id, r) = run;
    Side {
        id: id.clone(),
        name: r.name.clone(),
        name_moved: false,
        pipeline: r.pipeline.clone(),
        started_at: r.started_at,
        source: r.source.clone(),
        commit: r.provenance.as_ref().and_then(|p| p.commit.clone()),
        commit_dirty: r.provenance.as_ref().is_some_and(|p| p.dirty),
        sets: r.sets.clone(),
        targets: r.targets.clone(),
        status: r.status.clone(),
        by: r.by.clone(),
    }
}

/// Every stage's manifest of a run.
pub fn manifests(objects: &ObjectStore, run: &Run) -> Result<BTreeMap<String, Manifest>, String> {
    let mut out = BTreeMap::new();
    for (stage, digest) in &run.1.manifests {
        let m = load_manifest(objects, digest).map_err(|e| format!("run {}: stage `{stage}`: {e}", short(&run.0)))?;
        out.insert(stage.clone(), m);
    }
    Ok(out)
}

/// `prefix.key.sub` → scalar, for every leaf of a params map.
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                flatten(&format!("{prefix}.{k}"), x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// Every param of the stages in `ms` but those in `skip`, as `stage.param.sub`.
fn params_of(ms: &BTreeMap<String, Manifest>, skip: &BTreeSet<&String>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for (stage, m) in ms.iter().filter(|(s, _)| !skip.contains(s)) {
        for (k, v) in m.key_input.params.iter().chain(&m.key_input.fields) {
            flatten(&format!("{stage}.{k}"), v, &mut out);
        }
    }
    out
}

/// The declarations of both runs, B's winning where both declare one.
fn declarations(a: &RunRecord, b: &RunRecord) -> Vec<MetricDecl> {
    let mut out: Vec<MetricDecl> = b.metrics.clone();
    out.extend(a.metrics.iter().filter(|d| !b.metrics.iter().any(|x| x.name() == d.name())).cloned());
    out
}

fn number(m: Option<&Manifest>, metric: &str) -> Option<f64> {
    m?.metrics.get(metric)?.as_f64()
}

/// The metric rows: declared metrics of every stage they cover, plus (with `all`) every other
/// numeric metric. A declared metric that a stage present in a run did not record is an error
/// when that run's pipeline declares it (runs of two pipelines may name different things
/// alike).
fn metric_rows(
    decls: &[MetricDecl],
    runs: [&RunRecord; 2],
    ma: &BTreeMap<String, Manifest>,
    mb: &BTreeMap<String, Manifest>,
    all: bool,
) -> Result<Vec<MetricRow>, String> {
    let stages: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    let mut names: BTreeMap<String, (String, String, Option<Better>, Option<Band>)> = BTreeMap::new();
    for d in decls {
        for s in stages.iter().filter(|s| d.covers(s)) {
            for (run, m) in runs.iter().zip([ma.get(*s), mb.get(*s)]).filter_map(|(r, m)| Some((r, m?))) {
                if number(Some(m), &d.metric).is_none() && run.metrics.contains(d) {
                    let recorded: Vec<&str> = m.metrics.keys().map(String::as_str).collect();
                    let recorded = match recorded.is_empty() {
                        true => format!("it records none; {}", crate::pipeline::metrics::HOW_TO_RECORD),
                        false => format!("it records: {}", recorded.join(", ")),
                    };
                    return Err(format!(
                        "metric `{}` is declared, but stage `{s}` did not record `{}` ({recorded})",
                        d.name(),
                        d.metric,
                    ));
                }
            }
            names.insert(format!("{s}.{}", d.metric), ((*s).clone(), d.metric.clone(), Some(d.better), d.within));
        }
    }
    if all {
        for s in &stages {
            for m in [ma.get(*s), mb.get(*s)].into_iter().flatten() {
                for (k, v) in &m.metrics {
                    if v.is_number() {
                        names.entry(format!("{s}.{k}")).or_insert(((*s).clone(), k.clone(), None, None));
                    }
                }
            }
        }
    }
    Ok(names
        .into_iter()
        .map(|(name, (stage, metric, better, within))| {
            let (a, b) = (number(ma.get(&stage), &metric), number(mb.get(&stage), &metric));
            let delta = a.zip(b).map(|(a, b)| b - a);
            let delta_pct = a.zip(delta).filter(|(a, _)| *a != 0.0).map(|(a, d)| d / a.abs() * 100.0);
            let noise = |a: f64, b: f64| within.is_some_and(|w| (b - a).abs() <= w.allowed(a));
            let verdict = better.zip(a.zip(b)).map(|(dir, (a, b))| match dir.judge(a, b) {
                Some(_) if noise(a, b) => "noise".to_string(),
                Some(true) => "better".to_string(),
                Some(false) => "worse".to_string(),
                None => "same".to_string(),
            });
            MetricRow { name, a, b, delta, delta_pct, better, verdict, within, stage, metric }
        })
        .collect())
}

fn stage_rows(
    [run_a, run_b]: [&RunRecord; 2],
    ma: &BTreeMap<String, Manifest>,
    mb: &BTreeMap<String, Manifest>,
) -> Vec<StageRow> {
    let stages: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    let ran_in_b = |s: &str| run_b.ran.as_ref().is_some_and(|r| r.iter().any(|x| x == s));
    // A result that differs from A's but that B took from the store was not rerun by B: say
    // when it was computed. (A record from before `ran` was kept cannot tell; it says "reran".)
    let differs = |s: &str, b: &Manifest, mut reasons: Vec<String>| {
        if run_b.ran.is_none() || ran_in_b(s) {
            return ("reran", reasons);
        }
        reasons.push(format!("B reused the result computed at {}", iso8601(b.started_at)));
        ("changed", reasons)
    };
    let left_out = |side: &str, r: &RunRecord| ("left out", vec![format!("run {side} ran with {}", r.targets_shown())]);
    stages
        .into_iter()
        .map(|s| {
            let (change, reasons) = match (ma.get(s), mb.get(s)) {
                (Some(a), Some(b)) if a == b && !ran_in_b(s) => ("same", vec![]),
                (Some(a), Some(b)) if a.key != b.key => differs(s, b, explain(&a.key_input, &b.key_input)),
                (Some(_), Some(b)) => differs(s, b, vec!["same inputs, computed again".to_string()]),
                (None, Some(_)) if run_a.left_out(s) => left_out("A", run_a),
                (None, Some(_)) => ("added", vec![]),
                (Some(_), None) if run_b.left_out(s) => left_out("B", run_b),
                (Some(_), None) => ("removed", vec![]),
                (None, None) => ("same", vec![]),
            };
            StageRow { stage: s.clone(), change: change.into(), reasons }
        })
        .collect()
}

fn artifact_rows(
    ma: &BTreeMap<String, Manifest>,
    mb: &BTreeMap<String, Manifest>,
    skip: &BTreeSet<&String>,
) -> Vec<ArtifactRow> {
    let mut names: BTreeMap<String, ArtifactRow> = BTreeMap::new();
    for (side, ms) in [(0, ma), (1, mb)] {
        for (stage, m) in ms.iter().filter(|(s, _)| !skip.contains(s)) {
            for (o, e) in &m.outputs {
                let name = format!("{stage}.{o}");
                let row = names.entry(name.clone()).or_insert(ArtifactRow { name, a: None, b: None });
                let v = Some((e.digest.clone(), e.size));
                if side == 0 {
                    row.a = v;
                } else {
                    row.b = v;
                }
            }
        }
    }
    names.into_values().collect()
}

/// Compare run `a` (the base) with run `b`. Without `all`, only what differs.
pub fn compare(objects: &ObjectStore, a: &Run, b: &Run, all: bool) -> Result<Comparison, String> {
    let (ma, mb) = (manifests(objects, a)?, manifests(objects, b)?);
    // A stage one run's `--target` left out has no params or outputs there: not a difference
    // (the stage row says it was left out).
    let skip: BTreeSet<&String> = (ma.keys().filter(|s| !mb.contains_key(*s) && b.1.left_out(s)))
        .chain(mb.keys().filter(|s| !ma.contains_key(*s) && a.1.left_out(s)))
        .collect();
    let (pa, pb) = (params_of(&ma, &skip), params_of(&mb, &skip));
    let names: BTreeSet<&String> = pa.keys().chain(pb.keys()).collect();
    let params = (names.into_iter())
        .map(|n| ParamRow { name: n.clone(), a: pa.get(n).cloned(), b: pb.get(n).cloned() })
        .filter(|r| all || r.a != r.b)
        .collect();
    let metrics = metric_rows(&declarations(&a.1, &b.1), [&a.1, &b.1], &ma, &mb, all)?
        .into_iter()
        .filter(|r| all || r.a != r.b)
        .collect();
    let stages = stage_rows([&a.1, &b.1], &ma, &mb).into_iter().filter(|r| all || r.change != "same").collect();
    let artifacts = artifact_rows(&ma, &mb, &skip).into_iter().filter(|r| all || r.a != r.b).collect();
    Ok(Comparison { a: side(a), b: side(b), params, metrics, stages, artifacts })
}

/// Every variant of a `foreach` stage in one run, with the params that vary and the metrics.
#[derive(Debug, Serialize)]
pub struct Sweep {
    pub stage: String,
    pub run: String,
    /// The metric the rows are sorted by (best first), and which way is better.
    pub by: String,
    pub better: Better,
    /// The swept values: a grid's keys, or `item` for a plain `foreach` list.
    pub params: Vec<String>,
    /// The metrics shown: the one ranked by, and those declared covering the variants.
    pub metrics: Vec<String>,
    pub rows: Vec<SweepRow>,
}

#[derive(Debug, Serialize)]
pub struct SweepRow {
    pub variant: String,
    pub params: BTreeMap<String, Value>,
    pub metrics: BTreeMap<String, Option<f64>>,
}

/// The sweep's own values, read back from an instance's label: `lr=0.1+model=a` (a grid), or
/// `384` (a plain list, as `item`).
fn swept_values(label: &str) -> BTreeMap<String, Value> {
    let parse = |x: &str| serde_json::from_str::<Value>(x).unwrap_or_else(|_| Value::String(x.to_string()));
    if label.contains('=') {
        label.split('+').filter_map(|kv| kv.split_once('=')).map(|(k, x)| (k.to_string(), parse(x))).collect()
    } else {
        BTreeMap::from([("item".to_string(), parse(label))])
    }
}

/// Best first by `metric` (stable: ties keep name order); every row must have it.
fn rank(rows: &mut [SweepRow], metric: &str, better: Better) -> Result<(), String> {
    let key = |r: &SweepRow| r.metrics.get(metric).copied().flatten();
    if let Some(r) = rows.iter().find(|r| key(r).is_none()) {
        return Err(format!(
            "stage `{}` did not record the metric `{metric}` ({})",
            r.variant,
            crate::pipeline::metrics::HOW_TO_RECORD
        ));
    }
    rows.sort_by(|a, b| {
        let order = key(a).partial_cmp(&key(b)).unwrap_or(std::cmp::Ordering::Equal);
        if better == Better::Max {
            order.reverse()
        } else {
            order
        }
    });
    Ok(())
}

/// A number as every table shows it: 7 significant digits, at most 6 decimals, no trailing
/// zeros — so 0.09999999999999998 reads 0.1, 48417.860129 tok/s reads 48417.86 and 17071.0
/// reads 17071.
pub fn shown(x: f64) -> String {
    if !x.is_finite() || x == 0.0 {
        return if x == 0.0 { "0".into() } else { x.to_string() };
    }
    let decimals = (6 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
    let text = format!("{x:.decimals$}");
    let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
    if text == "-0" {
        "0".into()
    } else {
        text.to_string()
    }
}

/// A recorded metric as `show` and the web view print it: a fractional number as [`shown`]
/// (the exact value stays in `--json`), an integer in full, a string bare, anything else as JSON.
pub fn shown_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Number(n) if n.is_f64() => n.as_f64().map_or_else(|| n.to_string(), shown),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A run's `STAGE.METRIC`, as `runs --metric` and the web view's run list show it: the stage's
/// recorded value; for a `foreach` stage, the best variant's (by the direction given as
/// `STAGE.METRIC:min|max`, else the declared one) and that variant's name. `manifest` reads a
/// manifest by digest: from the store, or as `runs --remote` has fetched it.
pub fn run_metric(
    manifest: &dyn Fn(&str) -> Option<Manifest>,
    r: &RunRecord,
    spec: &str,
) -> Option<(f64, Option<String>)> {
    let (name, better) = Better::split(spec).unwrap_or((spec, None));
    match stage_metric(manifest, r, name) {
        Some(v) => Some((v, None)),
        None => best_of_sweep(manifest, r, name, better).map(|(v, from)| (v, Some(from))),
    }
}

/// `STAGE.METRIC` of a run, if that stage is in it and recorded the metric.
fn stage_metric(manifest: &dyn Fn(&str) -> Option<Manifest>, r: &RunRecord, spec: &str) -> Option<f64> {
    let (stage, digest) =
        (r.manifests.iter()).filter(|(s, _)| spec.starts_with(&format!("{s}."))).max_by_key(|(s, _)| s.len())?;
    manifest(digest)?.metrics.get(&spec[stage.len() + 1..])?.as_f64()
}

/// `SWEEP.METRIC` of a run for a `foreach` stage SWEEP, with a direction: the best variant's
/// value, and that variant (ties: the first by name). Variants that did not record the metric
/// are left out.
fn best_of_sweep(
    manifest: &dyn Fn(&str) -> Option<Manifest>,
    r: &RunRecord,
    spec: &str,
    better: Option<Better>,
) -> Option<(f64, String)> {
    let (stage, metric) = spec.split_once('.')?;
    let declared = || r.metrics.iter().find(|d| d.stage == stage && d.metric == metric).map(|d| d.better);
    let better = better.or_else(declared)?;
    let values: BTreeMap<&str, f64> = (r.manifests.iter())
        .filter(|(s, _)| is_variant_of(s, stage))
        .filter_map(|(s, digest)| Some((s.as_str(), manifest(digest)?.metrics.get(metric)?.as_f64()?)))
        .collect();
    let variants: Vec<String> = values.keys().map(|s| s.to_string()).collect();
    let value = |v: &str, _: &str| values.get(v).copied();
    let best = crate::cache_key::best_variant(&value, spec, &variants, metric, better).ok()?;
    Some((*values.get(best.as_str())?, best))
}

/// What `--sweep STAGE [--by B]` ranks by: `B` as `METRIC` or `STAGE.METRIC`, declared under
/// `metrics:`, or with its direction (`METRIC:min`, `METRIC:max`) whether declared or not;
/// without `--by`, the first declared metric covering the stage.
fn ranked_by(
    stage: &str,
    by: Option<&str>,
    decls: &[&MetricDecl],
    variants: &BTreeMap<&String, &Manifest>,
) -> Result<(String, Better), String> {
    let recorded = || {
        let names: BTreeSet<&str> = variants.values().flat_map(|m| m.metrics.keys()).map(String::as_str).collect();
        names.into_iter().collect::<Vec<_>>().join(", ")
    };
    let Some(spec) = by else {
        return decls.first().map(|d| (d.metric.clone(), d.better)).ok_or_else(|| {
            format!(
                "no metric of `{stage}` is declared, so the variants cannot be ranked: declare one (e.g. \
                 `metrics: {{{stage}.val_loss: min}}`) or name one with its direction, `--by METRIC:min` \
                 (its variants record: {})",
                recorded()
            )
        });
    };
    let (name, given) = Better::split(spec).map_err(|e| format!("--by {e}"))?;
    let name = name.strip_prefix(&format!("{stage}.")).unwrap_or(name);
    let declared = decls.iter().find(|d| d.metric == name).map(|d| d.better);
    match given.or(declared) {
        Some(better) => Ok((name.to_string(), better)),
        None => Err(format!(
            "`--by {spec}`: `{name}` is not a declared metric of `{stage}` in that run: give its direction, \
             `--by {name}:min` or `--by {name}:max` (its variants record: {})",
            recorded()
        )),
    }
}

/// The sweep of `stage` in `run`, sorted by `by` (else the first declared metric covering it).
pub fn sweep(objects: &ObjectStore, run: &Run, stage: &str, by: Option<&str>) -> Result<Sweep, String> {
    let all = manifests(objects, run)?;
    let variants: BTreeMap<&String, &Manifest> = all.iter().filter(|(n, _)| is_variant_of(n, stage)).collect();
    if variants.is_empty() {
        let stages: BTreeSet<&str> = (all.keys())
            .filter_map(|n| match split_instance(n) {
                (decl, Some(_)) => Some(decl),
                _ => None,
            })
            .collect();
        let known =
            if stages.is_empty() { "none".to_string() } else { stages.into_iter().collect::<Vec<_>>().join(", ") };
        return Err(format!("run {} has no variants of `{stage}` (stages with foreach in it: {known})", short(&run.0)));
    }
    let decls: Vec<&MetricDecl> = run.1.metrics.iter().filter(|d| variants.keys().any(|v| d.covers(v))).collect();
    let (by, better) = ranked_by(stage, by, &decls, &variants)?;
    let mut varying: Vec<String> = Vec::new();
    for v in variants.keys() {
        for k in swept_values(split_instance(v).1.unwrap_or_default()).into_keys() {
            if !varying.contains(&k) {
                varying.push(k);
            }
        }
    }
    let mut metrics: Vec<String> = decls.iter().map(|d| d.metric.clone()).collect();
    if !metrics.contains(&by) {
        metrics.insert(0, by.clone());
    }
    let mut rows: Vec<SweepRow> = (variants.iter())
        .map(|(v, m)| SweepRow {
            variant: (*v).clone(),
            params: swept_values(split_instance(v).1.unwrap_or_default()),
            metrics: metrics.iter().map(|name| (name.clone(), number(Some(m), name))).collect(),
        })
        .collect();
    rank(&mut rows, &by, better)?;
    Ok(Sweep { stage: stage.into(), run: run.0.clone(), by, better, params: varying, metrics, rows })
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_show_seven_significant_digits_and_no_float_noise() {
        let cases = [
            (0.09999999999999998, "0.1"),
            (48417.860129, "48417.86"),
            (17071.0, "17071"),
            (0.278811234, "0.278811"),
            (-1476.394748, "-1476.395"),
            (123456789.4, "123456789"),
            (0.0, "0"),
            (-0.0000001, "0"),
            (1.0 / 3.0, "0.333333"),
        ];
        for (x, text) in cases {
            assert_eq!(super::shown(x), text, "{x}");
        }
        let values = [
            (serde_json::json!(204887.65093707087), "204887.7"),
            (serde_json::json!(766442), "766442"),
            (serde_json::json!(u64::MAX), "18446744073709551615"),
            (serde_json::json!("vnni"), "vnni"),
            (serde_json::json!([1, 2]), "[1,2]"),
        ];
        for (v, text) in values {
            assert_eq!(super::shown_value(&v), text, "{v}");
        }
    }
}
