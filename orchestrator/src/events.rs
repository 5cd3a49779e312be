//! What a run tells the outside while it goes and when it ends. The scheduler emits into a
//! [`RunEvents`]; `progress` implements it for the terminal. Keeping the vocabulary here lets
//! the two meet without importing each other.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::objects::Entry;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Cached,
    /// Not in the local store but in the remote cache (`run --remote`): downloaded, not run.
    Pulled,
    Ran,
    Failed,
    /// Not run because something it needs failed (or the run stopped first).
    Skipped,
    Cancelled,
}

impl Status {
    /// The word `run --json`, run records and the live file use (the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Cached => "cached",
            Status::Pulled => "pulled",
            Status::Ran => "ran",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::Cancelled => "cancelled",
        }
    }
}

/// How one stage ended in a run.
#[derive(Clone, Debug, Serialize)]
pub struct StageOutcome {
    pub stage: String,
    pub status: Status,
    pub key: Option<String>,
    pub manifest: Option<String>,
    pub duration_s: f64,
    pub error: Option<String>,
    /// The last lines of a failed stage's log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_tail: Option<String>,
    #[serde(skip)]
    pub outputs: BTreeMap<String, Entry>,
}

impl StageOutcome {
    pub fn new(stage: &str, status: Status) -> Self {
        StageOutcome {
            stage: stage.into(),
            status,
            key: None,
            manifest: None,
            duration_s: 0.0,
            error: None,
            log_tail: None,
            outputs: BTreeMap::new(),
        }
    }
    pub fn key(mut self, key: Option<String>) -> Self {
        self.key = key;
        self
    }
    pub fn manifest(mut self, manifest: Option<String>) -> Self {
        self.manifest = manifest;
        self
    }
    pub fn duration(mut self, secs: f64) -> Self {
        self.duration_s = secs;
        self
    }
    pub fn error(mut self, error: Option<String>) -> Self {
        self.error = error;
        self
    }
    pub fn log_tail(mut self, tail: &str) -> Self {
        self.log_tail = (!tail.is_empty()).then(|| tail.to_string());
        self
    }
    pub fn outputs(mut self, outputs: BTreeMap<String, Entry>) -> Self {
        self.outputs = outputs;
        self
    }
}

/// A final output copied where a person can open it (see `deliver`).
#[derive(Clone, Debug, Serialize)]
pub struct DeliveredOutput {
    pub stage: String,
    pub output: String,
    /// The copy: under the store's `outputs/`, or the pipeline's `publish:` destination.
    pub path: String,
    /// Whether the pipeline's `publish:` put it there.
    pub published: bool,
}

/// The result of `run`, printed as JSON by `run --json`.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    /// The run record's id (`orchestrate runs`, `compare`), once recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    pub pipeline: String,
    pub status: String,
    pub wall_s: f64,
    pub cores: u32,
    pub stages: Vec<StageOutcome>,
    /// The final outputs, once delivered after a successful run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<DeliveredOutput>,
}

impl RunSummary {
    pub fn exit_code(&self) -> i32 {
        match self.status.as_str() {
            "ok" => 0,
            "cancelled" => 130,
            _ => 1,
        }
    }

    pub fn count(&self, status: Status) -> usize {
        self.stages.iter().filter(|r| r.status == status).count()
    }
}

/// Receives a run's events in the order they happen.
pub trait RunEvents {
    /// The run starts with `total` stages to settle.
    fn begin(&mut self, total: usize);
    fn cached(&mut self, stage: &str);
    /// Downloaded from the remote cache instead of running: `bytes` moved.
    fn pulled(&mut self, stage: &str, bytes: u64);
    fn started(&mut self, stage: &str, threads: u32);
    /// A running stage's latest progress message (e.g. step, loss, tokens/s).
    fn progress(&mut self, stage: &str, message: &str);
    fn done(&mut self, stage: &str, secs: f64);
    fn failed(&mut self, stage: &str, message: &str, log_tail: &str);
    fn skipped(&mut self, stage: &str, why: &str);
    fn cancelled(&mut self, stage: &str);
    /// Something about the run as a whole (e.g. an interrupt).
    fn note(&mut self, text: &str);
    /// Something the user must see even when only the summary is printed (`--json`).
    fn warning(&mut self, text: &str);
    fn finish(&mut self, summary: &RunSummary);
}

#[cfg(test)]
mod tests {
    use super::Status;

    #[test]
    fn status_words_are_the_serde_names() {
        for s in [Status::Cached, Status::Pulled, Status::Ran, Status::Failed, Status::Skipped, Status::Cancelled] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
