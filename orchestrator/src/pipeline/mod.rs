//! Pipeline files: raw YAML → a validated, fully resolved list of stage instances.
//!
//! [`load`] runs three steps, each in its own module: `parse` (the file, `--set`, and the top
//! level: name, params, stage names), `expand` (each declaration into instances — `foreach`,
//! `${...}`, outputs, inputs as written, the kind's own `Stage::check`), and `wire` (unique
//! instance names, every input resolved to a file or another instance's output). Every error
//! carries file:line:column.

mod expand;
pub mod metrics;
mod resources;

pub use resources::{ExecutorDecl, Resources};
mod parse;
mod wire;

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use stage_api::Params;

use crate::diag::{suggest, Diagnostic};
use crate::interp::InterpError;
use crate::registry::Registry;
use crate::yaml::{Key, Kind, Node, Pos};

const TOP_KEYS: &[&str] = &["name", "description", "params", "stages", "publish", "metrics", "executor"];
const STAGE_KEYS: &[&str] = &[
    "kind",
    "description",
    "inputs",
    "outputs",
    "params",
    "threads",
    "timeout",
    "retries",
    "foreach",
    "deterministic",
    "resources",
];

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum InputRef {
    /// `file:PATH`, resolved against the pipeline file's folder.
    File { path: PathBuf, written: String },
    /// `STAGE.OUTPUT`.
    Stage { stage: String, output: String },
    /// `{best_of: STAGE, by: METRIC, output: OUTPUT}`: that output of whichever instance of the
    /// `foreach` stage STAGE did best by METRIC (declared under `metrics:` with its direction).
    /// Ties go to the first instance in file order.
    Best { of: String, variants: Vec<String>, metric: String, better: metrics::Better, output: String },
}

impl InputRef {
    /// The stages this input reads from (none for a file; every variant for `best_of`).
    pub fn stages(&self) -> impl Iterator<Item = &str> {
        let names: &[String] = match self {
            InputRef::File { .. } => &[],
            InputRef::Stage { stage, .. } => std::slice::from_ref(stage),
            InputRef::Best { variants, .. } => variants,
        };
        names.iter().map(String::as_str)
    }
}

#[derive(Clone, Debug)]
pub struct StageInstance {
    /// Unique name: the stage name, or `name@item` for a `foreach` expansion.
    pub name: String,
    pub kind: String,
    /// The kind's implementation fingerprint (`Registry::implementation`), part of the key.
    pub implementation: BTreeMap<String, String>,
    pub params: Params,
    pub inputs: BTreeMap<String, InputRef>,
    pub outputs: Vec<String>,
    pub threads: u32,
    pub timeout: Option<Duration>,
    pub retries: u32,
    /// `resources:` — what a cluster job asks for (the local executor ignores it).
    pub resources: Resources,
    pub deterministic: bool,
    /// Outputs exempt from replay's bit-identity check (they record timings).
    pub volatile_outputs: Vec<String>,
    /// The stage is handed the run description (`RunSpec::run_description`).
    pub wants_run_description: bool,
    pub seed: u64,
    /// Params whose value is `file:PATH`: (dotted path in params, absolute path). Each is also
    /// an input (`params.<path>`), so its content is in the cache key; the stage is handed the
    /// absolute path while the key keeps the text as written (moving the project keeps hits).
    pub param_files: Vec<(String, PathBuf)>,
    /// Where the stage is declared, and its resolved node, for locating later errors.
    pub pos: Pos,
    pub node: Node,
}

/// `publish:` — a stage output copied into the working tree after a successful run.
#[derive(Clone, Debug, PartialEq)]
pub struct Publish {
    pub stage: String,
    pub output: String,
    /// Where the copy goes: the path as written, resolved against the pipeline file's folder.
    pub dest: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    pub dir: PathBuf,
    pub source: Arc<str>,
    pub params: Value,
    /// In file order; `foreach` expansions stay together in item order.
    pub stages: Vec<StageInstance>,
    /// `publish:` entries, in file order.
    pub publish: Vec<Publish>,
    /// `metrics:` — what the pipeline is judged by, and which way is better.
    pub metrics: Vec<metrics::MetricDecl>,
    /// The `--set` overrides it was loaded with, as given.
    pub sets: Vec<String>,
    /// `executor:` — how a cluster executor submits (`run --executor slurm`).
    pub executor: ExecutorDecl,
    /// Stage name → index in `stages`, so lookups stay O(1) in pipelines of thousands of stages.
    index: HashMap<String, usize>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&StageInstance> {
        self.index_of(name).map(|i| &self.stages[i])
    }
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
    pub fn diag(&self, d: Diagnostic) -> Diagnostic {
        d.in_file(&self.file, self.source.clone())
    }
}

/// The file being loaded, for placing errors in it.
struct Ctx {
    file: PathBuf,
    source: Arc<str>,
}

impl Ctx {
    fn err(&self, code: &'static str, msg: impl Into<String>, pos: Pos) -> Diagnostic {
        Diagnostic::new(code, msg).at(pos).in_file(&self.file, self.source.clone())
    }
    fn interp(&self, e: InterpError) -> Diagnostic {
        let mut d = self.err("E-INTERPOLATE", e.message, e.pos);
        d.help = e.help;
        d
    }
}

/// Parse a duration: `90`, `90s`, `10m`, `2h`, `1h30m`, `500ms`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    if t.is_empty() {
        return None;
    }
    if let Ok(secs) = t.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0.0f64;
    let mut num = String::new();
    let mut chars = t.chars().peekable();
    let mut saw_unit = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        while let Some(&n) = chars.peek() {
            if n.is_ascii_alphabetic() {
                unit.push(n);
                chars.next();
            } else {
                break;
            }
        }
        let v: f64 = num.parse().ok()?;
        num.clear();
        total += v * match unit.as_str() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return None,
        };
        saw_unit = true;
    }
    (num.is_empty() && saw_unit).then(|| Duration::from_secs_f64(total))
}

/// A stage instance's name split into its declaration and, for a `foreach` instance, the item's
/// label: `train@lr=0.1` → (`train`, `Some("lr=0.1")`), `corpus` → (`corpus`, `None`).
pub fn split_instance(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((decl, label)) => (decl, Some(label)),
        None => (name, None),
    }
}

/// Whether `name` is an instance of the `foreach` declaration `decl` (`train@…` of `train`).
pub fn is_variant_of(name: &str, decl: &str) -> bool {
    matches!(split_instance(name), (d, Some(_)) if d == decl)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// An output name is a relative path that stays inside the stage's output folder.
pub fn output_escapes(name: &str) -> bool {
    let p = Path::new(name);
    name.is_empty()
        || p.is_absolute()
        || p.components().any(|c| !matches!(c, Component::Normal(_)))
        || name.ends_with('/')
        || name.contains('\0')
}

fn map_or_err<'n>(ctx: &Ctx, node: &'n Node, what: &str) -> Result<&'n [(Key, Node)], Diagnostic> {
    node.as_map().ok_or_else(|| ctx.err("E-TYPE", format!("{what} must be a map, got {}", node.type_name()), node.pos))
}

/// Every key of `map` is given once and is one of `allowed`.
fn check_keys(ctx: &Ctx, map: &[(Key, Node)], allowed: &[&str], what: &str) -> Result<(), Diagnostic> {
    check_unique(ctx, map, what)?;
    for (k, _) in map {
        if !allowed.contains(&k.name.as_str()) {
            return Err(ctx
                .err("E-UNKNOWN-KEY", format!("unknown key `{}` in {what}", k.name), k.pos)
                .help(suggest(&k.name, allowed, "keys")));
        }
    }
    Ok(())
}

/// Every key of a free-form map (params, inputs) is given once — in one pass, since such a map
/// can hold thousands of keys (a join's inputs).
fn check_unique(ctx: &Ctx, map: &[(Key, Node)], what: &str) -> Result<(), Diagnostic> {
    let mut seen: HashMap<&str, Pos> = HashMap::with_capacity(map.len());
    for (k, _) in map {
        if let Some(first) = seen.insert(&k.name, k.pos) {
            return Err(ctx
                .err("E-DUPLICATE", format!("`{}` is given twice in {what}", k.name), k.pos)
                .help(format!("first given at line {} column {}; keep one", first.line, first.col)));
        }
    }
    Ok(())
}

fn as_u32(ctx: &Ctx, node: &Node, what: &str, min: u32) -> Result<u32, Diagnostic> {
    match node.kind {
        Kind::Int(i) if i >= i64::from(min) && i <= i64::from(u32::MAX) => Ok(i as u32),
        _ => Err(ctx.err(
            "E-TYPE",
            format!("`{what}` must be an integer ≥ {min}, got {}", node.type_name_value()),
            node.pos,
        )),
    }
}

impl Node {
    fn type_name_value(&self) -> String {
        match &self.kind {
            Kind::Int(i) => i.to_string(),
            Kind::Float(f) => f.to_string(),
            Kind::Str(s) => format!("\"{s}\""),
            _ => self.type_name().to_string(),
        }
    }
}

/// Load, check and resolve a pipeline file with `--set` overrides.
pub fn load(file: &Path, sets: &[String], registry: &Registry) -> Result<Pipeline, Diagnostic> {
    let doc = parse::parse(file, sets)?;
    let mut pending = Vec::new();
    for (key, decl) in doc.stage_decls() {
        pending.extend(expand::expand(&doc.ctx, registry, &doc.params, &doc.dir, key, decl)?);
    }
    let names: Vec<&str> = pending.iter().map(|p| p.inst.name.as_str()).collect();
    let metrics = metrics::metrics(&doc.ctx, doc.root.get("metrics"), &names)?;
    let stages = wire::wire(&doc.ctx, &doc.dir, pending, &metrics)?;
    let publish = wire::publish(&doc.ctx, &doc.dir, doc.root.get("publish"), &stages)?;
    let executor = resources::executor(&doc.ctx, doc.root.get("executor"))?;
    let parse::Document { ctx, name, params, dir, .. } = doc;
    let index = stages.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
    let sets = sets.to_vec();
    let (file, source) = (ctx.file, ctx.source);
    Ok(Pipeline { name, file, dir, source, params, stages, publish, metrics, sets, executor, index })
}

/// Params as a stage sees them: every `file:PATH` replaced by `file:<absolute path>`.
pub fn params_for_run(st: &StageInstance) -> Params {
    let mut p = st.params.clone();
    for (path, full) in &st.param_files {
        let (first, rest) = path.split_once('.').unwrap_or((path.as_str(), ""));
        let pointer = if rest.is_empty() { String::new() } else { format!("/{}", rest.replace('.', "/")) };
        if let Some(v) = p.params.get_mut(first).and_then(|v| v.pointer_mut(&pointer)) {
            *v = Value::String(format!("file:{}", full.display()));
        }
    }
    p
}

#[cfg(test)]
mod tests;
