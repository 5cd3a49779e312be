//! The `report` stage: a minijinja markdown template rendered with every upstream result, and
//! PNG plots drawn with plotters (the font is embedded, so no system fonts are needed).
//!
//! Inputs: any number, each exposed to the template as `inputs.<name>`: a `.json` file parsed,
//! a `.csv` file as a list of rows (numbers parsed), a folder as a map of its `.json`/`.csv`
//! files (by file name, dots → underscores). Param `template: file:templates/X.md.j2`. Output
//! `report/` with `report.md` and the PNGs the template asked for, linked by relative path.
//!
//! Template functions (each draws a PNG into the report folder and returns its file name):
//! `training_curves(png, {label: metrics_rows})`; `bars(png, title, items, "dotted.key", value_label or [value_label, name_label])`
//! and `scatter(png, title, items, ["x.key", x_label], ["y.key", y_label])` over a list of objects
//! with a `label`; `progression(png, steps)` with steps `{label, params, bytes, perplexity}`. Filters: `bytes`,
//! `ratio`, `fixed(n)`, `pct`, `signed_pct`, `int`.

pub mod names;
pub mod plots;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use minijinja::{Environment, Error, ErrorKind};
use serde_json::{Map, Value};
use stage_api::{InputSpec, ParamError, Params, Stage, StageContext, StageError, StageProfile};

pub struct ReportStage;

/// A CSV text as the template sees it: one object per row, keyed by the header; numbers as
/// numbers (integers as integers).
pub fn csv_rows(text: &str) -> Value {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().map(|h| h.split(',').collect()).unwrap_or_default();
    Value::Array(
        lines
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let mut row = Map::new();
                for (k, v) in header.iter().zip(l.split(',')) {
                    // Integers stay integers (`{{ row.step }}` renders `12`, not `12.0`).
                    let parsed = match v.parse::<i64>() {
                        Ok(i) => Value::from(i),
                        Err(_) => v
                            .parse::<f64>()
                            .ok()
                            .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                            .unwrap_or_else(|| Value::String(v.to_string())),
                    };
                    row.insert(k.to_string(), parsed);
                }
                Value::Object(row)
            })
            .collect(),
    )
}

/// An input as template data.
pub fn load_input(path: &Path) -> Result<Value, StageError> {
    let io = |e: std::io::Error| StageError::io(format!("reading {}", path.display()), e);
    if path.is_dir() {
        let mut m = Map::new();
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(path).map_err(io)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().map(|n| n.to_string_lossy().replace('.', "_")).unwrap_or_default();
            if p.is_file() && p.extension().is_some_and(|e| e == "json" || e == "csv") {
                m.insert(name, load_input(&p)?);
            }
        }
        return Ok(Value::Object(m));
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        // Binary outputs (weights, GGUF, ONNX) have no template value.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Ok(Value::Null),
        Err(e) => return Err(io(e)),
    };
    // Inputs arrive under their input name, not the producer's file name: go by content.
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text)
            .map_err(|e| StageError::failed(format!("{}: invalid JSON: {e}", path.display()))),
        Some("csv") => Ok(csv_rows(&text)),
        _ => {
            let trimmed = text.trim_start();
            if trimmed.starts_with('{') || trimmed.starts_with('[') {
                if let Ok(v) = serde_json::from_str(&text) {
                    return Ok(v);
                }
            }
            if text.lines().next().is_some_and(|h| h.contains(',')) {
                return Ok(csv_rows(&text));
            }
            Ok(Value::String(text))
        }
    }
}

fn num(v: &minijinja::Value) -> Result<f64, Error> {
    f64::try_from(v.clone()).map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("expected a number, got {v}")))
}

pub fn format_bytes(b: f64) -> String {
    let units = ["B", "KB", "MB", "GB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.2} {}", units[i])
    }
}

pub fn format_int(v: f64) -> String {
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A number at a dotted path (`quality.val_loss`) of a JSON object.
fn dotted(v: &Value, path: &str) -> Option<f64> {
    path.split('.').try_fold(v, |acc, k| acc.get(k))?.as_f64()
}

/// The items a plot draws one mark per: a list, or an error saying what came instead.
fn items_of(plot: &str, v: Value) -> Result<Vec<Value>, Error> {
    match v {
        Value::Array(items) => Ok(items),
        other => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("{plot}: the items must be a list of objects, got {}", names::sample(&other, 60)),
        )),
    }
}

/// An item's name in a plot: its `label`, else its `stage` or `name` (as the entries of
/// `run.stages` have); item `i` having none is an error, not a bar called "?".
fn label_of(plot: &str, i: usize, v: &Value) -> Result<String, Error> {
    ["label", "stage", "name"].iter().find_map(|k| v.get(k).and_then(Value::as_str)).map(str::to_string).ok_or_else(
        || {
            let msg =
                format!("{plot}: item {i} has no `label` (the name its mark is drawn with): {}", names::sample(v, 60));
            Error::new(ErrorKind::InvalidOperation, msg)
        },
    )
}

/// The template environment: filters, and plot functions writing into `out_dir`.
pub fn environment(out_dir: &Path) -> Environment<'static> {
    environment_noting_provenance(out_dir, Arc::new(AtomicBool::new(false)))
}

/// As [`environment`]; `provenance_called` is set when the template calls `provenance()`.
fn environment_noting_provenance(out_dir: &Path, provenance_called: Arc<AtomicBool>) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    // A rendered file ends with a newline, as text files do.
    env.set_keep_trailing_newline(true);
    add_filters(&mut env);
    add_plots(&mut env, out_dir);
    let run_of = move |state: &minijinja::State| -> Result<Option<Value>, Error> {
        state.lookup("run").map(|r| to_json(&r)).transpose()
    };
    env.add_function(
        "origin",
        move |state: &minijinja::State, stages: minijinja::value::Rest<String>| -> Result<String, Error> {
            let names: Vec<&str> = stages.iter().map(String::as_str).collect();
            Ok(origin(run_of(state)?.as_ref(), &names))
        },
    );
    env.add_function("provenance", move |state: &minijinja::State| -> Result<String, Error> {
        provenance_called.store(true, Ordering::Relaxed);
        Ok(run_of(state)?.map(|r| provenance(&r)).unwrap_or_default())
    });
    env
}

fn to_json(v: &minijinja::Value) -> Result<Value, Error> {
    serde_json::to_value(v).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

fn template_error(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message)
}

/// The number filters: `bytes`, `int`, `ratio`, `fixed(n)`, `pct`, `signed_pct`.
fn add_filters(env: &mut Environment<'static>) {
    env.add_filter("bytes", |v: minijinja::Value| -> Result<String, Error> { Ok(format_bytes(num(&v)?)) });
    env.add_filter("int", |v: minijinja::Value| -> Result<String, Error> { Ok(format_int(num(&v)?)) });
    env.add_filter("ratio", |v: minijinja::Value| -> Result<String, Error> { Ok(format!("{:.2}×", num(&v)?)) });
    env.add_filter("fixed", |v: minijinja::Value, n: Option<usize>| -> Result<String, Error> {
        Ok(format!("{:.*}", n.unwrap_or(2), num(&v)?))
    });
    env.add_filter("pct", |v: minijinja::Value| -> Result<String, Error> { Ok(format!("{:.2} %", 100.0 * num(&v)?)) });
    env.add_filter("signed_pct", |v: minijinja::Value| -> Result<String, Error> {
        Ok(format!("{:+.3} %", 100.0 * num(&v)?))
    });
}

/// The plot functions, each writing a PNG into `out_dir` and returning its file name.
fn add_plots(env: &mut Environment<'static>, out_dir: &Path) {
    let plot_err = |e: plots::PlotError| template_error(e.to_string());
    let dir = out_dir.to_path_buf();
    env.add_function("training_curves", move |file: String, series: minijinja::Value| -> Result<String, Error> {
        plots::training_curves(&dir.join(&file), &to_json(&series)?).map_err(plot_err)?;
        Ok(file)
    });
    let dir = out_dir.to_path_buf();
    env.add_function(
        "bars",
        move |file: String, title: String, items: minijinja::Value, key: String, axes: minijinja::Value| {
            bars(&dir.join(&file), &title, items, &key, axes).map(|()| file)
        },
    );
    let dir = out_dir.to_path_buf();
    env.add_function(
        "scatter",
        move |file: String, title: String, items: minijinja::Value, x_axis: Vec<String>, y_axis: Vec<String>| {
            scatter(&dir.join(&file), &title, items, &x_axis, &y_axis).map(|()| file)
        },
    );
    let dir = out_dir.to_path_buf();
    env.add_function("progression", move |file: String, steps: minijinja::Value| -> Result<String, Error> {
        plots::progression(&dir.join(&file), &to_json(&steps)?).map_err(plot_err)?;
        Ok(file)
    });
}

/// `bars(png, title, items, "dotted.key", axes)`: one bar per item; `axes` is `"value label"`
/// or `["value label", "name label"]`.
fn bars(png: &Path, title: &str, items: minijinja::Value, key: &str, axes: minijinja::Value) -> Result<(), Error> {
    let (y, names) = match to_json(&axes)? {
        Value::String(y) => (y, "model".to_string()),
        Value::Array(a) if a.len() == 2 && a.iter().all(Value::is_string) => {
            (a[0].as_str().unwrap_or_default().into(), a[1].as_str().unwrap_or_default().into())
        }
        other => {
            return Err(template_error(format!(
                "bars: the last argument is \"value label\" or [\"value label\", \"name label\"], got {other}"
            )))
        }
    };
    let rows = items_of("bars", to_json(&items)?)?;
    let labels = rows.iter().enumerate().map(|(i, r)| label_of("bars", i, r)).collect::<Result<Vec<_>, _>>()?;
    let values: Vec<f64> = rows.iter().map(|r| dotted(r, key).unwrap_or(f64::NAN)).collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(template_error(format!("bars: item `{}` has no number at `{key}`", labels[i])));
    }
    plots::bars(png, title, &labels, &values, &y, &names).map_err(|e| template_error(e.to_string()))?;
    Ok(())
}

/// `scatter(png, title, items, ["x.key", "x label"], ["y.key", "y label"])`: one labelled
/// point per item.
fn scatter(
    png: &Path,
    title: &str,
    items: minijinja::Value,
    x_axis: &[String],
    y_axis: &[String],
) -> Result<(), Error> {
    let axis = |a: &[String]| -> Result<(String, String), Error> {
        match a {
            [key, label] => Ok((key.clone(), label.clone())),
            _ => Err(template_error("scatter axes are [\"dotted.key\", \"axis label\"]".into())),
        }
    };
    let ((x_key, x), (y_key, y)) = (axis(x_axis)?, axis(y_axis)?);
    let mut points = Vec::new();
    for (i, r) in items_of("scatter", to_json(&items)?)?.into_iter().enumerate() {
        let label = label_of("scatter", i, &r)?;
        match (dotted(&r, &x_key), dotted(&r, &y_key)) {
            (Some(px), Some(py)) => points.push(serde_json::json!([label, px, py])),
            _ => return Err(template_error(format!("scatter: item `{label}` lacks `{x_key}` or `{y_key}`"))),
        }
    }
    plots::scatter(png, title, &Value::Array(points), &x, &y).map_err(|e| template_error(e.to_string()))?;
    Ok(())
}

/// The functions and filters every template has, one per line (`orchestrate report --vars`
/// prints them; docs/reports.md explains each).
pub const FUNCTIONS_AND_FILTERS: &str = "\
functions: training_curves(png, {label: metrics_rows}) · bars(png, title, items, \"dotted.key\", value_label or [value_label, name_label]) · \
scatter(png, title, items, [\"x.key\", x_label], [\"y.key\", y_label]) · progression(png, steps) · \
origin(\"stage\", …) · provenance()
filters: bytes · int · ratio · fixed(n) · pct · signed_pct";

/// One line saying where a section's numbers came from, stage by stage: computed by the run that
/// rendered the report, or reused from the cache (and when they were measured).
pub fn origin(run: Option<&Value>, stages: &[&str]) -> String {
    let entry = |stage: &str| run.and_then(|r| r.get("by_stage")).and_then(|b| b.get(stage));
    let one = |stage: &str| match entry(stage) {
        Some(e) if e.get("missing").and_then(Value::as_bool) == Some(true) => format!("`{stage}`, NOT CACHED"),
        Some(e) if e.get("cached").and_then(Value::as_bool) == Some(true) => {
            let when = e.get("computed_at").and_then(Value::as_str).unwrap_or("?");
            format!("`{stage}`, from cache (measured {when})")
        }
        Some(_) => format!("`{stage}`, measured in this run"),
        None => format!("`{stage}`"),
    };
    // What produced the numbers, said once when every stage of the section shares it.
    let mut by: Vec<String> = stages.iter().filter_map(|s| entry(s)).map(produced_by).collect();
    by.dedup();
    let parts: Vec<String> = match by.as_slice() {
        [_, _, ..] => stages.iter().map(|s| one(s) + &entry(s).map(produced_by).unwrap_or_default()).collect(),
        _ => stages.iter().map(|s| one(s)).collect(),
    };
    let common = if by.len() == 1 && !by[0].is_empty() { format!(" —{}", by[0]) } else { String::new() };
    format!("*Source: {}{common}.*", parts.join("; "))
}

/// ` by commit abc123def456 on Intel Xeon`: what produced a stage's numbers, as its result
/// records it (empty for results recorded before provenance was).
fn produced_by(e: &Value) -> String {
    let commit = e.get("commit").and_then(Value::as_str).map(|c| format!(" by commit {}", &c[..c.len().min(12)]));
    let dirty = if e.get("dirty").and_then(Value::as_bool) == Some(true) { " (uncommitted changes)" } else { "" };
    let cpu = e.get("cpu").and_then(Value::as_str).map(|c| format!(" on {c}"));
    format!("{}{}", commit.map(|c| c + dirty).unwrap_or_default(), cpu.unwrap_or_default())
}

/// The provenance section: the pipeline and commit, and per stage its cache key, whether the
/// rendering run computed it or reused it, when it was measured and how long it took.
pub fn provenance(run: &Value) -> String {
    let s = |k: &str| run.get(k).and_then(Value::as_str).unwrap_or("?");
    let short = |v: &str, n: usize| v.chars().take(n).collect::<String>();
    let changes =
        if run.get("git_dirty").and_then(Value::as_bool) == Some(true) { " with uncommitted changes" } else { "" };
    let commit = run
        .get("git_commit")
        .and_then(Value::as_str)
        .map(|c| format!(", git commit {}{changes}", short(c, 12)))
        .unwrap_or_default();
    let mut out = format!(
        "## Provenance\n\nRendered {} from {}; pipeline `{}` ({}, blake3 {}…){commit}.\n\
         Every figure above was measured by the stage that produced it, at the time listed; none was computed while rendering. \
         \"computed\" means the run that rendered this report produced it; \"from cache\" means that run reused a result stored by an earlier run.\n\n\
         Each stage's numbers come from the commit and machine its result records, which need not be \
         the commit this report was rendered at.\n\n\
         | stage | cache key | this run | measured at | duration | commit | machine | kernels |\n\
         |---|---|---|---|---|---|---|---|\n",
        s("date"),
        s("rendered_from"),
        s("pipeline"),
        s("pipeline_file"),
        short(s("pipeline_digest"), 16),
    );
    for e in run.get("stages").and_then(Value::as_array).into_iter().flatten() {
        let f = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("–").to_string();
        let key =
            e.get("key").and_then(Value::as_str).map(|k| format!("{}…", short(k, 16))).unwrap_or_else(|| "–".into());
        let missing = e.get("missing").and_then(Value::as_bool) == Some(true);
        let (status, at, took) = if missing {
            ("NOT CACHED", "–".to_string(), "–".to_string())
        } else {
            let status = if e.get("cached").and_then(Value::as_bool) == Some(true) { "from cache" } else { "computed" };
            (
                status,
                f("computed_at"),
                format!("{:.1} s", e.get("duration_s").and_then(Value::as_f64).unwrap_or(f64::NAN)),
            )
        };
        let commit = e.get("commit").and_then(Value::as_str).map(|c| short(c, 12)).unwrap_or_else(|| "–".into());
        let dirty = if e.get("dirty").and_then(Value::as_bool) == Some(true) { "+" } else { "" };
        let (machine, kernels) = (f("machine"), f("simd_path"));
        out.push_str(&format!(
            "| {} | {key} | {status} | {at} | {took} | {commit}{dirty} | {machine} | {kernels} |\n",
            f("stage")
        ));
    }
    out
}

/// Render `template` (its text and a name for errors) with `context` into `out_dir/report.md`.
pub fn render(template_name: &str, template: &str, context: &Value, out_dir: &Path) -> Result<String, StageError> {
    render_to(template_name, template, context, out_dir, "report.md", false)
}

/// As [`render`], into `out_dir/file_name`; plots go beside it. With `append_provenance`, a
/// template that did not call `provenance()` gets the provenance section of `context.run`
/// appended. The file always ends with a newline.
pub fn render_to(
    template_name: &str,
    template: &str,
    context: &Value,
    out_dir: &Path,
    file_name: &str,
    append_provenance: bool,
) -> Result<String, StageError> {
    std::fs::create_dir_all(out_dir).map_err(|e| StageError::io(format!("creating {}", out_dir.display()), e))?;
    let called = Arc::new(AtomicBool::new(false));
    let env = environment_noting_provenance(out_dir, called.clone());
    let describe = |e: &Error| StageError::failed(describe_error(e, template_name, template, context));
    let tmpl = env.template_from_named_str(template_name, template).map_err(|e| describe(&e))?;
    let mut text = tmpl.render(context).map_err(|e| describe(&e))?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    if let Some(run) = context.get("run").filter(|_| append_provenance && !called.load(Ordering::Relaxed)) {
        text.push('\n');
        text.push_str(&provenance(run));
    }
    std::fs::write(out_dir.join(file_name), &text).map_err(|e| StageError::io(format!("writing {file_name}"), e))?;
    Ok(text)
}

/// A template error as `name:line: message`, its causes, the offending text, and for an
/// undefined name the closest names the context has.
fn describe_error(e: &Error, template_name: &str, template: &str, context: &Value) -> String {
    let at = e.line().map(|l| format!("{template_name}:{l}")).unwrap_or_else(|| template_name.to_string());
    let mut msg = format!("{at}: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    if let Some(span) = e.range().and_then(|r| template.get(r)) {
        msg.push_str(&format!("\n  in: {span}"));
    } else if let Some(line) = e.line().and_then(|l| template.lines().nth(l.saturating_sub(1))) {
        msg.push_str(&format!("\n  | {}", line.trim()));
    }
    if e.kind() == ErrorKind::UndefinedError {
        if let Some(name) = e.range().and_then(|r| names::name_at(template, r.start)) {
            let paths: Vec<Vec<&str>> = names::paths(context).into_iter().map(|(p, _)| p).collect();
            let near = names::closest(&name, &paths);
            let help = match near.as_slice() {
                [] => "`orchestrate report --vars --pipeline P` lists every name a template can use".to_string(),
                [one] => format!("did you mean `{one}`?"),
                many => format!(
                    "did you mean one of: {}?",
                    many.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
                ),
            };
            msg.push_str(&format!("\n  = help: `{name}` is not defined; {help}"));
        }
    }
    msg
}

impl Stage for ReportStage {
    fn kind(&self) -> &'static str {
        "report"
    }
    fn describe(&self) -> &'static str {
        "render a minijinja markdown template with the upstream results and PNG plots → report/ (report.md + *.png)"
    }

    fn wants_run_description(&self) -> bool {
        true
    }

    fn check(&self, params: &Params, _io: &InputSpec) -> Result<StageProfile, ParamError> {
        stage_api::check_known_params(params, &["template", "title", "seed"], "report")?;
        match params.param("template").and_then(Value::as_str) {
            Some(_) => {}
            None => {
                return Err(ParamError::new("params", "the report stage needs `params.template`")
                    .with_help("template: file:templates/phase4.md.j2"))
            }
        }
        Ok(StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: vec!["report".into()],
            volatile_outputs: vec![],
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let template_path = PathBuf::from(
            ctx.params().param("template").and_then(Value::as_str).unwrap_or_default().trim_start_matches("file:"),
        );
        let template = std::fs::read_to_string(&template_path)
            .map_err(|e| StageError::io(format!("reading the template {}", template_path.display()), e))?;
        let mut inputs = Map::new();
        let names: Vec<String> = ctx.spec().inputs.keys().cloned().collect();
        for name in names {
            inputs.insert(name.clone(), load_input(ctx.input(&name)?)?);
        }
        let params: Map<String, Value> = ctx.params().params.clone().into_iter().collect();
        let mut context = serde_json::json!({"inputs": inputs, "params": params, "stage": ctx.stage_name()});
        // Run by hand (no orchestrator), there is no run to describe; templates test `run is defined`.
        if let Some(path) = ctx.run_description() {
            let run: Value = serde_json::from_str(&stage_api::read_text(path)?)
                .map_err(|e| StageError::failed(format!("the run description {} is not JSON: {e}", path.display())))?;
            context["run"] = run;
        }
        let name =
            template_path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "template".into());
        let out = ctx.output("report")?.to_path_buf();
        render(&name, &template, &context, &out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
