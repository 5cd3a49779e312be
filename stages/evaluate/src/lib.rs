//! The `evaluate` stage: every model it is given scored on one text the same way, and what the
//! scoring and a generation run cost.
//!
//! Inputs: `tokenizer`, `text` (any UTF-8 file), and any number of models, each named by the
//! label it gets in the tables: a checkpoint folder (`train`/`distill` output) or a quantized
//! `model.gguf`. Outputs `evaluation.json` and `evaluation.csv` (scores; deterministic) and
//! `energy.json` (CPU-seconds, joules where RAPL is readable, wall time; volatile).
//!
//! Every token after the first is predicted exactly once, in windows of the model's context
//! that overlap by one token. Bits/byte divides the summed loss by the UTF-8 bytes those tokens
//! cover, so models with different tokenizers compare on it; nats/token and perplexity do not.

use std::ops::Range;
use std::path::Path;

use candle_core::{Device, Tensor};
use energy_meter::{Cost, Meter};
use itera_models::accounting::param_counts;
use itera_models::training::{encode, load_tokenizer};
use itera_models::{Model, Sampling};
use serde_json::{json, Value};
use stage_api::{Context, InputSpec, ParamError, Params, Stage, StageContext, StageError, StageProfile};
use tokenizers::Tokenizer;

const KNOWN: &[&str] = &["seq_len", "batch", "max_bytes", "generate", "generate_runs", "prompt"];
const NOT_MODELS: [&str; 2] = ["tokenizer", "text"];

pub struct EvaluateStage;

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub seq_len: usize,
    pub batch: usize,
    /// Score only the first `max_bytes` of the text, cut after a line (0: all of it).
    pub max_bytes: usize,
    pub generate: usize,
    pub generate_runs: usize,
    pub prompt: usize,
}

pub fn settings(p: &Params) -> Result<Settings, ParamError> {
    stage_api::check_known_params(p, KNOWN, "evaluate")?;
    let u = |k: &str, d: u64| stage_api::param_u64(p, k, d).map(|v| v as usize);
    let s = Settings {
        seq_len: u("seq_len", 128)?,
        batch: u("batch", 16)?,
        max_bytes: u("max_bytes", 0)?,
        generate: u("generate", 112)?,
        generate_runs: u("generate_runs", 5)?,
        prompt: u("prompt", 16)?,
    };
    if s.seq_len < 2 || s.batch == 0 || s.generate == 0 || s.generate_runs == 0 || s.prompt == 0 {
        return Err(ParamError::new(
            "params",
            "`seq_len` must be ≥ 2 and `batch`, `generate`, `generate_runs`, `prompt` ≥ 1",
        ));
    }
    Ok(s)
}

/// The part of `text` that is scored: all of it, or its first `max_bytes` cut after the last
/// newline within them (or at a character boundary when there is none).
pub fn scored_text(text: &str, max_bytes: usize) -> &str {
    if max_bytes == 0 || text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    match text[..end].rfind('\n') {
        Some(nl) => &text[..nl + 1],
        None => &text[..end],
    }
}

/// A tokenized text and what its scored tokens cover.
#[derive(Debug)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// UTF-8 bytes after the first token (which is context only, never predicted).
    pub scored_bytes: usize,
    /// Tokens that are the tokenizer's `<unk>`.
    pub unknown: usize,
}

pub fn tokenize(tok: &Tokenizer, text: &str) -> Result<Tokens, StageError> {
    let ids = encode(tok, text)?;
    if ids.len() < 2 {
        return Err(StageError::failed(format!(
            "the text has {} token(s) under this tokenizer; scoring needs at least 2",
            ids.len()
        )));
    }
    // The first token's byte span, from the first line alone (tokens never cross "\n").
    let first_line = text.split_inclusive('\n').next().unwrap_or(text);
    let enc = tok.encode(first_line, false).context(|| "tokenizing the text's first line".into())?;
    let first_end = enc.get_offsets().first().map(|o| o.1).unwrap_or(0);
    let unk = tok.token_to_id("<unk>");
    let unknown = ids.iter().filter(|&&i| Some(i) == unk).count();
    Ok(Tokens { scored_bytes: text.len().saturating_sub(first_end), ids, unknown })
}

/// Windows of at most `len` tokens over `n`, overlapping by one, so that every token after
/// the first is predicted exactly once (from the tokens before it in its window).
pub fn windows(n: usize, len: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while len >= 2 && start + 1 < n {
        out.push(start..(start + len).min(n));
        start += len - 1;
    }
    out
}

/// Summed next-token loss (nats) over every window, and the number of predicted tokens.
pub fn score(model: &Model, ids: &[u32], len: usize, batch: usize) -> Result<(f64, usize), StageError> {
    let all = windows(ids.len(), len);
    // Only the last window can be shorter; it goes in a batch of its own.
    let split = all.iter().position(|w| w.len() < len).unwrap_or(all.len());
    let (full, tail) = all.split_at(split);
    let (mut nats, mut count) = (0.0, 0usize);
    for chunk in full.chunks(batch).chain(tail.chunks(1)) {
        let l = chunk[0].len();
        let flat: Vec<u32> = chunk.iter().flat_map(|w| ids[w.clone()].iter().copied()).collect();
        let mean = Tensor::from_vec(flat, (chunk.len(), l), &Device::Cpu)
            .and_then(|x| model.loss(&x, None))
            .and_then(|(ce, _)| ce.to_scalar::<f32>())
            .context(|| "scoring a batch of windows".into())?;
        let n = chunk.len() * (l - 1);
        nats += mean as f64 * n as f64;
        count += n;
    }
    Ok((nats, count))
}

/// One model's scores and costs.
struct Measured {
    scores: Value,
    scoring: Cost,
    generation: Cost,
}

fn measure(
    label: &str,
    path: &Path,
    s: &Settings,
    text: &Tokens,
    tok: &Tokenizer,
    meter: &Meter,
) -> Result<Measured, StageError> {
    let mut model = Model::load_any(path).context(|| format!("loading the model `{label}` from {}", path.display()))?;
    let weights = model.quant_scheme().map(|q| q.name()).unwrap_or("f32");
    let config = model.config.clone();
    let len = s.seq_len.min(config.max_seq_len());
    let energy = |e: energy_meter::EnergyError| StageError::failed(format!("reading the energy counters: {e}"));

    let started = meter.start().map_err(energy)?;
    let (nats, tokens) = score(&model, &text.ids, len, s.batch)?;
    let scoring = meter.stop(started, tokens as u64).map_err(energy)?;

    let prompt = &text.ids[..s.prompt.min(text.ids.len() - 1)];
    let new_tokens = s.generate.min(config.max_seq_len().saturating_sub(prompt.len()));
    if new_tokens == 0 {
        return Err(StageError::failed(format!(
            "`{label}`: a prompt of {} tokens leaves no room to generate within max_seq_len {}",
            prompt.len(),
            config.max_seq_len()
        )));
    }
    let gen = |n| model.generate(prompt, n, Sampling::Greedy, 0).context(|| format!("`{label}`: generating"));
    let sample = gen(new_tokens)?; // also the warm-up
    let started = meter.start().map_err(energy)?;
    for _ in 0..s.generate_runs {
        gen(new_tokens)?;
    }
    let generation = meter.stop(started, (new_tokens * s.generate_runs) as u64).map_err(energy)?;

    let per_token = nats / tokens.max(1) as f64;
    let scores = json!({
        "label": label,
        "model": config.name(),
        "weights": weights,
        "params": param_counts(&config),
        "context": len,
        "tokens_scored": tokens,
        "bytes_scored": text.scored_bytes,
        "nats_per_token": per_token,
        "perplexity": per_token.exp(),
        "bits_per_byte": nats / text.scored_bytes.max(1) as f64 / std::f64::consts::LN_2,
        "prompt": tok.decode(prompt, false).unwrap_or_default(),
        "continuation": tok.decode(&sample, false).unwrap_or_default(),
    });
    Ok(Measured { scores, scoring, generation })
}

const CSV_HEADER: &str =
    "label,model,weights,params,context,tokens_scored,bytes_scored,nats_per_token,perplexity,bits_per_byte";

fn csv_row(r: &Value) -> String {
    [
        "label",
        "model",
        "weights",
        "params",
        "context",
        "tokens_scored",
        "bytes_scored",
        "nats_per_token",
        "perplexity",
        "bits_per_byte",
    ]
    .iter()
    .map(|k| match if *k == "params" { &r[*k]["total"] } else { &r[*k] } {
        Value::String(s) => s.replace(',', ";"),
        Value::Null => String::new(),
        v => v.to_string(),
    })
    .collect::<Vec<_>>()
    .join(",")
}

const METHOD: &str = "every token after the first predicted once, in windows of min(seq_len, the model's \
    max_seq_len) tokens overlapping by one (context restarts at each window); nats/token = summed \
    next-token loss ÷ predicted tokens; perplexity = e^(nats/token); bits/byte = summed loss ÷ ln 2 ÷ \
    UTF-8 bytes of the predicted tokens (tokenizer-independent). Generation: batch 1, greedy, from \
    the text's first `prompt` tokens, `generate_runs` runs after a warm-up.";

impl Stage for EvaluateStage {
    fn kind(&self) -> &'static str {
        "evaluate"
    }
    fn describe(&self) -> &'static str {
        "every model input scored on one text (nats/token, bits/byte, perplexity) and the CPU-seconds \
            (joules where RAPL is readable) per 1,000 scored and generated tokens → evaluation.json, \
            evaluation.csv, energy.json"
    }

    fn check(&self, params: &Params, io: &InputSpec) -> Result<StageProfile, ParamError> {
        settings(params)?;
        for n in NOT_MODELS {
            if !io.inputs.iter().any(|i| i == n) {
                return Err(ParamError::new("inputs", format!("the evaluate stage needs an input named `{n}`"))
                    .with_help(
                        "inputs: {tokenizer: vocab.tokenizer.json, text: file:data/test.txt, itera: \
                         teacher.best, int8: int8.model.gguf}",
                    ));
            }
        }
        if io.inputs.len() <= NOT_MODELS.len() {
            return Err(ParamError::new(
                "inputs",
                "give the evaluate stage at least one model input besides `tokenizer` and `text`",
            ));
        }
        Ok(StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: vec!["evaluation.json".into(), "evaluation.csv".into(), "energy.json".into()],
            volatile_outputs: vec!["energy.json".into()],
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        let meter = Meter::new(Path::new(energy_meter::POWERCAP_ROOT));
        evaluate(ctx, &meter)
    }
}

/// The stage's work with a given meter (tests hand it one reading a fake powercap tree).
pub fn evaluate(ctx: &mut StageContext, meter: &Meter) -> Result<(), StageError> {
    let s = settings(ctx.params())?;
    let tok = load_tokenizer(ctx.input("tokenizer")?)?;
    let full = stage_api::read_text(ctx.input("text")?)?;
    let text = scored_text(&full, s.max_bytes);
    let tokens = tokenize(&tok, text)?;
    let mut names: Vec<String> =
        ctx.spec().inputs.keys().filter(|k| !NOT_MODELS.contains(&k.as_str())).cloned().collect();
    names.sort();
    let (mut scores, mut costs) = (Vec::new(), Vec::new());
    for name in &names {
        ctx.check_cancelled()?;
        ctx.progress(&format!("scoring {name}"));
        let path = ctx.input(name)?.to_path_buf();
        let m = measure(name, &path, &s, &tokens, &tok, meter)?;
        for key in ["bits_per_byte", "nats_per_token"] {
            ctx.metric(format!("{name}_{key}"), m.scores[key].clone());
        }
        // The cost of a token, so `runs` and `compare` follow it too (joules only when measured).
        for (what, cost) in [("scoring", &m.scoring), ("generation", &m.generation)] {
            ctx.metric(format!("{name}_{what}_cpu_s_per_1k"), cost.cpu_seconds_per_1k);
            if let Some(j) = cost.joules_per_1k {
                ctx.metric(format!("{name}_{what}_joules_per_1k"), j);
            }
        }
        scores.push(m.scores);
        costs.push(json!({"label": name, "scoring": m.scoring, "generation": m.generation}));
    }
    let summary = json!({
        "text": {"bytes": text.len(), "of_file_bytes": full.len(), "tokens": tokens.ids.len(),
            "unknown_tokens": tokens.unknown, "unknown_share": tokens.unknown as f64 / tokens.ids.len() as f64},
        "settings": {"seq_len": s.seq_len, "batch": s.batch, "max_bytes": s.max_bytes},
        "method": METHOD,
        "models": scores,
    });
    stage_api::write_json(ctx.output("evaluation.json")?, &summary)?;
    let mut csv = format!("{CSV_HEADER}\n");
    for r in summary["models"].as_array().into_iter().flatten() {
        csv.push_str(&csv_row(r));
        csv.push('\n');
    }
    std::fs::write(ctx.output("evaluation.csv")?, csv).map_err(|e| StageError::io("writing evaluation.csv", e))?;
    let energy = json!({
        "host": stage_api::host::describe(),
        "threads": ctx.threads(),
        "measured": meter.source(),
        "has_joules": meter.has_energy(),
        "settings": {"generate": s.generate, "generate_runs": s.generate_runs, "prompt": s.prompt},
        "models": costs,
    });
    stage_api::write_json(ctx.output("energy.json")?, &energy)?;
    ctx.metric("energy", if meter.has_energy() { "rapl" } else { "cpu_seconds_only" });
    Ok(())
}

#[cfg(test)]
mod tests;
