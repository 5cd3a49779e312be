//! `orchestrate serve`: an OpenAI-compatible server for a model in the store (or a folder),
//! with the `orchestrate-serve` crate. The model and its tokenizer are copied out of the store
//! into a private temporary folder first, so the store is not held while serving.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};

use super::export::{split_target, Results};
use super::{Env, Failure, PipelineArgs};
use crate::diag::Diagnostic;
use crate::pipeline::{InputRef, Pipeline};
use crate::store::{Manifest, Store};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    /// The pipeline file (omit with --model).
    pipeline: Option<PathBuf>,
    /// STAGE or STAGE.OUTPUT holding the model (train/distill: `best`; quantize: `model.gguf`).
    target: Option<String>,
    /// Override a value: PARAM=V, params.PATH=V, STAGE.PARAM=V or stages.STAGE.KEY=V.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Serve this checkpoint folder or .gguf file instead of a stage's output.
    #[arg(long, conflicts_with_all = ["pipeline", "target"])]
    model: Option<PathBuf>,
    /// Serve the model a past run recorded (`latest~N`, a name such as `baseline`, or 4+
    /// characters of an id), not the pipeline's as it is now.
    #[arg(long, value_name = "RUN", conflicts_with = "model")]
    run: Option<String>,
    /// The tokenizer.json (default: the stage's `tokenizer` input, or MODEL/tokenizer.json).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The model's name in the API (default: the stage name, or the model file's name).
    #[arg(long)]
    name: Option<String>,
    /// Address to bind (127.0.0.1: this machine only).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Requests that may wait beyond the batch before new ones get 503.
    #[arg(long, default_value_t = 256)]
    queue: usize,
}

/// The output a stage kind's model is in.
fn default_output(kind: &str) -> Option<&'static str> {
    match kind {
        "train" | "distill" => Some("best"),
        "quantize" => Some("model.gguf"),
        _ => None,
    }
}

/// The output holding the model: the one named, else the kind's (train/distill `best`, quantize
/// `model.gguf`).
fn model_output(stage: &str, kind: &str, named: Option<String>) -> Result<String, Failure> {
    match named.or_else(|| default_output(kind).map(String::from)) {
        Some(o) => Ok(o),
        None => Err(Diagnostic::new("E-CLI", format!("stage `{stage}` ({kind}) holds no model to serve"))
            .help("name the output: STAGE.OUTPUT (a checkpoint folder or a .gguf file), or use --model")
            .into()),
    }
}

/// The stage's model copied out of the store into `dir`, and when the stage computed it.
fn copy_model(store: &Store, m: &Manifest, stage: &str, output: &str, dir: &Path) -> Result<(PathBuf, u64), Failure> {
    let entry = super::output_of(m, output)?;
    let model = dir.join(if output.ends_with(".gguf") { "model.gguf" } else { "model" });
    store.export(entry, &model, &format!("{stage}.{output}")).map_err(|e| anyhow!(e))?;
    Ok((model, (m.started_at + m.duration_s) as u64))
}

/// A model copied out of the store, its tokenizer (or why there is none: `--tokenizer` may give
/// one), and when the stage computed it.
type FromStore = (PathBuf, Result<PathBuf, Failure>, u64);

/// The stage's model and tokenizer copied out of the store into `dir`.
fn from_store(env: &Env, pa: &PipelineArgs, target: &str, dir: &Path) -> Result<FromStore, Failure> {
    let (p, dag) = env.load(pa)?;
    let store = env.open_reader()?;
    let results = Results::now(&p, &dag, &store);
    let (stage, output) = split_target(&p, target)?;
    let st = p.stage(&stage).ok_or_else(|| anyhow!("no stage `{stage}`"))?;
    let output = model_output(&stage, &st.kind, output)?;
    let m = results.manifest(&store, &stage)?;
    let (model, created) = copy_model(&store, &m, &stage, &output, dir)?;
    let tokenizer = tokenizer_of(&p, &store, &results, &stage, dir).map_err(Failure::from);
    Ok((model, tokenizer, created))
}

/// Stored file `digest` (checked against its digest; `what` it is, for messages) copied to `to`.
fn copy_file(store: &Store, digest: &str, what: &str, to: &Path) -> anyhow::Result<PathBuf> {
    let bytes = store.objects.read_verified(digest, what).map_err(|e| anyhow!(e))?;
    std::fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    Ok(to.to_path_buf())
}

/// `--run`: the model a past run recorded, with the tokenizer its manifest names as its
/// `tokenizer` input — the pipeline may have changed since.
fn from_run(env: &Env, pa: &PipelineArgs, target: &str, spec: &str, dir: &Path) -> Result<FromStore, Failure> {
    let (p, _) = env.load(pa)?;
    let store = env.open_reader()?;
    let results = Results::of_run(&store, &p, spec)?;
    let (stage, output) = results.split(&p, target)?;
    let m = results.manifest(&store, &stage)?;
    let output = model_output(&stage, &m.key_input.kind, output)?;
    let (model, created) = copy_model(&store, &m, &stage, &output, dir)?;
    let run = results.run.unwrap_or_default();
    let tokenizer = match m.key_input.inputs.get("tokenizer") {
        Some(d) if store.objects.has(d) => copy_file(&store, d, "tokenizer", &dir.join("tokenizer.json")),
        Some(_) => Err(anyhow!(
            "the tokenizer `{stage}` had in run {run} was a file outside the store; pass it with --tokenizer FILE"
        )),
        None => Err(anyhow!("`{stage}` had no `tokenizer` input in run {run}; pass --tokenizer FILE")),
    };
    Ok((model, tokenizer.map_err(Failure::from), created))
}

/// A file's (or folder's) modification time in Unix seconds; 0 when the filesystem has none.
fn modified(path: &Path) -> u64 {
    let t = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs())
}

/// The stage's `tokenizer` input, copied out of the store (or in place for a `file:` input).
fn tokenizer_of(p: &Pipeline, store: &Store, results: &Results, stage: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let st = p.stage(stage).context("no such stage")?;
    match st.inputs.get("tokenizer") {
        Some(InputRef::File { path, .. }) => Ok(path.clone()),
        Some(InputRef::Stage { stage: from, output }) => {
            let m = results.manifest(store, from)?;
            let entry = m.outputs.get(output).with_context(|| format!("stage `{from}` has no output `{output}`"))?;
            let to = dir.join("tokenizer.json");
            store.export(entry, &to, &format!("{from}.{output}")).map_err(|e| anyhow!(e))?;
            Ok(to)
        }
        _ => bail!("stage `{stage}` has no plain `tokenizer` input to take the tokenizer from; pass --tokenizer FILE"),
    }
}

/// OpenAI's `system_fingerprint`: a digest of what decides the text a seed gives — the model's
/// and the tokenizer's bytes, this binary's commit and the kernels it runs here — so a client
/// can tell when the same seed may no longer give the same text.
fn fingerprint(model: &Path, tokenizer: &Path) -> anyhow::Result<String> {
    let mut h = blake3::Hasher::new();
    for path in [model, tokenizer] {
        hash_into(&mut h, path).with_context(|| format!("reading {}", path.display()))?;
    }
    h.update(env!("ORCHESTRATE_GIT_COMMIT").as_bytes());
    h.update(env!("ORCHESTRATE_GIT_DIRTY").as_bytes());
    h.update(itera_models::simd_path().as_bytes());
    Ok(format!("fp_{}", &h.finalize().to_hex()[..12]))
}

/// A file's bytes, or a folder's files by name (names included), into `h`.
fn hash_into(h: &mut blake3::Hasher, path: &Path) -> std::io::Result<()> {
    if !path.is_dir() {
        h.update_reader(std::fs::File::open(path)?)?;
        return Ok(());
    }
    let mut entries = std::fs::read_dir(path)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        h.update(e.file_name().as_encoded_bytes());
        hash_into(h, &e.path())?;
    }
    Ok(())
}

pub(super) fn serve(env: &Env, a: Args) -> Result<i32, Failure> {
    let addr = super::socket_addr(&a.host, a.port)?;
    let scratch =
        tempfile::Builder::new().prefix("orchestrate-serve-").tempdir().context("creating a temporary folder")?;
    let (model, tokenizer, default_name, created) = match (&a.model, &a.pipeline, &a.target) {
        (Some(m), _, _) => {
            // Given, else beside the model (a .gguf file), else inside it (a checkpoint folder).
            let beside = m.with_file_name("tokenizer.json");
            let tok = a.tokenizer.clone().unwrap_or(if beside.exists() { beside } else { m.join("tokenizer.json") });
            let name = m.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
            (m.clone(), tok, name, modified(m))
        }
        (None, Some(pipeline), Some(target)) => {
            let pa = PipelineArgs { pipeline: pipeline.clone(), sets: a.sets.clone() };
            let (m, t, created) = match &a.run {
                Some(spec) => from_run(env, &pa, target, spec, scratch.path())?,
                None => from_store(env, &pa, target, scratch.path())?,
            };
            let t = match &a.tokenizer {
                Some(given) => given.clone(),
                None => t?,
            };
            (m, t, target.clone(), created)
        }
        _ => {
            return Err(Diagnostic::new("E-CLI", "serve needs PIPELINE STAGE[.OUTPUT], or --model PATH")
                .help("orchestrate serve pipelines/phase4.yaml teacher   |   orchestrate serve --model ckpt/ --tokenizer tokenizer.json")
                .into())
        }
    };
    let loaded = orchestrate_serve::load(&model, &tokenizer).map_err(|e| anyhow!(e))?;
    let fingerprint = fingerprint(&model, &tokenizer)?;
    let kind = if loaded.decoder.batches() { "Itera-Lite, batched decoding" } else { "Transformer" };
    let name = a.name.clone().unwrap_or(default_name);
    let limits = orchestrate_serve::Limits {
        max_tokens: a.max_tokens,
        max_batch: a.max_batch.max(1),
        queue: a.queue,
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let listener = super::listen(addr).await?;
        let bound = listener.local_addr()?;
        // One write, flushed: whoever reads the address may close the pipe after this line, and
        // nothing more goes to stdout.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stdout(),
            "serving `{name}` ({kind}, context {} tokens) on http://{bound}/v1\n\
             endpoints: /v1/models /v1/completions /v1/chat/completions /health /metrics — Ctrl-C or SIGTERM stops",
            loaded.max_seq_len
        );
        let _ = std::io::stdout().flush();
        let card = orchestrate_serve::Card { name, fingerprint, created };
        orchestrate_serve::serve(listener, loaded, card, limits, shutdown_signal()).await.map_err(|e| anyhow!(e))?;
        eprintln!("stopped: requests in flight finished");
        Ok::<_, anyhow::Error>(())
    })?;
    drop(scratch);
    Ok(0)
}

/// The first SIGINT or SIGTERM.
pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
