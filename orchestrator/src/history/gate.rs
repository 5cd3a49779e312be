//! `compare --fail-on-regress`: a declared metric of run B judged against run A.

use super::{shown, Comparison, MetricRow};
use crate::pipeline::is_variant_of;
use crate::pipeline::metrics::Band;
use crate::store::RunRecord;

/// `--fail-on-regress METRIC[:TOL]`: TOL absolute (`0.01`) or relative (`2%`); none = the
/// metric's declared `within:` band, else any worsening.
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    pub metric: String,
    pub tolerance: Option<Band>,
}

impl std::str::FromStr for Gate {
    type Err = String;
    fn from_str(s: &str) -> Result<Gate, String> {
        let (metric, tol) = match s.rsplit_once(':') {
            Some((m, t)) => (m, Some(t)),
            None => (s, None),
        };
        let tolerance = tol.map(|t| Band::parse(t).map_err(|e| format!("`{s}`: the tolerance {e}"))).transpose()?;
        if !metric.contains('.') {
            return Err(format!("`{s}`: name the metric as STAGE.METRIC"));
        }
        Ok(Gate { metric: metric.to_string(), tolerance })
    }
}

/// What a gate found: any regression fails the comparison; notes say what it could not judge.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    pub regressions: Vec<String>,
    pub notes: Vec<String>,
}

impl Gate {
    /// The rows the gate judges: the metric named exactly (`train.val_loss`,
    /// `fit@lr=0.1.score`), else every instance of the `foreach` stage it names (`fit.score`
    /// covers `fit@…`, as the `metrics:` declaration does). The flag says which.
    fn rows<'c>(&self, c: &'c Comparison) -> (Vec<&'c MetricRow>, bool) {
        let exact: Vec<&MetricRow> = c.metrics.iter().filter(|r| r.name == self.metric).collect();
        if !exact.is_empty() {
            return (exact, false);
        }
        let variants = match self.metric.split_once('.') {
            Some((stage, metric)) => {
                c.metrics.iter().filter(|r| r.metric == metric && is_variant_of(&r.stage, stage)).collect()
            }
            None => Vec::new(),
        };
        (variants, true)
    }

    /// Judge run B (`b`) against run A in `c`, which must hold every metric (`compare --all`).
    /// A metric A has and B lacks is a regression when its stage did not finish in B, or when
    /// the gate names it exactly; a `foreach` gate skips variants B no longer has, but fails
    /// when no variant is in both runs. An error if the metric is unknown or has no direction.
    pub fn check(&self, c: &Comparison, b: &RunRecord) -> Result<Verdict, String> {
        let (rows, sweep) = self.rows(c);
        if rows.is_empty() {
            return Err(format!(
                "--fail-on-regress {}: no such metric in these runs (declared and recorded metrics: {})",
                self.metric,
                c.metrics.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        if rows.iter().any(|r| r.better.is_none()) {
            return Err(format!(
                "--fail-on-regress {}: the pipeline does not declare which way is better (add it under `metrics:`)",
                self.metric
            ));
        }
        let mut v = Verdict::default();
        let mut compared = 0;
        for row in rows {
            let name = &row.name;
            match (row.a, row.b) {
                (Some(a), Some(_)) => {
                    compared += 1;
                    v.regressions.extend(self.worse(row, a));
                }
                (Some(a), None) => match unfinished(b, &row.stage) {
                    Some(status) => v.regressions.push(format!(
                        "{name} was not recorded: stage `{}` {status} in run B ({} in run A)",
                        row.stage,
                        shown(a)
                    )),
                    None if !sweep && b.left_out(&row.stage) => v.regressions.push(format!(
                        "{name} was not recorded: run B ran with {}, which leaves `{}` out ({} in run A)",
                        b.targets_shown(),
                        row.stage,
                        shown(a)
                    )),
                    None if !sweep => v.regressions.push(format!(
                        "{name} was not recorded: run B has no stage `{}` ({} in run A)",
                        row.stage,
                        shown(a)
                    )),
                    None => v.notes.push(format!("{name}: run B has no variant `{}`; not compared", row.stage)),
                },
                (None, Some(_)) => v.notes.push(format!("{name}: not in run A; nothing to compare it with")),
                (None, None) => {}
            }
        }
        if sweep && compared == 0 && v.regressions.is_empty() {
            v.regressions.push(format!("{}: no variant is in both runs, so nothing was compared", self.metric));
        }
        Ok(v)
    }

    /// A message if `row` (in both runs, `a` in run A) got worse beyond the tolerance: the
    /// gate's own, else the metric's declared `within:` band, else none.
    fn worse(&self, row: &MetricRow, a: f64) -> Option<String> {
        let (b, d) = (row.b?, row.delta?);
        let band = self.tolerance.or(row.within).unwrap_or(Band { amount: 0.0, relative: false });
        let worse = row.better.and_then(|dir| dir.judge(a, b)) == Some(false);
        if !(worse && d.abs() > band.allowed(a)) {
            return None;
        }
        let pct = row.delta_pct.map(|p| format!(" ({p:+.2}%)")).unwrap_or_default();
        let whose =
            if self.tolerance.is_none() && row.within.is_some() { "its declared band" } else { "the tolerance" };
        Some(format!("{} regressed: {} → {}{pct}, beyond {whose} {band}", row.name, shown(a), shown(b)))
    }
}

/// How `stage` ended in run `b` when it did not finish there (failed, skipped, cancelled).
fn unfinished<'r>(b: &'r RunRecord, stage: &str) -> Option<&'r str> {
    let s = b.stages.iter().find(|s| s.name == stage)?;
    (!s.finished()).then_some(s.status.as_str())
}
