//! The run in progress as a file in the store folder, `live.json`, rewritten (atomically) as
//! stages start, report progress and end. `orchestrate ui` reads it to show a run as it goes:
//! it cannot open the store's index while the run holds it, and must not take the store's lock.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::dag::Dag;
use crate::events::{RunEvents, RunSummary};
use crate::pipeline::Pipeline;
use crate::store::now_unix;

pub const LIVE_FILE: &str = "live.json";

/// Progress messages alone rewrite the file at most this often; status changes always do.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveRun {
    pub pid: u32,
    pub pipeline: String,
    pub pipeline_file: String,
    #[serde(default)]
    pub sets: Vec<String>,
    pub started_at: f64,
    pub updated_at: f64,
    /// `running` until the run ends; then `ok`, `failed` or `cancelled`.
    pub status: String,
    /// The run record's id once the run is recorded.
    #[serde(default)]
    pub run: Option<String>,
    pub stages: Vec<LiveStage>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LiveStage {
    pub name: String,
    /// `waiting`, `running`, then how it ended (`ran`, `cached`, `pulled`, `failed`, `skipped`,
    /// `cancelled`); `not run` for a stage outside `--target`.
    pub status: String,
    pub needs: Vec<String>,
    /// The stage's latest progress line, or why it failed or was skipped.
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub started_at: Option<f64>,
    #[serde(default)]
    pub duration_s: Option<f64>,
}

/// The [`RunEvents`] that keeps `live.json` up to date.
pub struct LiveFile {
    path: PathBuf,
    run: LiveRun,
    last_write: Option<Instant>,
}

impl LiveFile {
    pub fn new(store_root: &Path, p: &Pipeline, dag: &Dag) -> LiveFile {
        let stages = (dag.order.iter())
            .map(|&i| LiveStage {
                name: p.stages[i].name.clone(),
                status: "waiting".into(),
                needs: dag.upstream(i).into_iter().map(|j| p.stages[j].name.clone()).collect(),
                message: None,
                started_at: None,
                duration_s: None,
            })
            .collect();
        let now = now_unix();
        let run = LiveRun {
            pid: std::process::id(),
            pipeline: p.name.clone(),
            pipeline_file: p.file.display().to_string(),
            sets: p.sets.clone(),
            started_at: now,
            updated_at: now,
            status: "running".into(),
            run: None,
            stages,
        };
        LiveFile { path: store_root.join(LIVE_FILE), run, last_write: None }
    }

    fn stage(&mut self, name: &str) -> Option<&mut LiveStage> {
        self.run.stages.iter_mut().find(|s| s.name == name)
    }

    fn set(&mut self, name: &str, status: &str, message: Option<&str>) {
        if let Some(s) = self.stage(name) {
            s.status = status.into();
            s.message = message.map(str::to_string);
        }
        self.write();
    }

    /// Replace the file in one rename, so a reader never sees half of it. A failure to write
    /// only costs the live view; the run goes on.
    fn write(&mut self) {
        self.run.updated_at = now_unix();
        self.last_write = Some(Instant::now());
        let tmp = self.path.with_extension(format!("json.{}", std::process::id()));
        let ok = serde_json::to_vec(&self.run)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = ok {
            tracing::debug!("could not update {}: {e}", self.path.display());
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

impl RunEvents for LiveFile {
    fn begin(&mut self, _total: usize) {
        self.write();
    }
    fn cached(&mut self, stage: &str) {
        self.set(stage, "cached", None);
    }
    fn pulled(&mut self, stage: &str, _bytes: u64) {
        self.set(stage, "pulled", None);
    }
    fn started(&mut self, stage: &str, _threads: u32) {
        if let Some(s) = self.stage(stage) {
            s.started_at = Some(now_unix());
        }
        self.set(stage, "running", None);
    }
    fn progress(&mut self, stage: &str, message: &str) {
        if let Some(s) = self.stage(stage) {
            s.message = Some(message.to_string());
        }
        if self.last_write.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
            self.write();
        }
    }
    fn done(&mut self, stage: &str, secs: f64) {
        if let Some(s) = self.stage(stage) {
            s.duration_s = Some(secs);
        }
        self.set(stage, "ran", None);
    }
    fn failed(&mut self, stage: &str, message: &str, _log_tail: &str) {
        self.set(stage, "failed", Some(message));
    }
    fn skipped(&mut self, stage: &str, why: &str) {
        self.set(stage, "skipped", Some(why));
    }
    fn cancelled(&mut self, stage: &str) {
        self.set(stage, "cancelled", None);
    }
    fn note(&mut self, _text: &str) {}
    fn warning(&mut self, _text: &str) {}
    fn finish(&mut self, summary: &RunSummary) {
        for s in &mut self.run.stages {
            match summary.stages.iter().find(|o| o.stage == s.name) {
                Some(o) => {
                    s.status = o.status.as_str().to_string();
                    s.duration_s = s.duration_s.or(Some(o.duration_s));
                }
                None if s.status == "waiting" => s.status = "not run".into(),
                None => {}
            }
        }
        self.run.status = summary.status.clone();
        self.run.run = summary.run.clone();
        self.write();
    }
}

/// The run `live.json` describes, if there is one and it parses.
pub fn read(store_root: &Path) -> Option<LiveRun> {
    let bytes = std::fs::read(store_root.join(LIVE_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Whether the process that wrote a live file still exists (a killed run leaves it behind).
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    pid != 0 && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// Every event to both receivers, in order: the terminal and the live file.
pub struct Both<'a>(pub &'a mut dyn RunEvents, pub &'a mut dyn RunEvents);

impl RunEvents for Both<'_> {
    fn begin(&mut self, total: usize) {
        self.0.begin(total);
        self.1.begin(total);
    }
    fn cached(&mut self, stage: &str) {
        self.0.cached(stage);
        self.1.cached(stage);
    }
    fn pulled(&mut self, stage: &str, bytes: u64) {
        self.0.pulled(stage, bytes);
        self.1.pulled(stage, bytes);
    }
    fn started(&mut self, stage: &str, threads: u32) {
        self.0.started(stage, threads);
        self.1.started(stage, threads);
    }
    fn progress(&mut self, stage: &str, message: &str) {
        self.0.progress(stage, message);
        self.1.progress(stage, message);
    }
    fn done(&mut self, stage: &str, secs: f64) {
        self.0.done(stage, secs);
        self.1.done(stage, secs);
    }
    fn failed(&mut self, stage: &str, message: &str, log_tail: &str) {
        self.0.failed(stage, message, log_tail);
        self.1.failed(stage, message, log_tail);
    }
    fn skipped(&mut self, stage: &str, why: &str) {
        self.0.skipped(stage, why);
        self.1.skipped(stage, why);
    }
    fn cancelled(&mut self, stage: &str) {
        self.0.cancelled(stage);
        self.1.cancelled(stage);
    }
    fn note(&mut self, text: &str) {
        self.0.note(text);
        self.1.note(text);
    }
    fn warning(&mut self, text: &str) {
        self.0.warning(text);
        self.1.warning(text);
    }
    fn finish(&mut self, summary: &RunSummary) {
        self.0.finish(summary);
        self.1.finish(summary);
    }
}
