//! The `distill` stage: train a smaller student on α·T²·KL(teacher_T ‖ student_T) +
//! (1−α)·CE, and — unless `control: false` — the same student architecture from scratch on
//! CE alone with the same data, steps and seed, so the summary shows what distillation bought.
//!
//! Inputs `teacher` (checkpoint folder), `train`, `valid`, `tokenizer`. Outputs `model/`
//! (final student), `best/`, `metrics.csv`, `summary.json`, and with the control `control/`
//! and `control.csv`. Same inputs, seed and threads ⇒ identical checkpoint bytes.

use std::path::Path;

use candle_core::Tensor;
use itera_models::accounting::{forward_flops_per_token, param_counts};
use itera_models::measure::forward_rates;
use itera_models::training::{
    encode, fit, load_tokenizer, quality, FitHooks, FitReport, Hyper, Objective, Quality, TokenSplits, HYPER_KEYS,
};
use itera_models::{Model, ModelConfig};
use serde_json::{json, Value};
use stage_api::{Context, InputSpec, ParamError, Params, Stage, StageContext, StageError, StageProfile};

pub struct DistillStage;

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub hyper: Hyper,
    pub temperature: f64,
    pub alpha: f64,
    pub control: bool,
}

pub fn settings(p: &Params) -> Result<Settings, ParamError> {
    let mut known: Vec<&str> = HYPER_KEYS.to_vec();
    known.extend(["temperature", "alpha", "control", "seed"]);
    stage_api::check_known_params(p, &known, "distill")?;
    let hyper = Hyper::from_params(&p.params.clone().into_iter().collect(), Some("itera_lite"), "micro")
        .map_err(|e| ParamError::new(format!("params.{}", e.key), e.message))?;
    let num = |key: &str, default: f64, ok: fn(f64) -> bool, what: &str| -> Result<f64, ParamError> {
        match p.param(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| ok(*x))
                .ok_or_else(|| ParamError::new(format!("params.{key}"), format!("`{key}` must be {what}, got {v}"))),
        }
    };
    let temperature = num("temperature", 2.0, |x| x > 0.0 && x.is_finite(), "a positive number")?;
    let alpha = num("alpha", 0.5, |x| (0.0..=1.0).contains(&x), "in [0, 1]")?;
    let control = match p.param("control") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(ParamError::new("params.control", format!("`control` must be true or false, got {v}"))),
    };
    Ok(Settings { hyper, temperature, alpha, control })
}

fn checkpoint_bytes(dir: &Path) -> Result<u64, StageError> {
    std::fs::metadata(dir.join("model.safetensors"))
        .map(|m| m.len())
        .map_err(|e| StageError::io(format!("reading {}", dir.display()), e))
}

fn describe(model: &Model, config: &ModelConfig, q: &Quality, bytes: u64, seq_len: usize, tokens_per_s: f64) -> Value {
    json!({
        "config": config,
        "params": param_counts(config),
        "allocated_params": model.allocated_params(),
        "forward_flops_per_token": forward_flops_per_token(config, seq_len.div_ceil(2)),
        "checkpoint_bytes": bytes,
        "val_loss": q.val_loss,
        "val_perplexity": q.val_perplexity,
        "bits_per_byte": q.bits_per_byte,
        "forward_tokens_per_s": tokens_per_s,
    })
}

fn run_summary(r: &FitReport, tokens_per_step: usize) -> Value {
    json!({"steps": r.steps, "tokens_seen": r.steps * tokens_per_step, "best_step": r.best_step, "final_train_loss": r.final_train_loss,
        "stopped_early": r.stopped_early, "wall_time_s": r.wall_time_s, "train_tokens_per_s": (r.steps * tokens_per_step) as f64 / r.wall_time_s.max(1e-9)})
}

impl Stage for DistillStage {
    fn kind(&self) -> &'static str {
        "distill"
    }
    fn describe(&self) -> &'static str {
        "distill a teacher into a smaller student (KL at temperature T + CE) and train a from-scratch control → model/, best/, control/, metrics.csv, summary.json"
    }

    fn check(&self, params: &Params, io: &InputSpec) -> Result<StageProfile, ParamError> {
        let s = settings(params)?;
        for needed in ["teacher", "train", "valid", "tokenizer"] {
            if !io.inputs.iter().any(|i| i == needed) {
                return Err(ParamError::new("inputs", format!("the distill stage needs an input named `{needed}`"))
                    .with_help(
                        "inputs: {teacher: teacher.best, train: corpus.train.txt, valid: \
                        corpus.valid.txt, tokenizer: vocab.tokenizer.json}",
                    ));
            }
        }
        let mut required: Vec<String> = ["model", "best", "metrics.csv", "summary.json"].map(String::from).to_vec();
        let mut volatile = vec!["metrics.csv".to_string(), "summary.json".to_string()];
        if s.control {
            required.extend(["control".to_string(), "control.csv".to_string()]);
            volatile.push("control.csv".into());
        }
        Ok(StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: required,
            volatile_outputs: volatile,
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        ctx.metric("simd_path", itera_models::simd_path());
        let s = settings(ctx.params())?;
        let h = &s.hyper;
        let seed = ctx.seed();
        let teacher_dir = ctx.input("teacher")?.to_path_buf();
        let teacher = Model::load(&teacher_dir).context(|| format!("loading the teacher {}", teacher_dir.display()))?;
        let tok = load_tokenizer(ctx.input("tokenizer")?)?;
        let vocab = tok.get_vocab_size(true);
        if teacher.config.vocab_size() != vocab {
            return Err(StageError::failed(format!(
                "the teacher has a vocabulary of {} tokens but the tokenizer has {vocab}; distill with the tokenizer the teacher was trained with",
                teacher.config.vocab_size()
            )));
        }
        let train_text = stage_api::read_text(ctx.input("train")?)?;
        let valid_text = stage_api::read_text(ctx.input("valid")?)?;
        let train_ids = encode(&tok, &train_text)?;
        let valid_ids = encode(&tok, &valid_text)?;
        let config = h.config(vocab)?;
        if h.seq_len > teacher.config.max_seq_len() {
            return Err(StageError::failed(format!(
                "seq_len {} exceeds the teacher's max_seq_len {}",
                h.seq_len,
                teacher.config.max_seq_len()
            )));
        }
        let tokens_per_step = h.batch * h.seq_len;
        let cancel = ctx.cancel_flag();

        let student = Model::new(&config, seed).context(|| "initializing the student".into())?;
        let best_dir = ctx.output("best")?.to_path_buf();
        let objective = Objective::Distill { teacher: &teacher, temperature: s.temperature, alpha: s.alpha };
        let say = |prefix: &str, m: &str, ctx: &mut StageContext| ctx.progress(&format!("{prefix}: {m}"));
        let report = fit(
            &student,
            h,
            seed,
            TokenSplits { train: &train_ids, valid: &valid_ids },
            &objective,
            &best_dir,
            FitHooks { progress: &mut |m| say("distilling", m, ctx), cancel: &cancel },
        )?;
        student.save(ctx.output("model")?).context(|| "saving the student".into())?;
        std::fs::write(ctx.output("metrics.csv")?, &report.csv)
            .map_err(|e| StageError::io("writing metrics.csv", e))?;
        let student_best =
            Model::load(&best_dir).context(|| format!("loading the best student {}", best_dir.display()))?;

        // The control: same architecture, seed, batches and steps; cross-entropy only.
        let control = if s.control {
            let control_dir = ctx.output("control")?.to_path_buf();
            let scratch = Model::new(&config, seed).context(|| "initializing the control".into())?;
            let r = fit(
                &scratch,
                h,
                seed,
                TokenSplits { train: &train_ids, valid: &valid_ids },
                &Objective::CrossEntropy,
                &control_dir,
                FitHooks { progress: &mut |m| say("control", m, ctx), cancel: &cancel },
            )?;
            std::fs::write(ctx.output("control.csv")?, &r.csv).map_err(|e| StageError::io("writing control.csv", e))?;
            let best =
                Model::load(&control_dir).context(|| format!("loading the control {}", control_dir.display()))?;
            Some((best, r, control_dir))
        } else {
            None
        };
        ctx.check_cancelled()?;

        let q_teacher = quality(&teacher, &valid_ids, valid_text.len(), h.seq_len, h.batch)?;
        let q_student = quality(&student_best, &valid_ids, valid_text.len(), h.seq_len, h.batch)?;
        let bench_ids: Vec<u32> = valid_ids.iter().copied().cycle().take(h.batch * h.seq_len).collect();
        let bench = Tensor::from_vec(bench_ids, (h.batch, h.seq_len), &candle_core::Device::Cpu)
            .context(|| "building the timing batch".into())?;
        let mut models: Vec<&Model> = vec![&teacher, &student_best];
        if let Some((m, _, _)) = &control {
            models.push(m);
        }
        let rates = forward_rates(&models, &bench, 5).context(|| "timing the forwards".into())?;
        let teacher_json = describe(
            &teacher,
            &teacher.config,
            &q_teacher,
            checkpoint_bytes(&teacher_dir)?,
            h.seq_len,
            rates[0].median,
        );
        let student_json =
            describe(&student_best, &config, &q_student, checkpoint_bytes(&best_dir)?, h.seq_len, rates[1].median);
        let tp = param_counts(&teacher.config).total as f64;
        let sp = param_counts(&config).total as f64;
        let mut summary = json!({
            "objective": format!("{}·T²·KL(teacher_T ‖ student_T) + {}·CE, T = {}", s.alpha, 1.0 - s.alpha, s.temperature),
            "temperature": s.temperature,
            "alpha": s.alpha,
            "seq_len": h.seq_len,
            "batch": h.batch,
            "teacher": teacher_json,
            "student": student_json,
            "student_run": run_summary(&report, tokens_per_step),
            "params_ratio_teacher_to_student": tp / sp,
            "speedup_student_vs_teacher": rates[1].median / rates[0].median,
            "threads": ctx.threads(),
            "seed": seed,
        });
        ctx.metric("student_val_loss", q_student.val_loss);
        ctx.metric("teacher_val_loss", q_teacher.val_loss);
        if let Some((m, r, dir)) = &control {
            let q_control = quality(m, &valid_ids, valid_text.len(), h.seq_len, h.batch)?;
            summary["control"] = describe(m, &config, &q_control, checkpoint_bytes(dir)?, h.seq_len, rates[2].median);
            summary["control_run"] = run_summary(r, tokens_per_step);
            summary["distillation_gain"] = json!({
                "val_loss_control_minus_student": q_control.val_loss - q_student.val_loss,
                "perplexity_ratio_control_to_student": q_control.val_perplexity / q_student.val_perplexity,
                "note": "positive = the distilled student beats the same architecture trained from scratch with the same data, steps and seed",
            });
            ctx.metric("control_val_loss", q_control.val_loss);
        }
        stage_api::write_json(ctx.output("summary.json")?, &summary)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
