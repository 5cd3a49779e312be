//! `orchestrate compare A B`: two runs side by side — params, metrics (better or worse by the
//! pipeline's `metrics:`), which stages reran and why, which artifacts changed.

use std::path::PathBuf;

use serde_json::Value;

use super::{human_bytes, print_json, Env, Failure, PipelineArgs};
use crate::diag::Diagnostic;
use crate::history::{
    base_before, compare as compare_runs, name_moved, resolve, short, sweep, Comparison, Gate, Sweep,
};
use crate::source::SourceRev;
use crate::store::iso8601;

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// The base run: a name (`run --name`, `orchestrate name`), an id (4+ characters), `latest` or `latest~N`
    /// [default: the run of B's pipeline before B].
    a: Option<String>,
    /// The run compared with it.
    #[arg(default_value = "latest")]
    b: String,
    /// Count `latest` among this pipeline's runs only.
    #[arg(long, value_name = "FILE")]
    pipeline: Option<PathBuf>,
    /// Everything, not only what differs.
    #[arg(long)]
    all: bool,
    /// Markdown tables.
    #[arg(long, conflicts_with_all = ["json", "csv"])]
    md: bool,
    /// The comparison as JSON on stdout (for scripts).
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// One CSV table: section,name,a,b,delta,delta_pct,verdict.
    #[arg(long)]
    csv: bool,
    /// Exit 1 when METRIC got worse (by more than TOL: absolute, or relative with `%`), or run
    /// B lacks it; a `foreach` stage's STAGE.METRIC gates every variant in both runs.
    #[arg(long = "fail-on-regress", value_name = "METRIC[:TOL]")]
    gates: Vec<Gate>,
    /// Instead: every variant of this `foreach` stage in run B, best first.
    #[arg(long, value_name = "STAGE", conflicts_with = "gates")]
    sweep: Option<String>,
    /// With --sweep: rank by this metric, declared under `metrics:`, or any the variants record
    /// with its direction: `loss:min`, `accuracy:max` (default: the first declared for the stage).
    #[arg(long, value_name = "METRIC", requires = "sweep")]
    by: Option<String>,
    /// With --sweep: also draw the ranking metric per variant as a PNG bar chart.
    #[arg(long, value_name = "OUT.png", requires = "sweep")]
    plot: Option<PathBuf>,
}

pub(super) fn compare(env: &Env, a: Args) -> Result<i32, Failure> {
    let invalid = |msg: String| Failure::Invalid(Diagnostic::new("E-COMPARE", msg));
    let name = match &a.pipeline {
        Some(file) => Some(env.load(&PipelineArgs { pipeline: file.clone(), sets: vec![] })?.0.name),
        None => None,
    };
    let store = env.open_reader()?;
    let all = store.runs();
    let runs: Vec<_> = all.iter().filter(|(_, r)| name.as_ref().is_none_or(|n| *n == r.pipeline)).cloned().collect();
    if let Some(stage) = &a.sweep {
        let run = resolve(&runs, &a.b).map_err(invalid)?;
        let sw = sweep(&store.objects, run, stage, a.by.as_deref()).map_err(invalid)?;
        if let Some(png) = &a.plot {
            plot_sweep(&sw, png)?;
        }
        match (a.json, a.csv) {
            (true, _) => print_json(&sw)?,
            (_, true) => print!("{}", sweep_csv(&sw)),
            _ => print!("{}", sweep_text(&sw, a.md)),
        }
        return Ok(0);
    }
    let rb = resolve(&runs, &a.b).map_err(invalid)?;
    let ra = match &a.a {
        Some(spec) => resolve(&runs, spec).map_err(invalid)?,
        None => base_before(&runs, rb).map_err(invalid)?,
    };
    if ra.1.pipeline != rb.1.pipeline {
        eprintln!("note: A is a run of pipeline `{}`, B of `{}`", ra.1.pipeline, rb.1.pipeline);
    }
    let mut c = compare_runs(&store.objects, ra, rb, a.all).map_err(invalid)?;
    (c.a.name_moved, c.b.name_moved) = (name_moved(ra, &all), name_moved(rb, &all));
    // Gates see every metric, also one that did not change.
    let everything = match (a.gates.is_empty(), a.all) {
        (false, false) => Some(compare_runs(&store.objects, ra, rb, true).map_err(invalid)?),
        _ => None,
    };
    let (mut regressions, mut notes) = (Vec::new(), Vec::new());
    for g in &a.gates {
        let v = g.check(everything.as_ref().unwrap_or(&c), &rb.1).map_err(invalid)?;
        regressions.extend(v.regressions);
        notes.extend(v.notes);
    }
    if a.json {
        print_json(&c)?;
    } else if a.csv {
        print!("{}", csv(&c));
    } else {
        print!("{}", text(&c, a.md, a.all));
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    for r in &regressions {
        eprintln!("regression: {r}");
    }
    Ok(if regressions.is_empty() { 0 } else { 1 })
}

fn shown(v: &Option<Value>) -> String {
    match v {
        None => "—".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// A param's two values for a table row: as they are, unless one is long or spans lines (a
/// multi-line `cmd`); then both on one line, cut to where they first differ.
fn shown_pair(a: &Option<Value>, b: &Option<Value>) -> (String, String) {
    let long = |v: &Option<Value>| matches!(v, Some(Value::String(s)) if s.contains('\n') || s.chars().count() > 60);
    if !long(a) && !long(b) {
        return (shown(a), shown(b));
    }
    match (a, b) {
        (Some(x), Some(y)) => crate::cache_key::change(x, y),
        _ => (
            a.as_ref().map_or("—".into(), crate::cache_key::brief),
            b.as_ref().map_or("—".into(), crate::cache_key::brief),
        ),
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or("—".into(), crate::history::shown)
}

fn artifact(v: &Option<(String, u64)>) -> String {
    v.as_ref().map_or("—".into(), |(d, s)| format!("{} ({})", &d[..d.len().min(12)], human_bytes(*s)))
}

/// A table as aligned text or markdown.
fn table(head: &[&str], rows: &[Vec<String>], md: bool) -> String {
    if rows.is_empty() {
        return "  (none)\n".into();
    }
    let mut w: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = w[i])).collect();
        if md {
            format!("| {} |\n", padded.join(" | "))
        } else {
            format!("  {}\n", padded.join("  ").trim_end())
        }
    };
    let mut out = line(head.iter().map(|h| h.to_string()).collect());
    if md {
        out.push_str(&format!("|{}|\n", w.iter().map(|n| "-".repeat(n + 2)).collect::<Vec<_>>().join("|")));
    }
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// A run in the header: `abc123 `base` (when, ok, by …, source …, orchestrate …, --set …)`;
/// `by` only when `show_by` (the two runs were made by different people or machines).
fn side_text(s: &crate::history::Side, show_by: bool) -> String {
    let build = match &s.commit {
        Some(c) => SourceRev { commit: c.clone(), dirty: s.commit_dirty }.described(),
        None => "?".into(),
    };
    format!(
        "{}{} ({}, {}, {}{}orchestrate {build}{}{})",
        short(&s.id),
        s.name
            .as_ref()
            .map(|n| format!(" `{n}`{}", if s.name_moved { " (the name moved on)" } else { "" }))
            .unwrap_or_default(),
        iso8601(s.started_at),
        s.status,
        s.by.as_ref().filter(|_| show_by).map(|b| format!("by {b}, ")).unwrap_or_default(),
        s.source.as_ref().map(|r| format!("source {}, ", r.described())).unwrap_or_default(),
        if s.sets.is_empty() { String::new() } else { format!(", --set {}", s.sets.join(" ")) },
        s.targets.iter().map(|t| format!(", --target {t}")).collect::<String>()
    )
}

fn text(c: &Comparison, md: bool, all: bool) -> String {
    let h = |t: &str| if md { format!("\n### {t}\n\n") } else { format!("\n{t}\n") };
    let show_by = c.a.by != c.b.by;
    let mut out = format!("A: {}\nB: {}\n", side_text(&c.a, show_by), side_text(&c.b, show_by));
    out += &h("params");
    let rows: Vec<_> = (c.params.iter())
        .map(|p| {
            let (a, b) = shown_pair(&p.a, &p.b);
            vec![p.name.clone(), a, b]
        })
        .collect();
    out += &table(&["param", "A", "B"], &rows, md);
    out += &h("metrics");
    let rows: Vec<_> = (c.metrics.iter())
        .map(|m| {
            let pct = m.delta_pct.map_or("—".into(), |p| format!("{p:+.2}%"));
            let verdict = match (m.verdict.as_deref(), m.within) {
                (Some("noise"), Some(w)) => format!("noise (within {w})"),
                (Some(v), _) => v.to_string(),
                (None, _) => "—".into(),
            };
            vec![m.name.clone(), num(m.a), num(m.b), num(m.delta), pct, verdict]
        })
        .collect();
    if rows.is_empty() && !all {
        // Without --all only the pipeline's declared metrics show, and only when they differ.
        out += "  (no declared metric differs; --all lists every metric the stages recorded)\n";
    } else {
        out += &table(&["metric", "A", "B", "Δ", "Δ%", "B is"], &rows, md);
    }
    out += &h("stages");
    let rows: Vec<_> = c.stages.iter().map(|s| vec![s.stage.clone(), s.change.clone(), s.reasons.join("; ")]).collect();
    out += &table(&["stage", "in B", "why"], &rows, md);
    out += &h("artifacts");
    let rows: Vec<_> = c.artifacts.iter().map(|r| vec![r.name.clone(), artifact(&r.a), artifact(&r.b)]).collect();
    out += &table(&["output", "A", "B"], &rows, md);
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv(c: &Comparison) -> String {
    let mut out = String::from("section,name,a,b,delta,delta_pct,verdict\n");
    let mut row = |cells: [String; 7]| {
        out.push_str(&cells.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(","));
        out.push('\n');
    };
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    let val =
        |v: &Option<Value>| v.as_ref().map(|v| v.as_str().map_or(v.to_string(), str::to_string)).unwrap_or_default();
    for p in &c.params {
        row(["param".into(), p.name.clone(), val(&p.a), val(&p.b), String::new(), String::new(), String::new()]);
    }
    for m in &c.metrics {
        let verdict = m.verdict.clone().unwrap_or_default();
        row(["metric".into(), m.name.clone(), opt(m.a), opt(m.b), opt(m.delta), opt(m.delta_pct), verdict]);
    }
    for s in &c.stages {
        row([
            "stage".into(),
            s.stage.clone(),
            String::new(),
            s.change.clone(),
            String::new(),
            String::new(),
            s.reasons.join("; "),
        ]);
    }
    let art = |v: &Option<(String, u64)>| v.as_ref().map(|(d, s)| format!("{d}:{s}")).unwrap_or_default();
    for r in &c.artifacts {
        row(["artifact".into(), r.name.clone(), art(&r.a), art(&r.b), String::new(), String::new(), String::new()]);
    }
    out
}

fn sweep_cells(sw: &Sweep) -> (Vec<String>, Vec<Vec<String>>) {
    let mut head = vec!["variant".to_string()];
    head.extend(sw.params.iter().cloned());
    head.extend(sw.metrics.iter().cloned());
    let rows = (sw.rows.iter())
        .map(|r| {
            let mut cells = vec![r.variant.clone()];
            cells.extend(sw.params.iter().map(|p| shown(&r.params.get(p).cloned())));
            cells.extend(sw.metrics.iter().map(|m| num(r.metrics.get(m).copied().flatten())));
            cells
        })
        .collect();
    (head, rows)
}

fn sweep_text(sw: &Sweep, md: bool) -> String {
    let (head, rows) = sweep_cells(sw);
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    let better = match sw.better {
        crate::pipeline::metrics::Better::Min => "lower",
        crate::pipeline::metrics::Better::Max => "higher",
    };
    format!(
        "sweep of `{}` in run {}, best first by {} ({better} is better):\n{}",
        sw.stage,
        short(&sw.run),
        sw.by,
        table(&head, &rows, md)
    )
}

fn sweep_csv(sw: &Sweep) -> String {
    let (head, rows) = sweep_cells(sw);
    let mut out = head.iter().map(|h| csv_field(h)).collect::<Vec<_>>().join(",") + "\n";
    for r in rows {
        out += &(r.iter().map(|c| csv_field(c)).collect::<Vec<_>>().join(",") + "\n");
    }
    out
}

fn plot_sweep(sw: &Sweep, png: &std::path::Path) -> Result<(), Failure> {
    let labels: Vec<String> = sw.rows.iter().map(|r| r.variant.clone()).collect();
    let values: Vec<f64> =
        sw.rows.iter().map(|r| r.metrics.get(&sw.by).copied().flatten().unwrap_or(f64::NAN)).collect();
    let title = format!("{} by {}", sw.stage, sw.by);
    crate::registry::report_templates::bars(png, &title, &labels, &values, &sw.by, "variant")
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", png.display()))?;
    eprintln!("plot: {}", png.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::history::Side;
    use crate::source::SourceRev;

    #[test]
    fn the_header_says_which_code_ran_and_whether_it_was_committed() {
        let side = |dirty: bool| Side {
            id: "0123456789abcdef".into(),
            name: Some("base".into()),
            name_moved: false,
            pipeline: "p".into(),
            started_at: 0.0,
            source: Some(SourceRev { commit: "aaaaaaaaaaaaaaaa".into(), dirty: false }),
            commit: Some("bbbbbbbbbbbbbbbb".into()),
            commit_dirty: dirty,
            sets: vec!["n=5".into()],
            targets: vec![],
            status: "ok".into(),
            by: Some("ana@ws1".into()),
        };
        assert_eq!(
            super::side_text(&side(true), false),
            "0123456789ab `base` (1970-01-01T00:00:00Z, ok, source aaaaaaaaaaaa, \
             orchestrate bbbbbbbbbbbb with uncommitted changes, --set n=5)"
        );
        assert!(super::side_text(&side(false), false).contains("orchestrate bbbbbbbbbbbb, --set"));
        assert!(super::side_text(&side(false), true).contains(", ok, by ana@ws1, source aaaaaaaaaaaa"));
    }
}
