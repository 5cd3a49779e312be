use super::*;
use crate::registry::Registry;

fn load_str(src: &str, sets: &[&str]) -> Result<Pipeline, Diagnostic> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in.txt"), "hello").unwrap();
    let f = dir.path().join("p.yaml");
    std::fs::write(&f, src).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    load(&f, &sets, &Registry::builtin())
}

const DEMO: &str = r#"name: demo
params: {seed: 42, sizes: [500, 1000]}
stages:
  a:
    kind: command
    cmd: ["sh", "-c", "tr a-z A-Z < ${inputs.text} > ${outputs.upper}"]
    inputs: {text: file:in.txt}
    outputs: [upper]
    timeout: 10m
  b:
    kind: command
    foreach: ${params.sizes}
    cmd: "head -c ${item} ${inputs.u} > ${outputs.out}"
    inputs: {u: a.upper}
    outputs: [out]
"#;

#[test]
fn resolves_demo() {
    let p = load_str(DEMO, &[]).unwrap();
    let names: Vec<&str> = p.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a", "b@500", "b@1000"]);
    let b = p.stage("b@500").unwrap();
    assert_eq!(b.params.fields["cmd"], serde_json::json!("head -c 500 ${inputs.u} > ${outputs.out}"));
    assert_eq!(b.inputs["u"], InputRef::Stage { stage: "a".into(), output: "upper".into() });
    assert_eq!(p.stage("a").unwrap().timeout, Some(Duration::from_secs(600)));
}

#[test]
fn set_overrides() {
    let p = load_str(DEMO, &["sizes=[7]", "stages.b.params.x=3"]).unwrap();
    assert_eq!(p.stages.len(), 2);
    assert_eq!(p.stage("b@7").unwrap().params.params["x"], serde_json::json!(3));
    let p = load_str(DEMO, &["b.x=4"]).unwrap();
    assert_eq!(p.stage("b@500").unwrap().params.params["x"], serde_json::json!(4));
    let e = load_str(DEMO, &["sede=1"]).unwrap_err();
    assert_eq!(e.code, "E-SET");
    assert!(e.help.unwrap().contains("seed"));
    assert_eq!(load_str(DEMO, &["novalue"]).unwrap_err().code, "E-SET");
}

#[test]
fn errors_carry_positions() {
    let e = load_str(&DEMO.replace("    timeout: 10m", "    timout: 10m"), &[]).unwrap_err();
    assert_eq!((e.code, e.pos.unwrap().line), ("E-UNKNOWN-KEY", 9));
    let e = load_str(&DEMO.replace("kind: command\n    foreach", "kind: comand\n    foreach"), &[]).unwrap_err();
    assert_eq!(e.code, "E-UNKNOWN-KIND");
    assert!(e.help.unwrap().contains("did you mean `command`"));
    let e = load_str(&DEMO.replace("a.upper", "a.lower"), &[]).unwrap_err();
    assert_eq!((e.code, e.pos.unwrap().line), ("E-MISSING-REF", 14));
    let e = load_str(&DEMO.replace("file:in.txt", "file:nope.txt"), &[]).unwrap_err();
    assert_eq!(e.code, "E-MISSING-FILE");
    let e = load_str(&DEMO.replace("${item}", "${itme}"), &[]).unwrap_err();
    assert_eq!((e.code, e.pos.unwrap().line), ("E-INTERPOLATE", 13));
    let e = load_str(&DEMO.replace("outputs: [upper]", "outputs: [../upper]"), &[]).unwrap_err();
    assert_eq!(e.code, "E-OUTPUT-PATH");
    let e = load_str(&DEMO.replace("  b:\n", "  a:\n"), &[]).unwrap_err();
    assert_eq!((e.code, e.pos.unwrap().line), ("E-DUPLICATE", 10));
    let e = load_str(&DEMO.replace("u: a.upper", "u: b@500.out"), &[]).unwrap();
    assert_eq!(e.stages.len(), 3, "self-reference is caught by the DAG check, not here");
}

#[test]
fn durations() {
    assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
    assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("10x"), None);
    assert_eq!(parse_duration("m"), None);
}

#[test]
fn output_paths() {
    assert!(output_escapes("../x"));
    assert!(output_escapes("/etc/x"));
    assert!(output_escapes("a/../../x"));
    assert!(output_escapes("./x"));
    assert!(!output_escapes("model/weights.bin"));
}

#[test]
fn resources_and_the_executor_block_parse_and_stay_out_of_the_key() {
    let src = "name: r\nexecutor: {partition: cpu, account: lab, qos: hi, sbatch_args: [\"--exclusive\"], poll: 2s, max_poll: 20s}\n\
               stages:\n  a:\n    kind: command\n    cmd: \"true\"\n    resources: {mem: 4GiB, time: 1h30m, partition: \"${params.p}\"}\n\
               params: {p: bigmem}\n";
    let p = load_str(src, &[]).unwrap();
    let r = &p.stage("a").unwrap().resources;
    assert_eq!(r.mem.as_deref(), Some("4G"));
    assert_eq!(r.time, Some(Duration::from_secs(5400)));
    assert_eq!(r.partition.as_deref(), Some("bigmem"));
    let e = &p.executor;
    assert_eq!(
        (e.partition.as_deref(), e.account.as_deref(), e.qos.as_deref()),
        (Some("cpu"), Some("lab"), Some("hi"))
    );
    assert_eq!(e.sbatch_args, ["--exclusive"]);
    assert_eq!((e.poll, e.max_poll), (Some(Duration::from_secs(2)), Some(Duration::from_secs(20))));
    let plain = load_str("name: r\nstages:\n  a:\n    kind: command\n    cmd: \"true\"\n", &[]).unwrap();
    let key = |p: &Pipeline| {
        let st = p.stage("a").unwrap();
        (st.params.clone(), st.outputs.clone(), st.implementation.clone())
    };
    assert_eq!(key(&p), key(&plain), "resources are not part of what the key is made of");
}

#[test]
fn bad_resources_are_located() {
    let base = "name: r\nstages:\n  a:\n    kind: command\n    cmd: \"true\"\n";
    for (extra, needle) in [
        ("    resources: {mem: lots}\n", "size like 500M"),
        ("    resources: {mem: 0G}\n", "size like 500M"),
        ("    resources: {time: soon}\n", "duration"),
        ("    resources: {cpus: 4}\n", "unknown key `cpus`"),
        ("    resources: 4G\n", "must be a map"),
    ] {
        let e = load_str(&format!("{base}{extra}"), &[]).unwrap_err();
        assert!(e.message.contains(needle), "{extra}: {}", e.message);
        assert_eq!(e.pos.map(|p| p.line), Some(6), "{extra}");
    }
    let e = load_str(&format!("{base}executor: {{poll: 10s, max_poll: 1s}}\n"), &[]).unwrap_err();
    assert!(e.message.contains("max_poll"), "{}", e.message);
    let e = load_str(&format!("{base}executor: {{sbatch_args: --exclusive}}\n"), &[]).unwrap_err();
    assert!(e.message.contains("list of strings"), "{}", e.message);
}
