//! The contract between the orchestrator and a stage.
//!
//! A stage crate implements [`Stage`] and nothing else of the orchestrator: it is validated once
//! before anything runs ([`Stage::check`]) and then run in a child process with a
//! [`StageContext`] that gives it typed params, read-only input paths, an output folder, a
//! metrics sink, a cancellation flag, its thread budget and its seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub mod host;

/// A stage's configuration as resolved from the pipeline file: every `${...}` interpolation of
/// pipeline params and `foreach` items already applied.
///
/// `fields` holds the kind-specific top-level keys the stage declared in [`Stage::fields`]
/// (for `command`: `cmd`, `env`); `params` holds the free-form `params:` map.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub fields: BTreeMap<String, Value>,
    pub params: BTreeMap<String, Value>,
}

impl Params {
    /// Params with only a `params:` map, from a JSON object (anything else gives none); handy
    /// for driving a stage without a pipeline file, as tests do.
    pub fn from_json(params: Value) -> Params {
        let params = match params {
            Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        Params { fields: BTreeMap::new(), params }
    }
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }
    pub fn param(&self, name: &str) -> Option<&Value> {
        self.params.get(name)
    }
}

/// What a stage is given as inputs and asked for as outputs, by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// What [`Stage::check`] promises about a stage instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageProfile {
    /// Threads the stage wants when the pipeline file does not say.
    pub default_threads: u32,
    /// Whether the same inputs and params give the same output bytes. `replay` holds a stage
    /// that declares this to it; the pipeline file may override it.
    pub deterministic: bool,
    /// Outputs the stage always writes, in addition to those the pipeline file lists.
    pub required_outputs: Vec<String>,
    /// Outputs whose bytes legitimately vary between identical runs (they record timings);
    /// `replay` reports them but holds only the other outputs to bit-identity.
    #[serde(default)]
    pub volatile_outputs: Vec<String>,
}

impl Default for StageProfile {
    fn default() -> Self {
        StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: Vec::new(),
            volatile_outputs: Vec::new(),
        }
    }
}

/// A problem with a stage's configuration, found before anything runs.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ParamError {
    /// Dotted path of the offending key inside the stage, e.g. `cmd`, `params.lr`, `inputs.text`,
    /// so the orchestrator can point at its line and column in the pipeline file.
    pub key: String,
    pub message: String,
    pub help: Option<String>,
}

impl ParamError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ParamError { key: key.into(), message: message.into(), help: None }
    }
    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Why a stage's run failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{0}")]
    Failed(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("invalid params: {0}")]
    Params(#[from] ParamError),
    /// A library the stage called failed; `context` says what the stage was doing (which
    /// file, which model), `source` keeps the library's own error.
    #[error("{context}: {source}")]
    Library {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StageError {
    pub fn failed(msg: impl Into<String>) -> Self {
        StageError::Failed(msg.into())
    }
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StageError::Io { context: context.into(), source }
    }
}

/// Attach what the stage was doing to a library's error, for `?` inside stages:
/// `Model::load(dir).context(|| format!("loading the teacher from {}", dir.display()))?`.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StageError>;
}

/// Any error that boxes into `Box<dyn Error + Send + Sync>`: concrete error types and the
/// already-boxed errors some libraries return (tokenizers).
impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> Context<T> for Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T, StageError> {
        self.map_err(|e| StageError::Library { context: what(), source: e.into() })
    }
}

/// Write a JSON value pretty-printed with a final newline (the stages' `*.json` outputs).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(value).context(|| format!("encoding {}", path.display()))?;
    std::fs::write(path, text + "\n").map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

/// Attach a context message to an I/O result, for `?` inside stages.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, StageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, StageError> {
        self.map_err(|source| StageError::Io { context: context(), source })
    }
}

/// Everything the executor hands a stage for one run. Serialisable because the stage runs in
/// a child process (`orchestrate exec-stage`) that rebuilds the context from this.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSpec {
    /// Instance name in the pipeline, e.g. `train` or `vocab@512`.
    pub stage_name: String,
    pub kind: String,
    pub params: Params,
    /// Input name → a path the stage may read (never write).
    pub inputs: BTreeMap<String, PathBuf>,
    /// Output name → the path the stage must create (a file or a directory).
    pub outputs: BTreeMap<String, PathBuf>,
    /// Scratch working directory; the stage's current directory for external programs.
    pub work_dir: PathBuf,
    pub threads: u32,
    pub seed: u64,
    /// For stages that ask for it ([`Stage::wants_run_description`]): a JSON file describing the
    /// run that executes the stage — pipeline, date, host, and for every upstream stage its
    /// cache key and whether this run computed it or took it from the cache. Not part of the
    /// cache key (a fully cached rerun must not re-render); recorded with the result instead,
    /// so `replay` hands the stage the same file.
    #[serde(default)]
    pub run_description: Option<PathBuf>,
}

impl RunSpec {
    /// A run of stage `stage_name` of `kind` in `work_dir`, on 1 thread with seed 0 and no run
    /// description: how a stage's own tests and tools run it (set the rest with `..`).
    pub fn new(
        stage_name: impl Into<String>,
        kind: impl Into<String>,
        params: Params,
        inputs: BTreeMap<String, PathBuf>,
        outputs: BTreeMap<String, PathBuf>,
        work_dir: impl Into<PathBuf>,
    ) -> RunSpec {
        RunSpec {
            stage_name: stage_name.into(),
            kind: kind.into(),
            params,
            inputs,
            outputs,
            work_dir: work_dir.into(),
            threads: 1,
            seed: 0,
            run_description: None,
        }
    }
}

/// A UTF-8 text input, with the path in the error.
pub fn read_text(path: &Path) -> Result<String, StageError> {
    std::fs::read_to_string(path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))
}

/// The live view of a [`RunSpec`] a stage runs against.
pub struct StageContext {
    spec: RunSpec,
    metrics: BTreeMap<String, Value>,
    cancel: Arc<AtomicBool>,
    progress: Box<dyn FnMut(&str) + Send>,
}

impl StageContext {
    pub fn new(spec: RunSpec, cancel: Arc<AtomicBool>) -> Self {
        StageContext { spec, metrics: BTreeMap::new(), cancel, progress: Box::new(|_| {}) }
    }

    /// A context no one cancels: for running a stage outside the executor (tests, tools).
    pub fn uncancelled(spec: RunSpec) -> Self {
        Self::new(spec, Arc::new(AtomicBool::new(false)))
    }

    /// Route progress messages somewhere (the executor prints them for the scheduler).
    pub fn on_progress(&mut self, f: impl FnMut(&str) + Send + 'static) {
        self.progress = Box::new(f);
    }

    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }
    pub fn stage_name(&self) -> &str {
        &self.spec.stage_name
    }
    pub fn params(&self) -> &Params {
        &self.spec.params
    }
    pub fn threads(&self) -> u32 {
        self.spec.threads
    }
    pub fn seed(&self) -> u64 {
        self.spec.seed
    }
    pub fn work_dir(&self) -> &Path {
        &self.spec.work_dir
    }
    /// The run-metadata file, when the stage asked for one and the executor provides it.
    pub fn run_description(&self) -> Option<&Path> {
        self.spec.run_description.as_deref()
    }

    /// Path of a declared input. Errors (rather than panics) on a name the stage did not declare.
    pub fn input(&self, name: &str) -> Result<&Path, StageError> {
        self.spec
            .inputs
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| StageError::failed(format!("no input named `{name}` was wired to this stage")))
    }

    /// Path where a declared output must be written.
    pub fn output(&self, name: &str) -> Result<&Path, StageError> {
        self.spec
            .outputs
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| StageError::failed(format!("no output named `{name}` is declared for this stage")))
    }

    pub fn metric(&mut self, name: impl Into<String>, value: impl Into<Value>) {
        self.metrics.insert(name.into(), value.into());
    }
    pub fn metrics(&self) -> &BTreeMap<String, Value> {
        &self.metrics
    }
    pub fn into_metrics(self) -> BTreeMap<String, Value> {
        self.metrics
    }

    pub fn progress(&mut self, message: &str) {
        (self.progress)(message)
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The cancellation flag, for long loops that cannot hold the context.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// For long loops: `ctx.check_cancelled()?` at each step.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// An external program that does a stage's whole job. The scheduler runs it directly (one
/// process, not two) in its own process group, with the spec's working folder as cwd.
#[derive(Clone, Debug, PartialEq)]
pub struct External {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A file the program may write a JSON object of metrics to.
    pub metrics_file: Option<PathBuf>,
}

/// One kind of pipeline stage. Implementations are registered by `kind` in the orchestrator.
pub trait Stage: Send + Sync {
    /// The name used as `kind:` in pipeline files.
    fn kind(&self) -> &'static str;

    /// One line for `orchestrate` help and error messages listing kinds.
    fn describe(&self) -> &'static str {
        ""
    }

    /// Kind-specific keys accepted at the top level of a stage in the pipeline file
    /// (beside the common `kind`, `inputs`, `outputs`, `params`, ...). Anything else is an error.
    fn fields(&self) -> &'static [&'static str] {
        &[]
    }

    /// Validate the configuration before anything runs and say what the stage will need.
    fn check(&self, params: &Params, io: &InputSpec) -> Result<StageProfile, ParamError>;

    /// Do the work: read inputs, write every declared output, record metrics.
    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError>;

    /// Whether the stage is handed a description of the run executing it (see
    /// [`RunSpec::run_description`]); a report that says which results were computed in this run.
    fn wants_run_description(&self) -> bool {
        false
    }

    /// A stage whose work is one external program may return it; the scheduler then runs it
    /// directly instead of calling [`Stage::run`] in a child process.
    fn external(&self, _spec: &RunSpec) -> Result<Option<External>, StageError> {
        Ok(None)
    }
}

/// Metrics a program wrote as one JSON object to a file (absent or empty file: none).
pub fn read_metrics_file(path: &Path) -> Result<BTreeMap<String, Value>, StageError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(StageError::io(format!("reading metrics file {}", path.display()), e)),
    };
    if text.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map.into_iter().collect()),
        Ok(_) | Err(_) => Err(StageError::failed(format!(
            "the metrics file {} must hold one JSON object, e.g. {{\"accuracy\": 0.9}}",
            path.display()
        ))),
    }
}

/// Reject params a stage does not know, naming the key and listing the known ones.
pub fn check_known_params(params: &Params, known: &[&str], kind: &str) -> Result<(), ParamError> {
    for k in params.params.keys() {
        if !known.contains(&k.as_str()) {
            return Err(ParamError::new(format!("params.{k}"), format!("unknown {kind} param `{k}`"))
                .with_help(format!("{kind} params: {}", known.join(", "))));
        }
    }
    Ok(())
}

/// Read a non-negative integer param, with a clear error naming the key.
pub fn param_u64(params: &Params, key: &str, default: u64) -> Result<u64, ParamError> {
    match params.param(key) {
        None => Ok(default),
        Some(v) => v.as_u64().ok_or_else(|| {
            ParamError::new(format!("params.{key}"), format!("`{key}` must be a non-negative integer, got {v}"))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_errors_on_undeclared_names() {
        let spec = RunSpec::new(
            "s",
            "k",
            Params::default(),
            BTreeMap::from([("a".to_string(), PathBuf::from("/x/a"))]),
            BTreeMap::new(),
            PathBuf::from("/x"),
        );
        let mut ctx = StageContext::uncancelled(spec);
        assert_eq!(ctx.input("a").unwrap(), Path::new("/x/a"));
        assert!(ctx.input("b").unwrap_err().to_string().contains("`b`"));
        assert!(ctx.output("o").is_err());
        ctx.metric("loss", 1.5);
        assert_eq!(ctx.metrics()["loss"], serde_json::json!(1.5));
        assert!(ctx.check_cancelled().is_ok());
    }

    #[test]
    fn param_u64_reports_key() {
        let mut p = Params::default();
        p.params.insert("steps".into(), serde_json::json!("ten"));
        let e = param_u64(&p, "steps", 1).unwrap_err();
        assert_eq!(e.key, "params.steps");
        assert_eq!(param_u64(&Params::default(), "steps", 7).unwrap(), 7);
    }
}
