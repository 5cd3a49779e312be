//! What the `train` and `distill` stages share: hyper-parameters, tokenized data, the AdamW
//! training loop with warmup + cosine, evaluation, and the distillation objective.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor, Var, D};
use candle_nn::{Optimizer, ParamsAdamW};

use crate::adamw::FusedAdamW;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};
use tokenizers::Tokenizer;

use crate::{Model, ModelConfig};

/// Parameters every trainer accepts (besides its own).
pub const HYPER_KEYS: &[&str] = &[
    "model",
    "preset",
    "overrides",
    "seq_len",
    "batch",
    "steps",
    "epochs",
    "lr",
    "min_lr_ratio",
    "weight_decay",
    "warmup",
    "grad_clip",
    "eval_interval",
    "eval_tokens",
    "patience",
];

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

/// A bad hyper-parameter: the key under `params` and what is wrong.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct HyperError {
    pub key: String,
    pub message: String,
}

fn bad(key: &str, message: impl Into<String>) -> HyperError {
    HyperError { key: key.to_string(), message: message.into() }
}

fn get_f64(
    p: &Map<String, Value>,
    key: &str,
    default: f64,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<f64, HyperError> {
    match p.get(key) {
        None => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if ok(x) => Ok(x),
            _ => Err(bad(key, format!("`{key}` must be {what}, got {v}"))),
        },
    }
}

fn get_usize(p: &Map<String, Value>, key: &str, default: usize) -> Result<usize, HyperError> {
    match p.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| bad(key, format!("`{key}` must be a non-negative integer, got {v}"))),
    }
}

impl Hyper {
    /// From a stage's `params`. `default_model` / `default_preset` apply when the keys are
    /// absent (`None` makes `model` required).
    pub fn from_params(
        p: &Map<String, Value>,
        default_model: Option<&str>,
        default_preset: &str,
    ) -> Result<Hyper, HyperError> {
        let model = match p.get("model").map(|v| v.as_str()) {
            Some(Some(m @ ("itera_lite" | "transformer"))) => m.to_string(),
            Some(Some(other)) => {
                return Err(bad("model", format!("unknown model `{other}`; models: itera_lite, transformer")))
            }
            Some(None) => return Err(bad("model", "`model` must be itera_lite or transformer")),
            None => match default_model {
                Some(m) => m.to_string(),
                None => return Err(bad("model", "`params.model` is required (itera_lite or transformer)")),
            },
        };
        let preset = match p.get("preset") {
            None => default_preset.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(bad("preset", format!("`preset` must be a string, got {v}"))),
        };
        let overrides = match p.get("overrides") {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(v) => return Err(bad("overrides", format!("`overrides` must be a map of config fields, got {v}"))),
        };
        // Validate the model config now (vocab size is not known yet; any positive one will do).
        ModelConfig::build(&model, &preset, 256, &overrides).map_err(|e| bad("preset", e.to_string()))?;
        let steps = p.get("steps").map(|_| get_usize(p, "steps", 0)).transpose()?;
        let epochs =
            p.get("epochs").map(|_| get_f64(p, "epochs", 0.0, |x| x > 0.0, "a positive number")).transpose()?;
        if steps.is_some() == epochs.is_some() {
            return Err(bad("steps", "give exactly one of `steps` or `epochs`"));
        }
        if steps == Some(0) {
            return Err(bad("steps", "`steps` must be at least 1"));
        }
        let h = Hyper {
            model,
            preset,
            overrides,
            seq_len: get_usize(p, "seq_len", 128)?,
            batch: get_usize(p, "batch", 16)?,
            steps,
            epochs,
            lr: get_f64(p, "lr", 3e-3, |x| x > 0.0 && x < 1.0, "in (0, 1)")?,
            min_lr_ratio: get_f64(p, "min_lr_ratio", 0.1, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?,
            weight_decay: get_f64(p, "weight_decay", 0.01, |x| x >= 0.0, "non-negative")?,
            warmup: get_usize(p, "warmup", 50)?,
            grad_clip: get_f64(p, "grad_clip", 1.0, |x| x >= 0.0, "non-negative (0 = off)")?,
            eval_interval: get_usize(p, "eval_interval", 100)?,
            eval_tokens: get_usize(p, "eval_tokens", 32_768)?,
            patience: get_usize(p, "patience", 0)?,
        };
        if h.seq_len < 2 {
            return Err(bad("seq_len", "`seq_len` must be at least 2"));
        }
        if h.batch == 0 || h.eval_interval == 0 {
            return Err(bad(if h.batch == 0 { "batch" } else { "eval_interval" }, "must be at least 1"));
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

    /// Optimizer steps for a corpus of `train_tokens`.
    pub fn total_steps(&self, train_tokens: usize) -> usize {
        match (self.steps, self.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => {
                ((e * train_tokens as f64) / (self.batch * self.seq_len) as f64).ceil().max(1.0) as usize
            }
            (None, None) => 1,
        }
    }

    pub fn config(&self, vocab: usize) -> Result<ModelConfig, FitError> {
        let config = ModelConfig::build(&self.model, &self.preset, vocab, &self.overrides)
            .map_err(|e| FitError::Failed(e.to_string()))?;
        if self.seq_len > config.max_seq_len() {
            return Err(FitError::Failed(format!(
                "seq_len {} exceeds the model's max_seq_len {}; lower seq_len or override max_seq_len",
                self.seq_len,
                config.max_seq_len()
            )));
        }
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FitError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

/// A cancelled fit is the stage's cancellation; any other failure keeps the fit's message.
#[cfg(feature = "stage-api")]
impl From<FitError> for stage_api::StageError {
    fn from(e: FitError) -> Self {
        match e {
            FitError::Cancelled => stage_api::StageError::Cancelled,
            FitError::Failed(m) => stage_api::StageError::Failed(m),
        }
    }
}

impl From<candle_core::Error> for FitError {
    fn from(e: candle_core::Error) -> Self {
        FitError::Failed(e.to_string())
    }
}

impl From<crate::CheckpointError> for FitError {
    fn from(e: crate::CheckpointError) -> Self {
        FitError::Failed(e.to_string())
    }
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, FitError> {
    Tokenizer::from_file(path).map_err(|e| FitError::Failed(format!("loading {}: {e}", path.display())))
}

/// Token ids of a text. Encoded per piece of about 64 KiB (split after a newline) so memory
/// stays flat on large corpora; the tokenizers here never merge across "\n".
pub fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, FitError> {
    let mut ids = Vec::with_capacity(text.len());
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + 65_536).min(text.len());
        while end < text.len() && !text.is_char_boundary(end) {
            end += 1;
        }
        if end < text.len() {
            if let Some(nl) = text[start..end].rfind('\n') {
                end = start + nl + 1;
            }
        }
        let enc = tok.encode(&text[start..end], false).map_err(|e| FitError::Failed(format!("tokenizing: {e}")))?;
        ids.extend_from_slice(enc.get_ids());
        start = end;
    }
    Ok(ids)
}

/// A window start in [0, n − len], drawn from the batch RNG.
pub fn sample_offset(rng: &mut ChaCha8Rng, n: usize, len: usize) -> usize {
    rng.random_range(0..=n - len)
}

/// `batch` windows of `len` tokens at random offsets.
pub fn random_batch(ids: &[u32], batch: usize, len: usize, rng: &mut ChaCha8Rng) -> Result<Tensor, FitError> {
    let mut flat = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        let off = sample_offset(rng, ids.len(), len);
        flat.extend_from_slice(&ids[off..off + len]);
    }
    Ok(Tensor::from_vec(flat, (batch, len), &Device::Cpu)?)
}

/// Non-overlapping windows of `len` tokens from the start, covering at most `max_tokens`.
pub fn eval_windows(ids: &[u32], len: usize, max_tokens: usize) -> Vec<&[u32]> {
    let n = (ids.len() / len).min(max_tokens.div_ceil(len).max(1));
    (0..n).map(|i| &ids[i * len..(i + 1) * len]).collect()
}

/// Batches of evaluation windows as (batch, len) tensors.
pub fn eval_batches(ids: &[u32], len: usize, batch: usize, max_tokens: usize) -> Result<Vec<Tensor>, FitError> {
    let windows = eval_windows(ids, len, max_tokens);
    if windows.is_empty() {
        return Err(FitError::Failed(format!(
            "the validation text has fewer than {len} tokens; use a smaller seq_len or more validation text"
        )));
    }
    windows
        .chunks(batch)
        .map(|chunk| {
            let flat: Vec<u32> = chunk.iter().flat_map(|w| w.iter().copied()).collect();
            Ok(Tensor::from_vec(flat, (chunk.len(), len), &Device::Cpu)?)
        })
        .collect()
}

/// Mean next-token loss over up to `max_tokens` of `ids`, in non-overlapping windows; returns
/// the loss and the number of scored positions.
pub fn evaluate(
    model: &Model,
    ids: &[u32],
    seq_len: usize,
    batch: usize,
    max_tokens: usize,
) -> Result<(f64, usize), FitError> {
    let mut total = 0.0;
    let mut count = 0usize;
    for x in eval_batches(ids, seq_len, batch, max_tokens)? {
        let (ce, _) = model.loss(&x, None)?;
        let n = x.dim(0)? * (seq_len - 1);
        total += ce.to_scalar::<f32>()? as f64 * n as f64;
        count += n;
    }
    Ok((total / count as f64, count))
}

/// Mean over positions of KL(softmax(p/T) ‖ softmax(q/T)) for logits of shape (…, vocab).
pub fn kl_divergence(p_logits: &Tensor, q_logits: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(&(p_logits / temperature)?, D::Minus1)?;
    let lq = candle_nn::ops::log_softmax(&(q_logits / temperature)?, D::Minus1)?;
    let per_position = (lp.exp()? * (&lp - &lq)?)?.sum(D::Minus1)?;
    per_position.mean_all()
}

/// What a step optimises.
pub enum Objective<'a> {
    /// Next-token cross-entropy.
    CrossEntropy,
    /// α·T²·KL(teacher_T ‖ student_T) + (1−α)·CE, teacher logits computed without gradients.
    Distill { teacher: &'a Model, temperature: f64, alpha: f64 },
}

impl Objective<'_> {
    /// (loss to minimise, cross-entropy for the log)
    pub fn loss(&self, model: &Model, x: &Tensor, rng: &mut ChaCha8Rng) -> candle_core::Result<(Tensor, f64)> {
        let f = model.forward(x, Some(rng))?;
        let ce = crate::next_token_loss(&f.logits, x)?;
        let ce_v = ce.to_scalar::<f32>()? as f64;
        let task = match self {
            Objective::CrossEntropy => ce,
            Objective::Distill { teacher, temperature, alpha } => {
                let t = teacher.forward(x, None)?.logits.detach();
                let kl = kl_divergence(&t, &f.logits, *temperature)?;
                ((kl * (alpha * temperature * temperature))? + (ce * (1.0 - alpha))?)?
            }
        };
        Ok(((task + f.aux)?, ce_v))
    }

    /// The gradients of [`Self::loss`]'s loss and the cross-entropy for the log: plain
    /// cross-entropy through [`Model::loss_grads`] (the models' hand-written steps where they
    /// apply), distillation through autograd.
    pub fn grads(
        &self,
        model: &Model,
        x: &Tensor,
        rng: &mut ChaCha8Rng,
    ) -> candle_core::Result<(candle_core::backprop::GradStore, f64)> {
        match self {
            Objective::CrossEntropy => {
                let (grads, ce, _) = model.loss_grads(x, Some(rng))?;
                Ok((grads, ce as f64))
            }
            Objective::Distill { .. } => {
                let (loss, ce) = self.loss(model, x, rng)?;
                Ok((loss.backward()?, ce))
            }
        }
    }
}

/// Progress reporting and cancellation, supplied by the caller.
/// The token ids a fit trains on and validates with.
#[derive(Clone, Copy, Debug)]
pub struct TokenSplits<'a> {
    pub train: &'a [u32],
    pub valid: &'a [u32],
}

pub struct FitHooks<'a> {
    pub progress: &'a mut dyn FnMut(&str),
    pub cancel: &'a std::sync::atomic::AtomicBool,
}

/// What a training run produced besides the weights.
#[derive(Clone, Debug)]
pub struct FitReport {
    /// `step,tokens,train_loss,val_loss,lr,tokens_per_s,grad_norm` rows with a header.
    pub csv: String,
    pub best_val_loss_sampled: f64,
    pub best_step: usize,
    pub steps: usize,
    pub planned_steps: usize,
    pub stopped_early: bool,
    pub final_train_loss: f64,
    pub wall_time_s: f64,
}

fn clip_and_norm(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[Var],
    max_norm: f64,
) -> candle_core::Result<f64> {
    let mut sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// Train `model` in place: AdamW (decay on matrices only), warmup + cosine, gradient clipping,
/// evaluation every `eval_interval` steps with the best checkpoint saved to `best_dir`, early
/// stopping after `patience` evaluations without improvement. Batches and dropout come from
/// RNGs seeded by `seed`, so the same seed and thread count give the same weights.
pub fn fit(
    model: &Model,
    h: &Hyper,
    seed: u64,
    data: TokenSplits,
    objective: &Objective,
    best_dir: &Path,
    hooks: FitHooks,
) -> Result<FitReport, FitError> {
    let (train_ids, valid_ids) = (data.train, data.valid);
    let t0 = Instant::now();
    if train_ids.len() <= h.seq_len {
        return Err(FitError::Failed(format!(
            "the training text has {} tokens, fewer than one window of {}",
            train_ids.len(),
            h.seq_len
        )));
    }
    let total_steps = h.total_steps(train_ids.len());
    let tokens_per_step = h.batch * h.seq_len;
    let vars = model.varmap.all_vars();
    // Weight decay on matrices only; norms, biases and the SSM's A_log / D are exempt.
    let (decay, no_decay): (Vec<Var>, Vec<Var>) = vars.iter().cloned().partition(|v| v.rank() >= 2);
    let adam = |wd: f64, vs: Vec<Var>| {
        FusedAdamW::new(vs, ParamsAdamW { lr: h.lr, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: wd })
    };
    let mut opt_decay = adam(h.weight_decay, decay)?;
    let mut opt_plain = adam(0.0, no_decay)?;
    let mut batch_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0ba7_c4e5);
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0d40_90a7);
    let mut csv = String::from("step,tokens,train_loss,val_loss,lr,tokens_per_s,grad_norm\n");
    let mut best = (f64::INFINITY, 0usize);
    let mut evals_since_best = 0;
    let mut stopped_early = false;
    let mut last_train_loss = f64::NAN;
    let (mut window_loss, mut window_steps, mut window_t) = (0.0, 0, Instant::now());
    let mut steps_done = 0;
    for step in 0..total_steps {
        if hooks.cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(FitError::Cancelled);
        }
        let lr = h.lr_at(step, total_steps);
        opt_decay.set_learning_rate(lr);
        opt_plain.set_learning_rate(lr);
        let x = random_batch(train_ids, h.batch, h.seq_len, &mut batch_rng)?;
        let (mut grads, ce_v) = objective.grads(model, &x, &mut dropout_rng)?;
        let gnorm = clip_and_norm(&mut grads, &vars, h.grad_clip)?;
        opt_decay.step(&grads)?;
        opt_plain.step(&grads)?;
        if !ce_v.is_finite() {
            return Err(FitError::Failed(format!(
                "the training loss became {ce_v} at step {step}; lower `lr` or enable `grad_clip`"
            )));
        }
        last_train_loss = ce_v;
        window_loss += ce_v;
        window_steps += 1;
        steps_done = step + 1;
        if steps_done % h.eval_interval == 0 || steps_done == total_steps {
            let (val, _) = evaluate(model, valid_ids, h.seq_len, h.batch, h.eval_tokens)?;
            let tps = (window_steps * tokens_per_step) as f64 / window_t.elapsed().as_secs_f64().max(1e-9);
            let mean = window_loss / window_steps as f64;
            let _ = writeln!(
                csv,
                "{steps_done},{},{mean:.6},{val:.6},{lr:.3e},{tps:.1},{gnorm:.4}",
                steps_done * tokens_per_step
            );
            (hooks.progress)(&format!("step {steps_done}/{total_steps} train {mean:.4} val {val:.4} {tps:.0} tok/s"));
            if val < best.0 {
                best = (val, steps_done);
                evals_since_best = 0;
                model.save(best_dir)?;
            } else {
                evals_since_best += 1;
            }
            (window_loss, window_steps, window_t) = (0.0, 0, Instant::now());
            if h.patience > 0 && evals_since_best >= h.patience {
                stopped_early = true;
                break;
            }
        }
    }
    Ok(FitReport {
        csv,
        best_val_loss_sampled: best.0,
        best_step: best.1,
        steps: steps_done,
        planned_steps: total_steps,
        stopped_early,
        final_train_loss: last_train_loss,
        wall_time_s: t0.elapsed().as_secs_f64(),
    })
}

/// Validation loss, perplexity and bits per byte of a checkpoint over the whole text.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Quality {
    pub val_loss: f64,
    pub val_perplexity: f64,
    pub bits_per_byte: f64,
    pub val_tokens_evaluated: usize,
}

pub fn quality(
    model: &Model,
    valid_ids: &[u32],
    valid_bytes: usize,
    seq_len: usize,
    batch: usize,
) -> Result<Quality, FitError> {
    let (val_loss, n) = evaluate(model, valid_ids, seq_len, batch, usize::MAX)?;
    let tokens_per_byte = valid_ids.len() as f64 / valid_bytes.max(1) as f64;
    Ok(Quality {
        val_loss,
        val_perplexity: val_loss.exp(),
        bits_per_byte: val_loss * tokens_per_byte / std::f64::consts::LN_2,
        val_tokens_evaluated: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_matches_a_hand_computed_case_and_vanishes_on_equal_inputs() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]; q = [0.5, 0.5].
        let p = Tensor::new(&[[0f32, 3f32.ln()]], &Device::Cpu).unwrap();
        let q = Tensor::new(&[[0f32, 0.0]], &Device::Cpu).unwrap();
        let kl = kl_divergence(&p, &q, 1.0).unwrap().to_scalar::<f32>().unwrap() as f64;
        let want = 0.25 * (0.25f64 / 0.5).ln() + 0.75 * (0.75f64 / 0.5).ln();
        assert!((kl - want).abs() < 1e-6, "{kl} vs {want}");
        // Temperature 2 softens p to softmax([0, ln3 / 2]) = [1/(1+√3), √3/(1+√3)].
        let kl2 = kl_divergence(&p, &q, 2.0).unwrap().to_scalar::<f32>().unwrap() as f64;
        let a = 1.0 / (1.0 + 3f64.sqrt());
        let want2 = a * (a / 0.5).ln() + (1.0 - a) * ((1.0 - a) / 0.5).ln();
        assert!((kl2 - want2).abs() < 1e-6, "{kl2} vs {want2}");
        assert!(kl_divergence(&p, &p, 1.0).unwrap().to_scalar::<f32>().unwrap().abs() < 1e-7);
    }

    #[test]
    fn distillation_gradient_pulls_the_student_towards_the_teacher() {
        // d/ds KL(softmax(t) ‖ softmax(s)) = softmax(s) − softmax(t) (T = 1): check it, and that
        // one gradient step lowers the KL.
        let t = Tensor::new(&[[2f32, 0.0, -1.0]], &Device::Cpu).unwrap();
        let s = Var::new(&[[0f32, 0.5, 0.0]], &Device::Cpu).unwrap();
        let kl = kl_divergence(&t, s.as_tensor(), 1.0).unwrap();
        let g = kl.backward().unwrap().get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        let sm = |v: &[f32]| {
            let e: Vec<f32> = v.iter().map(|x| x.exp()).collect();
            let z: f32 = e.iter().sum();
            e.into_iter().map(|x| x / z).collect::<Vec<f32>>()
        };
        let (ps, pt) = (sm(&[0.0, 0.5, 0.0]), sm(&[2.0, 0.0, -1.0]));
        for i in 0..3 {
            assert!((g[0][i] - (ps[i] - pt[i])).abs() < 1e-6, "{i}: {} vs {}", g[0][i], ps[i] - pt[i]);
        }
        let before = kl.to_scalar::<f32>().unwrap();
        let stepped = (s.as_tensor() - (Tensor::new(g, &Device::Cpu).unwrap() * 0.5).unwrap()).unwrap();
        let after = kl_divergence(&t, &stepped, 1.0).unwrap().to_scalar::<f32>().unwrap();
        assert!(after < before, "{after} !< {before}");
    }

    #[test]
    fn hyper_parameters_are_validated_with_their_key() {
        let p = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            Hyper::from_params(&p(serde_json::json!({"lr": 2, "steps": 1})), Some("itera_lite"), "micro")
                .unwrap_err()
                .key,
            "lr"
        );
        assert_eq!(
            Hyper::from_params(&p(serde_json::json!({"steps": 3, "epochs": 1})), Some("itera_lite"), "micro")
                .unwrap_err()
                .key,
            "steps"
        );
        assert_eq!(Hyper::from_params(&p(serde_json::json!({"steps": 1})), None, "tiny").unwrap_err().key, "model");
        let h = Hyper::from_params(&p(serde_json::json!({"warmup": 10, "steps": 110})), Some("itera_lite"), "micro")
            .unwrap();
        assert!((h.lr_at(0, 110) - h.lr / 10.0).abs() < 1e-12);
        assert!((h.lr_at(110, 110) - h.lr * h.min_lr_ratio).abs() < 1e-12);
        assert!(h.lr_at(60, 110) < h.lr && h.lr_at(60, 110) > h.lr * h.min_lr_ratio);
    }
}

#[cfg(test)]
mod objective_tests {
    use super::*;

    #[test]
    fn the_distillation_objective_trains_the_student_only() {
        let o = serde_json::json!({"max_seq_len": 16});
        let cfg = ModelConfig::build("itera_lite", "micro", 30, o.as_object().unwrap()).unwrap();
        let teacher = Model::new(&cfg, 1).unwrap();
        let student = Model::new(&cfg, 2).unwrap();
        let x = Tensor::from_vec((0..32u32).map(|i| i % 30).collect::<Vec<_>>(), (2, 16), &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let obj = Objective::Distill { teacher: &teacher, temperature: 2.0, alpha: 1.0 };
        let (loss, _) = obj.loss(&student, &x, &mut rng).unwrap();
        let grads = loss.backward().unwrap();
        let moved = student
            .varmap
            .all_vars()
            .iter()
            .filter(|v| {
                grads
                    .get(v.as_tensor())
                    .is_some_and(|g| g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0)
            })
            .count();
        assert!(moved > 10, "only {moved} student tensors get a gradient");
        assert!(
            teacher.varmap.all_vars().iter().all(|v| grads.get(v.as_tensor()).is_none()),
            "no gradient may reach the teacher"
        );
    }
}
