//! `orchestrate show`: a stage's stored result — outputs, metrics, duration, peak memory.

use super::{human_bytes, print_json, stage_index, Env, Failure, PipelineArgs};
use crate::dag::Dag;
use crate::objects::ObjKind;
use crate::pipeline::Pipeline;
use crate::store::{iso8601, Manifest, Store};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    pub(super) p: PipelineArgs,
    /// The stage (with `foreach`: STAGE@VARIANT).
    stage: String,
    /// Print the result as JSON on stdout (for scripts; metrics at full precision, where the
    /// text rounds fractions to 7 significant digits).
    #[arg(long, conflicts_with = "log")]
    json: bool,
    /// Print the stage's log (its stdout and stderr) instead; when the pipeline as it is has no
    /// result because the newest run that took the stage failed it, the end of that try's log.
    #[arg(long)]
    log: bool,
    /// Show the result a past run of the pipeline recorded (`latest~N`, a name such as
    /// `baseline`, or 4+ characters of an id), not the pipeline's as it is now.
    #[arg(long, value_name = "RUN")]
    run: Option<String>,
}

/// `show --run`: the stage's result as a past run recorded it.
fn show_of_run(store: &Store, p: &Pipeline, dag: &Dag, spec: &str, a: &Args) -> Result<i32, Failure> {
    let results = super::export::Results::of_run(store, p, spec)?;
    let stage = &a.stage;
    let (digest, m) = results.result(store, stage)?;
    if a.log {
        return print_log(store, stage, Some(&m), None);
    }
    let now = crate::plan::current_manifest(p, dag, store, stage).map(|(d, _)| d);
    let current = now.as_deref() == Some(digest.as_str());
    let run = results.run.unwrap_or_default();
    if a.json {
        let mut j = as_json(store, stage, &digest, &m, current);
        j["run"] = serde_json::json!(run);
        print_json(&j)?;
    } else {
        let also = if current { "; the pipeline as it is now has the same" } else { "" };
        print_text(store, stage, &m, Some(format!("the result run {run} recorded{also}")), None);
    }
    Ok(0)
}

pub(super) fn show(env: &Env, a: Args) -> Result<i32, Failure> {
    let (p, dag) = env.load(&a.p)?;
    if let Some(spec) = &a.run {
        // The run's stages, not the pipeline's as it is now, say which exist.
        return show_of_run(&env.open_reader()?, &p, &dag, spec, &a);
    }
    stage_index(&p, &a.stage)?;
    let store = env.open_reader()?;
    let stage = &a.stage;
    let current_result = crate::plan::current_manifest(&p, &dag, &store, stage);
    // Why the pipeline as it is has no result: the newest run that took the stage failed it.
    let attempt = if current_result.is_some() { None } else { last_unfinished(&store, &p.name, stage) };
    let stored = match current_result {
        Some((d, m)) => Some((d, m, true)),
        None => store.last_manifest(&p.name, stage).map(|m| ("(last run)".to_string(), m, false)),
    };
    if a.log && (stored.is_some() || attempt.is_some()) {
        return print_log(&store, stage, stored.as_ref().map(|s| &s.1), attempt.as_ref());
    }
    let (digest, m, current) = match stored {
        Some(s) => s,
        None => {
            let never = format!("stage `{stage}` has no stored result in this store ({})", env.root.display());
            match &attempt {
                Some(t) if a.json => print_json(&serde_json::json!({"stage": stage, "last_attempt": t}))?,
                Some(t) => {
                    println!("stage      {stage}");
                    print_attempt(t);
                    println!("note       {never}");
                }
                None => {
                    let how = format!("`orchestrate run {} --target {stage}` computes it", a.p.pipeline.display());
                    let why = "it has not run here, or `orchestrate gc` removed its results";
                    return Err(Failure::Other(anyhow::anyhow!("{never}: {why}; {how}"), 1));
                }
            }
            return Ok(1);
        }
    };
    if a.json {
        let mut j = as_json(&store, stage, &digest, &m, current);
        j["last_attempt"] = serde_json::to_value(&attempt).unwrap_or_default();
        print_json(&j)?;
    } else {
        let note = "not cached for the pipeline as it is now; showing its last stored result";
        print_text(&store, stage, &m, (!current).then(|| note.to_string()), attempt.as_ref());
    }
    Ok(0)
}

/// A run that took a stage and did not finish it.
#[derive(serde::Serialize)]
struct Attempt {
    run: String,
    at: String,
    status: String,
    error: Option<String>,
    log_tail: Option<String>,
}

/// The newest run of `pipeline` that took `stage`, when it did not finish it there (failed,
/// skipped, cancelled); none when that run finished it.
fn last_unfinished(store: &Store, pipeline: &str, stage: &str) -> Option<Attempt> {
    let (id, run, s) = (store.runs().into_iter())
        .filter(|(_, r)| r.pipeline == pipeline)
        .find_map(|(id, r)| r.stages.iter().find(|s| s.name == stage).cloned().map(|s| (id, r, s)))?;
    if s.finished() {
        return None;
    }
    Some(Attempt {
        run: crate::history::short(&id).to_string(),
        at: iso8601(run.started_at),
        status: s.status,
        error: s.error,
        log_tail: s.log_tail,
    })
}

/// `show --log`: the end of the log of the newest run's failed try when there is one, else the
/// stored result's whole log.
fn print_log(store: &Store, stage: &str, m: Option<&Manifest>, attempt: Option<&Attempt>) -> Result<i32, Failure> {
    use std::io::Write;
    if let Some((t, tail)) = attempt.and_then(|t| Some((t, t.log_tail.as_ref()?))) {
        eprintln!("the last try of `{stage}` ({} in run {}, {}) kept the end of its log:", t.status, t.run, t.at);
        println!("{}", tail.trim_end());
        return Ok(0);
    }
    let Some(log) = m.and_then(|m| m.log.as_ref()) else {
        eprintln!("`{stage}` wrote nothing to stdout or stderr");
        return Ok(0);
    };
    let bytes = store.objects.read_verified(log, "log").map_err(|e| Failure::Other(anyhow::anyhow!(e), 1))?;
    std::io::stdout().write_all(&bytes).map_err(|e| Failure::Other(anyhow::anyhow!("writing the log: {e}"), 1))?;
    Ok(0)
}

fn print_attempt(t: &Attempt) {
    let why = t.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
    println!("last try   {} in run {} ({}){why}", t.status, t.run, t.at);
    for line in t.log_tail.iter().flat_map(|l| l.lines()) {
        println!("  | {line}");
    }
}

fn as_json(store: &Store, stage: &str, digest: &str, m: &Manifest, current: bool) -> serde_json::Value {
    let outputs: serde_json::Map<String, serde_json::Value> = m
        .outputs
        .iter()
        .map(|(k, e)| {
            let path = store.objects.path(&e.digest);
            (k.clone(), serde_json::json!({"digest": e.digest, "type": e.kind, "size": e.size, "path": path}))
        })
        .collect();
    serde_json::json!({
        "stage": stage, "current": current, "manifest": digest, "key": m.key,
        "outputs": outputs, "metrics": m.metrics, "duration_s": m.duration_s, "cpu_s": m.cpu_s,
        "peak_rss_bytes": m.peak_rss_bytes, "threads": m.threads, "started_at": iso8601(m.started_at),
        "deterministic": m.deterministic, "params": m.key_input.params, "inputs": m.key_input.inputs,
        "selected": m.key_input.selected,
        "log": m.log.as_ref().map(|l| store.objects.path(l)),
        "implementation": m.key_input.implementation, "provenance": m.provenance,
    })
}

fn print_text(store: &Store, stage: &str, m: &Manifest, note: Option<String>, attempt: Option<&Attempt>) {
    println!("stage      {stage} ({})", m.key_input.kind);
    if let Some(t) = attempt {
        print_attempt(t);
    }
    if let Some(note) = note {
        println!("note       {note}");
    }
    println!("key        {}", m.key);
    println!(
        "ran        {} for {:.3}s, {:.3} CPU-s, peak memory {}",
        iso8601(m.started_at),
        m.duration_s,
        m.cpu_s,
        human_bytes(m.peak_rss_bytes)
    );
    match &m.provenance {
        Some(p) => {
            println!("built by   {}", p.build());
            println!("host       {}", p.machine());
            if let Some(ran_on) = &p.ran_on {
                println!("ran on     {ran_on}");
            }
            if let Some(simd) = &p.simd_path {
                println!("kernels    {simd}");
            }
        }
        None => println!("built by   (not recorded: computed by an orchestrate older than provenance records)"),
    }
    let parts: Vec<String> =
        m.key_input.implementation.iter().map(|(k, v)| format!("{k} {}", &v[..v.len().min(12)])).collect();
    if !parts.is_empty() {
        println!("code       {}", parts.join(", "));
    }
    for (input, winner) in &m.key_input.selected {
        println!("best_of    input `{input}` took `{winner}`, the best variant");
    }
    println!("outputs");
    let w = column(m.outputs.keys());
    for (k, e) in &m.outputs {
        let kind = if e.kind == ObjKind::Tree { "dir " } else { "file" };
        let path = store.objects.path(&e.digest);
        println!("  {k:<w$} {kind} {:>10}  {}  {}", human_bytes(e.size), e.digest, path.display());
    }
    if let Some(log) = &m.log {
        println!("log        {}", store.objects.path(log).display());
    }
    if !m.metrics.is_empty() {
        println!("metrics");
        let w = column(m.metrics.keys());
        for (k, v) in &m.metrics {
            println!("  {k:<w$} {}", crate::history::shown_value(v));
        }
    }
}

/// The width of a column of names: the longest, at least 16, so the values line up.
fn column<'a>(names: impl Iterator<Item = &'a String>) -> usize {
    names.map(|n| n.chars().count()).max().unwrap_or(0).max(16)
}
