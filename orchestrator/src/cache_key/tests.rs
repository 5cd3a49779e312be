//! Golden keys: one pinned key per stage kind for fixed params, input digests and a fixed
//! implementation fingerprint. A change to what goes into a key (a field, its serialization)
//! fails here, so an accidental change is caught and an intended one shows up as a visible diff
//! of these lines. The real fingerprints follow the code; the tests below check they reach the key.

use super::*;
use crate::pipeline;

/// The part of a fingerprint that covers locked external crates (see the `fingerprint` crate).
const EXTERNAL_PART: &str = "external crates";
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
  evaluate:
    kind: evaluate
    inputs: {tokenizer: vocab.tokenizer.json, text: corpus.valid.txt, itera: train.best}
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
    p.stages
        .iter()
        .map(|st| {
            let mut st = st.clone();
            st.implementation = BTreeMap::from([(st.kind.clone(), "fixed".to_string())]);
            (
                st.kind.clone(),
                stage_key(&ByName, &st, &Upstream { output: &upstream, metric: &|_, _| None }).unwrap().0.key(),
            )
        })
        .collect()
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
    let mut st = pl.stage("cmd").unwrap().clone();
    st.implementation = BTreeMap::from([("command".to_string(), "fixed".to_string())]);
    let key =
        stage_key(&ByName, &st, &Upstream { output: &|_: &str, _: &str| None, metric: &|_, _| None }).unwrap().0.key();
    assert_eq!(key, golden("command"));
}

#[test]
fn every_kind_has_a_real_fingerprint_in_its_key() {
    let registry = Registry::builtin();
    for kind in registry.kinds() {
        let parts = registry.implementation(kind);
        assert!(parts.contains_key("stage-api") && parts.contains_key(EXTERNAL_PART), "{kind}: {parts:?}");
        assert!(parts.values().all(|d| d.len() == 64), "{kind}: {parts:?}");
    }
    for kind in ["train", "quantize", "distill", "onnx_export", "onnx_check", "benchmark"] {
        assert!(registry.implementation(kind).contains_key("itera-models"), "{kind}");
    }
    for kind in ["command", "corpus", "vocab", "report"] {
        assert!(!registry.implementation(kind).contains_key("itera-models"), "{kind}");
    }
    // The loaded pipeline's stages carry them, and so do their keys.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "hello").unwrap();
    std::fs::write(dir.path().join("t.md.j2"), "{{ 1 }}").unwrap();
    let file = dir.path().join("golden.yaml");
    std::fs::write(&file, PIPELINE).unwrap();
    let p = pipeline::load(&file, &[], &registry).unwrap();
    let train = p.stage("train").unwrap();
    assert_eq!(train.implementation, registry.implementation("train"));
    let upstream = |_: &str, _: &str| Some(Entry { digest: "d".into(), kind: objects::ObjKind::File, size: 1 });
    let (ki, _) = stage_key(&ByName, train, &Upstream { output: &upstream, metric: &|_, _| None }).unwrap();
    assert_eq!(ki.implementation, registry.implementation("train"));
}

/// A build with different models-library code: `plan` says which crates changed.
#[test]
fn explains_an_implementation_change_by_crate() {
    let base = |models: &str| KeyInput {
        format: KEY_FORMAT,
        kind: "train".into(),
        implementation: BTreeMap::from([
            ("itera-models".to_string(), models.to_string()),
            ("stage-api".to_string(), "s".to_string()),
            ("stage-train".to_string(), "t".to_string()),
        ]),
        fields: BTreeMap::new(),
        params: BTreeMap::new(),
        inputs: BTreeMap::new(),
        outputs: vec![],
        selected: BTreeMap::new(),
    };
    let (old, new) = (base("m1"), base("m2"));
    assert_ne!(old.key(), new.key());
    assert_eq!(explain(&old, &new), vec!["implementation of `train` changed (itera-models)".to_string()]);
}

#[test]
fn explains_param_and_input_changes() {
    let ki = |params: Value, input: &str| KeyInput {
        format: 1,
        kind: "command".into(),
        implementation: BTreeMap::from([("stage-command".to_string(), "a".to_string())]),
        fields: BTreeMap::from([("cmd".to_string(), Value::from("x"))]),
        params: params.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        inputs: BTreeMap::from([("i".to_string(), input.to_string())]),
        outputs: vec!["o".into()],
        selected: BTreeMap::new(),
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
    ("benchmark", "01f3911d13424a9e8d0378ce3a03dd8c5173a8e69a18fc4b972b2a2ef11b3244"),
    ("command", "4a24ddb5e0086b27129302f0c6e809cf7dc2113269350552222d0091cc9b8ed7"),
    ("corpus", "2a0d85fd3d7295d96d42dfe38a09792489602a5791a80fb09381ed0ca5cb5915"),
    ("distill", "e572a200947b51c6f6a14b308af4dbabdb1b2e5c9f907e3192a5f25dda2a0206"),
    ("evaluate", "11f6988ad017d95ef40eb1e938bb0d86f2679438f983fc89404d58875b6f7bb0"),
    ("onnx_check", "60d33e04bd8fcff2345826365f583ad4ed79c50bc9091e86f6c25ee7defc6462"),
    ("onnx_export", "f609378ee3cccfe4147d7251b56d4a65d72c06df0bbcc4691ad885273c5170ce"),
    ("quantize", "fcff627b3acb004fff46f4d21724b60283139f0b5e4d91e05dc433590387a17b"),
    ("report", "3419066d7bfac4db81c42fddbd8ee18136a4cc3ad9cf2bb34874017e8d8e669c"),
    ("train", "2c5326e6e68e6f54ecdc9e6dedeafff66c8655381c72ef6397d8b1361e69edc9"),
    ("vocab", "02ca81c2068c16a4bd72864d64ad0926fcfb74ac37ddb192675a173574a7e7c6"),
];

fn golden(kind: &str) -> &'static str {
    GOLDEN.iter().find(|(k, _)| *k == kind).map_or("", |(_, v)| v)
}
