//! Every invalid pipeline or command line: a clear message with file:line:column where it
//! applies, exit code 2, no panic or backtrace, and nothing written to the store.

use e2e_tests::Project;

const GOOD: &str = r#"name: demo
params: {seed: 42, sizes: [5, 10]}
stages:
  a:
    kind: command
    cmd: ["sh", "-c", "tr a-z A-Z < ${inputs.text} > ${outputs.upper}"]
    inputs: {text: file:data/in.txt}
    outputs: [upper]
  b:
    kind: command
    foreach: ${params.sizes}
    cmd: "head -c ${item} ${inputs.u} > ${outputs.out}"
    inputs: {u: a.upper}
    outputs: [out]
"#;

fn project(pipeline: &str) -> Project {
    let p = Project::new();
    p.write("data/in.txt", "hello world\n");
    p.write("p.yaml", pipeline);
    p
}

/// Run `args` on a broken pipeline and check the common contract; returns stderr.
fn invalid(pipeline: &str, args: &[&str], code: &str, location: Option<&str>) -> String {
    let p = project(pipeline);
    let mut all = vec!["run", "p.yaml"];
    all.extend_from_slice(args);
    let r = p.run(&all);
    assert_eq!(r.code, 2, "exit code 2 expected\nstderr:\n{}", r.stderr);
    assert!(r.stderr.contains(&format!("error[{code}]")), "code {code} expected in:\n{}", r.stderr);
    if let Some(loc) = location {
        assert!(r.stderr.starts_with(&format!("p.yaml:{loc}")), "location p.yaml:{loc} expected in:\n{}", r.stderr);
    }
    assert!(!r.stderr.contains("panicked") && !r.stderr.contains("RUST_BACKTRACE"), "{}", r.stderr);
    assert!(p.store_is_empty(), "nothing may be written to the store on invalid input");
    r.stderr
}

#[test]
fn the_good_pipeline_is_valid() {
    let p = project(GOOD);
    p.run(&["run", "p.yaml"]).assert_ok();
}

#[test]
fn yaml_syntax_error() {
    let e = invalid(&GOOD.replace("outputs: [upper]", "outputs: [upper"), &[], "E-YAML", None);
    assert!(e.contains("p.yaml:"), "{e}");
    assert!(!e.contains("quote the interpolation"), "{e}");
    let e = invalid(&GOOD.replace("    outputs: [upper]", "\toutputs: [upper]"), &[], "E-YAML", Some("8:"));
    assert!(e.contains("YAML indents with spaces only"), "{e}");
}

/// An unquoted `${...}` in a flow map or list is YAML's `{`: the error says to quote it.
#[test]
fn unquoted_interpolation_in_a_flow_collection() {
    let grid = GOOD.replace("foreach: ${params.sizes}", "foreach: {n: ${params.sizes}}");
    let e = invalid(&grid, &[], "E-YAML", Some("11:19"));
    assert!(e.contains("quote the interpolation, \"${params.sizes}\""), "{e}");
    let list = GOOD.replace(r#"["sh", "-c", "#, r#"[sh, ${params.seed}, "#);
    let e = invalid(&list, &[], "E-YAML", Some("6:"));
    assert!(e.contains("quote the interpolation, \"${params.seed}\""), "{e}");
    // Quoted, the grid axis is the list itself.
    let p = project(
        &GOOD.replace("foreach: ${params.sizes}", "foreach: {n: \"${params.sizes}\"}").replace("${item}", "${item.n}"),
    );
    p.run(&["run", "p.yaml"]).assert_ok();
    assert_eq!(p.read("artifacts/outputs/demo/b@n=10/out"), "HELLO WORL");
}

#[test]
fn unknown_key_with_suggestion() {
    let e = invalid(&GOOD.replace("    outputs: [upper]", "    outptus: [upper]"), &[], "E-UNKNOWN-KEY", Some("8:5"));
    assert!(e.contains("unknown key `outptus` in stage `a`"), "{e}");
    assert!(e.contains("did you mean `outputs`"), "{e}");
    invalid(&format!("{GOOD}extra: 1\n"), &[], "E-UNKNOWN-KEY", Some("15:1"));
}

#[test]
fn unknown_kind_lists_known_kinds() {
    let e = invalid(&GOOD.replacen("kind: command", "kind: comand", 1), &[], "E-UNKNOWN-KIND", Some("5:11"));
    assert!(e.contains("unknown stage kind `comand`"), "{e}");
    assert!(e.contains("did you mean `command`"), "{e}");
    assert!(e.contains("valid kinds: ") && e.contains(" command, corpus,"), "{e}");
}

#[test]
fn missing_stage_output_reference() {
    let e = invalid(&GOOD.replace("a.upper", "a.lower"), &[], "E-MISSING-REF", Some("13:17"));
    assert!(e.contains("stage `a` has no output `lower`"), "{e}");
    let e = invalid(&GOOD.replace("a.upper", "x.upper"), &[], "E-MISSING-REF", Some("13:17"));
    assert!(e.contains("`x.upper` names no stage output"), "{e}");
}

#[test]
fn missing_file_input() {
    let e = invalid(&GOOD.replace("data/in.txt", "data/nope.txt"), &[], "E-MISSING-FILE", Some("7:20"));
    assert!(e.contains("file `data/nope.txt` does not exist"), "{e}");
}

#[test]
fn duplicate_stage_names() {
    let e = invalid(&GOOD.replace("  b:\n", "  a:\n"), &[], "E-DUPLICATE", Some("9:3"));
    assert!(e.contains("duplicate stage name `a`"), "{e}");
    assert!(e.contains("line 4"), "names the first definition: {e}");
}

#[test]
fn cycle_is_printed() {
    let src = r#"stages:
  a: {kind: command, cmd: "cp ${inputs.i} ${outputs.o}", inputs: {i: c.o}, outputs: [o]}
  b: {kind: command, cmd: "cp ${inputs.i} ${outputs.o}", inputs: {i: a.o}, outputs: [o]}
  c: {kind: command, cmd: "cp ${inputs.i} ${outputs.o}", inputs: {i: b.o}, outputs: [o]}
"#;
    let e = invalid(src, &[], "E-CYCLE", Some("2:"));
    assert!(e.contains("a → b → c → a"), "{e}");
}

#[test]
fn bad_set() {
    let e = invalid(GOOD, &["--set", "seed"], "E-SET", None);
    assert!(e.contains("is not KEY=VALUE"), "{e}");
    let e = invalid(GOOD, &["--set", "sede=7"], "E-SET", None);
    assert!(e.contains("did you mean `seed`"), "{e}");
    invalid(GOOD, &["--set", "stages.zz.params.x=1"], "E-SET", None);
    invalid(GOOD, &["--set", "sizes=[1, 2"], "E-SET", None);
    for key in ["b@5.x=1", "stages.b@5.threads=2"] {
        let e = invalid(GOOD, &["--set", key], "E-SET", None);
        assert!(e.contains("--set cannot reach one variant of a `foreach` stage"), "{e}");
        assert!(e.contains("`--set b.PARAM=V` sets it for every variant of `b`"), "{e}");
    }
    let e = invalid(GOOD, &["--set", "a@5.x=1"], "E-SET", None);
    assert!(e.contains("is neither a pipeline param nor a stage"), "{e}");
    // A value --set gives that the stage refuses: the error says it came from --set.
    let e = invalid(GOOD, &["--set", "stages.a.cmd=[]"], "E-PARAM", None);
    assert!(e.starts_with("--set: error[E-PARAM]: stage `a`: ") && e.contains("empty list"), "{e}");
    assert!(e.contains("the value comes from --set; stage `a` is declared at p.yaml:4:3"), "{e}");
    let e = invalid(GOOD, &["--set", "stages.a.threads=zero"], "E-TYPE", None);
    assert!(e.starts_with("--set: error[E-TYPE]"), "{e}");
}

#[test]
fn undefined_interpolation() {
    let e = invalid(&GOOD.replace("${item}", "${params.size}"), &[], "E-INTERPOLATE", Some("12:10"));
    assert!(e.contains("`${params.size}` is not defined"), "{e}");
    assert!(e.contains("did you mean `sizes`"), "{e}");
    let e = invalid(&GOOD.replace("${outputs.upper}", "${outputs.uper}"), &[], "E-INTERPOLATE", Some("6:23"));
    assert!(e.contains("no output named `uper`"), "{e}");
}

#[test]
fn output_escaping_scratch_dir() {
    let e = invalid(&GOOD.replace("outputs: [upper]", "outputs: [../../upper]"), &[], "E-OUTPUT-PATH", Some("8:15"));
    assert!(e.contains("escapes the stage's scratch folder"), "{e}");
    invalid(&GOOD.replace("outputs: [upper]", "outputs: [/tmp/upper]"), &[], "E-OUTPUT-PATH", Some("8:15"));
}

#[test]
fn bad_values() {
    invalid(&GOOD.replace("outputs: [upper]", "outputs: [upper]\n    threads: zero"), &[], "E-TYPE", Some("9:14"));
    invalid(&GOOD.replace("outputs: [upper]", "outputs: [upper]\n    timeout: soon"), &[], "E-TYPE", Some("9:14"));
    invalid(&GOOD.replace("foreach: ${params.sizes}", "foreach: 3"), &[], "E-FOREACH", None);
    let e = invalid(
        &GOOD.replace("cmd: [\"sh\", \"-c\", \"tr a-z A-Z < ${inputs.text} > ${outputs.upper}\"]", "cmd: []"),
        &[],
        "E-PARAM",
        Some("6:"),
    );
    assert!(e.contains("empty list"), "{e}");
}

#[test]
fn other_commands_share_the_checks() {
    let p = project(&GOOD.replace("a.upper", "a.lower"));
    for args in [vec!["plan", "p.yaml"], vec!["dag", "p.yaml"], vec!["show", "p.yaml", "a"], vec!["replay", "p.yaml"]] {
        let r = p.run(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("E-MISSING-REF"), "{args:?}: {}", r.stderr);
    }
    let p = project(GOOD);
    let r = p.run(&["run", "p.yaml", "--cores", "0"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = p.run(&["run", "p.yaml", "--bogus"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = p.run(&["run", "missing.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("cannot read pipeline file missing.yaml"), "{}", r.stderr);
}

/// Every argument and option of every verb says what it is in `--help`: a bare `--json` or
/// `--repair` leaves a user guessing.
#[test]
fn every_option_of_every_verb_is_described() {
    let p = Project::new();
    let top = p.run(&["--help"]);
    top.assert_ok();
    let verbs: Vec<&str> = (top.stdout.lines())
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|v| *v != "help")
        .collect();
    assert!(verbs.len() >= 15 && verbs.contains(&"push"), "{}", top.stdout);
    for verb in verbs {
        let help = p.run(&[verb, "--help"]);
        help.assert_ok();
        // An entry is its flag or name, two or more spaces, then its description.
        let entries = help.stdout.lines().map(str::trim_start).filter(|l| l.starts_with('-') || l.starts_with('<'));
        for entry in entries {
            let parts = entry.split("  ").filter(|s| !s.trim().is_empty()).count();
            assert!(parts >= 2, "`orchestrate {verb} --help` does not describe `{entry}`:\n{}", help.stdout);
        }
    }
}

/// A program the shell cannot find or run fails the stage with the shell's status and what it
/// means, in both forms of `cmd`.
#[test]
fn a_missing_or_unrunnable_program_is_named_as_such() {
    let p = project(GOOD);
    p.write("tool.sh", "echo never\n");
    let cases = [
        (
            "cmd: \"no-such-tool-xyz > ${outputs.o}\"",
            "status 127: the program was not found (is it installed and on PATH?)",
        ),
        ("cmd: [no-such-tool-xyz, \"${outputs.o}\"]", "status 127: the program was not found"),
        (
            "cmd: [\"${inputs.t}\", \"${outputs.o}\"]\n    inputs: {t: file:tool.sh}",
            "status 126: the program could not be executed",
        ),
    ];
    for (cmd, expected) in cases {
        p.write("q.yaml", &format!("stages:\n  s:\n    kind: command\n    {cmd}\n    outputs: [o]\n"));
        let r = p.run(&["run", "q.yaml"]);
        assert_eq!(r.code, 1, "{cmd}: {}", r.stderr);
        assert!(r.stderr.contains(expected), "{cmd}: {}", r.stderr);
    }
}

/// A mistyped param of a built-in kind: the nearest known one is offered, in the file and
/// from `--set` alike; a name near none gets the list alone.
#[test]
fn a_mistyped_param_gets_the_nearest_known_one() {
    let corpus = "stages:\n  c:\n    kind: corpus\n    params: {source: builtin, documnets: 10}\n";
    let e = invalid(corpus, &[], "E-PARAM", Some("4:31:"));
    assert!(e.contains("unknown corpus param `documnets`"), "{e}");
    assert!(e.contains("help: did you mean `documents`? corpus params: "), "{e}");
    let fine = corpus.replace("documnets", "documents");
    let e = invalid(&fine, &["--set", "c.seeed=3"], "E-PARAM", None);
    assert!(e.contains("did you mean `seed`? corpus params: "), "{e}");
    let e = invalid(&corpus.replace("documnets", "zzzzzzzzzz"), &[], "E-PARAM", None);
    assert!(e.contains("help: corpus params: ") && !e.contains("did you mean"), "{e}");
}
