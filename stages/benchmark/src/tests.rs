use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use itera_models::qmodel::QuantSpec;
use itera_models::quant::Scheme;
use itera_models::{Model, ModelConfig};
use serde_json::{json, Value};
use stage_api::{InputSpec, Params, RunSpec, Stage, StageContext};

use super::{settings, BenchmarkStage};

fn params(v: Value) -> Params {
    Params::from_json(v)
}

fn write_inputs(dir: &Path) -> usize {
    let n = itera_models::testing::write_char_tokenizer(dir).unwrap();
    std::fs::write(dir.join("valid.txt"), "the dog sat on the mat. a cat ran to the tree!\n".repeat(8)).unwrap();
    n
}

#[test]
fn measures_native_gguf_and_onnx_models_with_host_and_csv() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vocab = write_inputs(d);
    let o = json!({"max_seq_len": 32});
    let cfg = ModelConfig::build("itera_lite", "micro", vocab, o.as_object().unwrap()).unwrap();
    let mut m = Model::new(&cfg, 1).unwrap();
    m.save(&d.join("f32")).unwrap();
    let w = stage_onnx::export::Weights::of(&mut m).unwrap();
    std::fs::create_dir_all(d.join("graphs")).unwrap();
    let export = |name: &str, proto: tract_onnx::pb::ModelProto| {
        std::fs::write(d.join("graphs").join(name), prost::Message::encode_to_vec(&proto)).unwrap()
    };
    export("model.onnx", stage_onnx::export::full_graph(&cfg, &w).unwrap());
    export("step.onnx", stage_onnx::export::step_graph(&cfg, &w).unwrap().unwrap());
    std::fs::write(d.join("graphs/export.json"), json!({"model": cfg, "quantization": null}).to_string()).unwrap();
    m.quantize(&QuantSpec { scheme: Scheme::Int8, group_size: 32, embeddings: false, exclude: vec![] }).unwrap();
    m.save_gguf(&d.join("int8.gguf")).unwrap();

    let p = params(json!({"seq_len": 32, "batch": 2, "runs": 2, "generate": 8, "eval_tokens": 128}));
    let inputs: BTreeMap<String, PathBuf> = [
        ("tokenizer", d.join("tokenizer.json")),
        ("valid", d.join("valid.txt")),
        ("itera", d.join("f32")),
        ("int8", d.join("int8.gguf")),
        ("onnx", d.join("graphs")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let io = InputSpec { inputs: inputs.keys().cloned().collect(), outputs: vec![] };
    let plan = BenchmarkStage.check(&p, &io).unwrap();
    assert!(!plan.deterministic);
    let out: BTreeMap<String, PathBuf> = plan.required_outputs.iter().map(|n| (n.clone(), d.join(n))).collect();
    let spec = RunSpec::new("bench", "benchmark", p, inputs, out, d);
    let mut ctx = StageContext::uncancelled(spec);
    BenchmarkStage.run(&mut ctx).unwrap();
    let r: Value = serde_json::from_str(&std::fs::read_to_string(d.join("benchmark.json")).unwrap()).unwrap();
    assert!(r["host"]["cores"].as_u64().unwrap() >= 1 && r["host"]["rustc"].as_str().unwrap().starts_with("rustc"));
    let labels: Vec<&str> = r["models"].as_array().unwrap().iter().map(|m| m["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["int8", "itera", "onnx@tract", "onnx@onnxruntime"]);
    for m in r["models"].as_array().unwrap() {
        assert!(m["forward_tokens_per_s"]["median"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["quality"]["val_loss"].as_f64().unwrap().is_finite(), "{m}");
        assert!(m["peak_rss_bytes"].as_u64().unwrap() > 0, "{m}");
    }
    let models = r["models"].as_array().unwrap();
    // The same f32 weights score the same loss natively and in both runtimes.
    let loss = |i: usize| models[i]["quality"]["val_loss"].as_f64().unwrap();
    assert!((loss(1) - loss(2)).abs() < 1e-4 && (loss(1) - loss(3)).abs() < 1e-4);
    assert_eq!(models[2]["flops_cross_check"]["equal"], true);
    assert!(models[0]["bytes_on_disk"].as_u64().unwrap() * 2 < models[1]["bytes_on_disk"].as_u64().unwrap());
    // Each model's figures are also the stage's metrics, as benchmark.json has them (read
    // back by serde_json's fast float parser, which may be an ulp off).
    let metrics = ctx.metrics();
    for (i, label) in [(0, "int8"), (1, "itera"), (3, "onnx_onnxruntime")] {
        let m = &models[i];
        let same = |metric: &str, v: &Value| {
            let (a, b) = (metrics[&format!("{label}_{metric}")].as_f64().unwrap(), v.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-12 * b.abs(), "{label}_{metric}: {a} vs {b}");
        };
        same("forward_tok_s", &m["forward_tokens_per_s"]["median"]);
        same("generate_tok_s", &m["generate_tokens_per_s"]["median"]);
        same("val_loss", &m["quality"]["val_loss"]);
        same("bytes_on_disk", &m["bytes_on_disk"]);
        same("peak_rss_bytes", &m["peak_rss_bytes"]);
        same("latency_ms_p50", &m["latency_ms_p50"]);
    }
    let csv = std::fs::read_to_string(d.join("benchmark.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.lines().all(|l| l.split(',').count() == 20), "{csv}");
}

#[test]
fn params_and_inputs_are_checked() {
    assert_eq!(settings(&params(json!({"runtimes": ["onnxruntime", "coreml"]}))).unwrap_err().key, "params.runtimes");
    assert_eq!(settings(&params(json!({"batch": 0}))).unwrap_err().key, "params");
    let io = InputSpec { inputs: vec!["tokenizer".into(), "valid".into()], outputs: vec![] };
    assert!(BenchmarkStage.check(&params(json!({})), &io).unwrap_err().message.contains("at least one model"));
}
