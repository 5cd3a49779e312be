//! Peak memory per model, through the stage as a pipeline runs it.
//!
//! This test has its file to itself because `VmHWM` is a property of the whole process: the test
//! harness runs one file's tests as threads of one process, so another test allocating while a
//! model is measured lands in that model's peak (on some machines the small model below then
//! reported more than the large one).

use std::collections::BTreeMap;
use std::path::PathBuf;

use itera_models::{Model, ModelConfig};
use serde_json::{json, Value};
use stage_api::{InputSpec, Params, RunSpec, Stage, StageContext};
use stage_benchmark::BenchmarkStage;

/// A small model measured after a large one reports its own peak, not the large one's.
#[test]
fn a_small_model_after_a_large_one_reports_less_memory() {
    // As in a stage process: freed memory is kept, which is what made peaks inherit.
    itera_models::measure::keep_freed_memory();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vocab = itera_models::testing::write_char_tokenizer(d).unwrap();
    std::fs::write(d.join("valid.txt"), "the dog sat on the mat. a cat ran to the tree!\n".repeat(8)).unwrap();
    let build = |arch: &str, size: &str, len: usize| {
        ModelConfig::build(arch, size, vocab, json!({ "max_seq_len": len }).as_object().unwrap()).unwrap()
    };
    // The stage measures its models in the order of their names.
    Model::new(&build("transformer", "tiny", 64), 1).unwrap().save(&d.join("a_big")).unwrap();
    Model::new(&build("itera_lite", "micro", 32), 1).unwrap().save(&d.join("b_small")).unwrap();
    let inputs: BTreeMap<String, PathBuf> =
        [("tokenizer", "tokenizer.json"), ("valid", "valid.txt"), ("a_big", "a_big"), ("b_small", "b_small")]
            .into_iter()
            .map(|(name, file)| (name.to_string(), d.join(file)))
            .collect();
    let params = Params::from_json(json!({"seq_len": 32, "batch": 8, "runs": 1, "generate": 4, "eval_tokens": 256}));
    let io = InputSpec { inputs: inputs.keys().cloned().collect(), outputs: vec![] };
    let plan = BenchmarkStage.check(&params, &io).unwrap();
    let outputs = plan.required_outputs.iter().map(|n| (n.clone(), d.join(n))).collect();
    let spec = RunSpec::new("bench", "benchmark", params, inputs, outputs, d);
    BenchmarkStage.run(&mut StageContext::uncancelled(spec)).unwrap();

    let report: Value = serde_json::from_str(&std::fs::read_to_string(d.join("benchmark.json")).unwrap()).unwrap();
    let peak = |i: usize| {
        let m = &report["models"][i];
        (m["label"].as_str().unwrap().to_string(), m["peak_rss_bytes"].as_u64().unwrap())
    };
    let ((big, first_big), (small, then_small)) = (peak(0), peak(1));
    assert_eq!((big.as_str(), small.as_str()), ("a_big", "b_small"));
    assert!(then_small < first_big, "small {then_small} B after big {first_big} B: the peak was inherited");
}
