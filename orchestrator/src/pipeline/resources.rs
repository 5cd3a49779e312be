//! What a cluster executor needs beyond the stage itself: a stage's `resources:` (memory, time,
//! partition) and the pipeline's `executor:` block (partition, account, qos, extra `sbatch`
//! arguments, poll interval). The local executor ignores both; neither is in the cache key.

use std::time::Duration;

use super::{check_keys, map_or_err, parse_duration, Ctx};
use crate::diag::Diagnostic;
use crate::yaml::{Kind, Node, Pos};

/// A stage's `resources:`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// Memory as Slurm's `--mem` takes it: `500M`, `4G`.
    pub mem: Option<String>,
    /// The job's time limit; `timeout` when absent.
    pub time: Option<Duration>,
    pub partition: Option<String>,
    /// Where `partition` is written, for an error when the cluster has no such partition.
    pub partition_pos: Pos,
}

/// The pipeline's `executor:` block.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExecutorDecl {
    pub partition: Option<String>,
    pub partition_pos: Pos,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub sbatch_args: Vec<String>,
    pub poll: Option<Duration>,
    pub max_poll: Option<Duration>,
}

const RESOURCE_KEYS: &[&str] = &["mem", "time", "partition"];
const EXECUTOR_KEYS: &[&str] = &["partition", "account", "qos", "sbatch_args", "poll", "max_poll"];

fn text(ctx: &Ctx, n: &Node, what: &str) -> Result<String, Diagnostic> {
    match &n.kind {
        Kind::Str(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Kind::Int(i) => Ok(i.to_string()),
        _ => Err(ctx.err("E-TYPE", format!("`{what}` must be a non-empty string, got {}", n.type_name()), n.pos)),
    }
}

fn duration(ctx: &Ctx, n: &Node, what: &str) -> Result<Duration, Diagnostic> {
    let t = match &n.kind {
        Kind::Str(s) => s.clone(),
        Kind::Int(i) => i.to_string(),
        Kind::Float(f) => f.to_string(),
        _ => String::new(),
    };
    parse_duration(&t)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| ctx.err("E-TYPE", format!("`{what}` must be a duration like 30s, 10m, 2h, got {t:?}"), n.pos))
}

/// `500M`, `4G`, `1024` (megabytes, as Slurm reads a bare number); `GB`/`GiB` spellings too.
fn memory(ctx: &Ctx, n: &Node) -> Result<String, Diagnostic> {
    let raw = text(ctx, n, "resources.mem")?;
    let upper = raw.to_ascii_uppercase();
    let trimmed = upper.trim_end_matches("IB").trim_end_matches('B');
    let digits = trimmed.trim_end_matches(['K', 'M', 'G', 'T']);
    let unit = &trimmed[digits.len()..];
    let ok = !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) && unit.len() <= 1;
    if !ok || digits.parse::<u64>().map_or(true, |v| v == 0) {
        return Err(ctx
            .err("E-TYPE", format!("`resources.mem` must be a size like 500M or 4G, got {raw:?}"), n.pos)
            .help("a whole number with K, M, G or T (a bare number means megabytes, as in sbatch --mem)"));
    }
    Ok(format!("{digits}{unit}"))
}

/// A stage's `resources:` map.
pub(super) fn resources(ctx: &Ctx, node: Option<&Node>) -> Result<Resources, Diagnostic> {
    let Some(node) = node else { return Ok(Resources::default()) };
    let map = map_or_err(ctx, node, "`resources`")?;
    check_keys(ctx, map, RESOURCE_KEYS, "`resources`")?;
    let mut r = Resources::default();
    for (k, v) in map {
        match k.name.as_str() {
            "mem" => r.mem = Some(memory(ctx, v)?),
            "time" => r.time = Some(duration(ctx, v, "resources.time")?),
            _ => {
                r.partition = Some(text(ctx, v, "resources.partition")?);
                r.partition_pos = v.pos;
            }
        }
    }
    Ok(r)
}

/// The pipeline's `executor:` block.
pub(super) fn executor(ctx: &Ctx, node: Option<&Node>) -> Result<ExecutorDecl, Diagnostic> {
    let Some(node) = node else { return Ok(ExecutorDecl::default()) };
    let map = map_or_err(ctx, node, "`executor`")?;
    check_keys(ctx, map, EXECUTOR_KEYS, "`executor`")?;
    let mut e = ExecutorDecl::default();
    for (k, v) in map {
        let what = format!("executor.{}", k.name);
        match k.name.as_str() {
            "partition" => {
                e.partition = Some(text(ctx, v, &what)?);
                e.partition_pos = v.pos;
            }
            "account" => e.account = Some(text(ctx, v, &what)?),
            "qos" => e.qos = Some(text(ctx, v, &what)?),
            "poll" => e.poll = Some(duration(ctx, v, &what)?),
            "max_poll" => e.max_poll = Some(duration(ctx, v, &what)?),
            _ => {
                let Kind::Seq(items) = &v.kind else {
                    let msg = format!("`{what}` must be a list of strings, e.g. [\"--exclusive\"]");
                    return Err(ctx.err("E-TYPE", msg, v.pos));
                };
                e.sbatch_args = items.iter().map(|i| text(ctx, i, &what)).collect::<Result<_, _>>()?;
            }
        }
    }
    if let (Some(min), Some(max)) = (e.poll, e.max_poll) {
        if max < min {
            let pos = node.key_pos("max_poll").unwrap_or(node.pos);
            return Err(ctx.err("E-TYPE", "`executor.max_poll` must not be shorter than `executor.poll`", pos));
        }
    }
    Ok(e)
}
