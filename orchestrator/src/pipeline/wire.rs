//! Step 3 of loading: instance names checked unique after expansion, and every input wired —
//! `file:PATH` to an existing file, `STAGE.OUTPUT` to a declared output of a real instance.

use std::collections::HashMap;
use std::path::Path;

use super::expand::{Pending, RawRef};
use super::metrics::{declared, MetricDecl};
use super::{is_variant_of, map_or_err, split_instance, Ctx, InputRef, Publish, StageInstance};
use crate::diag::{suggest, Diagnostic};
use crate::yaml::{Node, Pos};

/// Every instance with its inputs resolved.
pub(super) fn wire(
    ctx: &Ctx,
    dir: &Path,
    pending: Vec<Pending>,
    metrics: &[MetricDecl],
) -> Result<Vec<StageInstance>, Diagnostic> {
    check_unique(ctx, &pending)?;
    let outputs_of: HashMap<String, Vec<String>> =
        pending.iter().map(|p| (p.inst.name.clone(), p.inst.outputs.clone())).collect();
    let names_owned: Vec<String> = pending.iter().map(|p| p.inst.name.clone()).collect();
    let refs = Refs { outputs_of, names: names_owned.iter().map(String::as_str).collect() };
    let mut stages = Vec::with_capacity(pending.len());
    for mut p in pending {
        for (path, full) in &p.inst.param_files {
            let file = InputRef::File { path: full.clone(), written: full.display().to_string() };
            p.inst.inputs.insert(format!("params.{path}"), file);
        }
        for (input, raw, pos) in p.raw_inputs {
            let what = format!("input `{input}` of stage `{}`", p.inst.name);
            let r = match raw {
                RawRef::Text(text) => match text.strip_prefix("file:") {
                    Some(path) => file_input(ctx, dir, path.trim(), &input, &p.inst.name, pos)?,
                    None => refs.resolve(ctx, &text, pos, &what)?,
                },
                RawRef::Best { of, by, output } => refs.best(ctx, metrics, (of, by, output), pos, &what)?,
            };
            p.inst.inputs.insert(input, r);
        }
        stages.push(p.inst);
    }
    Ok(stages)
}

/// `publish: {STAGE.OUTPUT: PATH, …}`: each key a real output, each path a folder or file
/// name (not `.`, `..` or `/`), resolved against the pipeline file's folder.
pub(super) fn publish(
    ctx: &Ctx,
    dir: &Path,
    node: Option<&Node>,
    stages: &[StageInstance],
) -> Result<Vec<Publish>, Diagnostic> {
    let Some(node) = node else { return Ok(Vec::new()) };
    let map = map_or_err(ctx, node, "`publish`")?;
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    let refs = Refs { outputs_of: stages.iter().map(|s| (s.name.clone(), s.outputs.clone())).collect(), names };
    let mut out: Vec<Publish> = Vec::new();
    for (k, v) in map {
        let what = format!("`publish` entry `{}`", k.name);
        let InputRef::Stage { stage, output } = refs.resolve(ctx, &k.name, k.pos, &what)? else {
            return Err(ctx.err("E-PUBLISH", "publish keys are `STAGE.OUTPUT`", k.pos));
        };
        let Some(written) = v.as_str().filter(|w| Path::new(w).file_name().is_some()) else {
            return Err(ctx
                .err("E-PUBLISH", format!("`publish` of `{}` needs a destination path", k.name), v.pos)
                .help("a folder or file name relative to the pipeline file's folder, e.g. `../reports/phase4`"));
        };
        let dest = lexically_normal(&dir.join(written));
        if let Some(other) = out.iter().find(|p| p.dest == dest) {
            let msg =
                format!("`{written}` is the destination of both `{}.{}` and `{}`", other.stage, other.output, k.name);
            return Err(ctx.err("E-PUBLISH", msg, v.pos));
        }
        out.push(Publish { stage, output, dest });
    }
    Ok(out)
}

/// `a/b/../c` as `a/c`, without looking at the filesystem (a destination need not exist yet).
fn lexically_normal(path: &Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Instance names must stay unique after expansion (`b` with item `x` vs a stage `b@x` cannot
/// clash since `@` is not allowed in names, but two items can share a label).
fn check_unique(ctx: &Ctx, pending: &[Pending]) -> Result<(), Diagnostic> {
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    for p in pending {
        if seen.insert(&p.inst.name, p.inst.pos).is_some() {
            return Err(ctx
                .err("E-DUPLICATE", format!("foreach expands to `{}` twice", p.inst.name), p.inst.pos)
                .help("foreach items must be distinct"));
        }
    }
    Ok(())
}

fn file_input(
    ctx: &Ctx,
    dir: &Path,
    path: &str,
    input: &str,
    consumer: &str,
    pos: Pos,
) -> Result<InputRef, Diagnostic> {
    let full = dir.join(path);
    if path.is_empty() || !full.exists() {
        let msg = format!("input `{input}` of stage `{consumer}`: file `{path}` does not exist");
        return Err(ctx.err("E-MISSING-FILE", msg, pos).help(format!(
            "paths are relative to the pipeline file's folder ({}); looked for {}",
            dir.display(),
            full.display()
        )));
    }
    Ok(InputRef::File { path: full, written: path.to_string() })
}

/// What `STAGE.OUTPUT` references can name.
struct Refs<'a> {
    outputs_of: HashMap<String, Vec<String>>,
    names: Vec<&'a str>,
}

impl Refs<'_> {
    /// `text` as `STAGE.OUTPUT`; `what` names the reference in errors (`input `x` of stage `y``).
    fn resolve(&self, ctx: &Ctx, text: &str, pos: Pos, what: &str) -> Result<InputRef, Diagnostic> {
        // Stage instance names may contain `.` (foreach items like 0.5) and output names may
        // too (`stats.json`), so try every split point and keep the one naming a real stage.
        for (i, _) in text.match_indices('.') {
            let (stage, output) = (&text[..i], &text[i + 1..]);
            if let Some(outs) = self.outputs_of.get(stage) {
                if outs.iter().any(|o| o == output) {
                    return Ok(InputRef::Stage { stage: stage.to_string(), output: output.to_string() });
                }
                let known: Vec<&str> = outs.iter().map(String::as_str).collect();
                let msg = format!("{what}: stage `{stage}` has no output `{output}`");
                return Err(ctx.err("E-MISSING-REF", msg, pos).help(suggest(
                    output,
                    &known,
                    &format!("outputs of `{stage}`"),
                )));
            }
        }
        let msg = format!("{what}: `{text}` names no stage output");
        Err(ctx.err("E-MISSING-REF", msg, pos).help(self.help(text)))
    }

    /// `{best_of: STAGE, by: METRIC, output: OUTPUT}`: STAGE a `foreach` stage whose instances
    /// all have OUTPUT, METRIC declared for it under `metrics:`.
    fn best(
        &self,
        ctx: &Ctx,
        metrics: &[MetricDecl],
        (of, by, output): (String, String, String),
        pos: Pos,
        what: &str,
    ) -> Result<InputRef, Diagnostic> {
        let variants: Vec<String> =
            self.names.iter().filter(|n| is_variant_of(n, &of)).map(|n| n.to_string()).collect();
        if variants.is_empty() {
            let stages: Vec<&str> = self.names.iter().map(|n| split_instance(n).0).collect();
            let msg = format!("{what}: `best_of: {of}` needs a stage with `foreach` named `{of}`");
            return Err(ctx.err("E-MISSING-REF", msg, pos).help(suggest(&of, &stages, "stages")));
        }
        for v in &variants {
            if !self.outputs_of.get(v).is_some_and(|o| o.contains(&output)) {
                return Err(ctx.err("E-MISSING-REF", format!("{what}: stage `{v}` has no output `{output}`"), pos));
            }
        }
        let Some(decl) = declared(metrics, &variants[0], &by) else {
            let msg = format!("{what}: `by: {by}` is not a declared metric of `{of}`");
            return Err(ctx
                .err("E-METRIC", msg, pos)
                .help(format!("declare which way is better, e.g. `metrics: {{{of}.{by}: min}}`")));
        };
        Ok(InputRef::Best { of, variants, metric: by, better: decl.better, output })
    }

    fn help(&self, text: &str) -> String {
        let stage_part = text.split('.').next().unwrap_or(text);
        let expanded: Vec<&str> = self.names.iter().copied().filter(|n| is_variant_of(n, stage_part)).collect();
        if !text.contains('.') {
            "write `STAGE.OUTPUT` for another stage's output, or `file:PATH` for a file".to_string()
        } else if !expanded.is_empty() {
            format!("`{stage_part}` is a foreach stage; name one instance: {}", expanded.join(", "))
        } else {
            suggest(stage_part, &self.names, "stages")
        }
    }
}
