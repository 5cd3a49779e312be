//! The `benchmark` stage: every model it is given, measured the same way on this host.
//!
//! Inputs: `tokenizer`, `valid`, and any number of models, each input named by the label it
//! gets in the tables: a checkpoint folder (`train`/`distill` output), a quantized `model.gguf`,
//! or an `onnx_export` `graphs/` folder (measured in tract and in ONNX Runtime, one row each).
//! Outputs `benchmark.json` (host + one record per model/runtime) and `benchmark.csv` (one row
//! each). Declared non-deterministic: it is all timings.

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use energy_meter::cpu_seconds;
use itera_models::accounting::{forward_flops_per_token, param_counts, weight_matmul_macs};
use itera_models::measure::{forward_rate, generate_rate, quantile, Rate};
use itera_models::training::{encode, eval_windows, load_tokenizer};
use itera_models::{Model, ModelConfig};
use onnx_runtime::{greedy, Engine, Input, StepLayout};
use serde_json::{json, Value};
use stage_api::{Context, InputSpec, ParamError, Params, Stage, StageContext, StageError, StageProfile};

const KNOWN: &[&str] = &["seq_len", "batch", "runs", "generate", "eval_tokens", "runtimes", "seed"];

pub struct BenchmarkStage;

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub seq_len: usize,
    pub batch: usize,
    pub runs: usize,
    pub generate: usize,
    pub eval_tokens: usize,
    pub runtimes: Vec<String>,
}

pub fn settings(p: &Params) -> Result<Settings, ParamError> {
    stage_api::check_known_params(p, KNOWN, "benchmark")?;
    let u = |k: &str, d: u64| stage_api::param_u64(p, k, d).map(|v| v as usize);
    let runtimes =
        onnx_runtime::parse_runtimes(p.param("runtimes")).map_err(|m| ParamError::new("params.runtimes", m))?;
    let s = Settings {
        seq_len: u("seq_len", 128)?,
        batch: u("batch", 16)?,
        runs: u("runs", 5)?,
        generate: u("generate", 112)?,
        eval_tokens: u("eval_tokens", 65_536)?,
        runtimes,
    };
    if s.seq_len < 2 || s.batch == 0 || s.runs == 0 {
        return Err(ParamError::new("params", "`seq_len` must be ≥ 2, `batch` and `runs` ≥ 1"));
    }
    Ok(s)
}

/// Start a model's memory measurement from what is live now: freed memory is handed back to
/// the kernel first (the stage keeps freed blocks for speed, `M_TRIM_THRESHOLD`, so without
/// this a small model measured after a large one would report the large one's peak), then the
/// kernel's peak-RSS mark is reset (Linux `clear_refs` 5) for `VmHWM` to be read afterwards.
fn reset_peak_rss() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; no live memory moves.
    unsafe {
        libc::malloc_trim(0);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

fn rate(r: &Rate) -> Value {
    json!({"median": r.median, "min": r.min, "max": r.max, "runs": r.runs})
}

fn bytes_on_disk(path: &Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok()).filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
        })
        .unwrap_or(0)
}

struct Data {
    windows: Vec<Vec<u32>>,
    bytes_per_token: f64,
    prompt: Vec<u32>,
}

/// Logits of a batch of windows: (token ids, batch size) → flat logits.
type LogitsFn<'a> = dyn FnMut(&[u32], usize) -> Result<Vec<f32>, StageError> + 'a;

/// Loss over the windows (batches of `batch`), from a function giving logits for (batch, seq) ids.
fn loss_over(data: &Data, batch: usize, seq: usize, vocab: usize, f: &mut LogitsFn) -> Result<f64, StageError> {
    let (mut total, mut n) = (0.0, 0usize);
    for chunk in data.windows.chunks(batch) {
        let ids: Vec<u32> = chunk.iter().flatten().copied().collect();
        let logits = f(&ids, chunk.len())?;
        let (ce, k) = onnx_runtime::next_token_nll(&logits, &ids, chunk.len(), seq, vocab);
        total += ce;
        n += k;
    }
    Ok(total / n.max(1) as f64)
}

fn quality(loss: f64, data: &Data) -> Value {
    json!({"val_loss": loss, "val_perplexity": loss.exp(), "bits_per_byte": loss / data.bytes_per_token / std::f64::consts::LN_2})
}

fn native_record(label: &str, path: &Path, s: &Settings, data: &Data, threads: usize) -> Result<Value, StageError> {
    reset_peak_rss();
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    let mut model = Model::load_any(path).context(|| format!("loading the model {}", path.display()))?;
    let scheme = model.quant_scheme();
    let config = model.config.clone();
    let seq = s.seq_len.min(config.max_seq_len());
    let vocab = config.vocab_size();
    let x: Vec<u32> = data.windows.iter().flatten().copied().cycle().take(s.batch * seq).collect();
    let fwd = Tensor::from_vec(x, (s.batch, seq), &Device::Cpu)
        .and_then(|x| forward_rate(&model, &x, s.runs))
        .context(|| "timing the forward".into())?;
    let new_tokens = s.generate.min(config.max_seq_len().saturating_sub(data.prompt.len())).max(1);
    let (gen, lat) =
        generate_rate(&model, &data.prompt, new_tokens, s.runs.min(3)).context(|| "timing generation".into())?;
    let loss = loss_over(data, s.batch, seq, vocab, &mut |ids, b| {
        let logits = Tensor::from_vec(ids.to_vec(), (b, seq), &Device::Cpu)
            .and_then(|t| model.forward(&t, None))
            .and_then(|o| o.logits.flatten_all())
            .and_then(|l| l.to_vec1());
        logits.context(|| "forward for the validation loss".into())
    })?;
    let wall = wall0.elapsed().as_secs_f64();
    let counts = param_counts(&config);
    let record = json!({
        "label": label,
        "runtime": "native",
        "weights": scheme.map(|s| s.name()).unwrap_or("f32"),
        "model": config.name(),
        "params": counts,
        "bytes_on_disk": bytes_on_disk(path),
        "flops_per_token": forward_flops_per_token(&config, seq.div_ceil(2)),
        "weight_matmul_flops_per_token": 2 * weight_matmul_macs(&config, false),
        "forward_tokens_per_s": rate(&fwd),
        "forward_shape": [s.batch, seq],
        "generate_tokens_per_s": rate(&gen),
        "latency_ms_p50": 1e3 * quantile(&lat, 0.5),
        "latency_ms_p95": 1e3 * quantile(&lat, 0.95),
        "generate": {"prompt": data.prompt.len(), "new_tokens": new_tokens},
        "peak_rss_bytes": peak_rss_bytes(),
        "cpu_utilisation": (cpu_seconds() - cpu0) / wall.max(1e-9) / threads as f64,
        "threads": threads,
        "quality": quality(loss, data),
    });
    drop(model);
    Ok(record)
}

fn onnx_records(label: &str, dir: &Path, s: &Settings, data: &Data, threads: usize) -> Result<Vec<Value>, StageError> {
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("export.json"))
            .map_err(|e| StageError::io(format!("reading {}/export.json", dir.display()), e))?,
    )
    .map_err(|e| StageError::failed(format!("{}/export.json: {e}", dir.display())))?;
    let config: ModelConfig = serde_json::from_value(manifest["model"].clone())
        .map_err(|e| StageError::failed(format!("{}/export.json: model config: {e}", dir.display())))?;
    let full = dir.join("model.onnx");
    let step = Some(dir.join("step.onnx")).filter(|p| p.exists());
    let layout = match (&config, &step) {
        (ModelConfig::IteraLite(c), Some(_)) => {
            Some(StepLayout { layers: c.n_layers, conv: vec![c.d_conv - 1, c.d_inner()], ssm: vec![c.d_state] })
        }
        _ => None,
    };
    let seq = s.seq_len.min(config.max_seq_len());
    let vocab = config.vocab_size();
    let graph_macs = onnx_runtime::weight_matmul_macs(&full).context(|| format!("reading {}", full.display()))?;
    let formula_macs = weight_matmul_macs(&config, true);
    let mut out = Vec::new();
    for runtime in &s.runtimes {
        reset_peak_rss();
        let (cpu0, wall0) = (cpu_seconds(), Instant::now());
        let open = |p: &Path| if runtime == "tract" { Engine::tract(p) } else { Engine::ort(p, threads) };
        let mut engine = open(&full).map_err(|e| StageError::failed(format!("{label}: {runtime}: {e}")))?;
        let ids: Vec<i64> =
            data.windows.iter().flatten().copied().cycle().take(s.batch * seq).map(|v| v as i64).collect();
        let input = [("input_ids", Input::I64(vec![s.batch, seq], ids))];
        engine.run(&input).context(|| format!("warm-up run in {runtime}"))?;
        let mut v = Vec::new();
        for _ in 0..s.runs {
            let t = Instant::now();
            engine.run(&input).context(|| format!("timed run in {runtime}"))?;
            v.push((s.batch * seq) as f64 / t.elapsed().as_secs_f64().max(1e-9));
        }
        let loss = loss_over(data, s.batch, seq, vocab, &mut |ids, b| {
            let o = engine
                .run(&[("input_ids", Input::I64(vec![b, seq], ids.iter().map(|&v| v as i64).collect()))])
                .context(|| format!("validation loss in {runtime}"))?;
            o.into_iter()
                .find(|o| o.name == "logits")
                .map(|o| o.data)
                .ok_or_else(|| StageError::failed("no logits output"))
        })?;
        let new_tokens = s.generate.min(config.max_seq_len().saturating_sub(data.prompt.len())).max(1);
        let gen_t0 = Instant::now();
        let (gen_engine_tokens, lat) = match (&step, &layout) {
            (Some(p), Some(l)) => {
                let mut e = open(p).context(|| format!("opening {} in {runtime}", p.display()))?;
                greedy(&mut e, Some(l), vocab, &data.prompt, new_tokens)
                    .context(|| format!("generation in {runtime}"))?
            }
            _ => greedy(&mut engine, None, vocab, &data.prompt, new_tokens)
                .context(|| format!("generation in {runtime}"))?,
        };
        let gen_wall = gen_t0.elapsed().as_secs_f64();
        let wall = wall0.elapsed().as_secs_f64();
        let fwd = Rate { median: quantile(&v, 0.5), min: quantile(&v, 0.0), max: quantile(&v, 1.0), runs: v.len() };
        out.push(json!({
            "label": format!("{label}@{runtime}"),
            "runtime": runtime,
            "weights": manifest["quantization"].as_str().unwrap_or("f32"),
            "model": config.name(),
            "params": param_counts(&config),
            "bytes_on_disk": bytes_on_disk(&full),
            "flops_per_token": forward_flops_per_token(&config, seq.div_ceil(2)),
            "weight_matmul_flops_per_token": 2 * graph_macs,
            "flops_cross_check": {"graph_weight_matmul_macs": graph_macs, "formula_weight_matmul_macs_all_experts": formula_macs, "equal": graph_macs == formula_macs,
                "note": "the graph computes every expert (dense MoE export); the native model and flops_per_token count the top-k"},
            "forward_tokens_per_s": rate(&fwd),
            "forward_shape": [s.batch, seq],
            // New tokens ÷ wall time including the prompt's prefill, as for native models.
            "generate_tokens_per_s": {"median": gen_engine_tokens.len() as f64 / gen_wall.max(1e-9)},
            "generate_method": if layout.is_some() { "step graph with recurrent state" } else { "full graph re-run on the growing prefix" },
            "latency_ms_p50": 1e3 * quantile(&lat, 0.5),
            "latency_ms_p95": 1e3 * quantile(&lat, 0.95),
            "generate": {"prompt": data.prompt.len(), "new_tokens": new_tokens},
            "peak_rss_bytes": peak_rss_bytes(),
            "cpu_utilisation": (cpu_seconds() - cpu0) / wall.max(1e-9) / if runtime == "tract" { 1.0 } else { threads as f64 },
            "threads": if runtime == "tract" { 1 } else { threads },
            "quality": quality(loss, data),
        }));
    }
    Ok(out)
}

fn csv_row(r: &Value) -> String {
    let f = |v: &Value| match v {
        Value::Null => String::new(),
        Value::String(s) => s.replace(',', ";"),
        other => other.to_string(),
    };
    [
        f(&r["label"]),
        f(&r["model"]),
        f(&r["runtime"]),
        f(&r["weights"]),
        f(&r["params"]["total"]),
        f(&r["params"]["embedding"]),
        f(&r["params"]["non_embedding"]),
        f(&r["bytes_on_disk"]),
        f(&r["flops_per_token"]),
        f(&r["forward_tokens_per_s"]["median"]),
        f(&r["forward_tokens_per_s"]["min"]),
        f(&r["forward_tokens_per_s"]["max"]),
        f(&r["generate_tokens_per_s"]["median"]),
        f(&r["latency_ms_p50"]),
        f(&r["latency_ms_p95"]),
        f(&r["peak_rss_bytes"]),
        f(&r["cpu_utilisation"]),
        f(&r["quality"]["val_loss"]),
        f(&r["quality"]["val_perplexity"]),
        f(&r["quality"]["bits_per_byte"]),
    ]
    .join(",")
}

/// A model's headline figures as stage metrics, so `runs --metric`, `compare` and
/// `--fail-on-regress` follow them across runs: `LABEL_forward_tok_s` and so on, named as the
/// evaluate stage names its own (`@` in an ONNX label becomes `_`). Absent figures are left out.
fn metrics_of(r: &Value) -> Vec<(String, Value)> {
    let label = r["label"].as_str().unwrap_or("model").replace('@', "_");
    [
        ("forward_tok_s", &r["forward_tokens_per_s"]["median"]),
        ("generate_tok_s", &r["generate_tokens_per_s"]["median"]),
        ("latency_ms_p50", &r["latency_ms_p50"]),
        ("bytes_on_disk", &r["bytes_on_disk"]),
        ("peak_rss_bytes", &r["peak_rss_bytes"]),
        ("val_loss", &r["quality"]["val_loss"]),
    ]
    .into_iter()
    .filter(|(_, v)| v.is_number())
    .map(|(k, v)| (format!("{label}_{k}"), v.clone()))
    .collect()
}

const CSV_HEADER: &str = concat!(
    "label,model,runtime,weights,params,",
    "embedding_params,non_embedding_params,bytes_on_disk,flops_per_token,forward_tok_s_median,",
    "forward_tok_s_min,forward_tok_s_max,generate_tok_s,latency_ms_p50,latency_ms_p95,",
    "peak_rss_bytes,cpu_utilisation,val_loss,val_perplexity,bits_per_byte",
);

impl Stage for BenchmarkStage {
    fn kind(&self) -> &'static str {
        "benchmark"
    }
    fn describe(&self) -> &'static str {
        "size, FLOPs, forward/generation speed, latency, memory, CPU use and quality of every model \
            input (native, GGUF, ONNX in tract and ORT) → benchmark.json, benchmark.csv"
    }

    fn check(&self, params: &Params, io: &InputSpec) -> Result<StageProfile, ParamError> {
        settings(params)?;
        for n in ["tokenizer", "valid"] {
            if !io.inputs.iter().any(|i| i == n) {
                return Err(ParamError::new("inputs", format!("the benchmark stage needs an input named `{n}`"))
                    .with_help(
                        "inputs: {tokenizer: \
                    vocab.tokenizer.json, valid: corpus.valid.txt, itera: itera.best, int8: \
                    int8.model.gguf, onnx: export.graphs}",
                    ));
            }
        }
        if io.inputs.len() < 3 {
            return Err(ParamError::new(
                "inputs",
                "give the benchmark stage at least one model input besides `tokenizer` and `valid`",
            ));
        }
        Ok(StageProfile {
            default_threads: 1,
            deterministic: false,
            required_outputs: vec!["benchmark.json".into(), "benchmark.csv".into()],
            volatile_outputs: vec![],
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        ctx.metric("simd_path", itera_models::simd_path());
        let s = settings(ctx.params())?;
        let threads = ctx.threads().max(1) as usize;
        let tok = load_tokenizer(ctx.input("tokenizer")?)?;
        let text = stage_api::read_text(ctx.input("valid")?)?;
        let ids = encode(&tok, &text)?;
        if ids.len() < s.seq_len + 16 {
            return Err(StageError::failed(format!(
                "the validation text has {} tokens; the benchmark needs at least seq_len + 16 = {}",
                ids.len(),
                s.seq_len + 16
            )));
        }
        let windows: Vec<Vec<u32>> =
            eval_windows(&ids, s.seq_len, s.eval_tokens.max(s.seq_len)).into_iter().map(<[u32]>::to_vec).collect();
        let data = Data { windows, bytes_per_token: text.len() as f64 / ids.len() as f64, prompt: ids[..16].to_vec() };
        let mut names: Vec<String> =
            ctx.spec().inputs.keys().filter(|k| *k != "tokenizer" && *k != "valid").cloned().collect();
        names.sort();
        let mut records = Vec::new();
        for name in &names {
            ctx.check_cancelled()?;
            let path = ctx.input(name)?.to_path_buf();
            ctx.progress(&format!("measuring {name}"));
            if path.join("model.onnx").exists() {
                records.extend(onnx_records(name, &path, &s, &data, threads)?);
            } else {
                // Quality uses windows of the model's own max length when it is shorter.
                records.push(native_record(name, &path, &s, &data, threads)?);
            }
        }
        let report = json!({
            "host": stage_api::host::describe(),
            "settings": {"seq_len": s.seq_len, "batch": s.batch, "runs": s.runs, "generate": s.generate, "eval_tokens": data.windows.len() * s.seq_len, "threads": threads},
            "method": "forward: median (min, max) of `runs` timed full-sequence forwards at batch × \
                seq_len after one warm-up; generation: batch 1, greedy, 16-token prompt, tokens/s = new \
                tokens ÷ wall time including the prompt's prefill; latency per new token p50/p95; peak \
                RSS: VmHWM from the memory live when the model's measurement starts (freed memory \
                returned to the kernel and the mark reset before each model); CPU utilisation: \
                process CPU seconds / wall / threads over the model's whole measurement; quality: \
                next-token loss over non-overlapping seq_len validation windows",
            "models": records,
        });
        stage_api::write_json(ctx.output("benchmark.json")?, &report)?;
        let mut csv = String::from(CSV_HEADER);
        csv.push('\n');
        for r in report["models"].as_array().into_iter().flatten() {
            csv.push_str(&csv_row(r));
            csv.push('\n');
        }
        std::fs::write(ctx.output("benchmark.csv")?, csv).map_err(|e| StageError::io("writing benchmark.csv", e))?;
        ctx.metric("models", report["models"].as_array().map(|a| a.len()).unwrap_or(0));
        for (name, value) in report["models"].as_array().into_iter().flatten().flat_map(metrics_of) {
            ctx.metric(name, value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
