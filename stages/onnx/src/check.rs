//! The cross-check behind `onnx_check`.
//!
//! Tolerances (recorded in `crosscheck.json`), tiered as tract's own test ladder:
//! - every graph against the native forward with the same arithmetic (for a quantized model:
//!   its dequantized weights with f32 activations, which is what the exported graph computes):
//!   max |Δlogit| ≤ 1e-4, identical argmax on ≥ 99.9 % of positions, validation loss equal
//!   within 1e-4 relative, greedy generation identical;
//! - a quantized graph's validation loss within 0.5 % of the native INT8/INT4 model (integer
//!   kernels, int8 activations).

use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use itera_models::measure::quantile;
use itera_models::training::{encode, eval_windows, load_tokenizer};
use itera_models::{Model, ModelConfig, Sampling};
use serde_json::json;
use stage_api::{Context, ParamError, Params, StageContext, StageError};

use onnx_runtime::{greedy, onnxruntime_path, Engine, Input, Output, StepLayout};

pub const MAX_ABS: f32 = 1e-4;
pub const ARGMAX_AGREEMENT: f64 = 0.999;
pub const LOSS_REL: f64 = 1e-4;
pub const QUANT_LOSS_REL: f64 = 0.005;

const KNOWN: &[&str] = &["seq_len", "batch", "batches", "eval_tokens", "generate", "bench_runs", "runtimes", "seed"];

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub seq_len: Option<usize>,
    pub batch: usize,
    pub batches: usize,
    pub eval_tokens: usize,
    pub generate: usize,
    pub bench_runs: usize,
    pub runtimes: Vec<String>,
}

pub fn settings(p: &Params) -> Result<Settings, ParamError> {
    stage_api::check_known_params(p, KNOWN, "onnx_check")?;
    let u = |k: &str, d: u64| stage_api::param_u64(p, k, d).map(|v| v as usize);
    let runtimes =
        onnx_runtime::parse_runtimes(p.param("runtimes")).map_err(|m| ParamError::new("params.runtimes", m))?;
    if runtimes.is_empty() {
        return Err(ParamError::new("params.runtimes", "list at least one runtime"));
    }
    let s = Settings {
        seq_len: p.param("seq_len").map(|_| u("seq_len", 128)).transpose()?,
        batch: u("batch", 4)?,
        batches: u("batches", 4)?,
        eval_tokens: u("eval_tokens", 16_384)?,
        generate: u("generate", 64)?,
        bench_runs: u("bench_runs", 3)?,
        runtimes,
    };
    if s.seq_len.is_some_and(|l| l < 2) {
        return Err(ParamError::new("params.seq_len", "`seq_len` must be at least 2"));
    }
    if s.batch == 0 || s.batches == 0 || s.bench_runs == 0 {
        return Err(ParamError::new("params", "`batch`, `batches` and `bench_runs` must be at least 1"));
    }
    Ok(s)
}

/// One comparison input: (batch, seq) ids and a label.
struct Case {
    label: String,
    batch: usize,
    seq: usize,
    ids: Vec<u32>,
}

fn native_logits(model: &Model, c: &Case) -> Result<Vec<f32>, StageError> {
    let logits = Tensor::from_vec(c.ids.clone(), (c.batch, c.seq), &Device::Cpu)
        .and_then(|x| model.forward(&x, None))
        .and_then(|o| o.logits.flatten_all())
        .and_then(|l| l.to_vec1());
    logits.context(|| format!("native forward on {}", c.label))
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
}

#[derive(Default)]
struct Agreement {
    max_abs: f32,
    sum_abs: f64,
    count: usize,
    max_rel: f32,
    same_argmax: usize,
    positions: usize,
    worst: Option<(String, usize, usize, usize)>,
}

impl Agreement {
    fn add(&mut self, c: &Case, reference: &[f32], got: &[f32], vocab: usize) {
        for (i, (&r, &g)) in reference.iter().zip(got).enumerate() {
            let d = (r - g).abs();
            if d > self.max_abs || self.worst.is_none() {
                self.max_abs = self.max_abs.max(d);
                let pos = i / vocab;
                self.worst = Some((c.label.clone(), pos / c.seq, pos % c.seq, i % vocab));
            }
            self.max_rel = self.max_rel.max(d / r.abs().max(1e-3));
            self.sum_abs += d as f64;
            self.count += 1;
        }
        for p in 0..c.batch * c.seq {
            let (a, b) = (&reference[p * vocab..(p + 1) * vocab], &got[p * vocab..(p + 1) * vocab]);
            self.same_argmax += usize::from(argmax(a) == argmax(b));
            self.positions += 1;
        }
    }
}

fn logits_of(outputs: &[Output]) -> Result<&Output, StageError> {
    outputs
        .iter()
        .find(|o| o.name == "logits")
        .ok_or_else(|| StageError::failed("the graph has no output named `logits`"))
}

fn ids_input(c: &Case) -> Input {
    Input::I64(vec![c.batch, c.seq], c.ids.iter().map(|&v| v as i64).collect())
}

/// The step-graph state layout of a model (Itera-Lite only).
pub fn step_layout(config: &ModelConfig) -> Option<StepLayout> {
    match config {
        ModelConfig::IteraLite(c) => {
            Some(StepLayout { layers: c.n_layers, conv: vec![c.d_conv - 1, c.d_inner()], ssm: vec![c.d_state] })
        }
        ModelConfig::Transformer(_) => None,
    }
}

fn generate(
    engine: &mut Engine,
    step: bool,
    config: &ModelConfig,
    prompt: &[u32],
    n: usize,
) -> Result<(Vec<u32>, Vec<f64>, f64), StageError> {
    let layout = if step { step_layout(config) } else { None };
    let t = Instant::now();
    let (tokens, latencies) = greedy(engine, layout.as_ref(), config.vocab_size(), prompt, n)
        .context(|| "greedy generation in the graph".into())?;
    Ok((tokens, latencies, t.elapsed().as_secs_f64()))
}

struct Graphs {
    full: std::path::PathBuf,
    step: Option<std::path::PathBuf>,
}

fn graphs(dir: &Path) -> Result<Graphs, StageError> {
    let full = dir.join("model.onnx");
    if !full.exists() {
        return Err(StageError::failed(format!(
            "{} has no model.onnx; wire an onnx_export stage's `graphs` output here",
            dir.display()
        )));
    }
    let step = Some(dir.join("step.onnx")).filter(|p| p.exists());
    Ok(Graphs { full, step })
}

pub fn run(ctx: &mut StageContext) -> Result<(), StageError> {
    let s = settings(ctx.params())?;
    let threads = ctx.threads().max(1) as usize;
    let g = graphs(ctx.input("graphs")?)?;
    let native = Native::measure(ctx, &s)?;
    ctx.check_cancelled()?;

    let mut entries = Vec::new();
    let mut failures = Vec::new();
    for runtime in &s.runtimes {
        for (graph_kind, path) in [("full", Some(&g.full)), ("step", g.step.as_ref())] {
            let Some(path) = path else { continue };
            let mut engine = match runtime.as_str() {
                "tract" => Engine::tract(path),
                _ => Engine::ort(path, threads),
            }
            .map_err(|e| {
                StageError::failed(format!("{}: {runtime} could not load {}: {e}", native.label, path.display()))
            })?;
            let entry = if graph_kind == "step" {
                native.check_step_graph(&mut engine, runtime, &mut failures)?
            } else {
                let entry =
                    native.check_full_graph(&mut engine, runtime, s.bench_runs, g.step.is_none(), &mut failures)?;
                ctx.check_cancelled()?;
                entry
            };
            entries.push(entry);
        }
    }
    let report = native.report(entries, &failures, threads);
    stage_api::write_json(ctx.output("crosscheck.json")?, &report)?;
    ctx.metric("pass", failures.is_empty());
    ctx.metric("native_val_loss", native.loss);
    if !failures.is_empty() {
        return Err(StageError::failed(format!(
            "the exported model disagrees with the native one:\n  {}",
            failures.join("\n  ")
        )));
    }
    Ok(())
}

/// The model's input windows: `eval`, every validation window in batches, which the losses and
/// speeds are scored on; `compared`, the first batches and two edge shapes, whose logits are
/// compared value by value; the prompt of the generation check.
struct Inputs {
    seq_len: usize,
    eval: Vec<Case>,
    compared: Vec<Case>,
    prompt: Vec<u32>,
}

fn inputs(ctx: &StageContext, s: &Settings, max_seq: usize) -> Result<Inputs, StageError> {
    let seq_len = s.seq_len.unwrap_or(128).min(max_seq);
    let tok = load_tokenizer(ctx.input("tokenizer")?)?;
    let valid_text = stage_api::read_text(ctx.input("valid")?)?;
    let valid_ids = encode(&tok, &valid_text)?;
    let windows = eval_windows(&valid_ids, seq_len, s.eval_tokens.max(seq_len));
    if windows.is_empty() || valid_ids.len() < seq_len {
        return Err(StageError::failed(format!(
            "the validation text has {} tokens, fewer than seq_len {seq_len}",
            valid_ids.len()
        )));
    }
    let case = |label: String, batch: usize, seq: usize, ids: Vec<u32>| Case { label, batch, seq, ids };
    let eval: Vec<Case> = (windows.chunks(s.batch).enumerate())
        .map(|(i, c)| {
            case(format!("validation batch {i}"), c.len(), seq_len, c.iter().flat_map(|w| w.iter().copied()).collect())
        })
        .collect();
    let mut compared: Vec<Case> =
        eval.iter().take(s.batches).map(|c| case(c.label.clone(), c.batch, c.seq, c.ids.clone())).collect();
    compared.push(case("edge: batch 1, seq 1".into(), 1, 1, vec![valid_ids[0]]));
    if valid_ids.len() >= max_seq {
        compared.push(case(format!("edge: batch 1, max seq {max_seq}"), 1, max_seq, valid_ids[..max_seq].to_vec()));
    }
    let prompt = valid_ids[..16.min(valid_ids.len())].to_vec();
    Ok(Inputs { seq_len, eval, compared, prompt })
}

/// Validation loss and tokens/s of `logits` over the cases, scored as every runtime is.
fn score(
    eval: &[Case],
    vocab: usize,
    logits: &mut dyn FnMut(&Case) -> Result<Vec<f32>, StageError>,
) -> Result<(f64, f64), StageError> {
    let (mut total, mut n, mut secs) = (0.0, 0usize, 0.0);
    for c in eval {
        let t = Instant::now();
        let l = logits(c)?;
        secs += t.elapsed().as_secs_f64();
        let (ce, k) = onnx_runtime::next_token_nll(&l, &c.ids, c.batch, c.seq, vocab);
        total += ce;
        n += k;
    }
    let tokens: usize = eval.iter().map(|c| c.batch * c.seq).sum();
    Ok((total / n.max(1) as f64, tokens as f64 / secs.max(1e-9)))
}

/// What the graphs are held to: the native model on the same inputs. For a quantized model the
/// reference is its dequantized weights in f32 (the graph's arithmetic); `loss` and `tps` are
/// the model as it runs natively (integer kernels).
struct Native {
    label: String,
    config: ModelConfig,
    quantization: Option<&'static str>,
    inputs: Inputs,
    reference_logits: Vec<Vec<f32>>,
    loss: f64,
    tps: f64,
    reference_loss: f64,
    reference_tps: f64,
    generated: Vec<u32>,
}

/// A full graph's agreement with the reference, and its validation loss against both natives.
struct Figures {
    agree: Agreement,
    agreement: f64,
    loss: f64,
    loss_rel: f64,
    quant_rel: f64,
    /// Where the largest logit difference is.
    worst: String,
}

impl Figures {
    fn of(agree: Agreement, loss: f64, native: &Native) -> Figures {
        let agreement = agree.same_argmax as f64 / agree.positions.max(1) as f64;
        let loss_rel = (loss - native.reference_loss).abs() / native.reference_loss.abs().max(1e-12);
        let quant_rel = (loss - native.loss).abs() / native.loss.abs().max(1e-12);
        let w = agree.worst.clone().unwrap_or_default();
        let worst = format!("{} (sequence {}, position {}, vocab {})", w.0, w.1, w.2, w.3);
        Figures { agree, agreement, loss, loss_rel, quant_rel, worst }
    }
}

impl Native {
    fn measure(ctx: &StageContext, s: &Settings) -> Result<Native, StageError> {
        let model_path = ctx.input("model")?.to_path_buf();
        let loading = || format!("loading the model {}", model_path.display());
        let mut native = Model::load_any(&model_path).context(loading)?;
        let scheme = native.quant_scheme();
        let reference = match scheme {
            Some(_) => {
                let mut r = Model::load_any(&model_path).context(loading)?;
                r.use_dequantized_weights();
                Some(r)
            }
            None => None,
        };
        let reference_model = reference.as_ref().unwrap_or(&native);
        let config = native.config.clone();
        let (vocab, max_seq) = (config.vocab_size(), config.max_seq_len());
        let inputs = inputs(ctx, s, max_seq)?;
        let reference_logits =
            inputs.compared.iter().map(|c| native_logits(reference_model, c)).collect::<Result<_, _>>()?;
        let (loss, tps) = score(&inputs.eval, vocab, &mut |c| native_logits(&native, c))?;
        let (reference_loss, reference_tps) = match &reference {
            Some(r) => score(&inputs.eval, vocab, &mut |c| native_logits(r, c))?,
            None => (loss, tps),
        };
        let n_gen = s.generate.min(max_seq.saturating_sub(16)).max(1);
        let generated = reference_model
            .generate(&inputs.prompt, n_gen.min(max_seq - inputs.prompt.len()), Sampling::Greedy, 0)
            .context(|| "native greedy generation".into())?;
        let label =
            format!("{}{}", model_name(&config), scheme.map(|s| format!(" ({})", s.name())).unwrap_or_default());
        let quantization = scheme.map(|s| s.name());
        Ok(Native {
            label,
            config,
            quantization,
            inputs,
            reference_logits,
            loss,
            tps,
            reference_loss,
            reference_tps,
            generated,
        })
    }

    /// The step graph (one token at a time, with state): its greedy generation must be ours.
    fn check_step_graph(
        &self,
        engine: &mut Engine,
        runtime: &str,
        failures: &mut Vec<String>,
    ) -> Result<serde_json::Value, StageError> {
        let prompt = &self.inputs.prompt;
        let (generated, lat, wall) = generate(engine, true, &self.config, prompt, self.generated.len())?;
        let identical = generated == self.generated;
        if !identical {
            let at = generated.iter().zip(&self.generated).position(|(a, b)| a != b).unwrap_or(0);
            let (got, want) = (generated.get(at).copied().unwrap_or(0), self.generated.get(at).copied().unwrap_or(0));
            failures.push(format!(
                "{}, {runtime}, step graph: greedy generation differs from native at new token {at} ({got} vs {want})",
                self.label
            ));
        }
        Ok(json!({
            "runtime": runtime, "graph": "step",
            "generation": {"prompt_tokens": prompt.len(), "new_tokens": generated.len(), "identical_to_native": identical,
                "tokens_per_s": generated.len() as f64 / wall.max(1e-9),
                "latency_ms_p50": 1e3 * quantile(&lat, 0.5), "latency_ms_p95": 1e3 * quantile(&lat, 0.95)},
            "pass": identical,
        }))
    }

    /// The full graph: logits value by value, validation loss, speed, and — when there is no
    /// step graph — greedy generation by re-running it on the growing prefix.
    fn check_full_graph(
        &self,
        engine: &mut Engine,
        runtime: &str,
        bench_runs: usize,
        generate_here: bool,
        failures: &mut Vec<String>,
    ) -> Result<serde_json::Value, StageError> {
        let vocab = self.config.vocab_size();
        let agree = self.agreement(engine, runtime)?;
        let (loss, tps) = score(&self.inputs.eval, vocab, &mut |c| {
            let o = engine.run(&[("input_ids", ids_input(c))]).context(|| format!("{runtime} on {}", c.label))?;
            Ok(logits_of(&o)?.data.clone())
        })?;
        let mut bench = Vec::new();
        for _ in 0..bench_runs {
            let c = &self.inputs.eval[0];
            let t = Instant::now();
            engine.run(&[("input_ids", ids_input(c))]).context(|| format!("{runtime} on {}", c.label))?;
            bench.push((c.batch * c.seq) as f64 / t.elapsed().as_secs_f64().max(1e-9));
        }
        let f = Figures::of(agree, loss, self);
        let found = self.judge(runtime, &f);
        let eval0 = &self.inputs.eval[0];
        let mut entry = json!({
            "runtime": runtime, "graph": "full",
            "cases": self.inputs.compared.iter().map(|c| c.label.clone()).collect::<Vec<_>>(),
            "max_abs_diff": f.agree.max_abs, "mean_abs_diff": f.agree.sum_abs / f.agree.count.max(1) as f64,
            "max_rel_diff": f.agree.max_rel, "argmax_agreement": f.agreement, "worst": f.worst,
            "val_loss": loss, "val_loss_native": self.reference_loss, "val_loss_rel_diff": f.loss_rel,
            "tokens_per_s": tps,
            "tokens_per_s_bench": {"median": quantile(&bench, 0.5), "min": quantile(&bench, 0.0), "max": quantile(&bench, 1.0), "shape": [eval0.batch, eval0.seq]},
            "pass": found.is_empty(),
        });
        failures.extend(found);
        if self.quantization.is_some() {
            entry["val_loss_native_quantized"] = json!(self.loss);
            entry["val_loss_rel_diff_vs_native_quantized"] = json!(f.quant_rel);
        }
        if generate_here {
            let prompt = &self.inputs.prompt;
            let (generated, _, wall) = generate(engine, false, &self.config, prompt, self.generated.len())?;
            let identical = generated == self.generated;
            if !identical {
                entry["pass"] = json!(false);
                failures.push(format!("{}, {runtime}, full graph: greedy generation differs from native", self.label));
            }
            entry["generation"] = json!({"prompt_tokens": prompt.len(), "new_tokens": generated.len(), "identical_to_native": identical,
                "tokens_per_s": generated.len() as f64 / wall.max(1e-9), "method": "full graph re-run on the growing prefix (no step graph)"});
        }
        Ok(entry)
    }

    /// The graph's logits against the reference's, on every compared case.
    fn agreement(&self, engine: &mut Engine, runtime: &str) -> Result<Agreement, StageError> {
        let vocab = self.config.vocab_size();
        let mut agree = Agreement::default();
        for (c, r) in self.inputs.compared.iter().zip(&self.reference_logits) {
            let o = (engine.run(&[("input_ids", ids_input(c))]))
                .map_err(|e| StageError::failed(format!("{}: {runtime} failed on {}: {e}", self.label, c.label)))?;
            let l = logits_of(&o)?;
            if l.shape != [c.batch, c.seq, vocab] {
                return Err(StageError::failed(format!(
                    "{}, {runtime}, full graph: logits have shape {:?}, expected [{}, {}, {vocab}]",
                    self.label, l.shape, c.batch, c.seq
                )));
            }
            agree.add(c, r, &l.data, vocab);
        }
        Ok(agree)
    }

    /// The full graph's figures held to the tolerances: what fails, one line each.
    fn judge(&self, runtime: &str, f: &Figures) -> Vec<String> {
        let (at, worst, loss) = (format!("{}, {runtime}, full graph", self.label), &f.worst, f.loss);
        let mut failures = Vec::new();
        if f.agree.max_abs > MAX_ABS || !f.agree.max_abs.is_finite() {
            failures.push(format!("{at}: max |Δlogit| {:.3e} > {MAX_ABS:.0e} at {worst}", f.agree.max_abs));
        }
        if f.agreement < ARGMAX_AGREEMENT {
            failures.push(format!(
                "{at}: argmax agrees on {:.3} % of positions (< {:.1} %); worst logit at {worst}",
                100.0 * f.agreement,
                100.0 * ARGMAX_AGREEMENT
            ));
        }
        if f.loss_rel > LOSS_REL || !loss.is_finite() {
            failures.push(format!(
                "{at}: validation loss {loss:.6} vs native {:.6} (relative {:.2e} > {LOSS_REL:.0e})",
                self.reference_loss, f.loss_rel
            ));
        }
        if self.quantization.is_some() && f.quant_rel > QUANT_LOSS_REL {
            failures.push(format!(
                "{at}: validation loss {loss:.6} vs native quantized {:.6} (relative {:.2e} > {QUANT_LOSS_REL})",
                self.loss, f.quant_rel
            ));
        }
        failures
    }

    fn report(&self, entries: Vec<serde_json::Value>, failures: &[String], threads: usize) -> serde_json::Value {
        let eval = &self.inputs.eval;
        json!({
            "model": self.label,
            "config": self.config,
            "quantization": self.quantization,
            "seq_len": self.inputs.seq_len,
            "eval_positions": eval.iter().map(|c| c.batch * (c.seq - 1)).sum::<usize>(),
            "tolerances": {
                "max_abs_diff": MAX_ABS, "argmax_agreement": ARGMAX_AGREEMENT, "val_loss_rel": LOSS_REL,
                "quantized_val_loss_rel_vs_native_quantized": QUANT_LOSS_REL,
                "reference": if self.quantization.is_some() { "native forward with the dequantized weights and f32 \
                    activations (what the graph computes); the validation loss is also held to the \
                    native quantized model (integer kernels)" } else { "native f32 forward" },
            },
            "native": {"val_loss": self.loss, "tokens_per_s": self.tps, "reference_val_loss": self.reference_loss,
                "reference_tokens_per_s": self.reference_tps, "generated": self.generated.len(), "threads": threads},
            "runtimes": entries,
            "onnxruntime_library": onnxruntime_path().map(|p| p.display().to_string()),
            "threads": {"native": threads, "onnxruntime": threads, "tract": 1},
            "pass": failures.is_empty(),
            "failures": failures,
        })
    }
}

fn model_name(c: &ModelConfig) -> &'static str {
    match c {
        ModelConfig::IteraLite(_) => "Itera-Lite",
        ModelConfig::Transformer(_) => "Transformer",
    }
}
