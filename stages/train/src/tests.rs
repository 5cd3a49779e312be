use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use stage_api::{InputSpec, Params, RunSpec, Stage, StageContext};

use super::{hyper, TrainStage};

fn params(v: Value) -> Params {
    Params::from_json(v)
}

/// A char tokenizer over the letters and punctuation used below (built by the vocab stage's
/// format: WordLevel over single characters).
fn write_inputs(dir: &Path) {
    let text = "the cat sat on the mat. the dog ran to the park! a bird sang in the tree.\n".repeat(30);
    std::fs::write(dir.join("train.txt"), &text).unwrap();
    std::fs::write(dir.join("valid.txt"), "the dog sat on the mat. a cat ran to the tree!\n".repeat(6)).unwrap();
    itera_models::testing::write_char_tokenizer(dir).unwrap();
}

fn run(dir: &Path, p: Value) -> Result<Value, stage_api::StageError> {
    write_inputs(dir);
    let p = params(p);
    let io = InputSpec { inputs: vec!["train".into(), "valid".into(), "tokenizer".into()], outputs: vec![] };
    TrainStage.check(&p, &io).unwrap();
    let inputs = BTreeMap::from([
        ("train".to_string(), dir.join("train.txt")),
        ("valid".to_string(), dir.join("valid.txt")),
        ("tokenizer".to_string(), dir.join("tokenizer.json")),
    ]);
    let outputs: BTreeMap<String, PathBuf> = ["model", "best", "metrics.csv", "summary.json"]
        .iter()
        .map(|n| (n.to_string(), dir.join("out").join(n)))
        .collect();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let spec = RunSpec { seed: 3, ..RunSpec::new("t", "train", p, inputs, outputs, dir) };
    let mut ctx = StageContext::uncancelled(spec);
    TrainStage.run(&mut ctx)?;
    Ok(serde_json::from_str(&std::fs::read_to_string(dir.join("out/summary.json")).unwrap()).unwrap())
}

fn tiny(model: &str) -> Value {
    json!({"model": model, "preset": if model == "itera_lite" { "micro" } else { "tiny" },
        "overrides": {"d_model": 32, "n_layers": 2, "max_seq_len": 32},
        "seq_len": 32, "batch": 4, "steps": 30, "eval_interval": 10, "warmup": 5, "lr": 0.01})
}

#[test]
fn trains_both_models_and_the_loss_falls() {
    for m in ["itera_lite", "transformer"] {
        let dir = tempfile::tempdir().unwrap();
        let s = run(dir.path(), tiny(m)).unwrap();
        let csv = std::fs::read_to_string(dir.path().join("out/metrics.csv")).unwrap();
        let rows: Vec<Vec<f64>> =
            csv.lines().skip(1).map(|l| l.split(',').map(|x| x.parse().unwrap()).collect()).collect();
        assert_eq!(rows.len(), 3, "{csv}");
        assert!(rows[2][2] < rows[0][2], "{m}: train loss falls: {csv}");
        assert!(s["val_loss"].as_f64().unwrap() < (35f64).ln(), "{m}: better than uniform over the vocabulary");
        assert_eq!(s["tokens_seen"], 30 * 4 * 32);
        assert!(dir.path().join("out/model/model.safetensors").exists());
        assert!(dir.path().join("out/best/config.json").exists());
        let bpb = s["bits_per_byte"].as_f64().unwrap();
        assert!(
            (bpb - s["val_loss"].as_f64().unwrap() / std::f64::consts::LN_2).abs() < 1e-9,
            "char-level: one token per byte"
        );
    }
}

#[test]
fn same_seed_same_checkpoint_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut p = tiny("itera_lite");
    p["steps"] = json!(6);
    p["overrides"]["dropout"] = json!(0.1);
    run(a.path(), p.clone()).unwrap();
    run(b.path(), p).unwrap();
    for f in ["model/model.safetensors", "best/model.safetensors", "metrics.csv"] {
        let x = std::fs::read(a.path().join("out").join(f)).unwrap();
        let y = std::fs::read(b.path().join("out").join(f)).unwrap();
        if f.ends_with(".csv") {
            // tokens/s differs between runs; the losses must not.
            let strip = |s: &[u8]| {
                String::from_utf8_lossy(s)
                    .lines()
                    .map(|l| l.split(',').take(4).collect::<Vec<_>>().join(","))
                    .collect::<Vec<_>>()
            };
            assert_eq!(strip(&x), strip(&y));
        } else {
            assert!(x == y, "{f} differs between two runs with the same seed");
        }
    }
}

#[test]
fn early_stopping_and_schedule() {
    let h = hyper(&params(json!({"model": "transformer", "steps": 100, "warmup": 10, "lr": 0.01}))).unwrap();
    assert!((h.lr_at(0, 100) - 0.001).abs() < 1e-12);
    assert!((h.lr_at(9, 100) - 0.01).abs() < 1e-12);
    assert!((h.lr_at(99, 100) - 0.001).abs() < 2e-5, "cosine ends at min_lr_ratio · lr");
    // With lr = 1e-12 no f32 weight can change, so validation never improves after the first
    // evaluation (step 2) and patience 1 stops the run at the second (step 4).
    let dir = tempfile::tempdir().unwrap();
    let mut p = tiny("transformer");
    p["steps"] = json!(200);
    p["eval_interval"] = json!(2);
    p["patience"] = json!(1);
    p["lr"] = json!(1e-12);
    let s = run(dir.path(), p).unwrap();
    assert_eq!(s["stopped_early"], true);
    assert_eq!(s["steps"], 4);
    assert_eq!(s["best_step"], 2);
}

#[test]
fn params_are_checked() {
    let e = |v: Value| hyper(&params(v)).unwrap_err();
    assert_eq!(e(json!({"steps": 5})).key, "params.model");
    assert_eq!(e(json!({"model": "rnn", "steps": 5})).key, "params.model");
    assert_eq!(e(json!({"model": "transformer", "steps": 5, "epochs": 1})).key, "params.steps");
    assert_eq!(e(json!({"model": "transformer", "steps": 5, "lr": 2})).key, "params.lr");
    assert_eq!(e(json!({"model": "transformer", "steps": 5, "preset": "giant"})).key, "params.preset");
    assert_eq!(e(json!({"model": "transformer", "steps": 5, "overrides": {"d_modle": 3}})).key, "params.preset");
    assert_eq!(e(json!({"model": "transformer", "steps": 5, "sed": 1})).key, "params.sed");
}
