use candle_core::{Device, Tensor};
use itera_models::{Model, ModelConfig};
use prost::Message;

use crate::export::{full_graph, step_graph, Weights};
use onnx_runtime::{Engine, Input};

fn small(model: &str) -> ModelConfig {
    let o = serde_json::json!({"max_seq_len": 32});
    ModelConfig::build(model, if model == "itera_lite" { "micro" } else { "tiny" }, 40, o.as_object().unwrap()).unwrap()
}

fn ids(b: usize, l: usize) -> Vec<u32> {
    (0..b * l).map(|i| (i as u32 * 7 + 3) % 40).collect()
}

fn native(model: &Model, ids: &[u32], b: usize, l: usize) -> Vec<f32> {
    let x = Tensor::from_vec(ids.to_vec(), (b, l), &Device::Cpu).unwrap();
    model.forward(&x, None).unwrap().logits.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn full_graphs_match_native_in_tract_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["itera_lite", "transformer"] {
        let mut model = Model::new(&small(name), 3).unwrap();
        let w = Weights::of(&mut model).unwrap();
        let proto = full_graph(&model.config, &w).unwrap();
        let path = dir.path().join(format!("{name}.onnx"));
        std::fs::write(&path, proto.encode_to_vec()).unwrap();
        for mut engine in [Engine::tract(&path).unwrap(), Engine::ort(&path, 1).unwrap()] {
            for (b, l) in [(2, 17), (1, 1), (1, 32)] {
                let x = ids(b, l);
                let want = native(&model, &x, b, l);
                let out = engine
                    .run(&[("input_ids", Input::I64(vec![b, l], x.iter().map(|&v| v as i64).collect()))])
                    .unwrap();
                assert_eq!(out[0].shape, vec![b, l, 40]);
                let d = max_diff(&want, &out[0].data);
                assert!(d < 1e-4, "{name} in {} at ({b}, {l}): max abs diff {d}", engine.name());
            }
        }
    }
}

#[test]
fn step_graph_matches_native_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::new(&small("itera_lite"), 5).unwrap();
    let w = Weights::of(&mut model).unwrap();
    let proto = step_graph(&model.config, &w).unwrap().unwrap();
    let path = dir.path().join("step.onnx");
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    let cfg = match &model.config {
        ModelConfig::IteraLite(c) => c.clone(),
        _ => unreachable!(),
    };
    let x = ids(1, 12);
    let full = native(&model, &x, 1, 12);
    for mut engine in [Engine::tract(&path).unwrap(), Engine::ort(&path, 1).unwrap()] {
        let mut states: Vec<(Vec<f32>, Vec<f32>)> =
            (0..cfg.n_layers).map(|_| (vec![0.0; (cfg.d_conv - 1) * cfg.d_inner()], vec![0.0; cfg.d_state])).collect();
        for (t, &tok) in x.iter().enumerate() {
            let mut inputs: Vec<(String, Input)> = vec![
                ("input_ids".into(), Input::I64(vec![1, 1], vec![tok as i64])),
                ("position".into(), Input::I64(vec![1], vec![t as i64])),
            ];
            for (i, (c, h)) in states.iter().enumerate() {
                inputs.push((format!("conv_state.{i}"), Input::F32(vec![1, cfg.d_conv - 1, cfg.d_inner()], c.clone())));
                inputs.push((format!("ssm_state.{i}"), Input::F32(vec![1, cfg.d_state], h.clone())));
            }
            let named: Vec<(&str, Input)> = inputs.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
            let out = engine.run(&named).unwrap();
            assert_eq!(out[0].name, "logits");
            let d = max_diff(&full[t * 40..(t + 1) * 40], &out[0].data);
            assert!(d < 1e-4, "{} step {t}: {d}", engine.name());
            for (i, st) in states.iter_mut().enumerate() {
                st.0 = out.iter().find(|o| o.name == format!("conv_state_out.{i}")).unwrap().data.clone();
                st.1 = out.iter().find(|o| o.name == format!("ssm_state_out.{i}")).unwrap().data.clone();
            }
        }
    }
}

mod stages {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use itera_models::qmodel::QuantSpec;
    use itera_models::quant::Scheme;
    use itera_models::{Model, ModelConfig};
    use prost::Message;
    use serde_json::{json, Value};
    use stage_api::{InputSpec, Params, RunSpec, Stage, StageContext, StageError};

    use crate::{OnnxCheckStage, OnnxExportStage};

    fn params(v: Value) -> Params {
        Params::from_json(v)
    }

    fn write_text_inputs(dir: &Path) -> usize {
        let n = itera_models::testing::write_char_tokenizer(dir).unwrap();
        std::fs::write(dir.join("valid.txt"), "the dog sat on the mat. a cat ran to the tree!\n".repeat(8)).unwrap();
        n
    }

    fn run_stage(
        stage: &dyn Stage,
        dir: &Path,
        p: Value,
        inputs: &[(&str, PathBuf)],
        out: &str,
    ) -> Result<PathBuf, StageError> {
        let p = params(p);
        let io = InputSpec { inputs: inputs.iter().map(|(n, _)| n.to_string()).collect(), outputs: vec![] };
        let plan = stage.check(&p, &io).unwrap();
        let out_dir = dir.join(out);
        std::fs::create_dir_all(&out_dir).unwrap();
        let outputs: BTreeMap<String, PathBuf> =
            plan.required_outputs.iter().map(|n| (n.clone(), out_dir.join(n))).collect();
        let spec = RunSpec::new(
            out,
            stage.kind(),
            p,
            inputs.iter().map(|(n, path)| (n.to_string(), path.clone())).collect(),
            outputs,
            dir,
        );
        let mut ctx = StageContext::uncancelled(spec);
        stage.run(&mut ctx)?;
        Ok(out_dir)
    }

    fn export_and_check(dir: &Path, model: PathBuf, corrupt: bool) -> Result<Value, StageError> {
        let exported = run_stage(&OnnxExportStage, dir, json!({}), &[("model", model.clone())], "export")?;
        let graphs = exported.join("graphs");
        if corrupt {
            // Flip one weight of the first layer's input projection.
            let path = graphs.join("model.onnx");
            let mut proto = tract_onnx::pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
            let init = proto
                .graph
                .as_mut()
                .unwrap()
                .initializer
                .iter_mut()
                .find(|t| t.name.starts_with("layers.0.ssm.in_proj.weight_t"))
                .unwrap();
            let v = f32::from_le_bytes(init.raw_data[0..4].try_into().unwrap());
            init.raw_data[0..4].copy_from_slice(&(v + 0.5).to_le_bytes());
            std::fs::write(&path, proto.encode_to_vec()).unwrap();
        }
        let inputs = [
            ("graphs", graphs),
            ("model", model),
            ("tokenizer", dir.join("tokenizer.json")),
            ("valid", dir.join("valid.txt")),
        ];
        let out = run_stage(
            &OnnxCheckStage,
            dir,
            json!({"seq_len": 32, "batch": 2, "batches": 2, "eval_tokens": 256, "generate": 12, "bench_runs": 1}),
            &inputs,
            "check",
        )?;
        Ok(serde_json::from_str(&std::fs::read_to_string(out.join("crosscheck.json")).unwrap()).unwrap())
    }

    fn small(dir: &Path, vocab: usize, model: &str) -> Model {
        let o = json!({"max_seq_len": 32});
        let cfg = ModelConfig::build(
            model,
            if model == "itera_lite" { "micro" } else { "tiny" },
            vocab,
            o.as_object().unwrap(),
        )
        .unwrap();
        let m = Model::new(&cfg, 2).unwrap();
        m.save(&dir.join("model")).unwrap();
        m
    }

    #[test]
    fn f32_and_int8_exports_pass_the_cross_check_in_both_runtimes() {
        for name in ["itera_lite", "transformer"] {
            let dir = tempfile::tempdir().unwrap();
            let vocab = write_text_inputs(dir.path());
            small(dir.path(), vocab, name);
            let r = export_and_check(dir.path(), dir.path().join("model"), false).unwrap();
            assert_eq!(r["pass"], true, "{r}");
            let graphs: Vec<(String, String)> = r["runtimes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["runtime"].as_str().unwrap().into(), e["graph"].as_str().unwrap().into()))
                .collect();
            assert!(
                graphs.contains(&("tract".into(), "full".into()))
                    && graphs.contains(&("onnxruntime".into(), "full".into())),
                "{graphs:?}"
            );
            assert_eq!(graphs.contains(&("tract".into(), "step".into())), name == "itera_lite");
            let export = dir.path().join("export/graphs/export.json");
            assert!(std::fs::read_to_string(export).unwrap().contains("\"opset\": 17"));
        }
        let dir = tempfile::tempdir().unwrap();
        let vocab = write_text_inputs(dir.path());
        let mut m = small(dir.path(), vocab, "itera_lite");
        m.quantize(&QuantSpec { scheme: Scheme::Int8, group_size: 32, embeddings: false, exclude: vec![] }).unwrap();
        m.save_gguf(&dir.path().join("model.gguf")).unwrap();
        let r = export_and_check(dir.path(), dir.path().join("model.gguf"), false).unwrap();
        assert_eq!(r["pass"], true, "{r}");
        assert_eq!(r["quantization"], "int8");
        let onnx = std::fs::metadata(dir.path().join("export/graphs/model.onnx")).unwrap().len();
        let f32_export = {
            let d = tempfile::tempdir().unwrap();
            write_text_inputs(d.path());
            small(d.path(), vocab, "itera_lite");
            run_stage(&OnnxExportStage, d.path(), json!({}), &[("model", d.path().join("model"))], "export").unwrap();
            std::fs::metadata(d.path().join("export/graphs/model.onnx")).unwrap().len()
        };
        assert!(onnx * 2 < f32_export, "int8 initializers make the file smaller: {onnx} vs {f32_export}");
    }

    #[test]
    fn a_corrupted_initializer_fails_the_check_naming_model_runtime_graph_and_position() {
        let dir = tempfile::tempdir().unwrap();
        let vocab = write_text_inputs(dir.path());
        small(dir.path(), vocab, "itera_lite");
        let e = export_and_check(dir.path(), dir.path().join("model"), true).unwrap_err().to_string();
        for want in ["Itera-Lite", "tract", "onnxruntime", "full graph", "max |Δlogit|", "position"] {
            assert!(e.contains(want), "missing `{want}` in: {e}");
        }
    }
}

#[test]
fn matmul_work_counted_in_the_graph_equals_the_formula() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["itera_lite", "transformer"] {
        for quantized in [false, true] {
            let mut model = Model::new(&small(name), 3).unwrap();
            if quantized {
                model
                    .quantize(&itera_models::qmodel::QuantSpec {
                        scheme: itera_models::quant::Scheme::Int8,
                        group_size: 32,
                        embeddings: true,
                        exclude: vec![],
                    })
                    .unwrap();
            }
            let w = Weights::of(&mut model).unwrap();
            let path = dir.path().join(format!("{name}-{quantized}.onnx"));
            std::fs::write(&path, full_graph(&model.config, &w).unwrap().encode_to_vec()).unwrap();
            let counted = onnx_runtime::weight_matmul_macs(&path).unwrap();
            assert_eq!(
                counted,
                itera_models::accounting::weight_matmul_macs(&model.config, true),
                "{name} quantized={quantized}"
            );
        }
    }
}
