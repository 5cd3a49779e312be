//! Golden keys: one pinned key per stage kind for fixed params and input digests. A change to
//! what goes into a key (a field, its serialization, a stage's `version()`) fails here, so an
//! accidental change is caught and an intended one shows up as a visible diff of these lines.

use super::*;
use crate::pipeline;
use crate::registry::Registry;

/// Every built-in kind once, with the params and input names its `check` asks for.
const PIPELINE: &str = r#"name: golden
params: {seed: 7}
stages:
  cmd:
    kind: command
    cmd: "tr a-z A-Z < ${inputs.text} > ${outputs.upper}"
    inputs: {text: file:in.txt}
    outputs: [upper]
  corpus:
    kind: corpus
    params: {source: builtin, documents: 40, seed: "${params.seed}"}
  vocab:
    kind: vocab
    inputs: {text: corpus.train.txt, valid: corpus.valid.txt}
    params: {type: bpe, size: 300}
  train:
    kind: train
    inputs: {train: corpus.train.txt, valid: corpus.valid.txt, tokenizer: vocab.tokenizer.json}
    params: {model: itera_lite, preset: tiny, steps: 5, seed: "${params.seed}"}
  quantize:
    kind: quantize
    inputs: {model: train.best, tokenizer: vocab.tokenizer.json, valid: corpus.valid.txt}
    params: {scheme: int8}
  distill:
    kind: distill
    inputs: {teacher: train.best, train: corpus.train.txt, valid: corpus.valid.txt, tokenizer: vocab.tokenizer.json}
    params: {preset: micro, steps: 5}
  export:
    kind: onnx_export
    inputs: {model: train.best}
  check:
    kind: onnx_check
    inputs: {graphs: export.graphs, model: train.best, tokenizer: vocab.tokenizer.json, valid: corpus.valid.txt}
  benchmark:
    kind: benchmark
    inputs: {tokenizer: vocab.tokenizer.json, valid: corpus.valid.txt, itera: train.best}
  report:
    kind: report
    inputs: {train: train.summary.json}
    params: {template: "file:t.md.j2"}
"#;

/// File digests by file name only, so the keys do not depend on the temporary folder.
struct ByName;

impl FileDigests for ByName {
    fn file_digest(&self, path: &Path) -> Result<Entry, String> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Entry { digest: objects::hash_bytes(name.as_bytes()), kind: objects::ObjKind::File, size: 1 })
    }
}

/// Every stage's key, with each upstream output's digest derived from its `stage.output` name.
fn keys() -> BTreeMap<String, String> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "hello").unwrap();
    std::fs::write(dir.path().join("t.md.j2"), "{{ 1 }}").unwrap();
    let file = dir.path().join("golden.yaml");
    std::fs::write(&file, PIPELINE).unwrap();
    let p = pipeline::load(&file, &[], &Registry::builtin()).unwrap();
    let upstream = |stage: &str, output: &str| {
        let digest = objects::hash_bytes(format!("{stage}.{output}").as_bytes());
        Some(Entry { digest, kind: objects::ObjKind::File, size: 1 })
    };
    p.stages.iter().map(|st| (st.kind.clone(), stage_key(&ByName, st, &upstream).unwrap().0.key())).collect()
}

#[test]
fn golden_key_per_stage_kind() {
    let got = keys();
    let want: BTreeMap<String, String> = GOLDEN.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let kinds: BTreeSet<&str> = Registry::builtin().kinds().into_iter().collect();
    assert_eq!(got.keys().map(String::as_str).collect::<BTreeSet<_>>(), kinds, "one stage of every kind");
    let table: String = got.iter().map(|(k, v)| format!("    (\"{k}\", \"{v}\"),\n")).collect();
    for (kind, key) in &got {
        assert_eq!(Some(key), want.get(kind), "cache key of `{kind}` changed; if intended, GOLDEN becomes:\n{table}");
    }
}

#[test]
fn key_ignores_threads_timeout_and_retries() {
    assert_eq!(keys(), keys(), "keys are stable across loads and temporary folders");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "hello").unwrap();
    std::fs::write(dir.path().join("t.md.j2"), "{{ 1 }}").unwrap();
    let file = dir.path().join("golden.yaml");
    let text = PIPELINE
        .replace("    outputs: [upper]\n", "    outputs: [upper]\n    threads: 2\n    timeout: 5m\n    retries: 3\n");
    std::fs::write(&file, text).unwrap();
    let pl = pipeline::load(&file, &[], &Registry::builtin()).unwrap();
    let key = stage_key(&ByName, pl.stage("cmd").unwrap(), &|_: &str, _: &str| None).unwrap().0.key();
    assert_eq!(key, golden("command"));
}

#[test]
fn explains_param_and_input_changes() {
    let ki = |params: Value, input: &str| KeyInput {
        format: 1,
        kind: "command".into(),
        version: 1,
        fields: BTreeMap::from([("cmd".to_string(), Value::from("x"))]),
        params: params.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        inputs: BTreeMap::from([("i".to_string(), input.to_string())]),
        outputs: vec!["o".into()],
    };
    let a = ki(serde_json::json!({"x": 3}), "aaaaaaaaaaaaaaaa");
    let b = ki(serde_json::json!({"x": 4, "y": 1}), "bbbbbbbbbbbbbbbb");
    assert_eq!(
        explain(&a, &b),
        vec![
            "params.x changed: 3 → 4".to_string(),
            "params.y added: 1".to_string(),
            "input `i` changed: aaaaaaaaaaaa → bbbbbbbbbbbb".to_string(),
        ]
    );
    assert!(explain(&a, &a).is_empty());
}

/// (kind, key) for the stages of `PIPELINE`.
const GOLDEN: &[(&str, &str)] = &[
    ("benchmark", "be0d0346ca72a54960bdf6b9eeae5debc92de5e2c075b73c1a75c76be19bf684"),
    ("command", "67756b2a9b06f7302370b2ceb5695c505a084c251c4b6232e81d4d7b9fdd03c3"),
    ("corpus", "fa14f7c611bcd124f5eeed366dbe44c14d8ea1331240c8a7660b5edd5f091c22"),
    ("distill", "19817f86ba3c1769bcb6c0f9335336f24f51e1ef9b5e17dd96481720b1c90247"),
    ("onnx_check", "1e5906e2d522c22a8d7cf3253b9cbb8ee426678cbf247569b094d0ffdf559b96"),
    ("onnx_export", "927e56e43ae061930bb34c521f71a8888225bc83d6364c42b5117166e7c3fa35"),
    ("quantize", "8f8f202f76de8b0794e1474ef8568c4340f804b88ef315bd2f2d926fd38c44a4"),
    ("report", "da14d1dc55e69957e2da80815c5be4c4846f50b9d1376a1bdcfd89d150c07676"),
    ("train", "a4debf0d5b7a36d42abe9ed3984477810b6688d56b0d3e2e8fdf8e47e1739a79"),
    ("vocab", "74db4f58c25e9dbd3fe292b0e922613605720195b9dec32324683595cd448a02"),
];

fn golden(kind: &str) -> &'static str {
    GOLDEN.iter().find(|(k, _)| *k == kind).map_or("", |(_, v)| v)
}
