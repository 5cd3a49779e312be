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

/// One declared metric: `STAGE.METRIC: min|max`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricDecl {
    /// A stage instance, or a `foreach` declaration (covering its instances).
    pub stage: String,
    pub metric: String,
    pub better: Better,
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
        let better = match v.as_str() {
            Some("min") => Better::Min,
            Some("max") => Better::Max,
            _ => {
                let msg = format!("metric `{}` must be `min` or `max` (which way is better)", k.name);
                return Err(ctx.err("E-METRIC", msg, v.pos));
            }
        };
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
        out.push(MetricDecl { stage, metric, better });
    }
    Ok(out)
}

/// The declaration that gives `stage`'s `metric` its direction.
pub fn declared<'d>(decls: &'d [MetricDecl], stage: &str, metric: &str) -> Option<&'d MetricDecl> {
    decls.iter().find(|d| d.metric == metric && d.covers(stage))
}
