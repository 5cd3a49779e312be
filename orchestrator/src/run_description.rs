//! The run description a report renders from: which pipeline, when, on what host, and for every
//! stage its cache key and whether this run computed it or took it from the cache.
//!
//! Two producers share one shape: the scheduler, for a stage that asks for it
//! (`Stage::wants_run_description`, the `report` stage), and `orchestrate report`, which renders
//! from the cache without running anything (so every stage there is `cached`).

use serde_json::{json, Map, Value};

use crate::pipeline::Pipeline;
use crate::source::SourceRev;
use crate::store::{iso8601, now_unix, Manifest};

/// One stage's line. `cached`: this run reused a stored result instead of computing it;
/// `computed_at`/`duration_s`/`cpu_s` describe the run that did compute it.
pub fn stage_entry(stage: &str, m: &Manifest, cached: bool) -> Value {
    json!({
        "stage": stage,
        "key": m.key,
        "cached": cached,
        "computed_at": iso8601(m.started_at),
        "duration_s": m.duration_s,
        "cpu_s": m.cpu_s,
        "commit": m.provenance.as_ref().and_then(|p| p.commit.clone()),
        "dirty": m.provenance.as_ref().map(|p| p.dirty),
        "machine": m.provenance.as_ref().map(|p| p.machine()),
        "cpu": m.provenance.as_ref().and_then(|p| p.cpu.clone()),
        "simd_path": m.provenance.as_ref().and_then(|p| p.simd_path.clone()),
        "metrics": m.metrics,
    })
}

/// A stage with no stored result (only `orchestrate report` lists those).
pub fn missing_entry(stage: &str, key: Option<&str>) -> Value {
    json!({"stage": stage, "key": key, "cached": false, "missing": true})
}

/// The whole description. The stage lines are also given by name (`by_stage`) so a template can
/// mark a number by the stage it came from: `{% if run.by_stage["train"].cached %}…`.
pub fn describe(p: &Pipeline, stages: Vec<Value>, rendered_from: &str) -> Value {
    let by_stage: Map<String, Value> =
        stages.iter().filter_map(|s| Some((s.get("stage")?.as_str()?.to_string(), s.clone()))).collect();
    let source = SourceRev::of(&p.dir);
    json!({
        "pipeline": p.name,
        "pipeline_file": p.file.display().to_string(),
        "pipeline_digest": blake3::hash(p.source.as_bytes()).to_hex().to_string(),
        "git_commit": source.as_ref().map(|s| s.commit.clone()),
        "git_dirty": source.as_ref().map(|s| s.dirty),
        "date": iso8601(now_unix()),
        "host": stage_api::host::describe(),
        "stages": stages,
        "by_stage": by_stage,
        "rendered_from": rendered_from,
    })
}
