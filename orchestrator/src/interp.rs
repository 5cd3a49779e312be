//! `${...}` interpolation in pipeline files.
//!
//! Resolved when the plan is made: `${params.NAME[.path]}` and `${item[.path]}`. Left in place
//! for the stage to fill in at run time (names checked now): `${inputs.NAME}`, `${outputs.NAME}`.
//! `$${` is a literal `${`. A string that is exactly one `${...}` takes the value's type, so
//! `foreach: ${params.sizes}` is a list and `threads: ${params.threads}` an integer.

use serde_json::Value;

use crate::yaml::{Kind, Node, Pos};

pub struct Scope<'a> {
    pub pipeline_params: &'a Value,
    /// The stage's own `params:`; `${params.x}` looks here first (outside the `params:` block).
    pub stage_params: Option<&'a Value>,
    pub item: Option<&'a Value>,
    /// The stage's input and output names, **sorted** (names are looked up by binary search: a
    /// join can reference thousands of inputs). `None` where `${inputs.*}`/`${outputs.*}` are
    /// not allowed (e.g. inside `inputs:` itself).
    pub inputs: Option<&'a [String]>,
    pub outputs: Option<&'a [String]>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InterpError {
    pub message: String,
    pub help: Option<String>,
    pub pos: Pos,
}

fn lookup<'v>(root: &'v Value, path: &[&str]) -> Option<&'v Value> {
    let mut v = root;
    for p in path {
        v = match v {
            Value::Object(m) => m.get(*p)?,
            Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

enum Resolved<'v> {
    Value(&'v Value),
    /// A run-time reference, kept verbatim.
    Deferred,
}

fn resolve<'v>(expr: &str, scope: &'v Scope<'v>, pos: Pos) -> Result<Resolved<'v>, InterpError> {
    let parts: Vec<&str> = expr.split('.').map(str::trim).collect();
    let err = |message: String, help: Option<String>| InterpError { message, help, pos };
    match parts[0] {
        "item" => {
            let Some(item) = scope.item else {
                return Err(err(
                    "`${item}` is only defined inside a stage with `foreach`".into(),
                    Some("add `foreach: [...]` to the stage, or use `${params.NAME}`".into()),
                ));
            };
            lookup(item, &parts[1..])
                .map(Resolved::Value)
                .ok_or_else(|| err(format!("`${{{expr}}}`: the foreach item has no `{}`", parts[1..].join(".")), None))
        }
        "params" if parts.len() >= 2 => {
            if let Some(v) = scope.stage_params.and_then(|sp| lookup(sp, &parts[1..])) {
                return Ok(Resolved::Value(v));
            }
            lookup(scope.pipeline_params, &parts[1..]).map(Resolved::Value).ok_or_else(|| {
                let names: Vec<String> = match scope.pipeline_params {
                    Value::Object(m) => m.keys().cloned().collect(),
                    _ => Vec::new(),
                };
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                err(
                    format!("`${{{expr}}}` is not defined"),
                    Some(crate::diag::suggest(parts[1], &refs, "params")),
                )
            })
        }
        which @ ("inputs" | "outputs") if parts.len() >= 2 => {
            // Output names may hold dots (`stats.json`): the name is everything after the prefix.
            let name = expr[which.len() + 1..].trim();
            let names = if which == "inputs" { scope.inputs } else { scope.outputs };
            let Some(names) = names else {
                return Err(err(format!("`${{{expr}}}` cannot be used here; it is only for commands and params"), None));
            };
            // `${inputs.@list}`: the file listing every input (the command stage writes it).
            let known = names.binary_search_by(|n| n.as_str().cmp(name)).is_ok();
            if known || (which == "inputs" && name == "@list") {
                Ok(Resolved::Deferred)
            } else {
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                Err(err(
                    format!("`${{{expr}}}`: this stage has no {} named `{name}`", &which[..which.len() - 1]),
                    Some(crate::diag::suggest(name, &refs, which)),
                ))
            }
        }
        _ => Err(err(
            format!("`${{{expr}}}` is not defined"),
            Some("use `${params.NAME}`, `${item}`, `${inputs.NAME}` or `${outputs.NAME}`; write `$${` for a literal `${`".into()),
        )),
    }
}

fn value_as_text(v: &Value, expr: &str, pos: Pos) -> Result<String, InterpError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Null => Ok(String::new()),
        Value::Array(_) | Value::Object(_) => Err(InterpError {
            message: format!("`${{{expr}}}` is a list or map and cannot be spliced into text"),
            help: Some(
                "use it as the whole value (e.g. `foreach: ${params.sizes}`) or index into it: `${params.sizes.0}`"
                    .into(),
            ),
            pos,
        }),
    }
}

/// Interpolate one string. Returns a node (a whole-value reference keeps the value's type).
pub fn interpolate_str(s: &str, scope: &Scope, pos: Pos) -> Result<Node, InterpError> {
    let trimmed = s.trim();
    if trimmed.starts_with("${") && trimmed.ends_with('}') && trimmed[2..trimmed.len() - 1].find(['{', '}']).is_none() {
        let expr = trimmed[2..trimmed.len() - 1].trim();
        if let Resolved::Value(v) = resolve(expr, scope, pos)? {
            return Ok(Node::from_json(v, pos));
        }
        return Ok(Node::new(Kind::Str(s.to_string()), pos));
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("$${");
            rest = tail;
        } else if after.starts_with("${") {
            let Some(end) = after.find('}') else {
                return Err(InterpError {
                    message: format!("unterminated `${{` in `{s}`"),
                    help: Some("close it with `}`, or write `$${` for a literal `${`".into()),
                    pos,
                });
            };
            let expr = after[2..end].trim();
            match resolve(expr, scope, pos)? {
                Resolved::Value(v) => out.push_str(&value_as_text(v, expr, pos)?),
                Resolved::Deferred => out.push_str(&after[..=end]),
            }
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(Node::new(Kind::Str(out), pos))
}

/// Interpolate every string in a subtree.
pub fn interpolate(node: &Node, scope: &Scope) -> Result<Node, InterpError> {
    Ok(match &node.kind {
        Kind::Str(s) if s.contains('$') => interpolate_str(s, scope, node.pos)?,
        Kind::Seq(items) => {
            Node::new(Kind::Seq(items.iter().map(|n| interpolate(n, scope)).collect::<Result<_, _>>()?), node.pos)
        }
        Kind::Map(m) => Node::new(
            Kind::Map(
                m.iter().map(|(k, v)| Ok((k.clone(), interpolate(v, scope)?))).collect::<Result<_, InterpError>>()?,
            ),
            node.pos,
        ),
        _ => node.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope<'a>(p: &'a Value, item: Option<&'a Value>, ins: &'a [String]) -> Scope<'a> {
        Scope { pipeline_params: p, stage_params: None, item, inputs: Some(ins), outputs: Some(&[]) }
    }

    #[test]
    fn whole_value_keeps_type() {
        let p = json!({"sizes": [1, 2], "n": 3});
        let s = scope(&p, None, &[]);
        let n = interpolate_str("${params.sizes}", &s, Pos::default()).unwrap();
        assert_eq!(n.to_json(), json!([1, 2]));
        assert_eq!(interpolate_str("${ params.n }", &s, Pos::default()).unwrap().to_json(), json!(3));
    }

    #[test]
    fn splices_text_and_defers_io() {
        let p = json!({"n": 3});
        let item = json!(500);
        let ins = vec!["stats.json".to_string(), "u".to_string()];
        let s = scope(&p, Some(&item), &ins);
        assert!(interpolate_str("${inputs.stats.json}", &s, Pos::default()).is_ok());
        let n = interpolate_str("head -c ${item} ${inputs.u} > x$${HOME}$n", &s, Pos::default()).unwrap();
        assert_eq!(n.as_str().unwrap(), "head -c 500 ${inputs.u} > x$${HOME}$n");
    }

    #[test]
    fn errors_name_the_expression() {
        let p = json!({"seed": 1});
        let s = scope(&p, None, &[]);
        let e = interpolate_str("x ${params.sede}", &s, Pos { line: 3, col: 4 }).unwrap_err();
        assert!(e.message.contains("params.sede"));
        assert!(e.help.unwrap().contains("seed"));
        assert_eq!(e.pos.line, 3);
        assert!(interpolate_str("${item}", &s, Pos::default()).is_err());
        assert!(interpolate_str("${inputs.zz}", &s, Pos::default()).is_err());
        assert!(interpolate_str("${nope}", &s, Pos::default()).is_err());
        assert!(interpolate_str("${params.seed", &s, Pos::default()).is_err());
    }

    #[test]
    fn stage_params_shadow_pipeline_params() {
        let p = json!({"x": 1});
        let sp = json!({"x": 2});
        let s = Scope { pipeline_params: &p, stage_params: Some(&sp), item: None, inputs: None, outputs: None };
        assert_eq!(interpolate_str("${params.x}", &s, Pos::default()).unwrap().to_json(), json!(2));
    }
}
