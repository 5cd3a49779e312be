use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use itera_models::training::{
    encode, eval_batches, fit, kl_divergence, load_tokenizer, FitHooks, Hyper, Objective, TokenSplits,
};
use itera_models::{Model, ModelConfig};
use serde_json::{json, Value};
use stage_api::{InputSpec, Params, RunSpec, Stage, StageContext};

use super::{settings, DistillStage};

fn params(v: Value) -> Params {
    Params::from_json(v)
}

/// Tokenizer, text, and a teacher trained for a few steps.
fn write_inputs(dir: &Path) {
    let n = itera_models::testing::write_char_tokenizer(dir).unwrap();
    let text = "the cat sat on the mat. the dog ran to the park! a bird sang in the tree.\n".repeat(30);
    std::fs::write(dir.join("train.txt"), &text).unwrap();
    std::fs::write(dir.join("valid.txt"), "the dog sat on the mat. a cat ran to the tree!\n".repeat(6)).unwrap();
    if dir.join("teacher").exists() {
        return;
    }
    let o = json!({"d_model": 48, "n_layers": 2, "max_seq_len": 32});
    let cfg = ModelConfig::build("itera_lite", "micro", n, o.as_object().unwrap()).unwrap();
    let teacher = Model::new(&cfg, 9).unwrap();
    let tokz = load_tokenizer(&dir.join("tokenizer.json")).unwrap();
    let ids = encode(&tokz, &text).unwrap();
    let h = Hyper::from_params(
        json!({"steps": 40, "seq_len": 32, "batch": 4, "lr": 0.01, "warmup": 5, "eval_interval": 40})
            .as_object()
            .unwrap(),
        Some("itera_lite"),
        "micro",
    )
    .unwrap();
    let cancel = AtomicBool::new(false);
    fit(
        &teacher,
        &h,
        1,
        TokenSplits { train: &ids, valid: &ids },
        &Objective::CrossEntropy,
        &dir.join("tbest"),
        FitHooks { progress: &mut |_| {}, cancel: &cancel },
    )
    .unwrap();
    teacher.save(&dir.join("teacher")).unwrap();
}

fn run(dir: &Path, p: Value) -> Result<Value, stage_api::StageError> {
    write_inputs(dir);
    let p = params(p);
    let io =
        InputSpec { inputs: ["teacher", "train", "valid", "tokenizer"].map(String::from).to_vec(), outputs: vec![] };
    let plan = DistillStage.check(&p, &io).unwrap();
    let inputs = BTreeMap::from([
        ("teacher".to_string(), dir.join("teacher")),
        ("train".to_string(), dir.join("train.txt")),
        ("valid".to_string(), dir.join("valid.txt")),
        ("tokenizer".to_string(), dir.join("tokenizer.json")),
    ]);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let outputs: BTreeMap<String, PathBuf> =
        plan.required_outputs.iter().map(|n| (n.to_string(), out.join(n))).collect();
    let spec = RunSpec { seed: 4, ..RunSpec::new("d", "distill", p, inputs, outputs, dir) };
    let mut ctx = StageContext::uncancelled(spec);
    DistillStage.run(&mut ctx)?;
    Ok(serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap())
}

fn student_params(alpha: f64) -> Value {
    json!({"preset": "micro", "overrides": {"d_model": 32, "n_layers": 1, "max_seq_len": 32}, "seq_len": 32, "batch": 4,
        "steps": 30, "eval_interval": 10, "warmup": 5, "lr": 0.01, "alpha": alpha, "temperature": 2.0})
}

fn kl_to_teacher(dir: &Path, student: &str) -> f64 {
    let teacher = Model::load(&dir.join("teacher")).unwrap();
    let s = Model::load(&dir.join("out").join(student)).unwrap();
    let tok = load_tokenizer(&dir.join("tokenizer.json")).unwrap();
    let ids = encode(&tok, &std::fs::read_to_string(dir.join("valid.txt")).unwrap()).unwrap();
    let x = &eval_batches(&ids, 32, 8, usize::MAX).unwrap()[0];
    let t = teacher.forward(x, None).unwrap().logits;
    let q = s.forward(x, None).unwrap().logits;
    kl_divergence(&t, &q, 1.0).unwrap().to_scalar::<f32>().unwrap() as f64
}

#[test]
fn distilled_student_is_closer_to_the_teacher_than_its_control() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = student_params(1.0);
    // Long enough for both runs to learn something (at 30 steps neither is past the warm-up
    // noise).
    p["steps"] = json!(100);
    let s = run(dir.path(), p).unwrap();
    assert!(s["teacher"]["params"]["total"].as_u64().unwrap() > s["student"]["params"]["total"].as_u64().unwrap());
    assert!(s["control"]["val_loss"].as_f64().unwrap().is_finite());
    assert!(s["distillation_gain"]["val_loss_control_minus_student"].is_number());
    let (ks, kc) = (kl_to_teacher(dir.path(), "model"), kl_to_teacher(dir.path(), "control"));
    assert!(
        ks < kc,
        "pure distillation (α = 1) should imitate the teacher better than CE from scratch: KL {ks} vs {kc}"
    );
    for f in
        ["model/model.safetensors", "best/model.safetensors", "control/model.safetensors", "metrics.csv", "control.csv"]
    {
        assert!(dir.path().join("out").join(f).exists(), "{f}");
    }
}

#[test]
fn same_seed_same_student_bytes_and_control_can_be_off() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut p = student_params(0.5);
    p["steps"] = json!(6);
    p["control"] = json!(false);
    run(a.path(), p.clone()).unwrap();
    // Same teacher bytes in both folders.
    std::fs::create_dir_all(b.path().join("teacher")).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(a.path().join("teacher").join(f), b.path().join("teacher").join(f)).unwrap();
    }
    let s = run(b.path(), p).unwrap();
    assert!(s.get("control").is_none());
    assert!(!b.path().join("out/control").exists());
    let x = std::fs::read(a.path().join("out/model/model.safetensors")).unwrap();
    let y = std::fs::read(b.path().join("out/model/model.safetensors")).unwrap();
    assert!(x == y, "same inputs and seed must give the same student bytes");
}

#[test]
fn params_are_checked() {
    let e = |v: Value| settings(&params(v)).unwrap_err();
    assert_eq!(e(json!({"steps": 5, "alpha": 1.5})).key, "params.alpha");
    assert_eq!(e(json!({"steps": 5, "temperature": 0})).key, "params.temperature");
    assert_eq!(e(json!({"steps": 5, "control": "yes"})).key, "params.control");
    assert_eq!(e(json!({"steps": 5, "tempreature": 2})).key, "params.tempreature");
    let s = settings(&params(json!({"steps": 5}))).unwrap();
    assert_eq!((s.hyper.model.as_str(), s.hyper.preset.as_str(), s.control), ("itera_lite", "micro", true));
}

#[test]
fn a_teacher_with_another_vocabulary_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path()).unwrap();
    let o = json!({"max_seq_len": 32});
    let cfg = ModelConfig::build("itera_lite", "micro", 99, o.as_object().unwrap()).unwrap();
    Model::new(&cfg, 1).unwrap().save(&dir.path().join("teacher")).unwrap();
    let e = run(dir.path(), student_params(0.5)).unwrap_err();
    assert!(e.to_string().contains("vocabulary of 99"), "{e}");
}
