//! The `quantize` stage: a trained checkpoint → INT8 or INT4 weights in one GGUF file, with an
//! honest account of what that bought and cost.
//!
//! Inputs `model` (a checkpoint folder from `train` or `distill`), `tokenizer`, `valid`.
//! Outputs `model.gguf` (deterministic) and `summary.json` (sizes, compression ratios,
//! validation loss / perplexity f32 vs quantized, mean KL of the next-token distributions,
//! forward and generation tokens/s f32 vs quantized measured in turns in this process with the
//! same threads). Timings make `summary.json` volatile.

use std::path::Path;

use candle_core::Tensor;
use itera_models::measure::{forward_rates, generate_rate, Rate};
use itera_models::qmodel::QuantSpec;
use itera_models::quant::Scheme;
use itera_models::training::{encode, eval_batches, kl_divergence, load_tokenizer, quality};
use itera_models::Model;
use serde_json::{json, Value};
use stage_api::{Context, InputSpec, ParamError, Params, Stage, StageContext, StageError, StageProfile};

const KNOWN: &[&str] =
    &["scheme", "group_size", "embeddings", "exclude", "seq_len", "batch", "eval_tokens", "bench_runs", "seed"];

pub struct QuantizeStage;

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub spec: QuantSpec,
    pub seq_len: Option<usize>,
    pub batch: usize,
    pub eval_tokens: usize,
    pub bench_runs: usize,
}

pub fn settings(p: &Params) -> Result<Settings, ParamError> {
    stage_api::check_known_params(p, KNOWN, "quantize")?;
    let scheme = match p.param("scheme").and_then(Value::as_str) {
        Some("int8") => Scheme::Int8,
        Some("int4") => Scheme::Int4,
        Some(other) => {
            return Err(ParamError::new("params.scheme", format!("unknown scheme `{other}`; schemes: int8, int4")))
        }
        None => return Err(ParamError::new("params", "the quantize stage needs `params.scheme` (int8 or int4)")),
    };
    let group_size = stage_api::param_u64(p, "group_size", 32)? as usize;
    if scheme == Scheme::Int4 && (group_size == 0 || !group_size.is_multiple_of(32)) {
        return Err(ParamError::new(
            "params.group_size",
            format!("INT4 group_size must be a positive multiple of 32 (the GGUF Q4_0 block), got {group_size}"),
        ));
    }
    let embeddings = match p.param("embeddings") {
        None => false,
        Some(Value::String(s)) if s == "f32" => false,
        Some(Value::String(s)) if s == "quantize" => true,
        Some(v) => {
            return Err(ParamError::new(
                "params.embeddings",
                format!("`embeddings` must be `f32` (keep the tied embedding / LM head in f32) or `quantize`, got {v}"),
            ))
        }
    };
    let exclude = match p.param("exclude") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ParamError::new("params.exclude", format!("`exclude` lists layer names (strings), got {v}"))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ParamError::new("params.exclude", format!("`exclude` must be a list of layer names, got {v}")))
        }
    };
    let seq_len = p.param("seq_len").map(|_| stage_api::param_u64(p, "seq_len", 128)).transpose()?.map(|v| v as usize);
    if seq_len.is_some_and(|s| s < 2) {
        return Err(ParamError::new("params.seq_len", "`seq_len` must be at least 2"));
    }
    let batch = stage_api::param_u64(p, "batch", 16)? as usize;
    let bench_runs = stage_api::param_u64(p, "bench_runs", 5)? as usize;
    if batch == 0 || bench_runs == 0 {
        return Err(ParamError::new(
            if batch == 0 { "params.batch" } else { "params.bench_runs" },
            "must be at least 1",
        ));
    }
    Ok(Settings {
        spec: QuantSpec { scheme, group_size, embeddings, exclude },
        seq_len,
        batch,
        eval_tokens: stage_api::param_u64(p, "eval_tokens", 0)? as usize,
        bench_runs,
    })
}

fn dir_bytes(dir: &Path) -> Result<u64, StageError> {
    let mut total = 0;
    for e in std::fs::read_dir(dir).map_err(|e| StageError::io(format!("reading {}", dir.display()), e))? {
        let e = e.map_err(|e| StageError::io(format!("reading {}", dir.display()), e))?;
        total += e.metadata().map_err(|err| StageError::io(format!("reading {}", e.path().display()), err))?.len();
    }
    Ok(total)
}

/// Mean over positions of KL(f32 ‖ quantized), weighted by positions per batch.
fn mean_kl(reference: &Model, quantized: &Model, batches: &[Tensor]) -> Result<f64, StageError> {
    let (mut total, mut n) = (0.0, 0usize);
    for x in batches {
        let p = reference.forward(x, None).context(|| "f32 forward for the KL divergence".into())?.logits;
        let q = quantized.forward(x, None).context(|| "quantized forward for the KL divergence".into())?.logits;
        let positions = x.elem_count();
        let kl = kl_divergence(&p, &q, 1.0).and_then(|t| t.to_scalar::<f32>());
        total += kl.context(|| "KL divergence of the quantized logits".into())? as f64 * positions as f64;
        n += positions;
    }
    Ok(total / n.max(1) as f64)
}

fn rate_json(r: &Rate) -> Value {
    json!({"median": r.median, "min": r.min, "max": r.max, "runs": r.runs})
}

impl Stage for QuantizeStage {
    fn kind(&self) -> &'static str {
        "quantize"
    }
    fn describe(&self) -> &'static str {
        "INT8 (per channel) / INT4 (Q4_0 blocks) weights with integer matmuls → model.gguf, summary.json (size, perplexity, KL, speed vs f32)"
    }

    fn check(&self, params: &Params, io: &InputSpec) -> Result<StageProfile, ParamError> {
        settings(params)?;
        for needed in ["model", "tokenizer", "valid"] {
            if !io.inputs.iter().any(|i| i == needed) {
                return Err(ParamError::new("inputs", format!("the quantize stage needs an input named `{needed}`"))
                    .with_help(
                        "inputs: {model: train.best, tokenizer: vocab.tokenizer.json, valid: corpus.valid.txt}",
                    ));
            }
        }
        Ok(StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: vec!["model.gguf".into(), "summary.json".into()],
            volatile_outputs: vec!["summary.json".into()],
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        ctx.metric("simd_path", itera_models::simd_path());
        let s = settings(ctx.params())?;
        let model_dir = ctx.input("model")?.to_path_buf();
        let loading = || format!("loading the model {}", model_dir.display());
        let reference = Model::load(&model_dir).context(loading)?;
        let mut quantized = Model::load(&model_dir).context(loading)?;
        let report = quantized.quantize(&s.spec).context(|| format!("quantizing to {:?}", s.spec.scheme))?;
        let gguf_path = ctx.output("model.gguf")?.to_path_buf();
        quantized.save_gguf(&gguf_path).context(|| format!("writing {}", gguf_path.display()))?;
        // What goes downstream is the file: evaluate the model as read back from it.
        let quantized = Model::load_gguf(&gguf_path).context(|| format!("reading back {}", gguf_path.display()))?;
        ctx.check_cancelled()?;

        let tok = load_tokenizer(ctx.input("tokenizer")?)?;
        let valid_text = stage_api::read_text(ctx.input("valid")?)?;
        let valid_ids = encode(&tok, &valid_text)?;
        let max_seq = reference.config.max_seq_len();
        let seq_len = s.seq_len.unwrap_or(max_seq.min(128));
        if seq_len > max_seq {
            return Err(StageError::failed(format!("seq_len {seq_len} exceeds the model's max_seq_len {max_seq}")));
        }
        let eval_tokens = if s.eval_tokens == 0 { usize::MAX } else { s.eval_tokens };
        let all_tokens = valid_ids.len();
        let valid_ids = &valid_ids[..all_tokens.min(eval_tokens.saturating_add(seq_len))];
        // Bytes covered by the evaluated prefix, at the text's average bytes per token.
        let bytes = (valid_ids.len() as f64 * valid_text.len() as f64 / all_tokens.max(1) as f64).round() as usize;
        let q_f32 = quality(&reference, valid_ids, bytes, seq_len, s.batch)?;
        let q_int = quality(&quantized, valid_ids, bytes, seq_len, s.batch)?;
        ctx.check_cancelled()?;
        let batches = eval_batches(valid_ids, seq_len, s.batch, eval_tokens)?;
        let kl = mean_kl(&reference, &quantized, &batches)?;
        ctx.check_cancelled()?;

        // Speed: the same (batch, seq) window, f32 and quantized in turns.
        let bench = &batches[0];
        let rates = forward_rates(&[&reference, &quantized], bench, s.bench_runs)
            .context(|| "timing the f32 and quantized forwards".into())?;
        let prompt: Vec<u32> = valid_ids[..16.min(valid_ids.len())].to_vec();
        let new_tokens = (max_seq - prompt.len()).min(112);
        let timing = || "timing generation".to_string();
        let (gen_f32, _) = generate_rate(&reference, &prompt, new_tokens, s.bench_runs.min(3)).context(timing)?;
        let (gen_int, _) = generate_rate(&quantized, &prompt, new_tokens, s.bench_runs.min(3)).context(timing)?;

        let f32_bytes = dir_bytes(&model_dir)?;
        let gguf_bytes = std::fs::metadata(&gguf_path).map_err(|e| StageError::io("reading model.gguf", e))?.len();
        let qt_f32 = report.quantized_f32_bytes();
        let qt_stored = report.quantized_stored_bytes();
        let ppl_change = q_int.val_perplexity / q_f32.val_perplexity - 1.0;
        let speedup = rates[1].median / rates[0].median;
        let summary = json!({
            "scheme": s.spec.scheme.name(),
            "group_size": if s.spec.scheme == Scheme::Int4 { json!(s.spec.group_size) } else { json!("per output channel") },
            "embeddings": if s.spec.embeddings { "quantized (LM head runs the integer kernel; lookups read dequantized rows)" } else { "kept f32" },
            "activations": "int8, symmetric per row, quantized on the fly",
            "kernel": itera_models::simd::active().name(),
            "quantized_tensors": report.quantized,
            "kept_f32": report.kept_f32.iter().map(|(n, c)| json!({"name": n, "elements": c})).collect::<Vec<_>>(),
            "bytes": {
                "f32_checkpoint": f32_bytes,
                "quantized_file": gguf_bytes,
                "quantized_tensors_f32": qt_f32,
                "quantized_tensors_stored": qt_stored,
            },
            "compression_ratio_model": f32_bytes as f64 / gguf_bytes as f64,
            "compression_ratio_quantized_tensors": qt_f32 as f64 / qt_stored.max(1) as f64,
            "f32": q_f32,
            "quantized": q_int,
            "val_loss_change_rel": q_int.val_loss / q_f32.val_loss - 1.0,
            "perplexity_change_rel": ppl_change,
            "mean_kl_f32_to_quantized": kl,
            "eval": {"seq_len": seq_len, "batch": s.batch, "windows": batches.iter().map(|b| b.dim(0).unwrap_or(0)).sum::<usize>()},
            "forward_tokens_per_s": {"f32": rate_json(&rates[0]), "quantized": rate_json(&rates[1]), "shape": bench.dims()},
            "forward_speedup": speedup,
            "generate_tokens_per_s": {"f32": rate_json(&gen_f32), "quantized": rate_json(&gen_int), "prompt": prompt.len(), "new_tokens": new_tokens},
            "generate_speedup": gen_int.median / gen_f32.median,
            "threads": ctx.threads(),
        });
        stage_api::write_json(ctx.output("summary.json")?, &summary)?;
        ctx.metric("compression_ratio_quantized_tensors", qt_f32 as f64 / qt_stored.max(1) as f64);
        ctx.metric("perplexity_change_rel", ppl_change);
        ctx.metric("mean_kl", kl);
        ctx.metric("forward_speedup", speedup);
        ctx.metric("val_loss", q_int.val_loss);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
