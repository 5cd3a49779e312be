//! `metrics:` — the numbers a pipeline is judged by, each with the direction that is better:
//! `metrics: {teacher.val_loss: min, benchmark.itera_f32_forward_tok_s: max}`. `compare` reports them
//! better/worse, `--fail-on-regress` gates on them. A declaration's stage may be a `foreach`
//! stage's name (`train.val_loss`): it then covers every instance.

use serde::{Deserialize, Serialize};

use super::{is_variant_of, map_or_err, split_instance, Ctx};
use crate::diag::{suggest, Diagnostic};
use crate::yaml::Node;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Min,
    Max,
}

impl Better {
    /// A metric named on the command line with its direction, `loss:min` or `fit.acc:max`, or
    /// without (`loss`: none given); any other suffix after `:` is an error.
    pub fn split(spec: &str) -> Result<(&str, Option<Better>), String> {
        match spec.rsplit_once(':') {
            Some((m, "min")) => Ok((m, Some(Better::Min))),
            Some((m, "max")) => Ok((m, Some(Better::Max))),
            Some((_, other)) => Err(format!("`{spec}`: the direction is `min` or `max`, not `{other}`")),
            None => Ok((spec, None)),
        }
    }

    /// Whether going from `a` to `b` is an improvement (`Some(true)`), a regression, or neither.
    pub fn judge(self, a: f64, b: f64) -> Option<bool> {
        if a == b {
            return None;
        }
        Some(match self {
            Better::Min => b < a,
            Better::Max => b > a,
        })
    }
}

/// A difference too small to call better or worse: absolute (`0.01`) or relative to run A's
/// value (`5%`). A timing swings by a few percent between two runs of the same code.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Band {
    pub amount: f64,
    pub relative: bool,
}

impl Band {
    /// `0.01` or `2%`: a number ≥ 0, `%` for relative.
    pub fn parse(text: &str) -> Result<Band, String> {
        let (num, relative) = text.strip_suffix('%').map_or((text, false), |n| (n, true));
        match num.trim().parse::<f64>() {
            Ok(amount) if amount.is_finite() && amount >= 0.0 => Ok(Band { amount, relative }),
            _ => Err(format!("`{text}` is not a number ≥ 0 like 0.01 or 2%")),
        }
    }

    /// The largest difference from `a` the band allows.
    pub fn allowed(self, a: f64) -> f64 {
        if self.relative {
            a.abs() * self.amount / 100.0
        } else {
            self.amount
        }
    }
}

impl std::fmt::Display for Band {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.amount, if self.relative { "%" } else { "" })
    }
}

/// One declared metric: `STAGE.METRIC: min|max`, or `{better: min|max, within: BAND}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricDecl {
    /// A stage instance, or a `foreach` declaration (covering its instances).
    pub stage: String,
    pub metric: String,
    pub better: Better,
    /// Differences within it are noise, neither better nor worse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<Band>,
}

/// How a stage records a metric, for errors about one missing: the built-in kinds record
/// their own; a `command` writes them.
pub const HOW_TO_RECORD: &str = "a `command` stage records metrics by writing one JSON object, \
    e.g. {\"score\": 0.9}, to the file named by $ORCH_METRICS";

impl MetricDecl {
    /// `stage.metric`, as written.
    pub fn name(&self) -> String {
        format!("{}.{}", self.stage, self.metric)
    }

    /// Whether it covers the stage instance `name` (itself, or an instance `stage@…`).
    pub fn covers(&self, name: &str) -> bool {
        name == self.stage || is_variant_of(name, &self.stage)
    }
}

/// The `metrics:` map, each key naming a stage (instance or `foreach` declaration).
pub(super) fn metrics(ctx: &Ctx, node: Option<&Node>, stages: &[&str]) -> Result<Vec<MetricDecl>, Diagnostic> {
    let Some(node) = node else { return Ok(Vec::new()) };
    let map = map_or_err(ctx, node, "`metrics`")?;
    let mut out: Vec<MetricDecl> = Vec::new();
    for (k, v) in map {
        let (better, within) = direction(ctx, &k.name, v)?;
        // The stage part is the longest prefix naming a stage: instance names may hold `.`.
        let split = k.name.match_indices('.').map(|(i, _)| i).rev().find(|&i| {
            let stage = &k.name[..i];
            stages.iter().any(|s| *s == stage || is_variant_of(s, stage))
        });
        let Some(i) = split else {
            let names: Vec<&str> = stages.iter().map(|s| split_instance(s).0).collect();
            let stage = k.name.split('.').next().unwrap_or(&k.name);
            let msg = format!("metric `{}` names no stage (write `STAGE.METRIC`)", k.name);
            return Err(ctx.err("E-METRIC", msg, k.pos).help(suggest(stage, &names, "stages")));
        };
        let (stage, metric) = (k.name[..i].to_string(), k.name[i + 1..].to_string());
        if metric.is_empty() {
            return Err(ctx.err("E-METRIC", format!("metric `{}` has no metric name after the stage", k.name), k.pos));
        }
        if out.iter().any(|d| d.stage == stage && d.metric == metric) {
            return Err(ctx.err("E-METRIC", format!("metric `{}` is declared twice", k.name), k.pos));
        }
        out.push(MetricDecl { stage, metric, better, within });
    }
    Ok(out)
}

/// A declaration's value: `min`, `max`, or `{better: min|max, within: 0.01 | 5%}`.
fn direction(ctx: &Ctx, name: &str, v: &Node) -> Result<(Better, Option<Band>), Diagnostic> {
    let word = |n: &Node| match n.as_str() {
        Some("min") => Ok(Better::Min),
        Some("max") => Ok(Better::Max),
        _ => Err(ctx
            .err("E-METRIC", format!("metric `{name}` must be `min` or `max` (which way is better)"), n.pos)
            .help("or a map: {better: max, within: 5%} — differences within 5% are noise")),
    };
    let Some(map) = v.as_map() else { return Ok((word(v)?, None)) };
    if let Some((k, _)) = map.iter().find(|(k, _)| k.name != "better" && k.name != "within") {
        let msg = format!("metric `{name}`: unknown key `{}`", k.name);
        return Err(ctx.err("E-METRIC", msg, k.pos).help(suggest(&k.name, &["better", "within"], "keys")));
    }
    let better = match v.get("better") {
        Some(b) => word(b)?,
        None => {
            return Err(ctx.err("E-METRIC", format!("metric `{name}` needs `better: min` or `better: max`"), v.pos))
        }
    };
    let within = match v.get("within") {
        None => None,
        Some(w) => {
            let text = w.as_str().map(str::to_string).unwrap_or_else(|| w.to_json().to_string());
            let band =
                Band::parse(&text).map_err(|e| ctx.err("E-METRIC", format!("metric `{name}`: `within` {e}"), w.pos))?;
            Some(band)
        }
    };
    Ok((better, within))
}

/// The declaration that gives `stage`'s `metric` its direction.
pub fn declared<'d>(decls: &'d [MetricDecl], stage: &str, metric: &str) -> Option<&'d MetricDecl> {
    decls.iter().find(|d| d.metric == metric && d.covers(stage))
}
