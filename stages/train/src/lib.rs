//! The `train` stage: next-token training of Itera-Lite or the Transformer baseline.
//!
//! Inputs `train`, `valid` (text) and `tokenizer` (tokenizer.json). Outputs `model/` (final
//! weights), `best/` (best validation loss), `metrics.csv`, `summary.json`. The same seed and
//! thread count give the same checkpoint bytes: weights come from a seeded ChaCha8 RNG in
//! sorted-name order and batches are drawn from another one. The loop itself lives in
//! `itera_models::training`, shared with the `distill` stage.

use itera_models::accounting::{forward_flops_per_token, param_counts};
use itera_models::training::{
    encode, fit, load_tokenizer, quality, FitHooks, Hyper, HyperError, Objective, TokenSplits, HYPER_KEYS,
};
use itera_models::Model;
use serde_json::json;
use stage_api::{Context, InputSpec, ParamError, Params, Stage, StageContext, StageError, StageProfile};

pub struct TrainStage;

/// `params.<key>` error from the shared hyper-parameter parser.
pub fn param_error(e: HyperError) -> ParamError {
    ParamError::new(format!("params.{}", e.key), e.message)
}

/// Validated hyper-parameters of the train stage (`model` is required).
pub fn hyper(p: &Params) -> Result<Hyper, ParamError> {
    let mut known: Vec<&str> = HYPER_KEYS.to_vec();
    known.push("seed");
    stage_api::check_known_params(p, &known, "train")?;
    Hyper::from_params(&p.params.clone().into_iter().collect(), None, "tiny").map_err(param_error)
}

impl Stage for TrainStage {
    fn kind(&self) -> &'static str {
        "train"
    }
    fn describe(&self) -> &'static str {
        "train itera_lite or transformer (AdamW, warmup + cosine) → model/, best/, metrics.csv, summary.json"
    }

    fn check(&self, params: &Params, io: &InputSpec) -> Result<StageProfile, ParamError> {
        hyper(params)?;
        for needed in ["train", "valid", "tokenizer"] {
            if !io.inputs.iter().any(|i| i == needed) {
                return Err(ParamError::new("inputs", format!("the train stage needs an input named `{needed}`"))
                    .with_help(
                        "inputs: {train: corpus.train.txt, valid: corpus.valid.txt, tokenizer: vocab.tokenizer.json}",
                    ));
            }
        }
        Ok(StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: vec!["model".into(), "best".into(), "metrics.csv".into(), "summary.json".into()],
            // Both record tokens/s and wall time; the weights must reproduce bit for bit.
            volatile_outputs: vec!["metrics.csv".into(), "summary.json".into()],
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        ctx.metric("simd_path", itera_models::simd_path());
        let h = hyper(ctx.params())?;
        let seed = ctx.seed();
        let tok = load_tokenizer(ctx.input("tokenizer")?)?;
        let train_text = stage_api::read_text(ctx.input("train")?)?;
        let valid_text = stage_api::read_text(ctx.input("valid")?)?;
        let train_ids = encode(&tok, &train_text)?;
        let valid_ids = encode(&tok, &valid_text)?;
        let vocab = tok.get_vocab_size(true);
        let config = h.config(vocab)?;
        let model = Model::new(&config, seed).context(|| format!("initializing a {} model", h.model))?;
        let counts = param_counts(&config);
        let model_dir = ctx.output("model")?.to_path_buf();
        let best_dir = ctx.output("best")?.to_path_buf();
        let cancel = ctx.cancel_flag();
        let report = fit(
            &model,
            &h,
            seed,
            TokenSplits { train: &train_ids, valid: &valid_ids },
            &Objective::CrossEntropy,
            &best_dir,
            FitHooks { progress: &mut |m| ctx.progress(m), cancel: &cancel },
        )?;
        model.save(&model_dir).context(|| format!("saving the model to {}", model_dir.display()))?;

        // The reported figure: the best checkpoint on the whole validation text.
        let best_model =
            Model::load(&best_dir).context(|| format!("loading the best checkpoint {}", best_dir.display()))?;
        let q = quality(&best_model, &valid_ids, valid_text.len(), h.seq_len, h.batch)?;
        std::fs::write(ctx.output("metrics.csv")?, &report.csv)
            .map_err(|e| StageError::io("writing metrics.csv", e))?;
        let tokens_seen = report.steps * h.batch * h.seq_len;
        let summary = json!({
            "model": h.model,
            "preset": h.preset,
            "config": config,
            "params": counts,
            "forward_flops_per_token": forward_flops_per_token(&config, h.seq_len.div_ceil(2)),
            "vocab_size": vocab,
            "seq_len": h.seq_len,
            "batch": h.batch,
            "steps": report.steps,
            "planned_steps": report.planned_steps,
            "tokens_seen": tokens_seen,
            "train_tokens": train_ids.len(),
            "epochs_seen": tokens_seen as f64 / train_ids.len() as f64,
            "final_train_loss": report.final_train_loss,
            "best_step": report.best_step,
            "best_val_loss_sampled": report.best_val_loss_sampled,
            "val_loss": q.val_loss,
            "val_perplexity": q.val_perplexity,
            "bits_per_byte": q.bits_per_byte,
            "val_tokens_evaluated": q.val_tokens_evaluated,
            "val_tokens_per_byte": valid_ids.len() as f64 / valid_text.len().max(1) as f64,
            "stopped_early": report.stopped_early,
            "wall_time_s": report.wall_time_s,
            "train_tokens_per_s": tokens_seen as f64 / report.wall_time_s.max(1e-9),
            "threads": ctx.threads(),
            "seed": seed,
            "note": "val_loss: mean next-token cross-entropy (nats) of best/ over the whole \
                validation text, in non-overlapping seq_len windows (the first token of each window \
                is context only); bits_per_byte = val_loss × tokens/byte ÷ ln 2",
        });
        stage_api::write_json(ctx.output("summary.json")?, &summary)?;
        ctx.metric("val_loss", q.val_loss);
        ctx.metric("val_perplexity", q.val_perplexity);
        ctx.metric("bits_per_byte", q.bits_per_byte);
        ctx.metric("tokens_seen", tokens_seen);
        ctx.metric("params", counts.total);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
