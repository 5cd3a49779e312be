use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use energy_meter::Meter;
use itera_models::qmodel::QuantSpec;
use itera_models::quant::Scheme;
use itera_models::{Model, ModelConfig};
use serde_json::{json, Value};
use stage_api::{InputSpec, Params, RunSpec, Stage, StageContext};

use super::*;

const TEXT: &str = "the dog sat on the mat.\na cat ran to the tree!\n";

fn model(vocab: usize, kind: &str, max_seq_len: usize) -> Model {
    let preset = if kind == "transformer" { "tiny" } else { "micro" };
    let cfg =
        ModelConfig::build(kind, preset, vocab, json!({"max_seq_len": max_seq_len}).as_object().unwrap()).unwrap();
    Model::new(&cfg, 7).unwrap()
}

#[test]
fn every_token_after_the_first_is_predicted_exactly_once() {
    for n in 0..40 {
        for len in 2..9 {
            let mut predicted = vec![0; n];
            for w in windows(n, len) {
                assert!(w.len() >= 2 && w.len() <= len, "{n} {len} {w:?}");
                for p in &mut predicted[w.start + 1..w.end] {
                    *p += 1;
                }
            }
            let want: Vec<i32> = (0..n).map(|i| i32::from(i > 0)).collect();
            assert_eq!(predicted, want, "n {n}, len {len}");
        }
    }
    assert!(windows(10, 1).is_empty(), "a 1-token window predicts nothing");
}

#[test]
fn the_scored_text_is_cut_after_a_line() {
    assert_eq!(scored_text(TEXT, 0), TEXT);
    assert_eq!(scored_text(TEXT, 1000), TEXT);
    assert_eq!(scored_text(TEXT, 30), "the dog sat on the mat.\n");
    // No newline within the limit: cut at a character boundary ("é" is 2 bytes).
    assert_eq!(scored_text("abé def\n", 3), "ab");
}

/// The loss `score` sums equals a log-softmax computed here from each window's logits, and
/// does not depend on how windows are batched.
#[test]
fn score_matches_a_direct_computation_whatever_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = itera_models::testing::write_char_tokenizer(dir.path()).unwrap();
    let tok = load_tokenizer(&dir.path().join("tokenizer.json")).unwrap();
    let ids = tokenize(&tok, &TEXT.repeat(3)).unwrap().ids;
    for kind in ["itera_lite", "transformer"] {
        let m = model(vocab, kind, 16);
        let mut want = 0.0f64;
        for w in windows(ids.len(), 16) {
            let x = Tensor::from_vec(ids[w.clone()].to_vec(), (1, w.len()), &Device::Cpu).unwrap();
            let logits = m.forward(&x, None).unwrap().logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            for (t, row) in logits.iter().enumerate().take(w.len() - 1) {
                let mx = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
                let lse = row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln() + mx;
                want += lse - row[ids[w.start + t + 1] as usize] as f64;
            }
        }
        for batch in [1, 3, 64] {
            let (nats, n) = score(&m, &ids, 16, batch).unwrap();
            assert_eq!(n, ids.len() - 1);
            assert!((nats - want).abs() < 1e-3 * want, "{kind} batch {batch}: {nats} vs {want}");
        }
    }
}

#[test]
fn bytes_are_counted_after_the_first_token_and_unknowns_counted() {
    let dir = tempfile::tempdir().unwrap();
    itera_models::testing::write_char_tokenizer(dir.path()).unwrap();
    let tok = load_tokenizer(&dir.path().join("tokenizer.json")).unwrap();
    let t = tokenize(&tok, TEXT).unwrap();
    assert_eq!(t.ids.len(), TEXT.len());
    assert_eq!(t.scored_bytes, TEXT.len() - 1);
    assert_eq!(t.unknown, 0);
    // "É" (2 bytes) is not in the vocabulary: one <unk>, and its 2 bytes are still scored.
    let t = tokenize(&tok, "É dog\n").unwrap();
    assert_eq!((t.ids.len(), t.unknown, t.scored_bytes), (6, 1, 5));
    assert!(tokenize(&tok, "a").unwrap_err().to_string().contains("at least 2"));
}

fn fake_powercap(root: &Path) {
    let d = root.join("intel-rapl:0");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("name"), "package-0\n").unwrap();
    std::fs::write(d.join("energy_uj"), "1000\n").unwrap();
    std::fs::write(d.join("max_energy_range_uj"), "262143328850\n").unwrap();
}

/// The stage's evaluation.json, energy.json, evaluation.csv and metrics.
fn run_stage(d: &Path, meter: &Meter, p: Value) -> (Value, Value, String, BTreeMap<String, Value>) {
    let inputs: BTreeMap<String, PathBuf> = [
        ("tokenizer", d.join("tokenizer.json")),
        ("text", d.join("text.txt")),
        ("itera", d.join("f32")),
        ("int8", d.join("int8.gguf")),
        ("transformer", d.join("tr")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let p = Params::from_json(p);
    let io = InputSpec { inputs: inputs.keys().cloned().collect(), outputs: vec![] };
    let profile = EvaluateStage.check(&p, &io).unwrap();
    assert!(profile.deterministic);
    assert_eq!(profile.volatile_outputs, ["energy.json"]);
    let out_dir = d.join(format!("out{}", meter.has_energy()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let outputs = profile.required_outputs.iter().map(|n| (n.clone(), out_dir.join(n))).collect();
    let spec = RunSpec::new("eval", "evaluate", p, inputs, outputs, d);
    let mut ctx = StageContext::uncancelled(spec);
    evaluate(&mut ctx, meter).unwrap();
    let read = |n: &str| std::fs::read_to_string(out_dir.join(n)).unwrap();
    (
        serde_json::from_str(&read("evaluation.json")).unwrap(),
        serde_json::from_str(&read("energy.json")).unwrap(),
        read("evaluation.csv"),
        ctx.into_metrics(),
    )
}

#[test]
fn scores_checkpoints_and_gguf_and_reports_joules_only_when_measured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vocab = itera_models::testing::write_char_tokenizer(d).unwrap();
    std::fs::write(d.join("text.txt"), TEXT.repeat(20)).unwrap();
    let mut m = model(vocab, "itera_lite", 32);
    m.save(&d.join("f32")).unwrap();
    m.quantize(&QuantSpec { scheme: Scheme::Int8, group_size: 32, embeddings: false, exclude: vec![] }).unwrap();
    m.save_gguf(&d.join("int8.gguf")).unwrap();
    model(vocab, "transformer", 32).save(&d.join("tr")).unwrap();
    fake_powercap(&d.join("powercap"));
    let p = json!({"seq_len": 64, "batch": 4, "max_bytes": 500, "generate": 8, "generate_runs": 2, "prompt": 4});

    let (eval, energy, csv, metrics) = run_stage(d, &Meter::new(&d.join("powercap")), p.clone());
    let text_bytes = eval["text"]["bytes"].as_u64().unwrap();
    assert!(text_bytes <= 500 && text_bytes > 450, "{text_bytes}");
    let models = eval["models"].as_array().unwrap();
    let labels: Vec<&str> = models.iter().map(|m| m["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["int8", "itera", "transformer"]);
    for m in models {
        // Char tokenizer: one byte per token, so bits/byte = nats/token ÷ ln 2 exactly.
        assert_eq!(m["tokens_scored"], m["bytes_scored"]);
        assert_eq!(m["context"], 32, "the model's max_seq_len bounds the window");
        let (nats, bpb) = (m["nats_per_token"].as_f64().unwrap(), m["bits_per_byte"].as_f64().unwrap());
        assert!((bpb - nats / std::f64::consts::LN_2).abs() < 1e-9, "{m}");
        assert!(m["continuation"].as_str().is_some(), "{m}");
    }
    assert_eq!(models[0]["weights"], "int8");
    assert_eq!(models[1]["weights"], "f32");
    // The same weights quantized to INT8 score close to, but not exactly, the f32 ones.
    let gap = (models[0]["nats_per_token"].as_f64().unwrap() - models[1]["nats_per_token"].as_f64().unwrap()).abs();
    assert!(gap < 0.05, "{gap}");
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.lines().all(|l| l.split(',').count() == 10), "{csv}");

    assert_eq!(energy["has_joules"], true);
    assert!(energy["measured"].as_str().unwrap().contains("RAPL"), "{energy}");
    for c in energy["models"].as_array().unwrap() {
        // The fake counters stand still: 0 J measured, not an estimate.
        assert_eq!(c["scoring"]["joules"], 0.0, "{c}");
        assert_eq!(c["generation"]["units"], 16, "{c}");
        assert!(c["scoring"]["cpu_seconds"].as_f64().unwrap() > 0.0, "{c}");
        // The costs are metrics too, as energy.json has them.
        let label = c["label"].as_str().unwrap();
        // (energy.json read back by serde_json's fast float parser, which may be an ulp off)
        let same = |metric: String, v: &Value| {
            let (a, b) = (metrics[&metric].as_f64().unwrap(), v.as_f64().unwrap());
            assert!((a - b).abs() <= 1e-12 * b.abs(), "{metric}: {a} vs {b}");
        };
        for what in ["scoring", "generation"] {
            same(format!("{label}_{what}_cpu_s_per_1k"), &c[what]["cpu_seconds_per_1k"]);
            same(format!("{label}_{what}_joules_per_1k"), &c[what]["joules_per_1k"]);
        }
        let scores = models.iter().find(|m| m["label"] == label).unwrap();
        same(format!("{label}_nats_per_token"), &scores["nats_per_token"]);
    }

    // No powercap: the same scores, CPU-seconds, and no joules anywhere.
    let (eval2, energy2, _, metrics2) = run_stage(d, &Meter::new(&d.join("absent")), p);
    assert!(
        metrics2.contains_key("itera_generation_cpu_s_per_1k")
            && !metrics2.contains_key("itera_generation_joules_per_1k")
    );
    assert_eq!(eval2, eval, "scores are deterministic and independent of the meter");
    assert_eq!(energy2["has_joules"], false);
    assert!(energy2["measured"].as_str().unwrap().contains("no joules"), "{energy2}");
    for c in energy2["models"].as_array().unwrap() {
        assert!(c["scoring"]["joules"].is_null() && c["generation"]["joules_per_1k"].is_null(), "{c}");
        assert!(c["generation"]["cpu_seconds_per_1k"].as_f64().unwrap() > 0.0, "{c}");
    }
}

#[test]
fn params_and_inputs_are_checked() {
    let p = |v: Value| Params::from_json(v);
    assert_eq!(settings(&p(json!({"seq_len": 1}))).unwrap_err().key, "params");
    assert_eq!(settings(&p(json!({"eval_tokens": 5}))).unwrap_err().key, "params.eval_tokens");
    assert_eq!(settings(&p(json!({"max_bytes": -1}))).unwrap_err().key, "params.max_bytes");
    let io = |names: &[&str]| InputSpec { inputs: names.iter().map(|s| s.to_string()).collect(), outputs: vec![] };
    let e = EvaluateStage.check(&p(json!({})), &io(&["tokenizer", "text"])).unwrap_err();
    assert!(e.message.contains("at least one model"), "{e:?}");
    let e = EvaluateStage.check(&p(json!({})), &io(&["tokenizer", "valid", "m"])).unwrap_err();
    assert!(e.message.contains("`text`"), "{e:?}");
}
