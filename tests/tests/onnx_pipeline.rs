//! pipelines/onnx.yaml end to end with tiny budgets: every exported graph passes
//! `onnx.checker.check_model(full_check=True)`, the cross-check passes in tract and ONNX Runtime,
//! and the Python `onnxruntime` package, given an exported graph and the project's
//! `tokenizer.json`, computes the validation loss the project reports.

use e2e_tests::{shipped_pipeline, venv_python, Project, TINY_TWO_MODELS};

/// Tiny budgets beyond the two models' (`TINY_TWO_MODELS`): `--set` overrides every verb gets.
const MORE: &[&str] = &[
    "int8.eval_tokens=1024",
    "int8.bench_runs=1",
    "check_itera.eval_tokens=1024",
    "check_transformer.eval_tokens=1024",
    "check_int8.eval_tokens=1024",
    "check_itera.generate=16",
    "check_transformer.generate=16",
    "check_int8.generate=16",
];

const CHECKER: &str = r#"
import sys, onnx
for path in sys.argv[1:]:
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    ins = [i.name for i in m.graph.input]
    outs = [o.name for o in m.graph.output]
    assert ins[0] == "input_ids" and outs[0] == "logits", (path, ins, outs)
    assert m.opset_import[0].version >= 17
    print(path.split("/")[-3], path.split("/")[-1], len(ins), len(outs))
"#;

/// The validation loss of an exported graph in the Python onnxruntime, windows as the project
/// makes them: non-overlapping seq_len windows from the start, at most ceil(eval_tokens/seq_len).
const ORT_LOSS: &str = r#"
import sys, math, json
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
model, tokenizer, valid, seq, eval_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ids = Tokenizer.from_file(tokenizer).encode(open(valid, encoding="utf-8").read(), add_special_tokens=False).ids
n = min(len(ids) // seq, max(1, -(-eval_tokens // seq)))
x = np.array(ids[: n * seq], dtype=np.int64).reshape(n, seq)
s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
total, count = 0.0, 0
for i in range(0, n, 4):
    logits = s.run(["logits"], {"input_ids": x[i:i + 4]})[0].astype(np.float64)
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1)) + m[..., 0]
    b = x[i:i + 4]
    picked = np.take_along_axis(logits[:, :-1, :], b[:, 1:, None], axis=-1)[..., 0]
    total += float((lse[:, :-1] - picked).sum())
    count += picked.size
print(json.dumps({"val_loss": total / count, "positions": count}))
"#;

#[test]
fn onnx_pipeline_exports_valid_onnx_that_both_runtimes_and_python_agree_on() {
    let p = Project::new();
    let file = shipped_pipeline("onnx");
    let cli = p.pipeline(&file, &[TINY_TWO_MODELS, MORE].concat());
    let cold = cli.run("run", &["--json"]);
    cold.assert_ok();
    let dest = p.path().join("out");
    cli.run("export", &["--all", dest.to_str().unwrap()]).assert_ok();

    let mut graphs = Vec::new();
    for stage in ["export_itera", "export_transformer", "export_int8"] {
        for g in ["model.onnx", "step.onnx"] {
            let path = dest.join(stage).join("graphs").join(g);
            if path.exists() {
                graphs.push(path);
            }
        }
    }
    assert_eq!(graphs.len(), 5, "full graphs for all three, step graphs for the two Itera-Lite: {graphs:?}");
    let out = std::process::Command::new(venv_python()).arg("-c").arg(CHECKER).args(&graphs).output().unwrap();
    assert!(
        out.status.success(),
        "onnx.checker: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for (check, export) in
        [("check_itera", "export_itera"), ("check_transformer", "export_transformer"), ("check_int8", "export_int8")]
    {
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dest.join(check).join("crosscheck.json")).unwrap()).unwrap();
        assert_eq!(report["pass"], true, "{check}: {report}");
        let runtimes: Vec<&str> =
            report["runtimes"].as_array().unwrap().iter().map(|e| e["runtime"].as_str().unwrap()).collect();
        assert!(runtimes.contains(&"tract") && runtimes.contains(&"onnxruntime"), "{runtimes:?}");
        // Python onnxruntime computes the same validation loss from the file and tokenizer.json.
        let out = std::process::Command::new(venv_python())
            .arg("-c")
            .arg(ORT_LOSS)
            .arg(dest.join(export).join("graphs/model.onnx"))
            .arg(dest.join("vocab/tokenizer.json"))
            .arg(dest.join("corpus/valid.txt"))
            .arg("32")
            .arg("1024")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let py: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ours = report["native"]["reference_val_loss"].as_f64().unwrap();
        let theirs = py["val_loss"].as_f64().unwrap();
        assert_eq!(
            py["positions"].as_u64().unwrap(),
            report["eval_positions"].as_u64().unwrap(),
            "{check}: same windows"
        );
        assert!((ours - theirs).abs() / ours < 1e-4, "{check}: project {ours} vs Python onnxruntime {theirs}");
    }

    let warm = cli.run("run", &["--json"]);
    warm.assert_ok();
    assert!(warm.statuses().iter().all(|(_, s)| s == "cached"), "{}", warm.stdout);
    let replay = cli.run("replay", &[]);
    assert_eq!(replay.code, 0, "{}{}", replay.stdout, replay.stderr);
}
