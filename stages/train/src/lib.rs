//! The `train` stage: next-token training of Itera-Lite or the Transformer baseline.
//!
//! Inputs `train`, `valid` (text) and `tokenizer` (tokenizer.json). Outputs `model/` (final
//! weights), `best/` (best validation loss), `metrics.csv`, `summary.json`. The same seed and
//! thread count give the same checkpoint bytes: weights come from a seeded ChaCha8 RNG in
//! sorted-name order and batches are drawn from another one.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use itera_models::accounting::{forward_flops_per_token, param_counts};
use itera_models::{Model, ModelConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use stage_api::{InputSpec, ParamError, Params, Stage, StageContext, StageError, StagePlan};
use tokenizers::Tokenizer;

pub mod data;

const KNOWN: &[&str] = &[
    "model", "preset", "overrides", "seq_len", "batch", "steps", "epochs", "lr", "min_lr_ratio", "weight_decay", "warmup", "grad_clip",
    "eval_interval", "eval_tokens", "patience", "seed",
];

pub struct TrainStage;

/// Training hyper-parameters, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Hyper {
    pub model: String,
    pub preset: String,
    pub overrides: Map<String, Value>,
    pub seq_len: usize,
    pub batch: usize,
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub lr: f64,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub warmup: usize,
    pub grad_clip: f64,
    pub eval_interval: usize,
    pub eval_tokens: usize,
    pub patience: usize,
}

fn f64_param(p: &Params, key: &str, default: f64, ok: impl Fn(f64) -> bool, what: &str) -> Result<f64, ParamError> {
    match p.param(key) {
        None => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if ok(x) => Ok(x),
            _ => Err(ParamError::new(format!("params.{key}"), format!("`{key}` must be {what}, got {v}"))),
        },
    }
}

impl Hyper {
    pub fn from_params(p: &Params) -> Result<Hyper, ParamError> {
        stage_api::check_known_params(p, KNOWN, "train")?;
        let model = match p.param("model").and_then(Value::as_str) {
            Some(m @ ("itera_lite" | "transformer")) => m.to_string(),
            Some(other) => return Err(ParamError::new("params.model", format!("unknown model `{other}`; models: itera_lite, transformer"))),
            None => return Err(ParamError::new("params", "the train stage needs `params.model` (itera_lite or transformer)")),
        };
        let preset = p.param("preset").and_then(Value::as_str).unwrap_or("tiny").to_string();
        let overrides = match p.param("overrides") {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(v) => return Err(ParamError::new("params.overrides", format!("`overrides` must be a map of config fields, got {v}"))),
        };
        // Validate the model config now (vocab size is not known yet; any positive one will do).
        ModelConfig::build(&model, &preset, 256, &overrides).map_err(|e| ParamError::new("params.preset", e.to_string()))?;
        let steps = p.param("steps").map(|_| stage_api::param_u64(p, "steps", 0)).transpose()?.map(|s| s as usize);
        let epochs = p.param("epochs").map(|_| f64_param(p, "epochs", 0.0, |x| x > 0.0, "a positive number")).transpose()?;
        if steps.is_some() == epochs.is_some() {
            return Err(ParamError::new("params", "give exactly one of `steps` or `epochs`"));
        }
        if steps == Some(0) {
            return Err(ParamError::new("params.steps", "`steps` must be at least 1"));
        }
        let h = Hyper {
            model,
            preset,
            overrides,
            seq_len: stage_api::param_u64(p, "seq_len", 128)? as usize,
            batch: stage_api::param_u64(p, "batch", 16)? as usize,
            steps,
            epochs,
            lr: f64_param(p, "lr", 3e-3, |x| x > 0.0 && x < 1.0, "in (0, 1)")?,
            min_lr_ratio: f64_param(p, "min_lr_ratio", 0.1, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?,
            weight_decay: f64_param(p, "weight_decay", 0.01, |x| x >= 0.0, "non-negative")?,
            warmup: stage_api::param_u64(p, "warmup", 50)? as usize,
            grad_clip: f64_param(p, "grad_clip", 1.0, |x| x >= 0.0, "non-negative (0 = off)")?,
            eval_interval: stage_api::param_u64(p, "eval_interval", 100)? as usize,
            eval_tokens: stage_api::param_u64(p, "eval_tokens", 32_768)? as usize,
            patience: stage_api::param_u64(p, "patience", 0)? as usize,
        };
        if h.seq_len < 2 || h.batch == 0 || h.eval_interval == 0 {
            return Err(ParamError::new("params", "seq_len must be ≥ 2, batch and eval_interval ≥ 1"));
        }
        Ok(h)
    }

    /// Learning rate at `step` (0-based): linear warmup, then cosine down to min_lr_ratio·lr.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (total.saturating_sub(self.warmup)).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + 0.5 * (self.lr - min) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

fn err(e: impl std::fmt::Display) -> StageError {
    StageError::failed(e.to_string())
}

/// Mean next-token loss over up to `max_tokens` of `ids`, in non-overlapping windows.
pub fn evaluate(model: &Model, ids: &[u32], seq_len: usize, batch: usize, max_tokens: usize) -> Result<(f64, usize), StageError> {
    let windows = data::eval_windows(ids, seq_len, max_tokens);
    if windows.is_empty() {
        return Err(StageError::failed(format!("the validation text has fewer than {seq_len} tokens; use a smaller seq_len or more validation text")));
    }
    let mut total = 0.0;
    let mut count = 0usize;
    for chunk in windows.chunks(batch) {
        let flat: Vec<u32> = chunk.iter().flat_map(|w| w.iter().copied()).collect();
        let x = Tensor::from_vec(flat, (chunk.len(), seq_len), &Device::Cpu).map_err(err)?;
        let (ce, _) = model.loss(&x, None).map_err(err)?;
        let n = chunk.len() * (seq_len - 1);
        total += ce.to_scalar::<f32>().map_err(err)? as f64 * n as f64;
        count += n;
    }
    Ok((total / count as f64, count))
}

fn clip_and_norm(grads: &mut candle_core::backprop::GradStore, vars: &[Var], max_norm: f64) -> Result<f64, StageError> {
    let mut sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr().map_err(err)?.sum_all().map_err(err)?.to_scalar::<f32>().map_err(err)? as f64;
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale).map_err(err)?);
            }
        }
    }
    Ok(norm)
}

fn read(path: &Path) -> Result<String, StageError> {
    std::fs::read_to_string(path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))
}

impl Stage for TrainStage {
    fn kind(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        1
    }
    fn describe(&self) -> &'static str {
        "train itera_lite or transformer (AdamW, warmup + cosine) → model/, best/, metrics.csv, summary.json"
    }

    fn check(&self, params: &Params, io: &InputSpec) -> Result<StagePlan, ParamError> {
        Hyper::from_params(params)?;
        for needed in ["train", "valid", "tokenizer"] {
            if !io.inputs.iter().any(|i| i == needed) {
                return Err(ParamError::new("inputs", format!("the train stage needs an input named `{needed}`"))
                    .with_help("inputs: {train: corpus.train.txt, valid: corpus.valid.txt, tokenizer: vocab.tokenizer.json}"));
            }
        }
        Ok(StagePlan {
            default_threads: 1,
            deterministic: true,
            required_outputs: vec!["model".into(), "best".into(), "metrics.csv".into(), "summary.json".into()],
            // Both record tokens/s and wall time; the weights must reproduce bit for bit.
            volatile_outputs: vec!["metrics.csv".into(), "summary.json".into()],
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let h = Hyper::from_params(ctx.params())?;
        let seed = ctx.seed();
        let t0 = Instant::now();
        let tok = Tokenizer::from_file(ctx.input("tokenizer")?).map_err(|e| StageError::failed(format!("loading tokenizer.json: {e}")))?;
        let train_text = read(ctx.input("train")?)?;
        let valid_text = read(ctx.input("valid")?)?;
        let train_ids = data::encode(&tok, &train_text)?;
        let valid_ids = data::encode(&tok, &valid_text)?;
        let vocab = tok.get_vocab_size(true);
        let config = ModelConfig::build(&h.model, &h.preset, vocab, &h.overrides).map_err(err)?;
        if h.seq_len > config.max_seq_len() {
            return Err(StageError::failed(format!("seq_len {} exceeds the model's max_seq_len {}; lower seq_len or override max_seq_len", h.seq_len, config.max_seq_len())));
        }
        if train_ids.len() <= h.seq_len {
            return Err(StageError::failed(format!("the training text has {} tokens, fewer than one window of {}", train_ids.len(), h.seq_len)));
        }
        let tokens_per_step = h.batch * h.seq_len;
        let total_steps = match (h.steps, h.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => ((e * train_ids.len() as f64) / tokens_per_step as f64).ceil().max(1.0) as usize,
            _ => return Err(StageError::failed("give exactly one of `steps` or `epochs`")),
        };
        let model = Model::new(&config, seed).map_err(err)?;
        let counts = param_counts(&config);
        let vars = model.varmap.all_vars();
        // Weight decay on matrices only; norms, biases and the SSM's A_log / D are exempt.
        let (decay, no_decay): (Vec<Var>, Vec<Var>) = vars.iter().cloned().partition(|v| v.rank() >= 2);
        let adam = |wd: f64, vs: Vec<Var>| AdamW::new(vs, ParamsAdamW { lr: h.lr, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: wd });
        let mut opt_decay = adam(h.weight_decay, decay).map_err(err)?;
        let mut opt_plain = adam(0.0, no_decay).map_err(err)?;
        let mut batch_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xba7c_4e5);
        let mut dropout_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd409_0a7);

        let model_dir = ctx.output("model")?.to_path_buf();
        let best_dir = ctx.output("best")?.to_path_buf();
        let mut csv = String::from("step,tokens,train_loss,val_loss,lr,tokens_per_s,grad_norm\n");
        let mut best = (f64::INFINITY, 0usize);
        let mut evals_since_best = 0;
        let mut stopped_early = false;
        let mut last_train_loss = f64::NAN;
        let mut window_loss = 0.0;
        let mut window_steps = 0;
        let mut window_t = Instant::now();
        let mut steps_done = 0;
        for step in 0..total_steps {
            ctx.check_cancelled()?;
            let lr = h.lr_at(step, total_steps);
            opt_decay.set_learning_rate(lr);
            opt_plain.set_learning_rate(lr);
            let x = data::random_batch(&train_ids, h.batch, h.seq_len, &mut batch_rng)?;
            let (ce, aux) = model.loss(&x, Some(&mut dropout_rng)).map_err(err)?;
            let loss = (&ce + &aux).map_err(err)?;
            let mut grads = loss.backward().map_err(err)?;
            let gnorm = clip_and_norm(&mut grads, &vars, h.grad_clip)?;
            opt_decay.step(&grads).map_err(err)?;
            opt_plain.step(&grads).map_err(err)?;
            let ce_v = ce.to_scalar::<f32>().map_err(err)? as f64;
            if !ce_v.is_finite() {
                return Err(StageError::failed(format!("the training loss became {ce_v} at step {step}; lower `lr` or enable `grad_clip`")));
            }
            last_train_loss = ce_v;
            window_loss += ce_v;
            window_steps += 1;
            steps_done = step + 1;
            let is_eval = steps_done % h.eval_interval == 0 || steps_done == total_steps;
            if is_eval {
                let (val, _) = evaluate(&model, &valid_ids, h.seq_len, h.batch, h.eval_tokens)?;
                let tps = (window_steps * tokens_per_step) as f64 / window_t.elapsed().as_secs_f64().max(1e-9);
                let _ = writeln!(csv, "{steps_done},{},{:.6},{val:.6},{lr:.3e},{tps:.1},{gnorm:.4}", steps_done * tokens_per_step, window_loss / window_steps as f64);
                ctx.progress(&format!("step {steps_done}/{total_steps} train {:.4} val {val:.4} {tps:.0} tok/s", window_loss / window_steps as f64));
                if val < best.0 {
                    best = (val, steps_done);
                    evals_since_best = 0;
                    model.save(&best_dir).map_err(err)?;
                } else {
                    evals_since_best += 1;
                }
                window_loss = 0.0;
                window_steps = 0;
                window_t = Instant::now();
                if h.patience > 0 && evals_since_best >= h.patience {
                    stopped_early = true;
                    break;
                }
            }
        }
        model.save(&model_dir).map_err(err)?;
        let train_time = t0.elapsed().as_secs_f64();

        // The reported figure: the best checkpoint on the whole validation text.
        let best_model = Model::load(&best_dir).map_err(err)?;
        let (val_loss, val_tokens) = evaluate(&best_model, &valid_ids, h.seq_len, h.batch, usize::MAX)?;
        let tokens_per_byte = valid_ids.len() as f64 / valid_text.len().max(1) as f64;
        let bits_per_byte = val_loss * tokens_per_byte / std::f64::consts::LN_2;
        std::fs::write(ctx.output("metrics.csv")?, csv).map_err(|e| StageError::io("writing metrics.csv", e))?;
        let tokens_seen = steps_done * tokens_per_step;
        let summary = json!({
            "model": h.model,
            "preset": h.preset,
            "config": config,
            "params": counts,
            "forward_flops_per_token": forward_flops_per_token(&config, h.seq_len.div_ceil(2)),
            "vocab_size": vocab,
            "seq_len": h.seq_len,
            "batch": h.batch,
            "steps": steps_done,
            "planned_steps": total_steps,
            "tokens_seen": tokens_seen,
            "train_tokens": train_ids.len(),
            "epochs_seen": tokens_seen as f64 / train_ids.len() as f64,
            "final_train_loss": last_train_loss,
            "best_step": best.1,
            "best_val_loss_sampled": best.0,
            "val_loss": val_loss,
            "val_perplexity": val_loss.exp(),
            "bits_per_byte": bits_per_byte,
            "val_tokens_evaluated": val_tokens,
            "val_tokens_per_byte": tokens_per_byte,
            "stopped_early": stopped_early,
            "wall_time_s": train_time,
            "train_tokens_per_s": tokens_seen as f64 / train_time.max(1e-9),
            "threads": ctx.threads(),
            "seed": seed,
            "note": "val_loss: mean next-token cross-entropy (nats) of best/ over the whole validation text, in non-overlapping seq_len windows (the first token of each window is context only); bits_per_byte = val_loss × tokens/byte ÷ ln 2",
        });
        std::fs::write(ctx.output("summary.json")?, serde_json::to_string_pretty(&summary).map_err(err)? + "\n").map_err(|e| StageError::io("writing summary.json", e))?;
        ctx.metric("val_loss", val_loss);
        ctx.metric("val_perplexity", val_loss.exp());
        ctx.metric("bits_per_byte", bits_per_byte);
        ctx.metric("tokens_seen", tokens_seen);
        ctx.metric("params", counts.total);
        Ok(())
    }
}

/// A window start in [0, n − len], drawn from the batch RNG.
pub fn sample_offset(rng: &mut ChaCha8Rng, n: usize, len: usize) -> usize {
    rng.random_range(0..=n - len)
}

#[cfg(test)]
mod tests;
