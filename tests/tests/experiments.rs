//! Experiments end to end: the run history (`runs`), two runs compared (`compare`: diff-only
//! and `--all`, text, markdown, JSON, CSV, `--fail-on-regress`), grid sweeps and their names,
//! a downstream stage taking the best variant (and that choice in its cache key), sweep tables
//! and plots, and the errors of each.

use e2e_tests::{Project, Run};

/// `score` counts the lines `gen` wrote and records it as `value`, plus a constant `loss`.
const SCORED: &str = r#"name: q
params: {n: 3}
metrics: {score.value: max, score.loss: min}
stages:
  gen: {kind: command, cmd: "seq ${params.n} > ${outputs.o}", outputs: [o]}
  score:
    kind: command
    cmd: "wc -l < ${inputs.x} > ${outputs.o}; echo '{\"value\": '$(cat ${outputs.o})', \"loss\": 1}' > $ORCH_METRICS"
    inputs: {x: gen.o}
    outputs: [o]
"#;

fn two_runs() -> Project {
    let p = Project::new();
    p.write("q.yaml", SCORED);
    p.run(&["run", "q.yaml"]).assert_ok();
    p.run(&["run", "q.yaml", "--set", "n=5"]).assert_ok();
    p
}

fn failed_with(r: &Run, code: i32, text: &str) {
    assert_eq!(r.code, code, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(text), "expected `{text}` in:\n{}", r.stderr);
}

/// `git` in the project folder, which must succeed.
fn git(p: &Project, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .current_dir(p.path())
        .args(["-c", "user.email=t@example.com", "-c", "user.name=t"])
        .args(args)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Each run records the commit of the pipeline's repository, and whether tracked files had
/// changes; `runs`, `compare` and the JSON say so.
#[test]
fn runs_record_the_pipeline_repository_revision() {
    let p = Project::new();
    p.write("q.yaml", SCORED);
    git(&p, &["init", "-q"]);
    git(&p, &["add", "q.yaml"]);
    git(&p, &["commit", "-qm", "pipeline"]);
    let head = git(&p, &["rev-parse", "HEAD"]);
    p.run(&["run", "q.yaml"]).assert_ok();
    // The store is untracked and is not a change; an edited pipeline is.
    p.write("q.yaml", &format!("{SCORED}# edited\n"));
    p.run(&["run", "q.yaml"]).assert_ok();
    let j = p.run(&["runs", "--json"]).json();
    assert_eq!(j[0]["source"], serde_json::json!({"commit": head, "dirty": true}), "{j}");
    assert_eq!(j[1]["source"], serde_json::json!({"commit": head, "dirty": false}), "{j}");
    let text = p.run(&["runs"]);
    text.assert_ok();
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert!(lines[0].contains(" source ") && lines[0].contains(" orchestrate "), "{}", text.stdout);
    assert!(lines[1].contains(&format!("{}*", &head[..12])), "{}", text.stdout);
    assert!(lines[2].contains(&format!("{} ", &head[..12])), "{}", text.stdout);
    assert!(text.stdout.contains("* source: the pipeline's repository had uncommitted changes"), "{}", text.stdout);
    // The binary's own build: marked as `orchestrate --version` describes it.
    let built_dirty = p.run(&["--version"]).stdout.contains("uncommitted changes");
    assert_eq!(j[0]["commit_dirty"], built_dirty, "{j}");
    let build = &j[0]["commit"].as_str().unwrap()[..12];
    assert_eq!(lines[1].contains(&format!("{build}* ")), built_dirty, "{}", text.stdout);
    assert_eq!(
        text.stdout.contains("* orchestrate: the binary was built from a tree with uncommitted changes"),
        built_dirty
    );
    let cmp = p.run(&["compare"]);
    cmp.assert_ok();
    assert!(cmp.stdout.contains(&format!("source {} with uncommitted changes", &head[..12])), "{}", cmp.stdout);
}

#[test]
fn runs_lists_the_history_newest_first() {
    let p = two_runs();
    let runs = p.run(&["runs", "--json"]);
    runs.assert_ok();
    let j = runs.json();
    let list = j.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["sets"], serde_json::json!(["n=5"]), "newest first: {j}");
    assert_eq!(list[1]["sets"], serde_json::json!([]));
    assert_eq!((list[0]["ran"].as_u64(), list[0]["reused"].as_u64()), (Some(2), Some(0)));
    assert_eq!(list[0]["status"], "ok");
    assert_eq!(list[0]["commit"].as_str().map(str::len), Some(12), "{j}");
    assert_eq!(list[0]["source"], serde_json::Value::Null, "a pipeline in no git repository: {j}");
    let text = p.run(&["runs", "q.yaml", "--metric", "score.value"]);
    text.assert_ok();
    let lines: Vec<&str> = text.stdout.lines().collect();
    assert!(lines[0].starts_with("id ") && lines[0].contains("score.value"), "{}", text.stdout);
    // Whole numbers print whole (not 5.000000).
    assert!(lines[1].ends_with(" 5  n=5"), "{}", text.stdout);
    // Several metrics: a column each, and each by name in the JSON.
    let two = p.run(&["runs", "--metric", "score.value", "--metric", "score.loss"]);
    let head = two.stdout.lines().next().unwrap_or_default().to_string();
    assert!(head.contains("score.value") && head.contains("score.loss"), "{}", two.stdout);
    let j = p.run(&["runs", "--metric", "score.value", "--metric", "score.loss", "--json"]).json();
    assert_eq!(
        j[0]["metrics"],
        serde_json::json!({"score.value": {"value": 5.0}, "score.loss": {"value": 1.0}}),
        "{j}"
    );
    assert_eq!(j[0]["metric"], 5.0, "the first metric, as with one --metric: {j}");
    let png = p.path().join("two.png");
    let both = p.run(&["runs", "--metric", "score.value", "--metric", "score.loss", "--plot", png.to_str().unwrap()]);
    failed_with(&both, 2, "--plot draws one metric");
    let none = p.run(&["runs", "--metric", "score.nope"]);
    none.assert_ok();
    assert!(none.stderr.contains("note: no listed run recorded `score.nope`"), "{}", none.stderr);
    let png = p.path().join("runs.png");
    p.run(&["runs", "--metric", "score.value", "--plot", png.to_str().unwrap()]).assert_ok();
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
}

/// `run --name` names a run; `compare` and `runs` take the name for the run that took it last
/// (here the newest so named), and names that would read as ids or ages are refused.
#[test]
fn runs_can_be_named_and_compared_by_name() {
    let p = Project::new();
    p.write("q.yaml", SCORED);
    p.run(&["run", "q.yaml", "--name", "baseline"]).assert_ok();
    p.run(&["run", "q.yaml", "--set", "n=5"]).assert_ok();
    p.run(&["run", "q.yaml", "--set", "n=7"]).assert_ok();
    let c = p.run(&["compare", "baseline"]);
    c.assert_ok();
    assert!(c.stdout.starts_with("A: ") && c.stdout.lines().next().unwrap().contains("`baseline`"), "{}", c.stdout);
    assert!(c.stdout.contains("score.value  3  7  4"), "against the named run, not the one before B: {}", c.stdout);
    // A name given again moves to the newer run. The run's last line names its id.
    let again = p.run(&["run", "q.yaml", "--set", "n=5", "--name", "baseline"]);
    again.assert_ok();
    assert!(p.run(&["compare", "baseline", "latest~1"]).stdout.contains("score.value  5  7  2"));
    let j = p.run(&["runs", "--json"]).json();
    assert_eq!(
        (j[0]["name"].as_str(), j[1]["name"].as_str(), j[3]["name"].as_str()),
        (Some("baseline"), None, Some("baseline"))
    );
    let id = j[0]["id"].as_str().unwrap_or("?");
    assert!(again.stderr.contains(&format!(" cores); run {id}\n")), "{}", again.stderr);
    let table = p.run(&["runs"]).stdout;
    assert!(table.lines().next().unwrap().contains(" name "), "{table}");
    for (bad, why) in [("cafe", "would read as a run id"), ("latest-good", "`latest…`"), ("a b", "only letters")] {
        failed_with(&p.run(&["run", "q.yaml", "--name", bad]), 2, why);
    }
    failed_with(&p.run(&["compare", "basline"]), 2, "no run is named `basline`");
}

/// A run limited by `--target` says so in `runs` and `compare`, and the stages it left out are
/// "left out", not "removed": their params and outputs are no difference, and a gate on their
/// metric says why it could not judge.
#[test]
fn a_targeted_run_leaves_stages_out_and_compare_says_so() {
    let p = Project::new();
    p.write(
        "t.yaml",
        r#"name: t
params: {n: 3}
metrics: {gen.v: max, side.v: max}
stages:
  gen: {kind: command, cmd: "seq ${params.n} > ${outputs.o}; echo '{\"v\": '${params.n}'}' > $ORCH_METRICS", outputs: [o]}
  side: {kind: command, cmd: "echo side > ${outputs.o}; echo '{\"v\": 1}' > $ORCH_METRICS", outputs: [o]}
"#,
    );
    p.run(&["run", "t.yaml", "--name", "full"]).assert_ok();
    p.run(&["run", "t.yaml", "--set", "n=4", "--target", "gen"]).assert_ok();
    let c = p.run(&["compare", "full"]);
    c.assert_ok();
    let out = &c.stdout;
    assert!(out.lines().nth(1).is_some_and(|b| b.contains("--set n=4, --target gen")), "{out}");
    let words = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(out.lines().any(|l| words(l) == "side left out run B ran with --target gen"), "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("gen.v ") && l.contains("better")), "{out}");
    assert!(out.contains("gen.cmd"), "{out}");
    assert!(!out.contains("side.cmd") && !out.contains("side.o ") && !out.contains("removed"), "{out}");
    let j = p.run(&["compare", "full", "--json"]).json();
    let side = j["stages"].as_array().and_then(|s| s.iter().find(|r| r["stage"] == "side"));
    assert_eq!(side.map(|r| r["change"].clone()), Some("left out".into()), "{j}");
    assert_eq!(j["b"]["targets"], serde_json::json!(["gen"]));
    assert!(p.run(&["runs"]).stdout.lines().nth(1).is_some_and(|l| l.ends_with("n=4 --target gen")));
    // A gate on a metric of the stage left out cannot pass, and says why.
    let gate = p.run(&["compare", "full", "--fail-on-regress", "side.v"]);
    assert_eq!(gate.code, 1, "{}", gate.stderr);
    assert!(
        gate.stderr
            .contains("side.v was not recorded: run B ran with --target gen, which leaves `side` out (1 in run A)"),
        "{}",
        gate.stderr
    );
}

/// A multi-line or long param (a `cmd: |` block) is cut to where the two runs differ, on one
/// line, so the table stays a table.
/// A run that took every result from the store reran nothing, even where its results differ
/// from the other run's: compare says it reused them, and when they were computed.
#[test]
fn compare_says_a_cached_result_that_differs_was_reused_not_rerun() {
    let p = two_runs();
    p.run(&["run", "q.yaml"]).assert_ok(); // n=3 again: everything from the first run
    let out = p.run(&["compare", "latest~1", "latest"]).stdout;
    let row = out.lines().find(|l| l.trim_start().starts_with("score ")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("score  changed  input `x` changed"), "{out}");
    assert!(row.contains("B reused the result computed at 20"), "{out}");
    assert!(!out.contains("reran"), "{out}");
    let j = p.run(&["compare", "latest~1", "latest", "--json"]).json();
    assert_eq!(j["stages"][0]["change"], "changed", "{j}");
    // The run that computed them says reran.
    assert!(p.run(&["compare", "latest~1", "latest~2"]).stdout.contains("score  reran  input `x` changed"));
}

#[test]
fn compare_cuts_long_params_to_their_difference() {
    let p = Project::new();
    let long = "name: l\nparams: {n: 3}\nstages:\n  s:\n    kind: command\n    cmd: |\n      echo first line of a long script that goes on and on > ${outputs.o}\n      echo n is ${params.n} >> ${outputs.o}\n      echo last line >> ${outputs.o}\n    outputs: [o]\n";
    p.write("l.yaml", long);
    p.run(&["run", "l.yaml"]).assert_ok();
    p.run(&["run", "l.yaml", "--set", "n=4"]).assert_ok();
    let out = p.run(&["compare"]).stdout;
    let row = out.lines().find(|l| l.trim_start().starts_with("s.cmd")).unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("n is 3") && row.contains("n is 4") && row.contains("\\n"), "{out}");
    assert!(!out.contains("last line >>"), "the rest is cut: {out}");
}

#[test]
fn compare_shows_what_differs_in_every_format() {
    let p = two_runs();
    let diff = p.run(&["compare"]);
    diff.assert_ok();
    let out = &diff.stdout;
    assert!(out.contains("--set n=5"), "{out}");
    assert!(out.contains("gen.cmd  seq 3 > ${outputs.o}  seq 5 > ${outputs.o}"), "{out}");
    assert!(!out.contains("score.cmd"), "unchanged params are left out by default:\n{out}");
    assert!(out.contains("score.value  3  5  2  +66.67%  better"), "{out}");
    assert!(!out.contains("score.loss"), "unchanged metrics are left out by default:\n{out}");
    assert!(out.contains("score  reran  input `x` changed"), "{out}");
    assert!(out.contains("gen.o ") && out.contains("(6 B)") && out.contains("(10 B)"), "{out}");

    let all = p.run(&["compare", "latest~1", "latest", "--all"]);
    assert!(
        all.stdout.contains("score.cmd") && all.stdout.contains("score.loss   1  1  0  +0.00%   same"),
        "{}",
        all.stdout
    );

    // Nothing declared differs: say so, and where the rest is.
    let same = p.run(&["compare", "latest", "latest"]);
    assert!(
        same.stdout.contains("metrics\n  (no declared metric differs; --all lists every metric"),
        "{}",
        same.stdout
    );

    let md = p.run(&["compare", "--md"]);
    assert!(
        md.stdout.contains("### metrics") && md.stdout.contains("| score.value | 3 | 5 | 2 | +66.67% | better |"),
        "{}",
        md.stdout
    );

    let j = p.run(&["compare", "--json"]).json();
    assert_eq!(j["metrics"][0]["name"], "score.value");
    assert_eq!((j["metrics"][0]["a"].as_f64(), j["metrics"][0]["b"].as_f64()), (Some(3.0), Some(5.0)));
    assert_eq!(j["metrics"][0]["verdict"], "better");
    assert_eq!(j["stages"][0]["change"], "reran");
    assert_eq!(j["b"]["sets"], serde_json::json!(["n=5"]));

    let csv = p.run(&["compare", "--csv"]);
    let lines: Vec<&str> = csv.stdout.lines().collect();
    assert_eq!(lines[0], "section,name,a,b,delta,delta_pct,verdict");
    assert!(lines.contains(&"metric,score.value,3,5,2,66.66666666666666,better"), "{}", csv.stdout);
    assert!(lines.iter().any(|l| l.starts_with("stage,gen,,reran,,,\"cmd changed: \"\"seq 3")), "{}", csv.stdout);
}

#[test]
fn fail_on_regress_gates_on_declared_metrics() {
    let p = two_runs();
    let (older, newer) = ("latest", "latest~1"); // comparing backwards: value 5 → 3 is worse
    failed_with(
        &p.run(&["compare", older, newer, "--fail-on-regress", "score.value"]),
        1,
        "score.value regressed: 5 → 3",
    );
    p.run(&["compare", older, newer, "--fail-on-regress", "score.value:50%"]).assert_ok();
    failed_with(&p.run(&["compare", older, newer, "--fail-on-regress", "score.value:1"]), 1, "beyond the tolerance 1");
    p.run(&["compare", "--fail-on-regress", "score.value"]).assert_ok();
    p.run(&["compare", "--fail-on-regress", "score.loss"]).assert_ok();
    failed_with(&p.run(&["compare", "--fail-on-regress", "score.nope"]), 2, "no such metric");
    failed_with(&p.run(&["compare", "--fail-on-regress", "score.value:fast"]), 2, "not a number");
}

/// A gated metric that run B lacks fails the gate: its stage failed there, or is gone.
#[test]
fn fail_on_regress_fails_when_run_b_did_not_record_the_metric() {
    let p = two_runs();
    p.write("q.yaml", &SCORED.replace("wc -l <", "exit 3; wc -l <"));
    assert_eq!(p.run(&["run", "q.yaml", "--set", "n=5"]).code, 1);
    failed_with(
        &p.run(&["compare", "--fail-on-regress", "score.value"]),
        1,
        "score.value was not recorded: stage `score` failed in run B (5 in run A)",
    );
    // Without the gate the comparison itself still succeeds.
    p.run(&["compare"]).assert_ok();
    p.write("q.yaml", &SCORED.replace("  score:", "  total:").replace("score.", "total."));
    p.run(&["run", "q.yaml", "--set", "n=5"]).assert_ok();
    failed_with(
        &p.run(&["compare", "latest~2", "latest", "--fail-on-regress", "score.value"]),
        1,
        "score.value was not recorded: run B has no stage `score` (5 in run A)",
    );
    // A metric new in run B has nothing to regress from: a note, not a failure.
    let r = p.run(&["compare", "latest~2", "latest", "--fail-on-regress", "total.value"]);
    r.assert_ok();
    assert!(r.stderr.contains("note: total.value: not in run A"), "{}", r.stderr);
}

/// `--fail-on-regress STAGE.METRIC` on a `foreach` stage judges every variant in both runs.
#[test]
fn fail_on_regress_gates_every_variant_of_a_sweep() {
    let p = Project::new();
    p.write("s.yaml", &sweep_pipeline("[0.1, 0.2]"));
    p.run(&["run", "s.yaml"]).assert_ok();
    // The optimum moves to 0.3: every variant's loss grows by 0.1.
    p.write("s.yaml", &sweep_pipeline("[0.1, 0.2, 0.4]").replace("- 0.2)", "- 0.3)"));
    p.run(&["run", "s.yaml"]).assert_ok();
    let r = p.run(&["compare", "--fail-on-regress", "fit.loss"]);
    failed_with(&r, 1, "regression: fit@lr=0.2+model=b.loss regressed: 0 → 0.1");
    assert_eq!(r.stderr.matches("regressed").count(), 4, "{}", r.stderr);
    assert!(r.stderr.contains("note: fit@lr=0.4+model=a.loss: not in run A"), "{}", r.stderr);
    p.run(&["compare", "--fail-on-regress", "fit.loss:0.2"]).assert_ok();
    p.run(&["compare", "latest", "latest~1", "--fail-on-regress", "fit.loss"]).assert_ok();
    // One variant named exactly is gated alone.
    failed_with(
        &p.run(&["compare", "--fail-on-regress", "fit@lr=0.1+model=a.loss"]),
        1,
        "fit@lr=0.1+model=a.loss regressed: 1.1 → 1.2",
    );
    // No variant in both runs: nothing was compared, which is no pass.
    p.write("s.yaml", &sweep_pipeline("[0.5]"));
    p.run(&["run", "s.yaml"]).assert_ok();
    failed_with(
        &p.run(&["compare", "--fail-on-regress", "fit.loss"]),
        1,
        "fit.loss: no variant is in both runs, so nothing was compared",
    );
    failed_with(&p.run(&["compare", "--fail-on-regress", "fat.loss"]), 2, "no such metric");
}

/// Without A, `compare` takes B's pipeline's run before B, not another pipeline's run between.
#[test]
fn compare_takes_the_base_run_from_the_same_pipeline() {
    let p = two_runs();
    p.write("o.yaml", "name: other\nstages:\n  x: {kind: command, cmd: \"echo > ${outputs.o}\", outputs: [o]}\n");
    p.run(&["run", "o.yaml"]).assert_ok();
    failed_with(&p.run(&["compare"]), 2, "is the oldest run of pipeline `other` here: name the base run A");
    p.run(&["run", "q.yaml", "--set", "n=7"]).assert_ok();
    let c = p.run(&["compare"]);
    c.assert_ok();
    assert!(c.stdout.contains("--set n=5)\nB: ") && c.stdout.contains("--set n=7)"), "{}", c.stdout);
    assert!(c.stdout.contains("score.value  5  7  2  +40.00%  better"), "{}", c.stdout);
    assert!(!c.stderr.contains("note:"), "{}", c.stderr);
    // Named explicitly, runs of two pipelines compare, with a note; `other` declares no metric
    // of its own, so q's declarations are not held against its stages.
    let cross = p.run(&["compare", "latest~1", "latest"]);
    cross.assert_ok();
    assert!(cross.stderr.contains("note: A is a run of pipeline `other`, B of `q`"), "{}", cross.stderr);
}

#[test]
fn compare_errors_are_clear() {
    let p = two_runs();
    failed_with(
        &p.run(&["compare", "latest", "abcdef12"]),
        2,
        "no run `abcdef12` in the store; `orchestrate runs` lists them",
    );
    failed_with(&p.run(&["compare", "latest~5", "latest"]), 2, "the store has only 2 runs (`latest~1` is the oldest)");
    failed_with(&p.run(&["compare", "latest", "latest~x"]), 2, "write `latest` or `latest~N`");
    p.write("q.yaml", &SCORED.replace("score.loss: min", "score.accuracy: max"));
    p.run(&["run", "q.yaml", "--set", "n=7"]).assert_ok();
    failed_with(
        &p.run(&["compare"]),
        2,
        "metric `score.accuracy` is declared, but stage `score` did not record `accuracy` (it records: loss, value)",
    );
    let fresh = Project::new();
    failed_with(&fresh.run(&["compare"]), 2, "the store has no runs yet");
}

/// A grid sweep whose `loss` is smallest at lr=0.2 with model b, and a stage taking the best.
fn sweep_pipeline(lrs: &str) -> String {
    format!(
        r#"name: sweep
metrics: {{fit.loss: min}}
stages:
  fit:
    kind: command
    foreach: {{lr: {lrs}, model: [a, b]}}
    cmd: "echo ${{item.model}}-${{item.lr}} > ${{outputs.model}}; python3 -c 'import json,sys; print(json.dumps({{\"loss\": abs(${{item.lr}} - 0.2) + (0 if \"${{item.model}}\" == \"b\" else 1)}}))' > $ORCH_METRICS"
    outputs: [model]
  pick:
    kind: command
    cmd: "cp ${{inputs.m}} ${{outputs.chosen}}"
    inputs: {{m: {{best_of: fit, by: loss, output: model}}}}
    outputs: [chosen]
"#
    )
}

#[test]
fn grid_sweeps_are_named_ranked_and_the_best_variant_is_in_the_key() {
    let p = Project::new();
    p.write("s.yaml", &sweep_pipeline("[0.1, 0.2, 0.4]"));
    let dag = p.run(&["plan", "s.yaml", "--json"]);
    dag.assert_ok();
    let names: Vec<String> =
        dag.json().as_array().unwrap().iter().map(|e| e["stage"].as_str().unwrap().to_string()).collect();
    assert_eq!(
        names,
        [
            "fit@lr=0.1+model=a",
            "fit@lr=0.1+model=b",
            "fit@lr=0.2+model=a",
            "fit@lr=0.2+model=b",
            "fit@lr=0.4+model=a",
            "fit@lr=0.4+model=b",
            "pick"
        ]
    );
    p.run(&["run", "s.yaml"]).assert_ok();
    assert_eq!(p.read("artifacts/outputs/sweep/pick/chosen"), "b-0.2\n");
    let show = p.run(&["show", "s.yaml", "pick", "--json"]).json();
    assert_eq!(show["selected"]["m"], "fit@lr=0.2+model=b", "the winner is recorded with the result");
    // The history's column for a sweep's metric is its best variant's, named.
    let runs = p.run(&["runs", "--metric", "fit.loss", "--json"]).json();
    assert_eq!((runs[0]["metric"].as_f64(), runs[0]["metric_from"].as_str()), (Some(0.0), Some("fit@lr=0.2+model=b")));
    let text = p.run(&["runs", "--metric", "fit.loss"]).stdout;
    assert!(text.contains(" 0 (fit@lr=0.2+model=b)"), "{text}");
    // A direction given picks the best variant that way, declared or not.
    let runs = p.run(&["runs", "--metric", "fit.loss:max", "--json"]).json();
    assert_eq!((runs[0]["metric"].as_f64(), runs[0]["metric_from"].as_str()), (Some(1.2), Some("fit@lr=0.4+model=a")));
    failed_with(&p.run(&["runs", "--metric", "fit.loss:up"]), 2, "the direction is `min` or `max`, not `up`");

    let sweep = p.run(&["compare", "--sweep", "fit"]);
    sweep.assert_ok();
    let rows: Vec<&str> = sweep.stdout.lines().skip(2).collect();
    assert!(rows[0].starts_with("  fit@lr=0.2+model=b") && rows[0].trim_end().ends_with(" 0"), "{}", sweep.stdout);
    assert!(rows[5].starts_with("  fit@lr=0.4+model=a"), "worst last:\n{}", sweep.stdout);
    let png = p.path().join("sweep.png");
    p.run(&["compare", "--sweep", "fit", "--plot", png.to_str().unwrap()]).assert_ok();
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let csv = p.run(&["compare", "--sweep", "fit", "--csv"]);
    assert!(csv.stdout.starts_with("variant,lr,model,loss\nfit@lr=0.2+model=b,0.2,b,0\n"), "{}", csv.stdout);

    // Another sweep where lr=0.25 wins: `pick` reruns, and the plan says which variant it now takes.
    p.write("s.yaml", &sweep_pipeline("[0.1, 0.25, 0.4]"));
    let plan = p.run(&["plan", "s.yaml"]);
    assert!(plan.stdout.contains("pick"), "{}", plan.stdout);
    p.run(&["run", "s.yaml"]).assert_ok();
    assert_eq!(p.read("artifacts/outputs/sweep/pick/chosen"), "b-0.25\n");
    let diff = p.run(&["compare"]);
    assert!(
        diff.stdout.contains("input `m` now from `fit@lr=0.25+model=b` (was `fit@lr=0.2+model=b`)"),
        "{}",
        diff.stdout
    );
}

#[test]
fn sweep_errors_are_clear() {
    let p = Project::new();
    let big = "name: g\nstages:\n  s:\n    kind: command\n    foreach: {a: [1,2,3,4,5,6,7,8,9,10,11], b: [1,2,3,4,5,6,7,8,9,10,11], c: [1,2,3,4,5,6,7,8,9,10,11]}\n    cmd: \"true\"\n";
    p.write("g.yaml", big);
    let r = p.run(&["plan", "g.yaml"]);
    failed_with(&r, 2, "expands to more than 1000 variants (a: 11 × b: 11 × c: 11)");
    assert!(r.stderr.contains("g.yaml:5:"), "{}", r.stderr);
    p.write("m.yaml", "name: m\nstages:\n  s: {kind: command, foreach: {lr: [0.1, fast]}, cmd: \"true\"}\n");
    failed_with(&p.run(&["plan", "m.yaml"]), 2, "grid axis `lr` mixes types: 0.1 is a number, \"fast\" a string");
    p.write(
        "b.yaml",
        "name: b\nstages:\n  a: {kind: command, cmd: \"echo > ${outputs.o}\", outputs: [o]}\n  c: {kind: command, cmd: \"true\", inputs: {m: {best_of: a, by: loss, output: o}}}\n",
    );
    failed_with(&p.run(&["plan", "b.yaml"]), 2, "`best_of: a` needs a stage with `foreach` named `a`");
    p.write("u.yaml", &sweep_pipeline("[0.1]").replace("metrics: {fit.loss: min}", "metrics: {fit.other: min}"));
    failed_with(&p.run(&["plan", "u.yaml"]), 2, "`by: loss` is not a declared metric of `fit`");
    p.write("d.yaml", &sweep_pipeline("[0.1]").replace("fit.loss: min", "fit.loss: lowest"));
    failed_with(&p.run(&["plan", "d.yaml"]), 2, "must be `min` or `max`");
    p.write("s.yaml", &sweep_pipeline("[0.1, 0.2]"));
    p.run(&["run", "s.yaml"]).assert_ok();
    // `--target` with a `foreach` stage's name runs every variant, and nothing downstream.
    p.write("s.yaml", &sweep_pipeline("[0.1, 0.3]"));
    let r = p.run(&["run", "s.yaml", "--target", "fit", "--json"]);
    r.assert_ok();
    let stages: Vec<(String, String)> = (r.json()["stages"].as_array().unwrap().iter())
        .map(|s| (s["stage"].as_str().unwrap().to_string(), s["status"].as_str().unwrap().to_string()))
        .collect();
    let status = |s: &str, st: &str| (s.to_string(), st.to_string());
    assert_eq!(
        stages,
        [
            status("fit@lr=0.1+model=a", "cached"),
            status("fit@lr=0.1+model=b", "cached"),
            status("fit@lr=0.3+model=a", "ran"),
            status("fit@lr=0.3+model=b", "ran")
        ]
    );
    failed_with(&p.run(&["run", "s.yaml", "--target", "fat"]), 2, "has no stage `fat`");
    p.write("s.yaml", &sweep_pipeline("[0.1, 0.2]"));
    // A `foreach` stage named where one stage is meant: the error lists its variants.
    let variants = "`fit` is a `foreach` stage: name one of its 4 variants, e.g. `fit@lr=0.1+model=a` (fit@lr=0.1+model=a, fit@lr=0.1+model=b, fit@lr=0.2+model=a, fit@lr=0.2+model=b)";
    failed_with(&p.run(&["export", "s.yaml", "fit.model", "out"]), 2, variants);
    failed_with(&p.run(&["show", "s.yaml", "fit"]), 2, variants);
    failed_with(&p.run(&["export", "s.yaml", "fat.model", "out"]), 2, "valid stages: fit@lr=0.1+model=a,");
    failed_with(
        &p.run(&["compare", "--sweep", "pick"]),
        2,
        "has no variants of `pick` (stages with foreach in it: fit)",
    );
    failed_with(
        &p.run(&["compare", "--sweep", "fit", "--by", "speed"]),
        2,
        "`speed` is not a declared metric of `fit` in that run: give its direction, `--by speed:min` or \
         `--by speed:max` (its variants record: loss)",
    );
    failed_with(&p.run(&["compare", "--sweep", "fit", "--by", "loss:up"]), 2, "the direction is `min` or `max`");
    // `--by` takes STAGE.METRIC too, and a direction given ranks that way.
    p.run(&["run", "s.yaml"]).assert_ok();
    let first_row = |args: &[&str]| {
        let r = p.run(args);
        r.assert_ok();
        r.stdout.lines().nth(2).unwrap_or_default().trim().to_string()
    };
    let best = first_row(&["compare", "--sweep", "fit", "--by", "fit.loss"]);
    assert!(best.starts_with("fit@lr=0.2+model=b"), "{best}");
    let worst = first_row(&["compare", "--sweep", "fit", "--by", "loss:max"]);
    assert!(worst.starts_with("fit@lr=0.1+model=a"), "{worst}");
}

/// A metric declared with a band (`within:`): changes inside it are noise — neither better nor
/// worse, and the gate passes them — while a change beyond it, or beyond a tolerance the gate
/// is given, still counts.
#[test]
fn a_declared_band_makes_small_changes_noise() {
    let p = Project::new();
    let banded = SCORED.replace("score.value: max", "score.value: {better: max, within: 50%}");
    p.write("q.yaml", &banded);
    for n in ["3", "2", "1"] {
        p.run(&["run", "q.yaml", "--set", &format!("n={n}")]).assert_ok();
    }
    // 3 → 2 (−33 %): noise.
    let cmp = p.run(&["compare", "latest~2", "latest~1"]);
    cmp.assert_ok();
    let row = cmp.stdout.lines().find(|l| l.trim_start().starts_with("score.value")).unwrap_or_default().to_string();
    assert!(row.trim_end().ends_with("noise (within 50%)"), "{}", cmp.stdout);
    let json = p.run(&["compare", "latest~2", "latest~1", "--json"]).json();
    let value = json["metrics"].as_array().and_then(|m| m.iter().find(|r| r["name"] == "score.value")).cloned();
    assert_eq!(
        value.map(|v| (v["verdict"].clone(), v["within"].clone())),
        Some(("noise".into(), serde_json::json!({"amount": 50.0, "relative": true})))
    );
    p.run(&["compare", "latest~2", "latest~1", "--fail-on-regress", "score.value"]).assert_ok();
    // The gate's own tolerance replaces the band.
    failed_with(
        &p.run(&["compare", "latest~2", "latest~1", "--fail-on-regress", "score.value:10%"]),
        1,
        "score.value regressed: 3 → 2 (-33.33%), beyond the tolerance 10%",
    );
    // 3 → 1 (−67 %): beyond the band, worse, and the gate fails naming the band.
    let cmp = p.run(&["compare", "latest~2", "latest"]);
    assert!(
        cmp.stdout.lines().any(|l| l.trim_start().starts_with("score.value") && l.trim_end().ends_with("worse")),
        "{}",
        cmp.stdout
    );
    failed_with(
        &p.run(&["compare", "latest~2", "latest", "--fail-on-regress", "score.value"]),
        1,
        "beyond its declared band 50%",
    );
    // Bad declarations, each placed in the file.
    for (decl, says) in [
        ("{better: up}", "must be `min` or `max`"),
        ("{better: max, within: lots}", "`within` `lots` is not a number ≥ 0"),
        ("{within: 5%}", "needs `better: min` or `better: max`"),
        ("{better: max, witin: 5%}", "unknown key `witin`"),
    ] {
        p.write("b.yaml", &SCORED.replace("score.value: max", &format!("score.value: {decl}")));
        let r = p.run(&["plan", "b.yaml"]);
        failed_with(&r, 2, says);
        assert!(r.stderr.starts_with("b.yaml:3:"), "{decl}: {}", r.stderr);
    }
}
