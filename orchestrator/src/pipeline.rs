//! Pipeline files: raw YAML → a validated, fully resolved list of stage instances.
//!
//! Two steps, like ripgrep's flags: the positioned YAML tree (with `--set` applied) is checked
//! key by key, then each stage is expanded (`foreach`), interpolated, wired and handed to its
//! kind's own `Stage::check`. Every error carries file:line:column.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use stage_api::{InputSpec, Params};

use crate::diag::{suggest, Diagnostic};
use crate::interp::{interpolate, InterpError, Scope};
use crate::registry::Registry;
use crate::yaml::{self, Key, Kind, Node, Pos};

const TOP_KEYS: &[&str] = &["name", "description", "params", "stages"];
const STAGE_KEYS: &[&str] =
    &["kind", "description", "inputs", "outputs", "params", "threads", "timeout", "retries", "foreach", "deterministic"];

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum InputRef {
    /// `file:PATH`, resolved against the pipeline file's folder.
    File { path: PathBuf, written: String },
    /// `STAGE.OUTPUT`.
    Stage { stage: String, output: String },
}

#[derive(Clone, Debug)]
pub struct StageInstance {
    /// Unique name: the stage name, or `name@item` for a `foreach` expansion.
    pub name: String,
    pub kind: String,
    pub version: u32,
    pub params: Params,
    pub inputs: BTreeMap<String, InputRef>,
    pub outputs: Vec<String>,
    pub threads: u32,
    pub timeout: Option<Duration>,
    pub retries: u32,
    pub deterministic: bool,
    /// Outputs exempt from replay's bit-identity check (they record timings).
    pub volatile_outputs: Vec<String>,
    /// The stage is handed the run description (`RunSpec::run_metadata`).
    pub wants_run_metadata: bool,
    pub seed: u64,
    /// Params whose value is `file:PATH`: (dotted path in params, absolute path). Each is also
    /// an input (`params.<path>`), so its content is in the cache key; the stage is handed the
    /// absolute path while the key keeps the text as written (moving the project keeps hits).
    pub param_files: Vec<(String, PathBuf)>,
    /// Where the stage is declared, and its resolved node, for locating later errors.
    pub pos: Pos,
    pub node: Node,
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
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&StageInstance> {
        self.stages.iter().find(|s| s.name == name)
    }
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }
    pub fn diag(&self, d: Diagnostic) -> Diagnostic {
        d.in_file(&self.file, self.source.clone())
    }
}

struct Ctx<'a> {
    file: &'a Path,
    source: Arc<str>,
}

impl Ctx<'_> {
    fn err(&self, code: &'static str, msg: impl Into<String>, pos: Pos) -> Diagnostic {
        Diagnostic::new(code, msg).at(pos).in_file(self.file, self.source.clone())
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
    node.as_map().ok_or_else(|| {
        ctx.err("E-TYPE", format!("{what} must be a map, got {}", node.type_name()), node.pos)
    })
}

fn check_keys(ctx: &Ctx, map: &[(Key, Node)], allowed: &[&str], what: &str) -> Result<(), Diagnostic> {
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    for (k, _) in map {
        if let Some(first) = seen.insert(&k.name, k.pos) {
            return Err(ctx
                .err("E-DUPLICATE", format!("`{}` is given twice in {what}", k.name), k.pos)
                .help(format!("first given at line {} column {}; keep one", first.line, first.col)));
        }
        if !allowed.contains(&k.name.as_str()) {
            return Err(ctx
                .err("E-UNKNOWN-KEY", format!("unknown key `{}` in {what}", k.name), k.pos)
                .help(suggest(&k.name, allowed, "keys")));
        }
    }
    Ok(())
}

fn item_label(item: &Value, ctx: &Ctx, pos: Pos) -> Result<String, Diagnostic> {
    let s = match item {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => return Err(ctx.err("E-FOREACH", format!("foreach items must be plain values (numbers or words), got {item}"), pos)),
    };
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c)) {
        return Err(ctx.err("E-FOREACH", format!("foreach item `{s}` cannot be part of a stage name"), pos)
            .help("use letters, digits, `_ - . +`; map longer values through params, e.g. foreach over keys of a params map"));
    }
    Ok(s)
}

fn as_u32(ctx: &Ctx, node: &Node, what: &str, min: u32) -> Result<u32, Diagnostic> {
    match node.kind {
        Kind::Int(i) if i >= i64::from(min) && i <= i64::from(u32::MAX) => Ok(i as u32),
        _ => Err(ctx.err("E-TYPE", format!("`{what}` must be an integer ≥ {min}, got {}", node.type_name_value()), node.pos)),
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
    let text = std::fs::read_to_string(file).map_err(|e| {
        Diagnostic::new("E-READ", format!("cannot read pipeline file {}: {e}", file.display()))
            .help("check the path; pipelines live in pipelines/")
    })?;
    let source: Arc<str> = text.into();
    let ctx = Ctx { file, source: source.clone() };
    let mut root = yaml::parse(&source).map_err(|e| {
        let d = Diagnostic::new("E-YAML", format!("invalid YAML: {}", e.message)).in_file(file, source.clone());
        match e.pos {
            Some(p) => d.at(p),
            None => d,
        }
    })?;
    if root.as_map().is_none() {
        return Err(ctx.err("E-TYPE", "a pipeline file must be a map with `name` and `stages`", root.pos));
    }
    check_keys(&ctx, root.as_map().unwrap_or(&[]), TOP_KEYS, "the pipeline")?;
    for s in sets {
        crate::overrides::apply_set(&mut root, s)?;
    }
    let name = match root.get("name") {
        None => file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into()),
        Some(n) => match n.as_str() {
            Some(s) if valid_name(s) => s.to_string(),
            _ => return Err(ctx.err("E-TYPE", "`name` must be a word (letters, digits, `_`, `-`)", n.pos)),
        },
    };
    let params = match root.get("params") {
        None => Value::Object(Default::default()),
        Some(p) => {
            map_or_err(&ctx, p, "`params`")?;
            check_keys(&ctx, p.as_map().unwrap_or(&[]), &p.as_map().unwrap_or(&[]).iter().map(|(k, _)| k.name.as_str()).collect::<Vec<_>>(), "`params`")?;
            // Pipeline params may refer to each other only by value, not by `${}`: keep it simple.
            p.to_json()
        }
    };
    let stages_node = root.get("stages").ok_or_else(|| {
        ctx.err("E-MISSING-KEY", "the pipeline has no `stages`", root.pos).help("add `stages:` with at least one stage")
    })?;
    let stage_map = map_or_err(&ctx, stages_node, "`stages`")?;
    if stage_map.is_empty() {
        return Err(ctx.err("E-MISSING-KEY", "`stages` is empty", stages_node.pos));
    }

    // Names first, so references can be checked against every stage whatever the order.
    let mut first_pos: HashMap<&str, Pos> = HashMap::new();
    for (k, _) in stage_map {
        if !valid_name(&k.name) {
            return Err(ctx.err("E-NAME", format!("stage name `{}` may only hold letters, digits, `_` and `-`", k.name), k.pos));
        }
        if let Some(first) = first_pos.insert(&k.name, k.pos) {
            return Err(ctx
                .err("E-DUPLICATE", format!("duplicate stage name `{}`", k.name), k.pos)
                .help(format!("a stage `{}` is already defined at line {} column {}; rename one", k.name, first.line, first.col)));
        }
    }

    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    struct Pending {
        inst: StageInstance,
        raw_inputs: Vec<(String, String, Pos)>,
    }
    let mut pending: Vec<Pending> = Vec::new();
    let kinds = registry.kinds();
    for (key, decl) in stage_map {
        let what = format!("stage `{}`", key.name);
        let decl_map = map_or_err(&ctx, decl, &what)?;
        let kind_node = decl.get("kind").ok_or_else(|| {
            ctx.err("E-MISSING-KEY", format!("stage `{}` has no `kind`", key.name), key.pos)
                .help(format!("known kinds: {}", kinds.join(", ")))
        })?;
        let kind = kind_node.as_str().unwrap_or_default();
        let Some(stage) = registry.get(kind) else {
            return Err(ctx
                .err("E-UNKNOWN-KIND", format!("unknown stage kind `{}`", kind_node.to_json().as_str().unwrap_or(&kind_node.type_name_value())), kind_node.pos)
                .help(suggest(kind, &kinds, "kinds")));
        };
        let mut allowed: Vec<&str> = STAGE_KEYS.to_vec();
        allowed.extend_from_slice(stage.fields());
        check_keys(&ctx, decl_map, &allowed, &what)?;

        let base_scope = Scope { pipeline_params: &params, stage_params: None, item: None, inputs: None, outputs: None };
        let items: Vec<Option<Value>> = match decl.get("foreach") {
            None => vec![None],
            Some(f) => {
                let f = interpolate(f, &base_scope).map_err(|e| ctx.interp(e))?;
                match f.to_json() {
                    Value::Array(items) if !items.is_empty() => items.into_iter().map(Some).collect(),
                    Value::Array(_) => return Err(ctx.err("E-FOREACH", "`foreach` is an empty list", f.pos)),
                    other => return Err(ctx.err("E-FOREACH", format!("`foreach` must be a list, got {other}"), f.pos)),
                }
            }
        };
        for item in &items {
            let name = match item {
                None => key.name.clone(),
                Some(v) => format!("{}@{}", key.name, item_label(v, &ctx, decl.get("foreach").map_or(key.pos, |n| n.pos))?),
            };
            let scope_no_io = Scope { pipeline_params: &params, stage_params: None, item: item.as_ref(), inputs: None, outputs: None };
            // Stage params: `${params.x}` here means the pipeline's params.
            let stage_params_node = match decl.get("params") {
                Some(p) => {
                    map_or_err(&ctx, p, &format!("`params` of stage `{}`", key.name))?;
                    Some(interpolate(p, &scope_no_io).map_err(|e| ctx.interp(e))?)
                }
                None => None,
            };
            let stage_params_json = stage_params_node.as_ref().map(Node::to_json).unwrap_or(Value::Object(Default::default()));
            let scope_local = Scope { stage_params: Some(&stage_params_json), ..scope_no_io };
            let outputs_node = match decl.get("outputs") {
                Some(o) => Some(interpolate(o, &scope_local).map_err(|e| ctx.interp(e))?),
                None => None,
            };
            let mut outputs: Vec<String> = Vec::new();
            if let Some(o) = &outputs_node {
                let Kind::Seq(list) = &o.kind else {
                    return Err(ctx.err("E-TYPE", format!("`outputs` must be a list of names, got {}", o.type_name()), o.pos));
                };
                for it in list {
                    let Some(n) = it.as_str() else {
                        return Err(ctx.err("E-TYPE", format!("an output name must be a string, got {}", it.type_name()), it.pos));
                    };
                    if output_escapes(n) {
                        return Err(ctx
                            .err("E-OUTPUT-PATH", format!("output `{n}` escapes the stage's scratch folder"), it.pos)
                            .help("an output is a relative path without `..`, e.g. `model` or `metrics.json`"));
                    }
                    if outputs.iter().any(|x| x == n) {
                        return Err(ctx.err("E-DUPLICATE", format!("output `{n}` is listed twice"), it.pos));
                    }
                    outputs.push(n.to_string());
                }
            }
            let mut raw_inputs = Vec::new();
            if let Some(i) = decl.get("inputs") {
                let i = interpolate(i, &scope_local).map_err(|e| ctx.interp(e))?;
                let imap = map_or_err(&ctx, &i, "`inputs`")?;
                check_keys(&ctx, imap, &imap.iter().map(|(k, _)| k.name.as_str()).collect::<Vec<_>>(), "`inputs`")?;
                for (k, v) in imap {
                    if !valid_name(&k.name) {
                        return Err(ctx.err("E-NAME", format!("input name `{}` may only hold letters, digits, `_` and `-`", k.name), k.pos));
                    }
                    let Some(s) = v.as_str() else {
                        return Err(ctx.err("E-TYPE", format!("input `{}` must be `file:PATH` or `STAGE.OUTPUT`, got {}", k.name, v.type_name()), v.pos));
                    };
                    raw_inputs.push((k.name.clone(), s.to_string(), v.pos));
                }
            }
            let input_names: Vec<String> = raw_inputs.iter().map(|(n, _, _)| n.clone()).collect();
            let declared_outputs = outputs.clone();
            let scope_io = Scope { inputs: Some(&input_names), outputs: Some(&declared_outputs), ..scope_local };
            let mut fields = BTreeMap::new();
            for f in stage.fields() {
                if let Some(v) = decl.get(f) {
                    fields.insert(f.to_string(), interpolate(v, &scope_io).map_err(|e| ctx.interp(e))?.to_json());
                }
            }
            let stage_params: BTreeMap<String, Value> = match &stage_params_json {
                Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                _ => BTreeMap::new(),
            };
            let p = Params { fields, params: stage_params };
            let io = InputSpec { inputs: input_names.clone(), outputs: outputs.clone() };
            let plan = stage.check(&p, &io).map_err(|e| {
                let pos = decl.locate(&e.key);
                let mut d = ctx.err("E-PARAM", format!("stage `{name}`: {}", e.message), if pos == Pos::default() { key.pos } else { pos });
                d.help = e.help;
                d
            })?;
            for req in &plan.required_outputs {
                if !outputs.contains(req) {
                    outputs.push(req.clone());
                }
            }
            let scalar = |k: &str| -> Result<Option<Node>, Diagnostic> {
                decl.get(k).map(|n| interpolate(n, &scope_io).map_err(|e| ctx.interp(e))).transpose()
            };
            let threads = match scalar("threads")? {
                Some(n) => as_u32(&ctx, &n, "threads", 1)?,
                None => plan.default_threads.max(1),
            };
            let retries = match scalar("retries")? {
                Some(n) => as_u32(&ctx, &n, "retries", 0)?,
                None => 0,
            };
            let timeout = match scalar("timeout")? {
                None => None,
                Some(n) => {
                    let text = match &n.kind {
                        Kind::Str(s) => s.clone(),
                        Kind::Int(i) => i.to_string(),
                        Kind::Float(f) => f.to_string(),
                        _ => String::new(),
                    };
                    Some(parse_duration(&text).ok_or_else(|| {
                        ctx.err("E-TYPE", format!("`timeout` must be a duration like 30s, 10m, 2h, got {}", n.type_name_value()), n.pos)
                    })?)
                }
            };
            let deterministic = match scalar("deterministic")? {
                None => plan.deterministic,
                Some(Node { kind: Kind::Bool(b), .. }) => b,
                Some(n) => return Err(ctx.err("E-TYPE", "`deterministic` must be true or false", n.pos)),
            };
            let seed = match p.params.get("seed") {
                None => 0,
                Some(v) => v.as_u64().ok_or_else(|| {
                    ctx.err("E-TYPE", format!("`seed` must be a non-negative integer, got {v}"), decl.locate("params.seed"))
                })?,
            };
            let mut node = decl.clone();
            if let Some(pn) = &stage_params_node {
                if let Kind::Map(m) = &mut node.kind {
                    for (k, v) in m.iter_mut() {
                        if k.name == "params" {
                            *v = pn.clone();
                        }
                    }
                }
            }
            let mut param_files = Vec::new();
            collect_param_files(&stage_params_json, "", &mut param_files);
            let mut file_inputs = Vec::new();
            for (path, rel) in &param_files {
                let full = dir.join(rel);
                if rel.is_empty() || !full.exists() {
                    return Err(ctx
                        .err("E-MISSING-FILE", format!("param `{path}` of stage `{name}`: file `{rel}` does not exist"), decl.locate(&format!("params.{path}")))
                        .help(format!("paths are relative to the pipeline file's folder ({}); looked for {}", dir.display(), full.display())));
                }
                file_inputs.push((path.clone(), full));
            }
            pending.push(Pending {
                inst: StageInstance {
                    name,
                    kind: kind.to_string(),
                    version: stage.version(),
                    params: p,
                    inputs: BTreeMap::new(),
                    outputs,
                    threads,
                    timeout,
                    retries,
                    deterministic,
                    volatile_outputs: plan.volatile_outputs.clone(),
                    wants_run_metadata: stage.wants_run_metadata(),
                    seed,
                    param_files: file_inputs,
                    pos: key.pos,
                    node,
                },
                raw_inputs,
            });
        }
    }

    // Instance names must stay unique after expansion (`b` with item `x` vs a stage `b@x`
    // cannot clash since `@` is not allowed in names, but two items can share a label).
    let mut seen: HashMap<String, Pos> = HashMap::new();
    for p in &pending {
        if seen.insert(p.inst.name.clone(), p.inst.pos).is_some() {
            return Err(ctx.err("E-DUPLICATE", format!("foreach expands to `{}` twice", p.inst.name), p.inst.pos)
                .help("foreach items must be distinct"));
        }
    }
    let outputs_of: HashMap<String, Vec<String>> =
        pending.iter().map(|p| (p.inst.name.clone(), p.inst.outputs.clone())).collect();
    let all_names_owned: Vec<String> = pending.iter().map(|p| p.inst.name.clone()).collect();
    let all_names: Vec<&str> = all_names_owned.iter().map(String::as_str).collect();
    let mut stages = Vec::with_capacity(pending.len());
    for mut p in pending {
        for (path, full) in &p.inst.param_files {
            p.inst.inputs.insert(format!("params.{path}"), InputRef::File { path: full.clone(), written: full.display().to_string() });
        }
        for (input, text, pos) in p.raw_inputs {
            let r = if let Some(path) = text.strip_prefix("file:") {
                let path = path.trim();
                let full = dir.join(path);
                if path.is_empty() || !full.exists() {
                    return Err(ctx
                        .err("E-MISSING-FILE", format!("input `{input}` of stage `{}`: file `{path}` does not exist", p.inst.name), pos)
                        .help(format!("paths are relative to the pipeline file's folder ({}); looked for {}", dir.display(), full.display())));
                }
                InputRef::File { path: full, written: path.to_string() }
            } else {
                resolve_ref(&ctx, &text, pos, &input, &p.inst.name, &outputs_of, &all_names)?
            };
            p.inst.inputs.insert(input, r);
        }
        stages.push(p.inst);
    }
    Ok(Pipeline { name, file: file.to_path_buf(), dir, source, params, stages })
}

/// Every string `file:PATH` inside a params value, with its dotted path.
fn collect_param_files(v: &Value, prefix: &str, out: &mut Vec<(String, String)>) {
    let join = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}.{k}") };
    match v {
        Value::String(s) => {
            if let Some(rel) = s.strip_prefix("file:") {
                out.push((prefix.to_string(), rel.trim().to_string()));
            }
        }
        Value::Array(items) => {
            for (i, it) in items.iter().enumerate() {
                collect_param_files(it, &join(&i.to_string()), out);
            }
        }
        Value::Object(m) => {
            for (k, it) in m {
                collect_param_files(it, &join(k), out);
            }
        }
        _ => {}
    }
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

fn resolve_ref(
    ctx: &Ctx,
    text: &str,
    pos: Pos,
    input: &str,
    consumer: &str,
    outputs_of: &HashMap<String, Vec<String>>,
    all_names: &[&str],
) -> Result<InputRef, Diagnostic> {
    // Stage instance names may contain `.` (foreach items like 0.5) and output names may too
    // (`stats.json`), so try every split point and keep the one naming a real stage.
    for (i, _) in text.match_indices('.') {
        let (stage, output) = (&text[..i], &text[i + 1..]);
        if let Some(outs) = outputs_of.get(stage) {
            if outs.iter().any(|o| o == output) {
                return Ok(InputRef::Stage { stage: stage.to_string(), output: output.to_string() });
            }
            let refs: Vec<&str> = outs.iter().map(String::as_str).collect();
            return Err(ctx
                .err("E-MISSING-REF", format!("input `{input}` of stage `{consumer}`: stage `{stage}` has no output `{output}`"), pos)
                .help(suggest(output, &refs, &format!("outputs of `{stage}`"))));
        }
    }
    let stage_part = text.split('.').next().unwrap_or(text);
    let expanded: Vec<&str> = all_names.iter().copied().filter(|n| n.starts_with(&format!("{stage_part}@"))).collect();
    let help = if !text.contains('.') {
        "write `STAGE.OUTPUT` for another stage's output, or `file:PATH` for a file".to_string()
    } else if !expanded.is_empty() {
        format!("`{stage_part}` is a foreach stage; name one instance: {}", expanded.join(", "))
    } else {
        suggest(stage_part, all_names, "stages")
    };
    Err(ctx
        .err("E-MISSING-REF", format!("input `{input}` of stage `{consumer}`: `{text}` names no stage output"), pos)
        .help(help))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(src: &str, sets: &[&str]) -> Result<Pipeline, Diagnostic> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in.txt"), "hello").unwrap();
        let f = dir.path().join("p.yaml");
        std::fs::write(&f, src).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load(&f, &sets, &Registry::builtin())
    }

    const DEMO: &str = r#"name: demo
params: {seed: 42, sizes: [500, 1000]}
stages:
  a:
    kind: command
    cmd: ["sh", "-c", "tr a-z A-Z < ${inputs.text} > ${outputs.upper}"]
    inputs: {text: file:in.txt}
    outputs: [upper]
    timeout: 10m
  b:
    kind: command
    foreach: ${params.sizes}
    cmd: "head -c ${item} ${inputs.u} > ${outputs.out}"
    inputs: {u: a.upper}
    outputs: [out]
"#;

    #[test]
    fn resolves_demo() {
        let p = load_str(DEMO, &[]).unwrap();
        let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b@500", "b@1000"]);
        let b = p.stage("b@500").unwrap();
        assert_eq!(b.params.fields["cmd"], serde_json::json!("head -c 500 ${inputs.u} > ${outputs.out}"));
        assert_eq!(b.inputs["u"], InputRef::Stage { stage: "a".into(), output: "upper".into() });
        assert_eq!(p.stage("a").unwrap().timeout, Some(Duration::from_secs(600)));
    }

    #[test]
    fn set_overrides() {
        let p = load_str(DEMO, &["sizes=[7]", "stages.b.params.x=3"]).unwrap();
        assert_eq!(p.stages.len(), 2);
        assert_eq!(p.stage("b@7").unwrap().params.params["x"], serde_json::json!(3));
        let p = load_str(DEMO, &["b.x=4"]).unwrap();
        assert_eq!(p.stage("b@500").unwrap().params.params["x"], serde_json::json!(4));
        let e = load_str(DEMO, &["sede=1"]).unwrap_err();
        assert_eq!(e.code, "E-SET");
        assert!(e.help.unwrap().contains("seed"));
        assert_eq!(load_str(DEMO, &["novalue"]).unwrap_err().code, "E-SET");
    }

    #[test]
    fn errors_carry_positions() {
        let e = load_str(&DEMO.replace("    timeout: 10m", "    timout: 10m"), &[]).unwrap_err();
        assert_eq!((e.code, e.pos.unwrap().line), ("E-UNKNOWN-KEY", 9));
        let e = load_str(&DEMO.replace("kind: command\n    foreach", "kind: comand\n    foreach"), &[]).unwrap_err();
        assert_eq!(e.code, "E-UNKNOWN-KIND");
        assert!(e.help.unwrap().contains("did you mean `command`"));
        let e = load_str(&DEMO.replace("a.upper", "a.lower"), &[]).unwrap_err();
        assert_eq!((e.code, e.pos.unwrap().line), ("E-MISSING-REF", 14));
        let e = load_str(&DEMO.replace("file:in.txt", "file:nope.txt"), &[]).unwrap_err();
        assert_eq!(e.code, "E-MISSING-FILE");
        let e = load_str(&DEMO.replace("${item}", "${itme}"), &[]).unwrap_err();
        assert_eq!((e.code, e.pos.unwrap().line), ("E-INTERPOLATE", 13));
        let e = load_str(&DEMO.replace("outputs: [upper]", "outputs: [../upper]"), &[]).unwrap_err();
        assert_eq!(e.code, "E-OUTPUT-PATH");
        let e = load_str(&DEMO.replace("  b:\n", "  a:\n"), &[]).unwrap_err();
        assert_eq!((e.code, e.pos.unwrap().line), ("E-DUPLICATE", 10));
        let e = load_str(&DEMO.replace("u: a.upper", "u: b@500.out"), &[]).unwrap();
        assert_eq!(e.stages.len(), 3, "self-reference is caught by the DAG check, not here");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10x"), None);
        assert_eq!(parse_duration("m"), None);
    }

    #[test]
    fn output_paths() {
        assert!(output_escapes("../x"));
        assert!(output_escapes("/etc/x"));
        assert!(output_escapes("a/../../x"));
        assert!(output_escapes("./x"));
        assert!(!output_escapes("model/weights.bin"));
    }
}
