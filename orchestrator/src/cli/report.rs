//! `orchestrate report TEMPLATE`: render a report template against the cached results of a
//! pipeline, without running anything.
//!
//! The template sees `inputs` wired exactly as the pipeline's `report` stage that uses this
//! template wires them (so the same template works in the stage and here), `stages.<stage>.
//! <output>` for every cached output, and `run`: pipeline name and digest, git commit, date,
//! host, and each stage's cache key, when it was computed and how long it took.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Map, Value};

use super::{Env, Failure, PipelineArgs};
use crate::dag::Dag;
use crate::diag::Diagnostic;
use crate::pipeline::{InputRef, Pipeline};
use crate::registry::report_templates;
use crate::store::Store;

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// The template (minijinja), e.g. templates/phase4.md.j2 (not needed with --vars).
    template: Option<PathBuf>,
    /// The pipeline whose cached results fill the template.
    #[arg(long)]
    pub(super) pipeline: PathBuf,
    /// Override a value, as for `run` (selects which cached results).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Where to write the markdown; plots go beside it.
    #[arg(short = 'o', long = "out", value_name = "OUT.md")]
    out: Option<PathBuf>,
    /// Print every name the template can use, with a sample of its value, and render nothing.
    #[arg(long, conflicts_with = "out")]
    vars: bool,
    /// Do not append the provenance section (it is appended unless the template calls
    /// `provenance()` itself).
    #[arg(long)]
    no_provenance: bool,
}

pub(super) fn report(env: &Env, a: Args) -> Result<i32, Failure> {
    let (p, dag) = env.load(&PipelineArgs { pipeline: a.pipeline, sets: a.sets })?;
    let store = env.open_reader()?;
    if a.vars {
        print_vars(&p, &dag, &store, a.template.as_deref())?;
        return Ok(0);
    }
    let (Some(template), Some(out)) = (a.template, a.out) else {
        let msg = "report needs TEMPLATE and -o OUT.md (or --vars to list what a template can use)";
        return Err(Diagnostic::new("E-CLI", msg).into());
    };
    render_cached(&p, &dag, &store, &template, &out, !a.no_provenance)?;
    eprintln!("wrote {}", out.display());
    Ok(0)
}

/// `--vars`: every name of the context with a sample, then the functions and filters.
fn print_vars(p: &Pipeline, dag: &Dag, store: &Store, template: Option<&Path>) -> anyhow::Result<()> {
    let scratch = scratch()?;
    let context = context(p, dag, store, template, scratch.path())?;
    let names = report_templates::names(&context);
    let width = names.iter().map(|(n, _)| n.len()).max().unwrap_or(0).min(48);
    println!("Names a template rendered against `{}` can use (from the cache):", p.name);
    for (name, sample) in &names {
        println!("  {name:<width$}  {sample}");
    }
    println!("\n{}", report_templates::FUNCTIONS_AND_FILTERS);
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

fn load_input(path: &Path) -> anyhow::Result<Value> {
    report_templates::load_input(path).map_err(|e| anyhow!(e))
}

/// Every cached output exported into `scratch`: `stages.<stage>.<output>` values for the
/// template (`.` in output names becomes `_`), the exported files by (stage, output), and
/// each stage's line of the run description.
struct Cached {
    stages: Map<String, Value>,
    /// Each cached stage's recorded metrics (to pick `best_of` winners).
    metrics: BTreeMap<String, BTreeMap<String, Value>>,
    files: BTreeMap<(String, String), PathBuf>,
    run_stages: Vec<Value>,
}

fn export_cached(p: &Pipeline, dag: &Dag, store: &Store, scratch: &Path) -> anyhow::Result<Cached> {
    let mut c = Cached { stages: Map::new(), metrics: BTreeMap::new(), files: BTreeMap::new(), run_stages: Vec::new() };
    for e in &crate::plan::plan(p, dag, store) {
        let Some(digest) = &e.manifest else {
            c.run_stages.push(crate::run_description::missing_entry(&e.stage, e.key.as_deref()));
            continue;
        };
        let m = store.load_manifest(digest)?;
        let mut outs = Map::new();
        for (name, entry) in &m.outputs {
            let to = scratch.join(&e.stage).join(name);
            store.export(entry, &to, &format!("{}.{name}", e.stage)).map_err(|e| anyhow!(e))?;
            outs.insert(name.replace('.', "_"), load_input(&to)?);
            c.files.insert((e.stage.clone(), name.clone()), to);
        }
        c.stages.insert(e.stage.clone(), Value::Object(outs));
        c.metrics.insert(e.stage.clone(), m.metrics.clone());
        c.run_stages.push(crate::run_description::stage_entry(&e.stage, &m, true));
    }
    Ok(c)
}

/// `inputs` as the pipeline's report stage that renders this template wires them (empty when
/// no report stage names the template).
fn wired_inputs(p: &Pipeline, template: &Path, cached: &Cached) -> anyhow::Result<Value> {
    let files = &cached.files;
    let renders = |s: &&crate::pipeline::StageInstance| {
        s.kind == "report" && s.param_files.iter().any(|(k, path)| k == "template" && same_file(path, template))
    };
    let mut inputs = Map::new();
    let Some(s) = p.stages.iter().find(renders) else { return Ok(Value::Object(inputs)) };
    for (name, r) in &s.inputs {
        let value = match r {
            InputRef::Stage { stage, output } => match files.get(&(stage.clone(), output.clone())) {
                Some(path) => load_input(path)?,
                None => bail!(
                    "stage `{stage}` is not cached for the pipeline as it is now, so `{name}: {stage}.{output}` \
                     has no value; run it first (`orchestrate run {}`)",
                    p.file.display()
                ),
            },
            InputRef::File { path, .. } => load_input(path)?,
            InputRef::Best { of, variants, metric, better, output } => {
                let metric_of = |v: &str, m: &str| cached.metrics.get(v)?.get(m)?.as_f64();
                let winner =
                    crate::cache_key::best_variant(&metric_of, name, variants, metric, *better).map_err(|_| {
                        anyhow!(
                            "`{name}` takes the best variant of `{of}`, but not every variant is cached; run it first"
                        )
                    })?;
                match files.get(&(winner.clone(), output.clone())) {
                    Some(path) => load_input(path)?,
                    None => bail!("`{winner}` (the best variant of `{of}`) has no cached `{output}`"),
                }
            }
        };
        inputs.insert(name.clone(), value);
    }
    Ok(Value::Object(inputs))
}

fn scratch() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("orchestrate-report-").tempdir().context("creating a scratch folder")
}

/// What a template sees: `inputs` (as the report stage rendering `template` wires them),
/// `stages`, `run` and `params`.
fn context(p: &Pipeline, dag: &Dag, store: &Store, template: Option<&Path>, scratch: &Path) -> anyhow::Result<Value> {
    let cached = export_cached(p, dag, store, scratch)?;
    let inputs = match template {
        Some(t) => wired_inputs(p, t, &cached)?,
        None => Value::Object(Map::new()),
    };
    let run = crate::run_description::describe(p, cached.run_stages, "cache (orchestrate report)");
    Ok(json!({"inputs": inputs, "stages": cached.stages, "run": run, "params": p.params}))
}

/// Render `template` into `out`; with `provenance`, append the provenance section unless the
/// template renders it itself.
pub fn render_cached(
    p: &Pipeline,
    dag: &Dag,
    store: &Store,
    template: &Path,
    out: &Path,
    provenance: bool,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(template).with_context(|| format!("reading the template {}", template.display()))?;
    let scratch = scratch()?;
    let context = context(p, dag, store, Some(template), scratch.path())?;
    let out_dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "report.md".into());
    let name = template.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "template".into());
    report_templates::render_to(&name, &text, &context, out_dir, &file_name, provenance).map_err(|e| anyhow!(e))
}
