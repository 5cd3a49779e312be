use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use itera_models::{Model, ModelConfig};
use serde_json::{json, Value};
use stage_api::{InputSpec, Params, RunSpec, Stage, StageContext};

use super::{settings, QuantizeStage};

fn params(v: Value) -> Params {
    Params::from_json(v)
}

/// A char-level tokenizer, some validation text and an (untrained, seeded) micro model.
fn write_inputs(dir: &Path) {
    let n = itera_models::testing::write_char_tokenizer(dir).unwrap();
    std::fs::write(dir.join("valid.txt"), "the dog sat on the mat. a cat ran to the tree!\n".repeat(20)).unwrap();
    let o = json!({"max_seq_len": 64});
    let cfg = ModelConfig::build("itera_lite", "micro", n, o.as_object().unwrap()).unwrap();
    Model::new(&cfg, 7).unwrap().save(&dir.join("model")).unwrap();
}

fn run(dir: &Path, p: Value) -> Result<Value, stage_api::StageError> {
    write_inputs(dir);
    let p = params(p);
    let io = InputSpec { inputs: vec!["model".into(), "valid".into(), "tokenizer".into()], outputs: vec![] };
    QuantizeStage.check(&p, &io).unwrap();
    let inputs = BTreeMap::from([
        ("model".to_string(), dir.join("model")),
        ("valid".to_string(), dir.join("valid.txt")),
        ("tokenizer".to_string(), dir.join("tokenizer.json")),
    ]);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let outputs: BTreeMap<String, PathBuf> =
        ["model.gguf", "summary.json"].iter().map(|n| (n.to_string(), out.join(n))).collect();
    let spec = RunSpec { seed: 1, ..RunSpec::new("q", "quantize", p, inputs, outputs, dir) };
    let mut ctx = StageContext::uncancelled(spec);
    QuantizeStage.run(&mut ctx)?;
    Ok(serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap())
}

#[test]
fn int8_and_int4_write_a_smaller_gguf_and_report_quality_and_speed() {
    for (scheme, min_ratio) in [("int8", 3.5), ("int4", 6.0)] {
        let dir = tempfile::tempdir().unwrap();
        let s = run(dir.path(), json!({"scheme": scheme, "seq_len": 32, "batch": 4, "bench_runs": 2})).unwrap();
        let ratio = s["compression_ratio_quantized_tensors"].as_f64().unwrap();
        assert!(ratio > min_ratio, "{scheme}: {ratio}");
        assert!(s["bytes"]["quantized_file"].as_u64().unwrap() < s["bytes"]["f32_checkpoint"].as_u64().unwrap());
        let kl = s["mean_kl_f32_to_quantized"].as_f64().unwrap();
        assert!(kl > 0.0 && kl < 0.1, "{scheme}: KL {kl}");
        for k in ["f32", "quantized"] {
            assert!(s[k]["val_loss"].as_f64().unwrap().is_finite());
        }
        assert!(s["forward_tokens_per_s"]["quantized"]["median"].as_f64().unwrap() > 0.0);
        assert_eq!(
            s["kept_f32"].as_array().unwrap().iter().filter(|t| t["name"] == "embed.weight").count(),
            1,
            "embeddings stay f32 by default"
        );
        // The file loads on its own and is deterministic.
        let a = std::fs::read(dir.path().join("out/model.gguf")).unwrap();
        let mut m = Model::load_gguf(&dir.path().join("out/model.gguf")).unwrap();
        assert_eq!(m.to_gguf().unwrap().to_bytes(), a);
    }
}

#[test]
fn params_are_checked() {
    let e = |v: Value| settings(&params(v)).unwrap_err();
    assert_eq!(e(json!({})).key, "params");
    assert_eq!(e(json!({"scheme": "int3"})).key, "params.scheme");
    assert_eq!(e(json!({"scheme": "int4", "group_size": 48})).key, "params.group_size");
    assert_eq!(e(json!({"scheme": "int8", "embeddings": "yes"})).key, "params.embeddings");
    assert_eq!(e(json!({"scheme": "int8", "exclude": "layers.0"})).key, "params.exclude");
    assert_eq!(e(json!({"scheme": "int8", "grup_size": 32})).key, "params.grup_size");
    assert!(
        settings(&params(json!({"scheme": "int8", "embeddings": "quantize", "exclude": ["layers.0.moe.router"]})))
            .unwrap()
            .spec
            .embeddings
    );
}

#[test]
fn an_unknown_excluded_layer_fails_the_run_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let e = run(dir.path(), json!({"scheme": "int8", "exclude": ["layers.7"], "seq_len": 32})).unwrap_err();
    assert!(e.to_string().contains("layers.7"), "{e}");
}
