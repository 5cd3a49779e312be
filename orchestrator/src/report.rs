//! `orchestrate report TEMPLATE`: render a report template against the cached results of a
//! pipeline, without running anything.
//!
//! The template sees `inputs` wired exactly as the pipeline's `report` stage that uses this
//! template wires them (so the same template works in the stage and here), `stages.<stage>.
//! <output>` for every cached output, and `run`: pipeline name and digest, git commit, date,
//! host, and each stage's cache key, when it was computed and how long it took.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use crate::dag::Dag;
use crate::pipeline::{InputRef, Pipeline};
use crate::store::Store;

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

pub fn render_cached(p: &Pipeline, dag: &Dag, store: &Store, template: &Path, out: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(template).with_context(|| format!("reading the template {}", template.display()))?;
    let entries = crate::plan::plan(p, dag, store);
    let scratch = tempfile::Builder::new().prefix("orchestrate-report-").tempdir().context("creating a scratch folder")?;
    let mut stages = Map::new();
    let mut files: std::collections::BTreeMap<(String, String), PathBuf> = Default::default();
    let mut run_stages = Vec::new();
    for e in &entries {
        let Some(digest) = &e.manifest else {
            run_stages.push(crate::runmeta::missing_entry(&e.stage, e.key.as_deref()));
            continue;
        };
        let m = store.load_manifest(digest)?;
        let mut outs = Map::new();
        for (name, entry) in &m.outputs {
            let to = scratch.path().join(&e.stage).join(name);
            crate::cli::export_entry(store, entry, &to, &format!("{}.{name}", e.stage))?;
            outs.insert(name.replace('.', "_"), stage_report::load_input(&to).map_err(|e| anyhow::anyhow!("{e}"))?);
            files.insert((e.stage.clone(), name.clone()), to);
        }
        stages.insert(e.stage.clone(), Value::Object(outs));
        run_stages.push(crate::runmeta::stage_entry(&e.stage, &m, true));
    }
    // The report stage that renders this template, if any: its wiring becomes `inputs`.
    let wiring = p.stages.iter().find(|s| s.kind == "report" && s.param_files.iter().any(|(k, path)| k == "template" && same_file(path, template)));
    let mut inputs = Map::new();
    if let Some(s) = wiring {
        for (name, r) in &s.inputs {
            let value = match r {
                InputRef::Stage { stage, output } => match files.get(&(stage.clone(), output.clone())) {
                    Some(path) => stage_report::load_input(path).map_err(|e| anyhow::anyhow!("{e}"))?,
                    None => bail!("stage `{stage}` is not cached for the pipeline as it is now, so `{name}: {stage}.{output}` has no value; run it first (`orchestrate run {}`)", p.file.display()),
                },
                InputRef::File { path, .. } => stage_report::load_input(path).map_err(|e| anyhow::anyhow!("{e}"))?,
            };
            inputs.insert(name.clone(), value);
        }
    }
    let run = crate::runmeta::describe(p, run_stages, "cache (orchestrate report)");
    let context = json!({"inputs": inputs, "stages": stages, "run": run, "params": p.params});
    let out_dir = out.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "report.md".into());
    let name = template.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "template".into());
    stage_report::render_to(&name, &text, &context, out_dir, &file_name).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
