//! Step 2 of loading: each stage declaration expanded into instances (one, or one per
//! `foreach` item), its `${...}` interpolated, its outputs and inputs listed, and its params
//! handed to the kind's own `Stage::check`. References between stages are left to `wire`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use stage_api::{InputSpec, Params, Stage, StageProfile};

use super::{
    as_u32, check_keys, check_unique, map_or_err, output_escapes, parse_duration, valid_name, Ctx, StageInstance,
    STAGE_KEYS,
};
use crate::diag::{suggest, Diagnostic};
use crate::interp::{interpolate, Scope};
use crate::registry::Registry;
use crate::yaml::{Key, Kind, Node, Pos};

/// An input as written.
pub(super) enum RawRef {
    /// `file:…` or `STAGE.OUTPUT`.
    Text(String),
    /// `{best_of: STAGE, by: METRIC, output: OUTPUT}`.
    Best { of: String, by: String, output: String },
}

/// An instance whose inputs are still as written: (input name, reference, position).
pub(super) struct Pending {
    pub inst: StageInstance,
    pub raw_inputs: Vec<(String, RawRef, Pos)>,
}

/// One stage declaration in the file.
struct Decl<'a> {
    key: &'a Key,
    node: &'a Node,
    kind: &'a str,
    stage: &'a dyn Stage,
    implementation: BTreeMap<String, String>,
}

/// Every instance of the stage declared as `key: decl`.
pub(super) fn expand(
    ctx: &Ctx,
    registry: &Registry,
    params: &Value,
    dir: &Path,
    key: &Key,
    decl: &Node,
) -> Result<Vec<Pending>, Diagnostic> {
    let d = declaration(ctx, registry, key, decl)?;
    let items = foreach_items(ctx, &d, params)?;
    items.iter().map(|item| instance(ctx, &d, params, dir, item.as_ref())).collect()
}

/// The declaration's kind, looked up in the registry, and its keys checked against the
/// common ones and the kind's own fields.
fn declaration<'a>(ctx: &Ctx, registry: &'a Registry, key: &'a Key, decl: &'a Node) -> Result<Decl<'a>, Diagnostic> {
    let what = format!("stage `{}`", key.name);
    let decl_map = map_or_err(ctx, decl, &what)?;
    let kinds = registry.kinds();
    let kind_node = decl.get("kind").ok_or_else(|| {
        ctx.err("E-MISSING-KEY", format!("stage `{}` has no `kind`", key.name), key.pos)
            .help(format!("known kinds: {}", kinds.join(", ")))
    })?;
    let kind = kind_node.as_str().unwrap_or_default();
    let Some(stage) = registry.get(kind) else {
        let written = kind_node.to_json().as_str().map(str::to_string).unwrap_or_else(|| kind_node.type_name_value());
        return Err(ctx
            .err("E-UNKNOWN-KIND", format!("unknown stage kind `{written}`"), kind_node.pos)
            .help(suggest(kind, &kinds, "kinds")));
    };
    let mut allowed: Vec<&str> = STAGE_KEYS.to_vec();
    allowed.extend_from_slice(stage.fields());
    check_keys(ctx, decl_map, &allowed, &what)?;
    Ok(Decl { key, node: decl, kind, stage, implementation: registry.implementation(kind) })
}

/// The most variants one `foreach` may expand to; past it a typo (a list pasted twice) is likelier
/// than intent.
const MAX_VARIANTS: usize = 1000;

/// `[None]` without `foreach`; else one `Some(item)` per item of a non-empty list, or per
/// combination of a grid (`foreach: {lr: [...], model: [...]}`: each item a map).
fn foreach_items(ctx: &Ctx, d: &Decl, params: &Value) -> Result<Vec<Option<Value>>, Diagnostic> {
    let Some(f) = d.node.get("foreach") else { return Ok(vec![None]) };
    let scope = Scope { pipeline_params: params, stage_params: None, item: None, inputs: None, outputs: None };
    let f = interpolate(f, &scope).map_err(|e| ctx.interp(e))?;
    let items = match f.to_json() {
        Value::Array(items) if !items.is_empty() => {
            same_types(ctx, &items, "`foreach`", f.pos)?;
            items
        }
        Value::Array(_) => return Err(ctx.err("E-FOREACH", "`foreach` is an empty list", f.pos)),
        Value::Object(axes) => grid(ctx, d, &axes, f.pos)?,
        other => {
            let msg = format!("`foreach` must be a list, or a map of lists (a grid), got {other}");
            return Err(ctx.err("E-FOREACH", msg, f.pos));
        }
    };
    if items.len() > MAX_VARIANTS {
        let msg = format!(
            "`foreach` of stage `{}` expands to {} variants, more than {MAX_VARIANTS}",
            d.key.name,
            items.len()
        );
        return Err(ctx.err("E-FOREACH", msg, f.pos));
    }
    Ok(items.into_iter().map(Some).collect())
}

/// Every item of a `foreach` list or grid axis has one type (numbers count as one).
fn same_types(ctx: &Ctx, items: &[Value], what: &str, pos: Pos) -> Result<(), Diagnostic> {
    let kind = |v: &Value| match v {
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Bool(_) => "boolean",
        _ => "other",
    };
    if let Some(odd) = items.iter().find(|v| kind(v) != kind(&items[0])) {
        let msg = format!("{what} mixes types: {} is a {}, {} a {}", items[0], kind(&items[0]), odd, kind(odd));
        return Err(ctx.err("E-FOREACH", msg, pos).help("give every value of one list the same type"));
    }
    Ok(())
}

/// The cartesian product of a grid's axes, in the order written (the last axis varies fastest).
fn grid(ctx: &Ctx, d: &Decl, axes: &serde_json::Map<String, Value>, pos: Pos) -> Result<Vec<Value>, Diagnostic> {
    if axes.is_empty() {
        return Err(ctx.err("E-FOREACH", "`foreach` is an empty map", pos));
    }
    let mut sizes = Vec::new();
    let mut total: usize = 1;
    for (k, v) in axes {
        let list = match v {
            Value::Array(l) if !l.is_empty() => l.clone(),
            Value::Array(_) => return Err(ctx.err("E-FOREACH", format!("grid axis `{k}` is an empty list"), pos)),
            other => vec![other.clone()],
        };
        same_types(ctx, &list, &format!("grid axis `{k}`"), pos)?;
        total = total.saturating_mul(list.len());
        sizes.push(format!("{k}: {}", list.len()));
        if total > MAX_VARIANTS {
            let msg = format!(
                "the grid of stage `{}` expands to more than {MAX_VARIANTS} variants ({})",
                d.key.name,
                sizes.join(" × ")
            );
            return Err(ctx.err("E-FOREACH", msg, pos).help("sweep fewer values, or split the sweep into stages"));
        }
    }
    let mut items: Vec<serde_json::Map<String, Value>> = vec![serde_json::Map::new()];
    for (k, v) in axes {
        let values = match v {
            Value::Array(l) => l.clone(),
            other => vec![other.clone()],
        };
        items = items
            .into_iter()
            .flat_map(|m| {
                values.iter().map(move |x| {
                    let mut m = m.clone();
                    m.insert(k.clone(), x.clone());
                    m
                })
            })
            .collect();
    }
    Ok(items.into_iter().map(Value::Object).collect())
}

/// A `foreach` item as it appears in an instance name: the value, or `k=v+k2=v2` for a grid item.
fn item_label(item: &Value, ctx: &Ctx, pos: Pos) -> Result<String, Diagnostic> {
    if let Value::Object(m) = item {
        let parts: Result<Vec<String>, Diagnostic> =
            m.iter().map(|(k, v)| Ok(format!("{k}={}", scalar_label(v, ctx, pos)?))).collect();
        return Ok(parts?.join("+"));
    }
    scalar_label(item, ctx, pos)
}

fn scalar_label(item: &Value, ctx: &Ctx, pos: Pos) -> Result<String, Diagnostic> {
    let s = match item {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => {
            let msg = format!("foreach items must be plain values (numbers or words), got {item}");
            return Err(ctx.err("E-FOREACH", msg, pos));
        }
    };
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.+".contains(c)) {
        return Err(ctx.err("E-FOREACH", format!("foreach item `{s}` cannot be part of a stage name"), pos).help(
            "use letters, digits, `_ - . +`; map longer values through params, e.g. foreach over keys of a params map",
        ));
    }
    Ok(s)
}

/// One instance of a declaration, for one `foreach` item (or none).
fn instance(ctx: &Ctx, d: &Decl, params: &Value, dir: &Path, item: Option<&Value>) -> Result<Pending, Diagnostic> {
    let name = match item {
        None => d.key.name.clone(),
        Some(v) => {
            format!("{}@{}", d.key.name, item_label(v, ctx, d.node.get("foreach").map_or(d.key.pos, |n| n.pos))?)
        }
    };
    let scope = Scope { pipeline_params: params, stage_params: None, item, inputs: None, outputs: None };
    let params_node = stage_params(ctx, d, &scope)?;
    let params_json = params_node.as_ref().map(Node::to_json).unwrap_or(Value::Object(Default::default()));
    let scope = Scope { stage_params: Some(&params_json), ..scope };
    let mut outputs = declared_outputs(ctx, d, &scope)?;
    let raw_inputs = declared_inputs(ctx, d, &scope)?;
    let input_names: Vec<String> = raw_inputs.iter().map(|(n, _, _)| n.clone()).collect();
    let (mut sorted_inputs, mut declared) = (input_names.clone(), outputs.clone());
    sorted_inputs.sort_unstable();
    declared.sort_unstable();
    let scope = Scope { inputs: Some(&sorted_inputs), outputs: Some(&declared), ..scope };
    let p = Params { fields: fields(ctx, d, &scope)?, params: as_btree(&params_json) };
    let profile = check(ctx, d, &name, &p, InputSpec { inputs: input_names.clone(), outputs: outputs.clone() })?;
    for req in &profile.required_outputs {
        if !outputs.contains(req) {
            outputs.push(req.clone());
        }
    }
    let settings = settings(ctx, d, &scope, &profile, &p)?;
    let param_files = param_files(ctx, d, &name, &params_json, dir)?;
    let inst = StageInstance {
        name,
        kind: d.kind.to_string(),
        implementation: d.implementation.clone(),
        params: p,
        inputs: BTreeMap::new(),
        outputs,
        threads: settings.threads,
        timeout: settings.timeout,
        retries: settings.retries,
        resources: settings.resources,
        deterministic: settings.deterministic,
        volatile_outputs: profile.volatile_outputs.clone(),
        wants_run_description: d.stage.wants_run_description(),
        seed: settings.seed,
        param_files,
        pos: d.key.pos,
        node: with_params(d.node, params_node.as_ref()),
    };
    Ok(Pending { inst, raw_inputs })
}

/// The stage's `params:` interpolated; `${params.x}` inside it means the pipeline's params.
fn stage_params(ctx: &Ctx, d: &Decl, scope: &Scope) -> Result<Option<Node>, Diagnostic> {
    let Some(p) = d.node.get("params") else { return Ok(None) };
    map_or_err(ctx, p, &format!("`params` of stage `{}`", d.key.name))?;
    Ok(Some(interpolate(p, scope).map_err(|e| ctx.interp(e))?))
}

fn as_btree(v: &Value) -> BTreeMap<String, Value> {
    match v {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => BTreeMap::new(),
    }
}

/// `outputs:` as distinct relative paths that stay inside the stage's output folder.
fn declared_outputs(ctx: &Ctx, d: &Decl, scope: &Scope) -> Result<Vec<String>, Diagnostic> {
    let Some(o) = d.node.get("outputs") else { return Ok(Vec::new()) };
    let o = interpolate(o, scope).map_err(|e| ctx.interp(e))?;
    let Kind::Seq(list) = &o.kind else {
        return Err(ctx.err("E-TYPE", format!("`outputs` must be a list of names, got {}", o.type_name()), o.pos));
    };
    let mut outputs: Vec<String> = Vec::new();
    for it in list {
        let Some(n) = it.as_str() else {
            let msg = format!("an output name must be a string, got {}", it.type_name());
            return Err(ctx.err("E-TYPE", msg, it.pos));
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
    Ok(outputs)
}

/// `{best_of: STAGE, by: METRIC, output: OUTPUT}`, each a string.
fn best_of(ctx: &Ctx, name: &str, v: &Node) -> Result<RawRef, Diagnostic> {
    let what = format!("input `{name}`");
    let map = map_or_err(ctx, v, &what)?;
    super::check_keys(ctx, map, &["best_of", "by", "output"], &what)?;
    let field = |k: &str| -> Result<String, Diagnostic> {
        v.get(k).and_then(Node::as_str).map(str::to_string).ok_or_else(|| {
            ctx.err("E-TYPE", format!("input `{name}`: `{k}` is required and must be a string"), v.pos)
                .help("write {best_of: STAGE, by: METRIC, output: OUTPUT}")
        })
    };
    Ok(RawRef::Best { of: field("best_of")?, by: field("by")?, output: field("output")? })
}

/// `inputs:` as (name, reference as written, position).
fn declared_inputs(ctx: &Ctx, d: &Decl, scope: &Scope) -> Result<Vec<(String, RawRef, Pos)>, Diagnostic> {
    let Some(i) = d.node.get("inputs") else { return Ok(Vec::new()) };
    let i = interpolate(i, scope).map_err(|e| ctx.interp(e))?;
    let imap = map_or_err(ctx, &i, "`inputs`")?;
    check_unique(ctx, imap, "`inputs`")?;
    let mut raw = Vec::new();
    for (k, v) in imap {
        if !valid_name(&k.name) {
            let msg = format!("input name `{}` may only hold letters, digits, `_` and `-`", k.name);
            return Err(ctx.err("E-NAME", msg, k.pos));
        }
        if v.as_map().is_some() {
            raw.push((k.name.clone(), best_of(ctx, &k.name, v)?, v.pos));
            continue;
        }
        let Some(s) = v.as_str() else {
            let msg = format!(
                "input `{}` must be `file:PATH`, `STAGE.OUTPUT` or {{best_of: STAGE, by: METRIC, output: OUTPUT}}, got {}",
                k.name,
                v.type_name()
            );
            return Err(ctx.err("E-TYPE", msg, v.pos));
        };
        raw.push((k.name.clone(), RawRef::Text(s.to_string()), v.pos));
    }
    Ok(raw)
}

/// The kind's own top-level fields (e.g. `cmd`, `env` for `command`), interpolated.
fn fields(ctx: &Ctx, d: &Decl, scope: &Scope) -> Result<BTreeMap<String, Value>, Diagnostic> {
    let mut fields = BTreeMap::new();
    for f in d.stage.fields() {
        if let Some(v) = d.node.get(f) {
            fields.insert(f.to_string(), interpolate(v, scope).map_err(|e| ctx.interp(e))?.to_json());
        }
    }
    Ok(fields)
}

/// The kind's own check, its error placed at the offending key (or the stage's name); a value
/// given with `--set` has no place in the file: the error says `--set`, and where the stage is.
fn check(ctx: &Ctx, d: &Decl, name: &str, p: &Params, io: InputSpec) -> Result<StageProfile, Diagnostic> {
    d.stage.check(p, &io).map_err(|e| {
        let mut pos = d.node.locate(&e.key);
        let unknown = e.help.as_deref().and_then(|h| unknown_param(&e.key, h));
        // An unknown param is its key's fault, not its value's: point at the key.
        if let Some((param, _)) = unknown.as_ref().filter(|_| !pos.is_cli()) {
            pos = d.node.get("params").and_then(|p| p.key_pos(param)).unwrap_or(pos);
        }
        let mut diag = ctx.err("E-PARAM", format!("stage `{name}`: {}", e.message), pos);
        let near = unknown.and_then(|(param, known)| crate::diag::closest(param, known).filter(|n| *n != param));
        let help = e.help.as_ref().map(|h| match near {
            Some(near) => format!("did you mean `{near}`? {h}"),
            None => h.clone(),
        });
        diag.help = match (pos.is_cli(), help) {
            (false, help) => help,
            (true, help) => {
                let at = format!("{}:{}:{}", ctx.file.display(), d.key.pos.line, d.key.pos.col);
                let set = format!("the value comes from --set; stage `{name}` is declared at {at}");
                Some(help.map_or(set.clone(), |h| format!("{set}; {h}")))
            }
        };
        diag
    })
}

/// For `stage_api::check_known_params`' error on an unknown `params.K` (its help reads "KIND
/// params: a, b, c"): K and the known params. The list is only in the help text: a method on
/// `Stage` naming them would change every stage's code fingerprint, and so every cache key.
fn unknown_param<'a>(key: &'a str, help: &'a str) -> Option<(&'a str, Vec<&'a str>)> {
    let param = key.strip_prefix("params.")?;
    let (_, list) = help.split_once(" params: ")?;
    Some((param, list.split(", ").collect()))
}

/// How the instance runs, from the common keys or the kind's defaults.
struct Settings {
    threads: u32,
    retries: u32,
    timeout: Option<std::time::Duration>,
    resources: super::Resources,
    deterministic: bool,
    seed: u64,
}

fn settings(ctx: &Ctx, d: &Decl, scope: &Scope, profile: &StageProfile, p: &Params) -> Result<Settings, Diagnostic> {
    let scalar = |k: &str| -> Result<Option<Node>, Diagnostic> {
        d.node.get(k).map(|n| interpolate(n, scope).map_err(|e| ctx.interp(e))).transpose()
    };
    let threads = match scalar("threads")? {
        Some(n) => as_u32(ctx, &n, "threads", 1)?,
        None => profile.default_threads.max(1),
    };
    let retries = match scalar("retries")? {
        Some(n) => as_u32(ctx, &n, "retries", 0)?,
        None => 0,
    };
    let timeout = scalar("timeout")?.map(|n| timeout(ctx, &n)).transpose()?;
    let deterministic = match scalar("deterministic")? {
        None => profile.deterministic,
        Some(Node { kind: Kind::Bool(b), .. }) => b,
        Some(n) => return Err(ctx.err("E-TYPE", "`deterministic` must be true or false", n.pos)),
    };
    let seed = match p.params.get("seed") {
        None => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            let msg = format!("`seed` must be a non-negative integer, got {v}");
            ctx.err("E-TYPE", msg, d.node.locate("params.seed"))
        })?,
    };
    let resources = super::resources::resources(ctx, scalar("resources")?.as_ref())?;
    Ok(Settings { threads, retries, timeout, resources, deterministic, seed })
}

fn timeout(ctx: &Ctx, n: &Node) -> Result<std::time::Duration, Diagnostic> {
    let text = match &n.kind {
        Kind::Str(s) => s.clone(),
        Kind::Int(i) => i.to_string(),
        Kind::Float(f) => f.to_string(),
        _ => String::new(),
    };
    parse_duration(&text).ok_or_else(|| {
        let msg = format!("`timeout` must be a duration like 30s, 10m, 2h, got {}", n.type_name_value());
        ctx.err("E-TYPE", msg, n.pos)
    })
}

/// The declaration with its `params:` replaced by the interpolated ones, for locating errors.
fn with_params(decl: &Node, params: Option<&Node>) -> Node {
    let mut node = decl.clone();
    if let (Some(pn), Kind::Map(m)) = (params, &mut node.kind) {
        for (k, v) in m.iter_mut() {
            if k.name == "params" {
                *v = pn.clone();
            }
        }
    }
    node
}

/// Params whose value is `file:PATH`, each checked to exist: (dotted path, absolute path).
fn param_files(
    ctx: &Ctx,
    d: &Decl,
    name: &str,
    params: &Value,
    dir: &Path,
) -> Result<Vec<(String, PathBuf)>, Diagnostic> {
    let mut found = Vec::new();
    collect_param_files(params, "", &mut found);
    let mut files = Vec::new();
    for (path, rel) in found {
        let full = dir.join(&rel);
        if rel.is_empty() || !full.exists() {
            let msg = format!("param `{path}` of stage `{name}`: file `{rel}` does not exist");
            return Err(ctx.err("E-MISSING-FILE", msg, d.node.locate(&format!("params.{path}"))).help(format!(
                "paths are relative to the pipeline file's folder ({}); looked for {}",
                dir.display(),
                full.display()
            )));
        }
        files.push((path, full));
    }
    Ok(files)
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
