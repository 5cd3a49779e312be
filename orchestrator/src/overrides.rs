//! `--set KEY=VALUE` overrides, applied to the positioned YAML tree before it is checked, so
//! an overridden value is validated exactly like one written in the file.

use crate::diag::{suggest, Diagnostic};
use crate::yaml::{self, Key, Kind, Node, Pos};

/// Apply one `--set K=V` to the raw tree. See docs/pipeline.md for the key forms.
pub fn apply_set(root: &mut Node, arg: &str) -> Result<(), Diagnostic> {
    let bad = |msg: String| Diagnostic::new("E-SET", msg).at(Pos::CLI);
    let Some((key, value)) = arg.split_once('=') else {
        return Err(bad(format!("`--set {arg}` is not KEY=VALUE"))
            .help("e.g. --set seed=7 or --set stages.train.params.lr=0.001"));
    };
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
        return Err(bad(format!("`--set {arg}`: `{key}` is not a dotted key")));
    }
    let value = yaml::parse_value(value)
        .map_err(|e| bad(format!("`--set {arg}`: the value is not valid YAML: {}", e.message)))?;
    let param_names: Vec<String> = root
        .get("params")
        .and_then(Node::as_map)
        .map(|m| m.iter().map(|(k, _)| k.name.clone()).collect())
        .unwrap_or_default();
    let stage_names: Vec<String> = root
        .get("stages")
        .and_then(Node::as_map)
        .map(|m| m.iter().map(|(k, _)| k.name.clone()).collect())
        .unwrap_or_default();
    // `fit@lr=0.1.x=1` splits at the variant's own `=`: say what --set can reach instead.
    let variant_of = key.split_once('@').map(|(s, _)| s.strip_prefix("stages.").unwrap_or(s));
    let has_foreach = |s: &str| root.get("stages").and_then(|m| m.get(s)).and_then(|n| n.get("foreach")).is_some();
    if let Some(stage) = variant_of.filter(|s| has_foreach(s)) {
        return Err(bad(format!("`--set {arg}`: --set cannot reach one variant of a `foreach` stage")).help(format!(
            "`--set {stage}.PARAM=V` sets it for every variant of `{stage}`; to run one variant alone, use `--target` with its name"
        )));
    }
    let path: Vec<String> = match parts[0] {
        "params" if parts.len() > 1 => parts.iter().map(|s| s.to_string()).collect(),
        "stages" if parts.len() > 2 => {
            if !stage_names.iter().any(|s| s == parts[1]) {
                let refs: Vec<&str> = stage_names.iter().map(String::as_str).collect();
                return Err(bad(format!("`--set {arg}`: there is no stage `{}`", parts[1]))
                    .help(suggest(parts[1], &refs, "stages")));
            }
            parts.iter().map(|s| s.to_string()).collect()
        }
        first if param_names.iter().any(|p| p == first) => {
            std::iter::once("params").chain(parts.iter().copied()).map(str::to_string).collect()
        }
        first if stage_names.iter().any(|s| s == first) && parts.len() > 1 => {
            ["stages", first, "params"].into_iter().chain(parts[1..].iter().copied()).map(str::to_string).collect()
        }
        first => {
            let mut names: Vec<&str> = param_names.iter().map(String::as_str).collect();
            names.extend(stage_names.iter().map(String::as_str));
            return Err(bad(format!("`--set {arg}`: `{first}` is neither a pipeline param nor a stage")).help(
                format!(
                    "{}; forms: PARAM=V, params.PATH=V, STAGE.PARAM=V, stages.STAGE.KEY=V",
                    suggest(first, &names, "names")
                ),
            ));
        }
    };
    let mut node = root;
    for (i, part) in path.iter().enumerate() {
        if node.kind == Kind::Null {
            node.kind = Kind::Map(Vec::new());
        }
        let what = node.type_name();
        let Kind::Map(map) = &mut node.kind else {
            return Err(bad(format!("`--set {arg}`: `{}` is {what}, not a map", path[..i].join("."))));
        };
        let idx = match map.iter().position(|(k, _)| &k.name == part) {
            Some(idx) => idx,
            None => {
                map.push((Key { name: part.clone(), pos: Pos::CLI }, Node::new(Kind::Null, Pos::CLI)));
                map.len() - 1
            }
        };
        node = &mut map[idx].1;
    }
    *node = value;
    Ok(())
}
