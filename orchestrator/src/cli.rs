//! The `orchestrate` command line.
//!
//! Exit codes: 0 ok; 1 a stage failed (or verify/replay found a problem); 2 the pipeline or the
//! command line is invalid (nothing ran, nothing was written); 3 the store is busy or unusable;
//! 130 interrupted.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

use crate::dag::Dag;
use crate::diag::Diagnostic;
use crate::objects::ObjKind;
use crate::pipeline::{self, Pipeline};
use crate::progress::Reporter;
use crate::registry::Registry;
use crate::sched::{self, RunOptions};
use crate::store::{self, iso8601, Store, StoreError};

#[derive(Parser, Debug)]
#[command(name = "orchestrate", version, about = "Run YAML pipelines of stages with a content-addressed cache")]
struct Cli {
    /// Store folder (default: $ORCHESTRATE_STORE, else ./artifacts).
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// If another orchestrate holds the store, wait for it instead of failing.
    #[arg(long, global = true)]
    wait: bool,
    /// Log format on stderr (RUST_LOG sets the level; default warn).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DagFormat {
    Dot,
    Mermaid,
}

#[derive(clap::Args, Debug, Clone)]
struct PipelineArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// Override a value: PARAM=V, params.PATH=V, STAGE.PARAM=V or stages.STAGE.KEY=V.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a pipeline (only what is not cached).
    Run {
        #[command(flatten)]
        p: PipelineArgs,
        /// Run only these stages and what they need.
        #[arg(long = "target", value_name = "STAGE")]
        targets: Vec<String>,
        /// CPU budget: the sum of running stages' threads stays within it (default: all cores).
        #[arg(long)]
        cores: Option<u32>,
        /// After a failure, finish every branch that does not depend on it.
        #[arg(long)]
        keep_going: bool,
        /// Print a machine-readable summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Dry run: what is cached and what will run, and why.
    Plan {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long)]
        json: bool,
    },
    /// Print the stage graph.
    Dag {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long, value_enum, default_value_t = DagFormat::Dot)]
        format: DagFormat,
    },
    /// Show a stage's stored result: outputs, metrics, duration, peak memory.
    Show {
        #[command(flatten)]
        p: PipelineArgs,
        stage: String,
        #[arg(long)]
        json: bool,
    },
    /// Copy a stage's outputs (or one output, STAGE.OUTPUT) out of the store.
    Export {
        #[command(flatten)]
        p: PipelineArgs,
        /// STAGE or STAGE.OUTPUT (omit with --all).
        target: Option<String>,
        /// Destination folder (or file, for a single file output).
        dest: Option<PathBuf>,
        /// Export every stage's outputs to DEST/<stage>/<output>.
        #[arg(long, value_name = "DEST", conflicts_with = "dest")]
        all: Option<PathBuf>,
    },
    /// Render a report template against the cached results of a pipeline, running nothing.
    Report {
        /// The template (minijinja), e.g. templates/phase4.md.j2.
        template: PathBuf,
        /// The pipeline whose cached results fill the template.
        #[arg(long)]
        pipeline: PathBuf,
        /// Override a value, as for `run` (selects which cached results).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Where to write the markdown; plots go beside it.
        #[arg(short = 'o', long = "out", value_name = "OUT.md")]
        out: PathBuf,
    },
    /// Re-execute cached stages from their cached inputs and compare outputs bit for bit.
    Replay {
        #[command(flatten)]
        p: PipelineArgs,
        /// Replay only these stages (default: all).
        #[arg(long = "stage", value_name = "STAGE")]
        stages: Vec<String>,
        #[arg(long)]
        cores: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every object; name and quarantine corrupt ones; --repair rebuilds the index.
    Verify {
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete objects not used by the last N runs.
    Gc {
        #[arg(long, default_value_t = 1)]
        keep_last: usize,
        #[arg(long)]
        dry_run: bool,
    },
    /// List the stage kinds this binary knows.
    Stages,
    /// Internal: run one stage in this process (used by the scheduler).
    #[command(hide = true)]
    ExecStage { spec: PathBuf, result: PathBuf },
}

/// Errors at the edge, each with its exit code.
enum Failure {
    Invalid(Diagnostic),
    Store(StoreError),
    Other(anyhow::Error, i32),
}

impl From<Diagnostic> for Failure {
    fn from(d: Diagnostic) -> Self {
        Failure::Invalid(d)
    }
}
impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}
impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e, 1)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    if let Cmd::ExecStage { spec, result } = &cli.command {
        return crate::exec::exec_stage_main(spec, result);
    }
    init_logging(cli.log_format);
    match dispatch(cli) {
        Ok(code) => code,
        Err(Failure::Invalid(d)) => {
            eprint!("{d}");
            2
        }
        Err(Failure::Store(e)) => {
            match &e {
                StoreError::Locked { .. } => eprintln!("error: {e}\n  = help: wait for it to finish, or pass --wait to queue behind it"),
                StoreError::Index { .. } => eprintln!("error: {e}\n  = help: run `orchestrate verify --repair` to rebuild the index from objects/"),
                _ => eprintln!("error: {e}"),
            }
            3
        }
        Err(Failure::Other(e, code)) => {
            eprintln!("error: {e:#}");
            code
        }
    }
}

fn store_root(cli_store: &Option<PathBuf>) -> PathBuf {
    cli_store
        .clone()
        .or_else(|| std::env::var_os("ORCHESTRATE_STORE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("artifacts"))
}

fn load(args: &PipelineArgs, registry: &Registry) -> Result<(Pipeline, Dag), Diagnostic> {
    let p = pipeline::load(&args.pipeline, &args.sets, registry)?;
    let dag = Dag::build(&p)?;
    Ok((p, dag))
}

fn unknown_stage(p: &Pipeline, name: &str) -> Diagnostic {
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    Diagnostic::new("E-NO-STAGE", format!("pipeline `{}` has no stage `{name}`", p.name))
        .help(crate::diag::suggest(name, &names, "stages"))
}

fn stage_index(p: &Pipeline, name: &str) -> Result<usize, Diagnostic> {
    p.index_of(name).ok_or_else(|| unknown_stage(p, name))
}

fn cores_arg(cores: Option<u32>) -> Result<u32, Diagnostic> {
    match cores {
        Some(0) => Err(Diagnostic::new("E-CLI", "--cores must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn command_label(cmd: &Cmd) -> String {
    match cmd {
        Cmd::Run { p, .. } => format!("run {}", p.pipeline.display()),
        Cmd::Plan { p, .. } => format!("plan {}", p.pipeline.display()),
        Cmd::Show { p, .. } => format!("show {}", p.pipeline.display()),
        Cmd::Export { p, .. } => format!("export {}", p.pipeline.display()),
        Cmd::Replay { p, .. } => format!("replay {}", p.pipeline.display()),
        Cmd::Report { pipeline, .. } => format!("report {}", pipeline.display()),
        Cmd::Verify { .. } => "verify".into(),
        Cmd::Gc { .. } => "gc".into(),
        _ => "orchestrate".into(),
    }
}

fn dispatch(cli: Cli) -> Result<i32, Failure> {
    let registry = Registry::builtin();
    let root = store_root(&cli.store);
    let label = command_label(&cli.command);
    let open = |root: &Path| Store::open(root, &label, cli.wait);
    match cli.command {
        Cmd::ExecStage { .. } => Ok(0),
        Cmd::Stages => {
            for s in registry.iter() {
                println!("{:<12} v{}  {}", s.kind(), s.version(), s.describe());
            }
            Ok(0)
        }
        Cmd::Dag { p, format } => {
            let (p, dag) = load(&p, &registry)?;
            print!("{}", match format {
                DagFormat::Dot => dag.to_dot(&p),
                DagFormat::Mermaid => dag.to_mermaid(&p),
            });
            Ok(0)
        }
        Cmd::Run { p, targets, cores, keep_going, json } => {
            let (p, dag) = load(&p, &registry)?;
            let cores = cores_arg(cores)?;
            let only = if targets.is_empty() {
                None
            } else {
                let mut set = HashSet::new();
                for t in &targets {
                    set.extend(dag.with_upstream(stage_index(&p, t)?));
                }
                Some(set)
            };
            let store = Arc::new(open(&root)?);
            store.clean_tmp();
            let mut reporter = Reporter::new(json);
            let summary = runtime()?.block_on(sched::run(&p, &dag, store, RunOptions { cores, keep_going, only }, &mut reporter));
            if json {
                println!("{}", serde_json::to_string_pretty(&summary).context("encoding the summary")?);
            }
            Ok(summary.exit_code())
        }
        Cmd::Plan { p, json } => {
            let (p, dag) = load(&p, &registry)?;
            let store = open(&root)?;
            let entries = crate::plan::plan(&p, &dag, &store);
            if json {
                println!("{}", serde_json::to_string_pretty(&entries).context("encoding the plan")?);
            } else {
                let width = entries.iter().map(|e| e.stage.len()).max().unwrap_or(5).max(5);
                for e in &entries {
                    let status = match e.status.as_str() {
                        "cached" => "cached",
                        "run" => "will run",
                        _ => "error",
                    };
                    let why = if e.reasons.is_empty() { String::new() } else { format!("  ({})", e.reasons.join("; ")) };
                    println!("{:<width$}  {status}{why}", e.stage);
                }
                let runs = entries.iter().filter(|e| e.status != "cached").count();
                println!("{} of {} stages will run", runs, entries.len());
            }
            Ok(0)
        }
        Cmd::Show { p, stage, json } => {
            let (p, dag) = load(&p, &registry)?;
            stage_index(&p, &stage)?;
            let store = open(&root)?;
            let (digest, m, current) = match crate::plan::current_manifest(&p, &dag, &store, &stage) {
                Some((d, m)) => (d, m, true),
                None => match store.last_manifest(&p.name, &stage) {
                    Some(m) => ("(last run)".to_string(), m, false),
                    None => return Err(Failure::Other(anyhow::anyhow!("stage `{stage}` has never run in this store ({})", root.display()), 1)),
                },
            };
            if json {
                let outputs: serde_json::Map<String, serde_json::Value> = m
                    .outputs
                    .iter()
                    .map(|(k, e)| {
                        (k.clone(), serde_json::json!({"digest": e.digest, "type": e.kind, "size": e.size,
                            "path": store.objects.path(&e.digest)}))
                    })
                    .collect();
                let v = serde_json::json!({
                    "stage": stage, "current": current, "manifest": digest, "key": m.key,
                    "outputs": outputs, "metrics": m.metrics, "duration_s": m.duration_s, "cpu_s": m.cpu_s,
                    "peak_rss_bytes": m.peak_rss_bytes, "threads": m.threads, "started_at": iso8601(m.started_at),
                    "deterministic": m.deterministic, "params": m.key_input.params, "inputs": m.key_input.inputs,
                    "log": m.log.as_ref().map(|l| store.objects.path(l)),
                });
                println!("{}", serde_json::to_string_pretty(&v).context("encoding")?);
            } else {
                println!("stage      {stage} ({})", m.key_input.kind);
                if !current {
                    println!("note       not cached for the pipeline as it is now; showing its last run");
                }
                println!("key        {}", m.key);
                println!("ran        {} for {:.3}s, {:.3} CPU-s, peak memory {}", iso8601(m.started_at), m.duration_s, m.cpu_s, human_bytes(m.peak_rss_bytes));
                println!("outputs");
                for (k, e) in &m.outputs {
                    let kind = if e.kind == ObjKind::Tree { "dir " } else { "file" };
                    println!("  {k:<16} {kind} {:>10}  {}  {}", human_bytes(e.size), e.digest, store.objects.path(&e.digest).display());
                }
                if let Some(log) = &m.log {
                    println!("log        {}", store.objects.path(log).display());
                }
                if !m.metrics.is_empty() {
                    println!("metrics");
                    for (k, v) in &m.metrics {
                        println!("  {k:<16} {v}");
                    }
                }
            }
            Ok(0)
        }
        Cmd::Report { template, pipeline, sets, out } => {
            let (p, dag) = load(&PipelineArgs { pipeline, sets }, &registry)?;
            let store = open(&root)?;
            crate::report::render_cached(&p, &dag, &store, &template, &out)?;
            eprintln!("wrote {}", out.display());
            Ok(0)
        }
        Cmd::Export { p, target, dest, all } => {
            let (p, dag) = load(&p, &registry)?;
            let store = open(&root)?;
            let entries = crate::plan::plan(&p, &dag, &store);
            let manifest_of = |stage: &str| -> anyhow::Result<crate::store::Manifest> {
                let e = entries.iter().find(|e| e.stage == stage).context("no such stage")?;
                match &e.manifest {
                    Some(d) => Ok(store.load_manifest(d)?),
                    None => bail!("stage `{stage}` is not cached for the pipeline as it is now; run it first (`orchestrate run`)"),
                }
            };
            if let Some(dest) = all {
                for e in &entries {
                    let m = manifest_of(&e.stage)?;
                    for (name, entry) in &m.outputs {
                        let to = dest.join(&e.stage).join(name);
                        export_entry(&store, entry, &to, &format!("{}.{name}", e.stage))?;
                    }
                }
                eprintln!("exported {} stages to {}", entries.len(), dest.display());
                return Ok(0);
            }
            let (Some(target), Some(dest)) = (target, dest) else {
                return Err(Diagnostic::new("E-CLI", "export needs STAGE[.OUTPUT] and DEST, or --all DEST").into());
            };
            let (stage, output) = match p.index_of(&target) {
                Some(_) => (target.clone(), None),
                None => {
                    let split = target.match_indices('.').map(|(i, _)| i).find(|&i| p.index_of(&target[..i]).is_some());
                    match split {
                        Some(i) => (target[..i].to_string(), Some(target[i + 1..].to_string())),
                        None => return Err(unknown_stage(&p, &target).into()),
                    }
                }
            };
            let m = manifest_of(&stage)?;
            match output {
                Some(o) => {
                    let entry = m.outputs.get(&o).with_context(|| {
                        format!("stage `{stage}` has no output `{o}` (it has: {})", m.outputs.keys().cloned().collect::<Vec<_>>().join(", "))
                    })?;
                    export_entry(&store, entry, &dest, &target)?;
                }
                None => {
                    for (name, entry) in &m.outputs {
                        export_entry(&store, entry, &dest.join(name), &format!("{stage}.{name}"))?;
                    }
                }
            }
            eprintln!("exported {target} to {}", dest.display());
            Ok(0)
        }
        Cmd::Replay { p, stages, cores, json } => {
            let (p, dag) = load(&p, &registry)?;
            let cores = cores_arg(cores)?;
            let only = if stages.is_empty() {
                None
            } else {
                Some(stages.iter().map(|s| stage_index(&p, s)).collect::<Result<Vec<_>, _>>()?)
            };
            let store = open(&root)?;
            store.clean_tmp();
            let report = runtime()?
                .block_on(crate::replay::replay(&p, &dag, &store, only.as_deref(), cores))
                .context("replay")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).context("encoding")?);
            } else {
                print!("{}", crate::replay::render_table(&report));
                println!("{}", if report.failed { "replay: MISMATCH — a deterministic stage did not reproduce" } else { "replay: every deterministic stage reproduced bit for bit" });
            }
            Ok(if report.failed { 1 } else { 0 })
        }
        Cmd::Verify { repair, json } => {
            let (store, moved) = if repair { store::open_for_repair(&root, cli.wait)? } else { (open(&root)?, None) };
            if let Some(m) = &moved {
                eprintln!("the index could not be opened; moved it to {} and rebuilt it", m.display());
            }
            let r = store.verify(repair)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r).context("encoding")?);
            } else {
                println!("checked {} objects ({})", r.objects_checked, human_bytes(r.bytes_checked));
                for (d, to) in &r.corrupt {
                    println!("CORRUPT  {d}  (moved to {to}; the next run recomputes what needs it)");
                }
                for k in &r.dangling {
                    println!("{}  index entry {k}: its manifest or outputs are missing", if repair { "REMOVED " } else { "DANGLING" });
                }
                if r.index_rebuilt {
                    println!("index rebuilt from objects/: {} cache entries, {} run records", r.manifests_indexed, r.runs_indexed);
                }
                if r.corrupt.is_empty() && r.dangling.is_empty() {
                    println!("store OK");
                }
            }
            let problems = !r.corrupt.is_empty() || (!repair && !r.dangling.is_empty());
            Ok(if problems { 1 } else { 0 })
        }
        Cmd::Gc { keep_last, dry_run } => {
            let store = open(&root)?;
            let r = store.gc(keep_last, dry_run)?;
            println!(
                "{}{} objects ({}) {}; kept {} objects used by the last {} run(s)",
                if dry_run { "would remove " } else { "removed " },
                r.objects_removed,
                human_bytes(r.bytes_freed),
                if dry_run { "(dry run)" } else { "" },
                r.objects_kept,
                r.runs_kept
            );
            Ok(0)
        }
    }
}

pub(crate) fn export_entry(store: &Store, entry: &crate::objects::Entry, to: &Path, what: &str) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    if to.exists() {
        bail!("{} already exists; remove it or pick another destination", to.display());
    }
    store.objects.materialize(entry, to, what).with_context(|| format!("exporting {what}"))?;
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
