//! The `onnx_export` and `onnx_check` stages.
//!
//! `onnx_export`: a checkpoint folder or a quantized `model.gguf` → `graphs/` holding
//! `model.onnx` (full sequence), `step.onnx` (Itera-Lite one-token graph) and `export.json`.
//!
//! `onnx_check`: runs every graph in tract and in ONNX Runtime on validation windows and edge
//! shapes, compares with the native candle forward, scores validation loss in each runtime,
//! times each, generates greedily through the step graph, and fails naming the model, runtime,
//! graph and worst position when a tolerance is broken. Writes `crosscheck.json`.

pub mod check;
pub mod export;
pub mod graph;

use itera_models::Model;
use prost::Message;
use serde_json::json;
use stage_api::{Context, InputSpec, ParamError, Params, Stage, StageContext, StageError, StageProfile};

use crate::export::{full_graph, step_graph, Weights};

fn need_inputs(io: &InputSpec, kind: &str, needed: &[&str], help: &str) -> Result<(), ParamError> {
    for n in needed {
        if !io.inputs.iter().any(|i| i == n) {
            return Err(ParamError::new("inputs", format!("the {kind} stage needs an input named `{n}`"))
                .with_help(help.to_string()));
        }
    }
    Ok(())
}

pub struct OnnxExportStage;

impl Stage for OnnxExportStage {
    fn kind(&self) -> &'static str {
        "onnx_export"
    }
    fn describe(&self) -> &'static str {
        "a checkpoint or quantized model.gguf → ONNX (opset 17): graphs/model.onnx (full sequence), \
            graphs/step.onnx (Itera-Lite), graphs/export.json"
    }

    fn check(&self, params: &Params, io: &InputSpec) -> Result<StageProfile, ParamError> {
        stage_api::check_known_params(params, &["seed"], "onnx_export")?;
        need_inputs(io, "onnx_export", &["model"], "inputs: {model: train.best}  (or a quantize stage's model.gguf)")?;
        Ok(StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: vec!["graphs".into()],
            volatile_outputs: vec![],
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        ctx.metric("simd_path", itera_models::simd_path());
        let src = ctx.input("model")?.to_path_buf();
        let mut model = Model::load_any(&src).context(|| format!("loading the model {}", src.display()))?;
        let scheme = model.quant_scheme();
        let w = Weights::of(&mut model).context(|| "reading the weights to export".into())?;
        let dir = ctx.output("graphs")?.to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
        let full = full_graph(&model.config, &w).context(|| "building the full-sequence graph".into())?.encode_to_vec();
        std::fs::write(dir.join("model.onnx"), &full).map_err(|e| StageError::io("writing model.onnx", e))?;
        let mut graphs = vec![json!({"file": "model.onnx", "kind": "full", "bytes": full.len(),
            "inputs": {"input_ids": "int64 [batch, seq]"}, "outputs": {"logits": "float32 [batch, seq, vocab]"}})];
        if let Some(step) = step_graph(&model.config, &w).context(|| "building the step graph".into())? {
            let bytes = step.encode_to_vec();
            std::fs::write(dir.join("step.onnx"), &bytes).map_err(|e| StageError::io("writing step.onnx", e))?;
            graphs.push(json!({"file": "step.onnx", "kind": "step", "bytes": bytes.len(),
                "inputs": {"input_ids": "int64 [batch, 1]", "position": "int64 [1]", "conv_state.<i>": "float32 [batch, d_conv-1, d_inner]", "ssm_state.<i>": "float32 [batch, d_state]"},
                "outputs": {"logits": "float32 [batch, 1, vocab]", "conv_state_out.<i>": "float32 [batch, d_conv-1, d_inner]", "ssm_state_out.<i>": "float32 [batch, d_state]"}}));
        }
        let manifest = json!({
            "opset": graph::OPSET,
            "ir_version": graph::IR_VERSION,
            "model": model.config,
            "weights": match scheme {
                Some(s) => format!("{} weights as int8 initializers with f32 scales, dequantized in the graph (Cast · scale); activations f32", s.name()),
                None => "f32 initializers".to_string(),
            },
            "quantization": scheme.map(|s| s.name()),
            "graphs": graphs,
        });
        stage_api::write_json(&dir.join("export.json"), &manifest)?;
        ctx.metric("model_onnx_bytes", full.len());
        Ok(())
    }
}

pub struct OnnxCheckStage;

impl Stage for OnnxCheckStage {
    fn kind(&self) -> &'static str {
        "onnx_check"
    }
    fn describe(&self) -> &'static str {
        "run exported graphs in tract and ONNX Runtime, compare with the native forward (logits, \
            argmax, validation loss, generation, tokens/s) → crosscheck.json; fails on disagreement"
    }

    fn check(&self, params: &Params, io: &InputSpec) -> Result<StageProfile, ParamError> {
        check::settings(params)?;
        need_inputs(
            io,
            "onnx_check",
            &["graphs", "model", "tokenizer", "valid"],
            "inputs: {graphs: export.graphs, model: \
            train.best, tokenizer: vocab.tokenizer.json, valid: corpus.valid.txt}",
        )?;
        Ok(StageProfile {
            default_threads: 1,
            deterministic: true,
            required_outputs: vec!["crosscheck.json".into()],
            // Holds tokens/s.
            volatile_outputs: vec!["crosscheck.json".into()],
        })
    }

    fn run(&self, ctx: &mut StageContext) -> Result<(), StageError> {
        ctx.metric("simd_path", itera_models::simd_path());
        check::run(ctx)
    }
}

#[cfg(test)]
mod tests;
