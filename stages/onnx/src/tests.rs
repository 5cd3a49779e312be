use candle_core::{Device, Tensor};
use itera_models::{Model, ModelConfig};
use prost::Message;

use crate::export::{full_graph, step_graph, Weights};
use crate::runtime::{Engine, Input};

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
                let out = engine.run(&[("input_ids", Input::I64(vec![b, l], x.iter().map(|&v| v as i64).collect()))]).unwrap();
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
        let mut states: Vec<(Vec<f32>, Vec<f32>)> = (0..cfg.n_layers).map(|_| (vec![0.0; (cfg.d_conv - 1) * cfg.d_inner()], vec![0.0; cfg.d_state])).collect();
        for (t, &tok) in x.iter().enumerate() {
            let mut inputs: Vec<(String, Input)> = vec![("input_ids".into(), Input::I64(vec![1, 1], vec![tok as i64])), ("position".into(), Input::I64(vec![1], vec![t as i64]))];
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
