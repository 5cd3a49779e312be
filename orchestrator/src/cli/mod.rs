//! The `orchestrate` command line: one module per verb, each with its arguments (`Args`) and
//! one entry function; this module parses, dispatches and turns failures into exit codes.
//!
//! Exit codes: 0 ok; 1 a stage failed (or verify/replay found a problem); 2 the pipeline or the
//! command line is invalid (nothing ran, nothing was written); 3 the store is busy or unusable;
//! 130 interrupted.

mod compare;
mod dag;
mod export;
mod gc;
mod name;
mod plan;
mod pull;
mod push;
mod replay;
mod report;
mod run;
mod runs;
mod serve;
mod show;
mod stages;
mod ui;
mod verify;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::dag::Dag;
use crate::diag::Diagnostic;
pub use crate::objects::human_bytes;
use crate::pipeline::{self, Pipeline};
use crate::registry::Registry;
use crate::store::{Store, StoreError};

#[derive(Parser, Debug)]
#[command(
    name = "orchestrate",
    version = env!("ORCHESTRATE_LONG_VERSION"),
    about = "Run YAML pipelines of stages with a content-addressed cache"
)]
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

/// A pipeline file and `--set` overrides: what most verbs start from.
#[derive(clap::Args, Debug, Clone)]
struct PipelineArgs {
    /// The pipeline file.
    pipeline: PathBuf,
    /// Override a value: PARAM=V, params.PATH=V, STAGE.PARAM=V or stages.STAGE.KEY=V.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

/// Which stages a run takes and which it executes although cached: `run` and `plan` take
/// both flags; `pull` takes the targets.
#[derive(clap::Args, Debug)]
struct SelectArgs {
    /// Only these stages and what they need (a `foreach` stage's name: every variant).
    #[arg(long = "target", value_name = "STAGE")]
    targets: Vec<String>,
    /// Execute these stages even when their result is cached (here or on the remote), e.g. to
    /// measure again; the new result replaces the cached one, and what reads it reruns only if
    /// its outputs changed. A `foreach` stage's name: every variant. With --target, also a target.
    #[arg(long = "rerun", value_name = "STAGE")]
    reruns: Vec<String>,
}

impl SelectArgs {
    /// The stages the run is limited to, as named (a `--rerun` stage is a target too when
    /// there are targets); empty: every stage.
    fn targets(&self) -> Vec<String> {
        if self.targets.is_empty() {
            return Vec::new();
        }
        self.targets.iter().chain(&self.reruns).cloned().collect()
    }

    fn scope(&self, p: &Pipeline, dag: &Dag) -> Result<crate::plan::Scope, Diagnostic> {
        let mut rerun = std::collections::HashSet::new();
        for s in &self.reruns {
            rerun.extend(target_indices(p, s)?);
        }
        if self.targets.is_empty() {
            return Ok(crate::plan::Scope { only: None, rerun });
        }
        let mut set = std::collections::HashSet::new();
        for t in &self.targets {
            set.extend(target_indices(p, t)?);
        }
        set.extend(&rerun);
        let only = set.iter().flat_map(|&i| dag.with_upstream(i)).collect();
        Ok(crate::plan::Scope { only: Some(only), rerun })
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a pipeline (only what is not cached).
    Run(run::Args),
    /// Dry run: what is cached and what will run, and why.
    Plan(plan::Args),
    /// Print the stage graph.
    Dag(dag::Args),
    /// Show a stage's stored result: outputs, metrics, duration, peak memory.
    Show(show::Args),
    /// Copy a stage's outputs (or one output, STAGE.OUTPUT) out of the store.
    Export(export::Args),
    /// Render a report template against the cached results of a pipeline, running nothing.
    Report(report::Args),
    /// Re-execute cached stages from their cached inputs and compare outputs bit for bit.
    Replay(replay::Args),
    /// Re-hash every object; name and quarantine corrupt ones; --repair rebuilds the index.
    Verify(verify::Args),
    /// The run history, newest first.
    Runs(runs::Args),
    /// Compare two runs: params, metrics (better/worse), reruns and why, changed artifacts.
    Compare(compare::Args),
    /// Name a run after it ran, as `run --name` names it as it starts (or --clear its name).
    Name(name::Args),
    /// Delete objects not used by the last N runs: of the store, or with --remote of a remote cache.
    Gc(gc::Args),
    /// Upload cached results to a remote cache (S3 or a shared directory).
    Push(push::Args),
    /// Download results from a remote cache into the store, running nothing.
    Pull(pull::Args),
    /// Serve a trained model over the OpenAI HTTP API (completions, chat, streaming).
    Serve(serve::Args),
    /// A read-only web view of the store: runs, stage graphs, stages, compare, sweeps, reports, the live run.
    Ui(ui::Args),
    /// List the stage kinds this binary knows.
    Stages,
    /// Print a shell completion script, e.g. `orchestrate completions bash >
    /// ~/.local/share/bash-completion/completions/orchestrate`.
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
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

/// What every verb may need besides its own arguments.
struct Env {
    registry: Registry,
    /// The store folder.
    root: PathBuf,
    /// The command line in short, recorded in the store's lock for whoever waits on it.
    label: String,
    wait: bool,
}

impl Env {
    fn open_store(&self) -> Result<Store, StoreError> {
        Store::open(&self.root, &self.label, self.wait)
    }

    /// Whether a store is at the root (only `run` and `pull` create one).
    fn has_store(&self) -> bool {
        self.root.join("objects").is_dir()
    }

    /// What a verb that needs results says when the root holds no store.
    fn no_store(&self, code: &'static str) -> Diagnostic {
        Diagnostic::new(code, format!("no store at {} (it has no objects/ folder)", self.root.display()))
            .help("run a pipeline first, or point at a store with --store DIR (or ORCHESTRATE_STORE)")
    }

    /// The store for a verb that maintains one (`gc`, `replay`, `verify`): it must exist, so
    /// a mistyped --store never turns another folder into a store.
    fn open_existing(&self) -> Result<Store, Failure> {
        if !self.has_store() {
            return Err(self.no_store("E-STORE").into());
        }
        Ok(self.open_store()?)
    }

    /// The store for a verb that only reads it (`show`, `export`, `plan`, `report`, `runs`,
    /// `compare`, `serve`, `push`): none yet, an empty view that creates nothing; while
    /// another process holds it, unless `--wait`, a snapshot
    /// of what its objects say ([`Store::open_snapshot`]), so a long run does not lock its team
    /// out of results and history. What that run has not finished is not in the snapshot.
    fn open_reader(&self) -> Result<Store, Failure> {
        // No store yet (a fresh project, or a mistyped --store): an empty view, creating nothing.
        if !self.has_store() {
            return Ok(Store::open_snapshot(&self.root)?);
        }
        match self.open_store() {
            Err(StoreError::Locked { holder, .. }) if !self.wait => {
                eprintln!("note: the store is in use by {holder}; reading what its objects hold (that run's results appear as its stages finish)");
                Ok(Store::open_snapshot(&self.root)?)
            }
            other => Ok(other?),
        }
    }

    /// Load, check and resolve a pipeline, and build its graph.
    fn load(&self, args: &PipelineArgs) -> Result<(Pipeline, Dag), Diagnostic> {
        let p = pipeline::load(&args.pipeline, &args.sets, &self.registry)?;
        let dag = Dag::build(&p)?;
        Ok((p, dag))
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
            let help = match &e {
                StoreError::Locked { .. } => "\n  = help: wait for it to finish, or pass --wait to queue behind it",
                StoreError::Index { .. } => {
                    "\n  = help: run `orchestrate verify --repair` to rebuild the index from objects/"
                }
                _ => "",
            };
            eprintln!("error: {e}{help}");
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

fn command_label(cmd: &Cmd) -> String {
    let with = |verb: &str, file: &Path| format!("{verb} {}", file.display());
    match cmd {
        Cmd::Run(a) => with("run", &a.p.pipeline),
        Cmd::Plan(a) => with("plan", &a.p.pipeline),
        Cmd::Show(a) => with("show", &a.p.pipeline),
        Cmd::Export(a) => with("export", &a.p.pipeline),
        Cmd::Replay(a) => with("replay", &a.p.pipeline),
        Cmd::Report(a) => with("report", &a.pipeline),
        Cmd::Verify(_) => "verify".into(),
        Cmd::Push(_) => "push".into(),
        Cmd::Runs(_) => "runs".into(),
        Cmd::Compare(_) => "compare".into(),
        Cmd::Pull(_) => "pull".into(),
        Cmd::Gc(_) => "gc".into(),
        Cmd::Name(_) => "name".into(),
        Cmd::Serve(_) => "serve".into(),
        Cmd::Ui(_) => "ui".into(),
        _ => "orchestrate".into(),
    }
}

/// A reader that stops early (`orchestrate runs --json | head`) ends a listing quietly, as it
/// ends `ls`: the verbs that only read the store and print take the default SIGPIPE action
/// again. (Rust's runtime ignores SIGPIPE, so a write to the closed pipe failed and `println!`
/// panicked.) The others keep ignoring it: a verb that runs stages, writes the store or talks to
/// a network (`plan --remote` too; vectored socket writes can raise SIGPIPE) must not be killed
/// mid-work by a closed pipe or socket.
fn end_quietly_on_a_closed_pipe(cmd: &Cmd) {
    let listing = matches!(
        cmd,
        Cmd::Runs(_) | Cmd::Compare(_) | Cmd::Show(_) | Cmd::Dag(_) | Cmd::Stages | Cmd::Completions { .. }
    );
    if listing {
        // SAFETY: called once, before any thread is started, with a valid handler constant.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
}

fn dispatch(cli: Cli) -> Result<i32, Failure> {
    end_quietly_on_a_closed_pipe(&cli.command);
    let env = Env {
        registry: Registry::builtin(),
        root: store_root(&cli.store),
        label: command_label(&cli.command),
        wait: cli.wait,
    };
    match cli.command {
        Cmd::ExecStage { .. } => Ok(0),
        Cmd::Stages => stages::stages(&env),
        Cmd::Completions { shell } => completions(shell),
        Cmd::Dag(a) => dag::dag(&env, a),
        Cmd::Run(a) => run::run(&env, a),
        Cmd::Plan(a) => plan::plan(&env, a),
        Cmd::Show(a) => show::show(&env, a),
        Cmd::Report(a) => report::report(&env, a),
        Cmd::Export(a) => export::export(&env, a),
        Cmd::Replay(a) => replay::replay(&env, a),
        Cmd::Verify(a) => verify::verify(&env, a),
        Cmd::Gc(a) => gc::gc(&env, a),
        Cmd::Name(a) => name::name(&env, a),
        Cmd::Push(a) => push::push(&env, a),
        Cmd::Runs(a) => runs::runs(&env, a),
        Cmd::Compare(a) => compare::compare(&env, a),
        Cmd::Pull(a) => pull::pull(&env, a),
        Cmd::Serve(a) => serve::serve(&env, a),
        Cmd::Ui(a) => ui::ui(&env, a),
    }
}

/// `orchestrate completions SHELL`: the script for the command line as users see it (clap's
/// generators would also offer the hidden internal subcommand), written at once so that a
/// reader that stops early (`| head`) is not an error.
fn completions(shell: clap_complete::Shell) -> Result<i32, Failure> {
    let full = <Cli as clap::CommandFactory>::command();
    let visible = full.get_subcommands().filter(|c| !c.is_hide_set()).cloned();
    let mut cmd = clap::Command::new("orchestrate")
        .version(env!("ORCHESTRATE_LONG_VERSION"))
        .args(full.get_arguments().cloned())
        .subcommands(visible);
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "orchestrate", &mut script);
    match std::io::Write::write_all(&mut std::io::stdout(), &script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure::Other(anyhow::Error::new(e).context("writing the completion script"), 1))
        }
        _ => Ok(0),
    }
}

/// `--remote`, for the verbs that can use a remote cache.
#[derive(clap::Args, Debug, Clone)]
struct RemoteArgs {
    /// Remote cache: a name from orchestrate.toml, s3://BUCKET/PREFIX, or a directory.
    #[arg(long, value_name = "REMOTE")]
    remote: Option<String>,
}

impl RemoteArgs {
    /// The remote given, or the `default_remote` of orchestrate.toml when `use_default`.
    /// `near` is where orchestrate.toml is looked for (the pipeline's folder).
    fn open(
        &self,
        near: &Path,
        use_default: bool,
        access: crate::remote::Access,
    ) -> Result<Option<crate::remote::Remote>, Failure> {
        let invalid = |msg: String| Failure::Invalid(Diagnostic::new("E-REMOTE", msg));
        let spec = match (&self.remote, use_default) {
            (Some(s), _) => s.clone(),
            (None, true) => match crate::remote::config::default_spec(near).map_err(invalid)? {
                Some(s) => s,
                None => {
                    return Err(invalid(format!(
                        "no remote given: pass --remote NAME|s3://BUCKET/PREFIX|DIR, or set default_remote in {}",
                        crate::remote::config::CONFIG_FILE
                    )))
                }
            },
            (None, false) => return Ok(None),
        };
        let loc = crate::remote::config::resolve(&spec, near).map_err(invalid)?;
        crate::remote::Remote::open(&loc, access).map(Some).map_err(|e| invalid(e.to_string()))
    }
}

/// The folder a pipeline file is in (where orchestrate.toml is looked for).
fn folder_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Output `output` of a stored result, or an invalid command line naming the ones it has.
fn output_of<'m>(m: &'m crate::store::Manifest, output: &str) -> Result<&'m crate::objects::Entry, Diagnostic> {
    m.outputs.get(output).ok_or_else(|| {
        let names: Vec<&str> = m.outputs.keys().map(String::as_str).collect();
        Diagnostic::new("E-NO-OUTPUT", format!("stage `{}` has no output `{output}`", m.stage))
            .help(crate::diag::suggest(output, &names, "outputs"))
    })
}

fn unknown_stage(p: &Pipeline, name: &str) -> Diagnostic {
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    let variants: Vec<&str> = names.iter().copied().filter(|n| crate::pipeline::is_variant_of(n, name)).collect();
    let d = Diagnostic::new("E-NO-STAGE", format!("pipeline `{}` has no stage `{name}`", p.name));
    match variants.as_slice() {
        [] => d.help(crate::diag::suggest(name, &names, "stages")),
        [first, ..] => {
            // A grid can have a thousand variants: name a few.
            const SHOWN: usize = 8;
            let more = variants.len().saturating_sub(SHOWN);
            let listed = variants[..variants.len().min(SHOWN)].join(", ");
            let listed = if more > 0 { format!("{listed}, … and {more} more") } else { listed };
            d.help(format!(
                "`{name}` is a `foreach` stage: name one of its {} variants, e.g. `{first}` ({listed})",
                variants.len()
            ))
        }
    }
}

/// `--target NAME`: that stage, or every variant of the `foreach` stage NAME.
fn target_indices(p: &Pipeline, name: &str) -> Result<Vec<usize>, Diagnostic> {
    if let Some(i) = p.index_of(name) {
        return Ok(vec![i]);
    }
    let variants: Vec<usize> =
        (0..p.stages.len()).filter(|&i| crate::pipeline::is_variant_of(&p.stages[i].name, name)).collect();
    if variants.is_empty() {
        return Err(unknown_stage(p, name));
    }
    Ok(variants)
}

fn stage_index(p: &Pipeline, name: &str) -> Result<usize, Diagnostic> {
    p.index_of(name).ok_or_else(|| unknown_stage(p, name))
}

/// `--cores`: at least 1; all cores when not given.
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

/// `--host` and `--port` of a server verb as an address (IPv4 or IPv6): a bad host is an
/// invalid command line, found before anything is loaded.
fn socket_addr(host: &str, port: u16) -> Result<std::net::SocketAddr, Diagnostic> {
    format!("{host}:{port}").parse().or_else(|_| format!("[{host}]:{port}").parse()).map_err(|_| {
        Diagnostic::new("E-CLI", format!("`{host}` is not an IP address to bind (e.g. 127.0.0.1 or 0.0.0.0)"))
    })
}

/// Listen on `addr`, saying what to do when the port is taken.
async fn listen(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (another server on that port? try --port 0 for a free one)"))
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    println!("{}", serde_json::to_string_pretty(value).context("encoding JSON")?);
    Ok(())
}

/// Errors a transfer printed in full; the rest are counted (`--json` lists every one). A
/// remote that fails one way usually fails every blob the same way.
const ERRORS_SHOWN: usize = 5;

/// A push's or pull's errors on stderr, the first [`ERRORS_SHOWN`] of them in full.
fn print_errors(errors: &[String]) {
    for e in errors.iter().take(ERRORS_SHOWN) {
        eprintln!("error: {e}");
    }
    if errors.len() > ERRORS_SHOWN {
        eprintln!("error: … and {} more (--json lists every one)", errors.len() - ERRORS_SHOWN);
    }
}
