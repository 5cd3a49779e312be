//! Step 1 of loading: the file read and parsed into a positioned tree, `--set` applied, and
//! the top level checked — its keys, the pipeline's name and params, and the stage names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::{check_keys, check_unique, map_or_err, valid_name, Ctx, TOP_KEYS};
use crate::diag::Diagnostic;
use crate::yaml::{self, Key, Node, Pos};

/// A pipeline file whose top level is known to be well formed.
pub(super) struct Document {
    pub ctx: Ctx,
    pub root: Node,
    pub name: String,
    pub params: Value,
    /// The pipeline file's folder, absolute: `file:` paths are relative to it.
    pub dir: PathBuf,
}

impl Document {
    /// The stage declarations, in file order (checked to be a non-empty map by `parse`).
    pub fn stage_decls(&self) -> &[(Key, Node)] {
        self.root.get("stages").and_then(Node::as_map).unwrap_or(&[])
    }
}

pub(super) fn parse(file: &Path, sets: &[String]) -> Result<Document, Diagnostic> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        Diagnostic::new("E-READ", format!("cannot read pipeline file {}: {e}", file.display()))
            .help("check the path; pipelines live in pipelines/")
    })?;
    let source: Arc<str> = text.into();
    let ctx = Ctx { file: file.to_path_buf(), source: source.clone() };
    let mut root = yaml::parse(&source).map_err(|e| {
        let d = Diagnostic::new("E-YAML", format!("invalid YAML: {}", e.message)).in_file(file, source.clone());
        match e.pos {
            Some(p) => match unquoted_interpolation(&source, p) {
                Some(expr) => d.at(p).help(format!(
                    "inside `{{...}}` or `[...]` YAML reads `{{` as the start of a map: quote the \
                     interpolation, \"{expr}\""
                )),
                None if e.message.contains("tabs disallowed") => {
                    d.at(p).help("YAML indents with spaces only: replace the tab with spaces")
                }
                None => d.at(p),
            },
            None => d,
        }
    })?;
    let Some(top) = root.as_map() else {
        return Err(ctx.err("E-TYPE", "a pipeline file must be a map with `name` and `stages`", root.pos));
    };
    check_keys(&ctx, top, TOP_KEYS, "the pipeline")?;
    for s in sets {
        crate::overrides::apply_set(&mut root, s)?;
    }
    let name = pipeline_name(&ctx, &root, file)?;
    let params = pipeline_params(&ctx, &root)?;
    check_stage_names(&ctx, &root)?;
    Ok(Document { ctx, root, name, params, dir: folder_of(file) })
}

/// The `${...}` at `pos` (1-based line and column), if the YAML error is there: unquoted in a
/// flow collection (`foreach: {n: ${params.sizes}}`), where `{` opens a map.
fn unquoted_interpolation(source: &str, pos: crate::yaml::Pos) -> Option<&str> {
    let line = source.lines().nth((pos.line as usize).checked_sub(1)?)?;
    let at = line.char_indices().nth((pos.col as usize).checked_sub(1)?)?.0;
    // The parser stops at the `$` or at the `{` after it.
    let start = if line[..at].ends_with('$') { at - 1 } else { at };
    let rest = line[start..].strip_prefix("${")?;
    Some(&line[start..start + 2 + rest.find('}')? + 1])
}

/// `name:`, or the file's stem when absent.
fn pipeline_name(ctx: &Ctx, root: &Node, file: &Path) -> Result<String, Diagnostic> {
    match root.get("name") {
        None => Ok(file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into())),
        Some(n) => match n.as_str() {
            Some(s) if valid_name(s) => Ok(s.to_string()),
            _ => Err(ctx.err("E-TYPE", "`name` must be a word (letters, digits, `_`, `-`)", n.pos)),
        },
    }
}

/// Pipeline params may refer to each other only by value, not by `${}`: kept simple.
fn pipeline_params(ctx: &Ctx, root: &Node) -> Result<Value, Diagnostic> {
    let Some(p) = root.get("params") else { return Ok(Value::Object(Default::default())) };
    check_unique(ctx, map_or_err(ctx, p, "`params`")?, "`params`")?;
    Ok(p.to_json())
}

/// `stages:` is a non-empty map of valid, distinct names — checked before any stage is
/// expanded, so references can be checked against every stage whatever the order.
fn check_stage_names(ctx: &Ctx, root: &Node) -> Result<(), Diagnostic> {
    let stages_node = root.get("stages").ok_or_else(|| {
        ctx.err("E-MISSING-KEY", "the pipeline has no `stages`", root.pos).help("add `stages:` with at least one stage")
    })?;
    let stage_map = map_or_err(ctx, stages_node, "`stages`")?;
    if stage_map.is_empty() {
        return Err(ctx.err("E-MISSING-KEY", "`stages` is empty", stages_node.pos));
    }
    let mut first_pos: HashMap<&str, Pos> = HashMap::new();
    for (k, _) in stage_map {
        if !valid_name(&k.name) {
            let msg = format!("stage name `{}` may only hold letters, digits, `_` and `-`", k.name);
            return Err(ctx.err("E-NAME", msg, k.pos));
        }
        if let Some(first) = first_pos.insert(&k.name, k.pos) {
            return Err(ctx.err("E-DUPLICATE", format!("duplicate stage name `{}`", k.name), k.pos).help(format!(
                "a stage `{}` is already defined at line {} column {}; rename one",
                k.name, first.line, first.col
            )));
        }
    }
    Ok(())
}

fn folder_of(file: &Path) -> PathBuf {
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    std::path::absolute(&dir).unwrap_or(dir)
}
