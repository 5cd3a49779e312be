//! pipelines/compress.yaml end to end with tiny budgets: teacher → int8 ∥ int4 ∥ distill (+control);
//! the GGUF files are read back by the `gguf` Python package and checked against the teacher.

use e2e_tests::{shipped_pipeline, venv_python, Project};

/// Tiny budgets: `--set` overrides every verb gets.
const SMALL: &[&str] = &[
    "steps=16",
    "batch=4",
    "seq_len=32",
    "corpus.documents=300",
    "teacher.eval_interval=8",
    "student.eval_interval=8",
    "teacher.eval_tokens=512",
    "student.eval_tokens=512",
    "int8.eval_tokens=2048",
    "int4.eval_tokens=2048",
    "int8.bench_runs=2",
    "int4.bench_runs=2",
];

/// Reads a GGUF with the reference reader and compares every quantized matrix with the
/// teacher's f32 weights (parsed from safetensors by hand: header length, JSON, raw data).
const CHECK_GGUF: &str = r#"
import json, struct, sys
import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf.quants import dequantize

path, teacher, scheme = sys.argv[1], sys.argv[2], sys.argv[3]
with open(teacher, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    blob = f.read()
def f32(name):
    meta = header[name]
    a, b = meta["data_offsets"]
    return np.frombuffer(blob[a:b], dtype="<f4").reshape(meta["shape"])

r = GGUFReader(path)
config = json.loads(bytes(r.fields["orchestrate.config"].parts[-1]).decode())
tensors = {t.name: t for t in r.tensors}
want = T.I8 if scheme == "int8" else T.Q4_0
quantized = [t for t in r.tensors if t.tensor_type == want]
assert quantized, "no quantized tensors"
checked = 0
for t in quantized:
    ref = f32(t.name)
    if scheme == "int8":
        q = np.asarray(t.data, dtype=np.int8).reshape(ref.shape).astype(np.float32)
        scale = np.asarray(tensors[t.name + ".scale"].data, dtype=np.float32).reshape(-1, 1)
        deq = q * scale
        bound = scale / 2 * 1.0001 + 1e-7
    else:
        deq = dequantize(t.data, t.tensor_type).reshape(ref.shape)
        rows, cols = ref.shape
        blocks = np.abs(ref.reshape(rows, cols // 32, 32)).max(axis=2) / 7.0
        bound = np.repeat(blocks, 32, axis=1) * (0.5 + 7.0 / 2048) + 1e-7
    err = np.abs(deq - ref)
    assert (err <= bound).all(), f"{t.name}: max error {err.max()} above the half-step bound"
    checked += 1
for t in r.tensors:
    if t.tensor_type == T.F32 and not t.name.endswith(".scale"):
        assert np.array_equal(np.asarray(t.data, dtype=np.float32).reshape(-1), f32(t.name).reshape(-1)), t.name
print(f"ok {checked} {config['model']}")
"#;

#[test]
fn compress_pipeline_runs_caches_replays_and_its_gguf_reads_in_python() {
    let p = Project::new();
    let file = shipped_pipeline("compress");
    let cli = p.pipeline(&file, SMALL);
    let cold = cli.run("run", &["--json"]);
    cold.assert_ok();
    assert!(cold.statuses().iter().all(|(_, s)| s == "ran"), "{}", cold.stdout);

    let dest = p.path().join("out");
    cli.run("export", &["--all", dest.to_str().unwrap()]).assert_ok();
    let read = |rel: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dest.join(rel)).unwrap()).unwrap()
    };
    for (stage, ratio) in [("int8", 3.5), ("int4", 6.0)] {
        let s = read(&format!("{stage}/summary.json"));
        assert_eq!(s["scheme"], stage);
        assert!(s["compression_ratio_quantized_tensors"].as_f64().unwrap() > ratio, "{stage}: {s}");
        assert!(s["perplexity_change_rel"].as_f64().unwrap().is_finite());
        assert!(s["mean_kl_f32_to_quantized"].as_f64().unwrap() >= 0.0);
        let out = std::process::Command::new(venv_python())
            .args(["-c", CHECK_GGUF])
            .arg(dest.join(stage).join("model.gguf"))
            .arg(dest.join("teacher/best/model.safetensors"))
            .arg(stage)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.starts_with("ok "),
            "{stage}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let d = read("student/summary.json");
    for k in ["teacher", "student", "control"] {
        assert!(d[k]["val_loss"].as_f64().unwrap().is_finite(), "{k}");
    }
    assert!(d["teacher"]["params"]["total"].as_u64().unwrap() > 4 * d["student"]["params"]["total"].as_u64().unwrap());
    assert!(d["distillation_gain"]["val_loss_control_minus_student"].is_number());
    assert!(dest.join("student/control/model.safetensors").exists());

    let warm = cli.run("run", &["--json"]);
    warm.assert_ok();
    assert!(warm.statuses().iter().all(|(_, s)| s == "cached"), "{}", warm.stdout);
    let replay = cli.run("replay", &[]);
    assert_eq!(replay.code, 0, "quantize and distill are deterministic:\n{}{}", replay.stdout, replay.stderr);
    for stage in ["teacher", "int8", "int4", "student"] {
        assert!(
            replay.stdout.lines().any(|l| l.starts_with(stage) && l.ends_with("yes")),
            "{stage}: {}",
            replay.stdout
        );
    }
}
