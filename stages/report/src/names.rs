//! The names a template can use: every dotted path of the context (for `orchestrate report
//! --vars`), and the closest ones to a name that is not defined (for "did you mean").

use serde_json::Value;

/// How deep `paths` descends into nested objects.
const MAX_DEPTH: usize = 6;

/// Every path of `context` as its keys, with its value, objects descended into (not lists),
/// in sorted order: `[stages]`, `[stages, train]`, `[stages, train, summary_json]`, ….
pub fn paths(context: &Value) -> Vec<(Vec<&str>, &Value)> {
    let mut out = Vec::new();
    walk(context, Vec::new(), &mut out);
    out
}

fn walk<'a>(v: &'a Value, prefix: Vec<&'a str>, out: &mut Vec<(Vec<&'a str>, &'a Value)>) {
    let Value::Object(map) = v else { return };
    if prefix.len() >= MAX_DEPTH {
        return;
    }
    for (k, child) in map {
        let mut path = prefix.clone();
        path.push(k.as_str());
        out.push((path.clone(), child));
        walk(child, path, out);
    }
}

/// A key a template can write after a dot: a letter or `_`, then letters, digits, `_`.
fn plain(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A path as a template writes it: `stages.teacher.summary_json`, and a key that is not a
/// plain name subscripted, `stages["vocab@384"].tokenizer_json`.
pub fn written(keys: &[&str]) -> String {
    let mut out = String::new();
    for k in keys {
        if plain(k) {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(k);
        } else {
            out.push('[');
            out.push_str(&Value::String(k.to_string()).to_string());
            out.push(']');
        }
    }
    out
}

/// A value in one line of at most `width` characters: numbers and strings as they are,
/// objects by their keys, lists by their length and first item's keys.
pub fn sample(v: &Value, width: usize) -> String {
    let text = match v {
        Value::Object(m) => format!("{{{}}}", m.keys().cloned().collect::<Vec<_>>().join(", ")),
        Value::Array(items) => match items.first() {
            Some(Value::Object(first)) => {
                let keys = first.keys().cloned().collect::<Vec<_>>().join(", ");
                format!("list of {} rows of {{{keys}}}", items.len())
            }
            Some(first) => format!("list of {} items, first {first}", items.len()),
            None => "empty list".to_string(),
        },
        other => other.to_string(),
    };
    if text.chars().count() > width {
        format!("{}…", text.chars().take(width.saturating_sub(1)).collect::<String>())
    } else {
        text
    }
}

/// The dotted name around byte `at` of `template` (e.g. `teacher.summary.val_loss` for an
/// error pointing into it).
pub fn name_at(template: &str, at: usize) -> Option<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    let at = at.min(template.len());
    let start = template[..at].rfind(|c: char| !is_name(c)).map_or(0, |i| i + 1);
    let end = template[start..].find(|c: char| !is_name(c)).map_or(template.len(), |i| start + i);
    let name = template[start..end].trim_matches('.');
    (!name.is_empty()).then(|| name.to_string())
}

/// Segments of `a` and `b` are the same name, or nearly: a typo, or one a prefix of the other
/// (`summary` for `summary_json`).
fn segment_cost(a: &str, b: &str) -> Option<usize> {
    if a == b {
        return Some(0);
    }
    // A key that is not a plain name (a vocabulary's "." token) is near no name, except a
    // `foreach` variant, `fit@lr=0.1` for `fit`.
    if !plain(b) {
        return b.strip_prefix(a).is_some_and(|rest| rest.starts_with('@')).then_some(1);
    }
    if a.is_empty() {
        return None;
    }
    if b.starts_with(a) || a.starts_with(b) {
        return Some(1);
    }
    let d = strsim::levenshtein(a, b);
    (d <= (a.len().max(b.len()) / 3).max(1)).then_some(d)
}

/// How far `name` is from `path`: its segments are matched in order to the path's; each one
/// left unmatched costs 10, each path segment left over 1, each near match its distance.
/// `None` unless the last segments match and at least half of `name`'s segments do.
fn distance(name: &[&str], path: &[&str]) -> Option<usize> {
    segment_cost(name.last()?, path.last()?)?;
    let (mut cost, mut matched, mut j) = (0, 0, 0);
    for seg in name {
        match (j..path.len()).find_map(|k| segment_cost(seg, path[k]).map(|c| (k, c))) {
            Some((k, c)) => {
                cost += c + (k - j);
                matched += 1;
                j = k + 1;
            }
            None => cost += 10,
        }
    }
    (matched * 2 >= name.len()).then_some(cost + (path.len() - j))
}

/// Up to three paths closest to the dotted `name`, best first, as a template writes them.
pub fn closest(name: &str, paths: &[Vec<&str>]) -> Vec<String> {
    let want: Vec<&str> = name.split('.').collect();
    let mut scored: Vec<(usize, String)> =
        paths.iter().filter_map(|p| distance(&want, p).map(|d| (d, written(p)))).collect();
    scored.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.len().cmp(&b.1.len())).then(a.1.cmp(&b.1)));
    scored.into_iter().take(3).map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn context() -> Value {
        json!({
            "inputs": {},
            "stages": {
                "teacher": {"summary_json": {"val_loss": 1.9, "val_perplexity": 7.0}, "metrics_csv": [{"step": 1}]},
                "transformer": {"summary_json": {"val_loss": 3.0}},
            },
            "run": {"pipeline": "p", "git_commit": "abc"},
        })
    }

    fn all(v: &Value) -> Vec<Vec<&str>> {
        paths(v).into_iter().map(|(p, _)| p).collect()
    }

    #[test]
    fn suggests_the_stage_output_path() {
        let c = context();
        let p = all(&c);
        assert_eq!(closest("teacher.summary.val_loss", &p)[0], "stages.teacher.summary_json.val_loss");
        assert_eq!(closest("inputs.teacher.val_loss", &p)[0], "stages.teacher.summary_json.val_loss");
        assert_eq!(closest("stages.teacher.summary_json.val_los", &p)[0], "stages.teacher.summary_json.val_loss");
        assert_eq!(closest("run.git_comit", &p)[0], "run.git_commit");
        assert!(closest("nothing.like.this", &p).is_empty());
    }

    #[test]
    fn keys_with_dots_in_them_are_not_suggested_for_any_name() {
        // A character vocabulary's "." token: its path ends in an empty segment.
        let mut c = context();
        c["stages"]["vocab"] = json!({"tokenizer_json": {"model": {"vocab": {".": 3, "a": 4}}}});
        let near = closest("stages.nope.summary_json.val_loss", &all(&c));
        assert!(near.iter().all(|p| !p.contains("..") && !p.contains("vocab")), "{near:?}");
        assert_eq!(near[0], "stages.teacher.summary_json.val_loss");
    }

    /// A `foreach` variant's key is not a name a template can write after a dot: it is
    /// suggested, and listed, subscripted.
    #[test]
    fn variant_keys_are_written_subscripted() {
        let mut c = context();
        c["stages"]["fit@lr=0.1"] = json!({"out": "x"});
        c["stages"]["fit@lr=0.3"] = json!({"out": "y"});
        let p = all(&c);
        assert_eq!(closest("stages.fit.out", &p), [r#"stages["fit@lr=0.1"].out"#, r#"stages["fit@lr=0.3"].out"#]);
        assert!(p.iter().map(|k| written(k)).any(|w| w == r#"stages["fit@lr=0.3"]"#));
        assert_eq!(
            written(&["stages", "vocab", "tokenizer_json", "model", "vocab", "\"", "0"]),
            r#"stages.vocab.tokenizer_json.model.vocab["\""]["0"]"#
        );
    }

    #[test]
    fn names_and_samples() {
        let t = "a {{ teacher.summary.val_loss | fixed(3) }} b";
        assert_eq!(name_at(t, 6).as_deref(), Some("teacher.summary.val_loss"));
        assert_eq!(name_at(t, 14).as_deref(), Some("teacher.summary.val_loss"));
        let c = context();
        assert_eq!(sample(&c["stages"]["teacher"]["metrics_csv"], 80), "list of 1 rows of {step}");
        assert_eq!(sample(&c["stages"]["teacher"]["summary_json"], 80), "{val_loss, val_perplexity}");
        assert_eq!(sample(&json!("abcdefgh"), 5), "\"abc…");
    }
}
