//! Caching and scheduling behaviour of `orchestrate run`, through the real binary.

use e2e_tests::Project;

const CHAIN: &str = r#"name: chain
params: {seed: 42, sizes: [5, 10], suffix: "!"}
stages:
  up:
    kind: command
    cmd: ["sh", "-c", "tr a-z A-Z < ${inputs.text} > ${outputs.upper}"]
    inputs: {text: file:data/in.txt}
    outputs: [upper]
  cut:
    kind: command
    foreach: ${params.sizes}
    cmd: "head -c ${item} ${inputs.u} > ${outputs.out}"
    inputs: {u: up.upper}
    outputs: [out]
  tag:
    kind: command
    cmd: "cat ${inputs.x} > ${outputs.t} && printf '${params.suffix}' >> ${outputs.t}"
    inputs: {x: cut@5.out}
    outputs: [t]
  other:
    kind: command
    cmd: "echo ${params.seed} > ${outputs.o}"
    outputs: [o]
"#;

fn project() -> Project {
    let p = Project::new();
    p.write("data/in.txt", "hello world, hello orchestrate\n");
    p.write("p.yaml", CHAIN);
    p
}

#[test]
fn foreach_expands_and_outputs_are_right() {
    let p = project();
    let r = p.run(&["run", "p.yaml", "--json"]);
    r.assert_ok();
    let names: Vec<String> = r.statuses().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["up", "cut@5", "cut@10", "tag", "other"]);
    assert!(r.statuses().iter().all(|(_, s)| s == "ran"));
    p.run(&["export", "p.yaml", "tag.t", "t.txt"]).assert_ok();
    assert_eq!(p.read("t.txt"), "HELLO!");
    p.run(&["export", "p.yaml", "cut@10", "cut10"]).assert_ok();
    assert_eq!(p.read("cut10/out"), "HELLO WORL");
    // Into an existing folder, as `cp` does; what is there already is never overwritten.
    let into = p.run(&["export", "p.yaml", "tag.t", "cut10"]);
    into.assert_ok();
    assert!(into.stderr.contains("exported tag.t to cut10/t"), "{}", into.stderr);
    assert_eq!(p.read("cut10/t"), "HELLO!");
    let again = p.run(&["export", "p.yaml", "tag.t", "cut10"]);
    assert_eq!(again.code, 1, "{}", again.stderr);
    assert!(again.stderr.contains("cut10/t already exists"), "{}", again.stderr);
    // A trailing `/` names a folder to make, as the output's home.
    let made = p.run(&["export", "p.yaml", "tag.t", "new/dir/"]);
    assert!(made.stderr.contains("exported tag.t to new/dir/t"), "{}", made.stderr);
    assert_eq!(p.read("new/dir/t"), "HELLO!");
    // A misspelt output is an invalid command line, with the stage's outputs offered.
    let typo = p.run(&["export", "p.yaml", "tag.tt", "x.txt"]);
    assert_eq!(typo.code, 2, "{}", typo.stderr);
    assert!(typo.stderr.contains("has no output `tt`") && typo.stderr.contains("did you mean `t`?"), "{}", typo.stderr);
}

#[test]
fn rerun_is_fully_cached() {
    let p = project();
    p.run(&["run", "p.yaml"]).assert_ok();
    let r = p.run(&["run", "p.yaml", "--json"]);
    r.assert_ok();
    assert!(r.statuses().iter().all(|(_, s)| s == "cached"), "{}", r.stdout);
    let plan = p.run(&["plan", "p.yaml"]);
    assert!(plan.stdout.contains("0 of 5 stages will run"), "{}", plan.stdout);
}

#[test]
fn a_param_change_reruns_exactly_its_downstream() {
    let p = project();
    p.run(&["run", "p.yaml"]).assert_ok();
    let plan = p.run(&["plan", "p.yaml", "--set", "suffix=+"]);
    plan.assert_ok();
    let tag = plan.stdout.lines().find(|l| l.starts_with("tag ")).unwrap_or_default();
    assert!(
        tag.contains("will run  (cmd changed: ") && tag.contains("printf '!'") && tag.contains("printf '+'"),
        "{}",
        plan.stdout
    );
    assert!(plan.stdout.contains("1 of 5 stages will run"), "{}", plan.stdout);
    let r = p.run(&["run", "p.yaml", "--set", "suffix=+", "--json"]);
    r.assert_ok();
    assert_eq!(r.status_of("tag"), "ran");
    for s in ["up", "cut@5", "cut@10", "other"] {
        assert_eq!(r.status_of(s), "cached", "{s}");
    }
    // Back to a cached configuration, then another change: told against the configuration the
    // stage last resolved to (a cache hit), not the last one that had to execute.
    p.run(&["run", "p.yaml"]).assert_ok();
    let plan = p.run(&["plan", "p.yaml", "--set", "suffix=x"]);
    let tag = plan.stdout.lines().find(|l| l.starts_with("tag ")).unwrap_or_default();
    assert!(tag.contains("printf '!'") && tag.contains("printf 'x'") && !tag.contains("'+'"), "{}", plan.stdout);
    // A stage param (not used by the command) still belongs to the cache key.
    let plan = p.run(&["plan", "p.yaml", "--set", "suffix=+", "--set", "stages.other.params.x=3"]);
    let other = plan.stdout.lines().find(|l| l.starts_with("other ")).unwrap_or_default();
    assert!(other.ends_with("will run  (params.x added: 3)"), "{}", plan.stdout);
}

#[test]
fn an_input_file_change_reruns_its_downstream_and_plan_says_why() {
    let p = project();
    p.run(&["run", "p.yaml"]).assert_ok();
    p.write("data/in.txt", "goodbye world\n");
    let plan = p.run(&["plan", "p.yaml", "--json"]);
    let entries = plan.json();
    let up = entries.as_array().unwrap().iter().find(|e| e["stage"] == "up").unwrap();
    assert_eq!(up["status"], "run");
    assert!(up["reasons"][0].as_str().unwrap().starts_with("input `text` changed: "), "{up}");
    let r = p.run(&["run", "p.yaml", "--json"]);
    r.assert_ok();
    assert_eq!(r.status_of("up"), "ran");
    assert_eq!(r.status_of("cut@5"), "ran");
    assert_eq!(r.status_of("other"), "cached");
    p.run(&["export", "p.yaml", "tag.t", "t.txt"]).assert_ok();
    assert_eq!(p.read("t.txt"), "GOODB!");
}

#[test]
fn same_output_bytes_stop_the_rerun_early() {
    // `up` reruns on an input change that does not change its output; downstream stays cached.
    let p = project();
    p.run(&["run", "p.yaml"]).assert_ok();
    p.write("data/in.txt", "HELLO WORLD, HELLO ORCHESTRATE\n");
    let r = p.run(&["run", "p.yaml", "--json"]);
    assert_eq!(r.status_of("up"), "ran");
    assert_eq!(r.status_of("cut@5"), "cached");
    assert_eq!(r.status_of("tag"), "cached");
}

/// `--rerun` executes a cached stage again (a `foreach` name: every variant); what reads it
/// reruns only if its bytes changed, and the new result is what the cache then holds.
#[test]
fn rerun_executes_cached_stages_and_replaces_their_results() {
    let p = project();
    p.write("stamp.yaml", "stages:\n  stamp: {kind: command, cmd: \"date +%s%N > ${outputs.o}\", outputs: [o], deterministic: false}\n  copy: {kind: command, cmd: \"cp ${inputs.i} ${outputs.o}\", inputs: {i: stamp.o}, outputs: [o]}\n");
    p.run(&["run", "p.yaml"]).assert_ok();
    // `plan` takes the same flags and says what such a run would do.
    let plan = p.run(&["plan", "p.yaml", "--rerun", "up"]);
    plan.assert_ok();
    let line =
        |stage: &str| plan.stdout.lines().find(|l| l.starts_with(&format!("{stage} "))).unwrap_or("").to_string();
    assert!(line("up").contains("will run  (--rerun: executed again although cached"), "{}", plan.stdout);
    assert!(line("cut@5").contains("cached  (unless `up`, run again, gives other outputs)"), "{}", plan.stdout);
    assert!(line("tag").contains("cached  (unless `up`, run again"), "{}", plan.stdout);
    assert!(line("other").ends_with(" cached"), "nothing upstream reruns: {}", plan.stdout);
    assert!(plan.stdout.contains("1 of 5 stages will run"), "{}", plan.stdout);
    let tplan = p.run(&["plan", "p.yaml", "--target", "other", "--rerun", "up", "--json"]).json();
    let planned: Vec<(&str, &str)> = (tplan.as_array().into_iter().flatten())
        .map(|e| (e["stage"].as_str().unwrap_or(""), e["status"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(planned, [("up", "run"), ("other", "cached")]);
    let targeted = p.run(&["plan", "p.yaml", "--target", "tag"]);
    assert!(
        targeted.stdout.contains("0 of 3 stages will run (--target takes 3 of the pipeline's 5)"),
        "{}",
        targeted.stdout
    );
    let r = p.run(&["run", "p.yaml", "--rerun", "up", "--rerun", "cut", "--json"]);
    r.assert_ok();
    let ran: Vec<(String, String)> = r.statuses();
    assert_eq!(r.status_of("up"), "ran", "{ran:?}");
    assert_eq!((r.status_of("cut@5"), r.status_of("cut@10")), ("ran".into(), "ran".into()), "{ran:?}");
    assert_eq!(r.status_of("tag"), "cached", "same bytes upstream: {ran:?}");
    assert_eq!(r.status_of("other"), "cached", "{ran:?}");
    assert!(!r.stderr.contains("not deterministic"), "same bytes: {}", r.stderr);
    // With --target, a rerun stage is a target too; nothing else is taken.
    let t = p.run(&["run", "p.yaml", "--target", "other", "--rerun", "up", "--json"]);
    assert_eq!(t.statuses().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["up", "other"]);
    assert_eq!((t.status_of("up"), t.status_of("other")), ("ran".into(), "cached".into()));
    // Other bytes: the reader reruns, and the cache holds the new result.
    p.run(&["run", "stamp.yaml"]).assert_ok();
    p.run(&["export", "stamp.yaml", "stamp.o", "first"]).assert_ok();
    let again = p.run(&["run", "stamp.yaml", "--rerun", "stamp", "--json"]);
    assert_eq!((again.status_of("stamp"), again.status_of("copy")), ("ran".into(), "ran".into()));
    assert!(!again.stderr.contains("not deterministic"), "declared so: {}", again.stderr);
    p.run(&["export", "stamp.yaml", "copy.o", "second"]).assert_ok();
    assert_ne!(p.read("first"), p.read("second"));
    let cached = p.run(&["run", "stamp.yaml", "--json"]);
    assert_eq!((cached.status_of("stamp"), cached.status_of("copy")), ("cached".into(), "cached".into()));
    // A stage declared deterministic that gives other bytes: the rerun says so.
    p.write("clock.yaml", "stages:\n  clock: {kind: command, cmd: \"date +%s%N > ${outputs.o}\", outputs: [o]}\n");
    p.run(&["run", "clock.yaml"]).assert_ok();
    let clock = p.run(&["run", "clock.yaml", "--rerun", "clock"]);
    clock.assert_ok();
    assert!(
        clock.stderr.contains("`clock` was run again and gave other bytes than its cached result (`o`)")
            && clock.stderr.contains("the stage is not deterministic"),
        "{}",
        clock.stderr
    );
    for verb in ["run", "plan"] {
        let typo = p.run(&[verb, "p.yaml", "--rerun", "upp"]);
        assert_eq!(typo.code, 2, "{verb}: {}", typo.stderr);
        assert!(typo.stderr.contains("no stage `upp`"), "{verb}: {}", typo.stderr);
    }
}

#[test]
fn set_changes_foreach_items() {
    let p = project();
    let r = p.run(&["run", "p.yaml", "--set", "sizes=[3]", "--set", "stages.tag.inputs.x=cut@3.out", "--json"]);
    r.assert_ok();
    let names: Vec<String> = r.statuses().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["up", "cut@3", "tag", "other"]);
    p.run(&["export", "p.yaml", "--set", "sizes=[3]", "--set", "stages.tag.inputs.x=cut@3.out", "tag.t", "t.txt"])
        .assert_ok();
    assert_eq!(p.read("t.txt"), "HEL!");
}

#[test]
fn environment_variables_and_scratch_dir() {
    let p = Project::new();
    p.write("data/in.txt", "x");
    p.write(
        "p.yaml",
        r#"stages:
  env:
    kind: command
    cmd: "pwd > ${outputs.where} && echo \"$ORCH_IN_TEXT|$ORCH_OUT_WHERE|$ORCH_STAGE|$ORCH_THREADS|$GREETING\" > $ORCH_OUT_VARS"
    inputs: {text: file:data/in.txt}
    outputs: [where, vars]
    threads: 1
    env: {GREETING: hi}
"#,
    );
    p.run(&["run", "p.yaml"]).assert_ok();
    p.run(&["export", "p.yaml", "env", "out"]).assert_ok();
    let vars = p.read("out/vars");
    let parts: Vec<&str> = vars.trim().split('|').collect();
    assert!(parts[0].ends_with("data/in.txt"), "{vars}");
    assert!(parts[1].ends_with("/out/where"), "{vars}");
    assert_eq!(&parts[2..], ["env", "1", "hi"]);
    let wd = p.read("out/where");
    assert!(wd.contains("/tmp/stage-env"), "commands run in a scratch folder under the store: {wd}");
}

/// Two independent `sleep 1` stages overlap in time with --cores 2 and do not with --cores 1.
/// (Checked by the stages' own start/end stamps, not by a wall-clock bound.)
#[test]
fn independent_stages_run_in_parallel_within_the_core_budget() {
    let src = r#"stages:
  s1: {kind: command, cmd: "date +%s.%N > ${outputs.t}; sleep 1; date +%s.%N >> ${outputs.t}", outputs: [t], params: {run: RUN, id: 1}}
  s2: {kind: command, cmd: "date +%s.%N > ${outputs.t}; sleep 1; date +%s.%N >> ${outputs.t}", outputs: [t], params: {run: RUN, id: 2}}
"#;
    let spans = |cores: &str| {
        let p = Project::new();
        p.write("p.yaml", &src.replace("RUN", cores));
        let r = p.run(&["run", "p.yaml", "--cores", cores, "--json"]);
        r.assert_ok();
        let mut v = Vec::new();
        for s in ["s1", "s2"] {
            p.run(&["export", "p.yaml", &format!("{s}.t"), s]).assert_ok();
            let t: Vec<f64> = p.read(s).lines().map(|l| l.trim().parse().unwrap()).collect();
            v.push((t[0], t[1]));
        }
        (v[0], v[1], r.json()["wall_s"].as_f64().unwrap())
    };
    let ((a0, a1), (b0, b1), wall) = spans("2");
    assert!(a0 < b1 && b0 < a1, "with 2 cores the stages must overlap: {a0}-{a1} vs {b0}-{b1}");
    eprintln!("2 cores: wall {wall:.2}s for two 1 s stages");
    let ((a0, a1), (b0, b1), _) = spans("1");
    assert!(a1 <= b0 || b1 <= a0, "with 1 core the stages must not overlap: {a0}-{a1} vs {b0}-{b1}");
}

#[test]
fn after_a_failure_running_stages_finish_and_are_stored_and_nothing_new_starts() {
    let p = Project::new();
    let mark = p.path().join("bad-failed");
    // `slow` is running when `bad` fails (it waits for bad's mark), and ends a second later.
    let src = r#"stages:
  bad: {kind: command, cmd: "touch MARK; exit 7", outputs: [o]}
  slow: {kind: command, cmd: "while [ ! -e MARK ]; do sleep 0.05; done; sleep 1; echo ok > ${outputs.o}", outputs: [o]}
  later: {kind: command, cmd: "echo later > ${outputs.o}", outputs: [o]}
"#
    .replace("MARK", &mark.display().to_string());
    p.write("p.yaml", &src);
    let r = p.run(&["run", "p.yaml", "--cores", "2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let said = |text: &str| assert!(r.stderr.contains(text), "`{text}` expected in:\n{}", r.stderr);
    said("FAILED     bad: command exited with status 7");
    said("nothing new starts after the failure; waiting for `slow` to finish so its result is kept (Ctrl-C stops it now)");
    said("done       slow in ");
    // `later` never started: nothing new starts after a failure.
    said("1 ran, 0 cached, 1 failed, 1 skipped in");
    // With --json too, the run says what it waits for (stderr; stdout is the summary).
    let r = p.run(&["run", "p.yaml", "--cores", "2", "--rerun", "slow", "--json"]);
    assert_eq!((r.status_of("bad"), r.status_of("slow")), ("failed".into(), "ran".into()), "{}", r.stderr);
    assert!(r.stderr.contains("waiting for `slow` to finish so its result is kept"), "{}", r.stderr);
    // Its result was stored: the next run takes it from the cache.
    std::fs::remove_file(&mark).unwrap();
    let r = p.run(&["run", "p.yaml", "--cores", "2", "--json", "--keep-going"]);
    assert_eq!(r.status_of("slow"), "cached", "{}", r.stderr);
    assert_eq!(r.status_of("later"), "ran");
}

#[test]
fn fail_fast_by_default_keep_going_finishes_other_branches() {
    let src = r#"stages:
  bad: {kind: command, cmd: "echo boom >&2; exit 7", outputs: [o]}
  after_bad: {kind: command, cmd: "cp ${inputs.i} ${outputs.o}", inputs: {i: bad.o}, outputs: [o]}
  slow: {kind: command, cmd: "sleep 0.5; echo ok > ${outputs.o}", outputs: [o]}
"#;
    let p = Project::new();
    p.write("p.yaml", src);
    let r = p.run(&["run", "p.yaml", "--cores", "1", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.status_of("bad"), "failed");
    assert_eq!(r.status_of("after_bad"), "skipped");
    assert_eq!(r.status_of("slow"), "skipped", "fail fast: nothing new starts after a failure");
    assert!(r.stderr.contains("exited with status 7"), "{}", r.stderr);
    assert!(r.stderr.contains("| boom"), "the stage's own output is shown: {}", r.stderr);

    let r = p.run(&["run", "p.yaml", "--cores", "1", "--keep-going", "--json"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.status_of("bad"), "failed");
    assert_eq!(r.status_of("after_bad"), "skipped");
    assert_eq!(r.status_of("slow"), "ran");

    // `show` on a stage that failed: how, in which run, and the end of its log.
    let shown = p.run(&["show", "p.yaml", "bad"]);
    assert_eq!(shown.code, 1, "no stored result: {}", shown.stderr);
    assert!(
        shown.stdout.contains("last try   failed in run ") && shown.stdout.contains("command exited with status 7"),
        "{}",
        shown.stdout
    );
    assert!(shown.stdout.contains("  | boom"), "{}", shown.stdout);
    // `--log`: the failed try's log, as it was written.
    let log = p.run(&["show", "p.yaml", "bad", "--log"]);
    log.assert_ok();
    assert_eq!(log.stdout.trim(), "boom", "{}", log.stderr);
    assert!(log.stderr.contains("the last try of `bad` (failed in run "), "{}", log.stderr);
    let j = p.run(&["show", "p.yaml", "after_bad", "--json"]).json();
    assert_eq!(j["last_attempt"]["status"], "skipped", "{j}");
    // Once it succeeds, the failure is history: `show` shows the result alone.
    p.write("p.yaml", &src.replace("exit 7", "echo fixed > ${outputs.o}"));
    p.run(&["run", "p.yaml"]).assert_ok();
    let shown = p.run(&["show", "p.yaml", "bad", "--json"]);
    shown.assert_ok();
    assert!(shown.json()["last_attempt"].is_null() && shown.json()["current"] == true, "{}", shown.stdout);
    // A stored result that is not the pipeline's current one, after a failed try: both.
    p.write("p.yaml", &src.replace("exit 7", "exit 8"));
    assert_eq!(p.run(&["run", "p.yaml"]).code, 1);
    let shown = p.run(&["show", "p.yaml", "bad"]);
    shown.assert_ok();
    assert!(
        shown.stdout.contains("status 8") && shown.stdout.contains("showing its last stored result"),
        "{}",
        shown.stdout
    );
}

#[test]
fn missing_declared_output_fails_and_stores_nothing_for_it() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  s: {kind: command, cmd: \"true\", outputs: [o]}\n");
    let r = p.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("declared output `o` was not written: the stage ended without creating it (a `command` writes it at ${outputs.o})"), "{}", r.stderr);
    let r = p.run(&["run", "p.yaml", "--json"]);
    assert_eq!(r.status_of("s"), "failed", "a failure is never cached");
}

#[test]
fn directory_outputs_become_trees() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  d: {kind: command, cmd: \"mkdir -p ${outputs.dir}/sub && echo a > ${outputs.dir}/a && echo b > ${outputs.dir}/sub/b\", outputs: [dir]}\n  c: {kind: command, cmd: \"cat ${inputs.d}/a ${inputs.d}/sub/b > ${outputs.o}\", inputs: {d: d.dir}, outputs: [o]}\n",
    );
    p.run(&["run", "p.yaml"]).assert_ok();
    p.run(&["export", "p.yaml", "c.o", "o.txt"]).assert_ok();
    assert_eq!(p.read("o.txt"), "a\nb\n");
    let show = p.run(&["show", "p.yaml", "d", "--json"]);
    show.assert_ok();
    let v = show.json();
    assert_eq!(v["outputs"]["dir"]["type"], "tree");
    assert_eq!(v["outputs"]["dir"]["size"], 4);
}

#[test]
fn show_reports_outputs_metrics_duration_and_memory() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  m: {kind: command, cmd: \"echo hi > ${outputs.o}; echo '{\\\"acc\\\": 0.5, \\\"compression_ratio_of_tensors\\\": 3.9, \\\"tok_s\\\": 204887.65093707087}' > $ORCH_METRICS\", outputs: [o]}\n");
    p.run(&["run", "p.yaml"]).assert_ok();
    let v = p.run(&["show", "p.yaml", "m", "--json"]).json();
    assert_eq!(v["metrics"]["acc"], 0.5);
    // The text rounds a fraction as the tables do; JSON keeps it whole.
    assert_eq!(v["metrics"]["tok_s"], 204887.65093707087);
    assert_eq!(v["outputs"]["o"]["size"], 3);
    assert!(std::path::Path::new(v["outputs"]["o"]["path"].as_str().unwrap()).exists());
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(v["duration_s"].as_f64().unwrap() > 0.0);
    let text = p.run(&["show", "p.yaml", "m"]);
    assert!(text.stdout.contains("peak memory"), "{}", text.stdout);
    // Values line up after the longest name.
    assert!(
        text.stdout.contains("\n  acc                          0.5\n  compression_ratio_of_tensors 3.9\n  tok_s                        204887.7\n"),
        "{}",
        text.stdout
    );
    // `--log` prints what the stage wrote to stdout and stderr.
    p.write(
        "q.yaml",
        "stages:\n  s: {kind: command, cmd: \"echo out; echo err >&2; echo > ${outputs.o}\", outputs: [o]}\n",
    );
    p.run(&["run", "q.yaml"]).assert_ok();
    let log = p.run(&["show", "q.yaml", "s", "--log"]);
    log.assert_ok();
    assert!(log.stdout.contains("out\n") && log.stdout.contains("err\n"), "{}", log.stdout);
    let quiet = p.run(&["show", "p.yaml", "m", "--log"]);
    assert!(quiet.stdout.is_empty() && quiet.stderr.contains("`m` wrote nothing"), "{}{}", quiet.stdout, quiet.stderr);
}

#[test]
fn timeout_and_retries() {
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"stages:
  slow: {kind: command, cmd: "sleep 5; echo > ${outputs.o}", outputs: [o], timeout: 300ms}
  flaky:
    kind: command
    cmd: "n=$(cat ${inputs.c} 2>/dev/null); if [ -f ../../attempted ]; then echo ok > ${outputs.o}; else touch ../../attempted; exit 1; fi"
    inputs: {c: file:p.yaml}
    outputs: [o]
    retries: 1
"#,
    );
    let r = p.run(&["run", "p.yaml", "--keep-going", "--json"]);
    assert_eq!(r.status_of("slow"), "failed");
    assert!(r.stderr.contains("timed out"), "{}", r.stderr);
    assert_eq!(r.status_of("flaky"), "ran", "{}", r.stderr);
}

#[test]
fn logs_are_json_lines_on_request() {
    let p = project();
    let out =
        p.cmd().args(["--log-format", "json", "run", "p.yaml"]).env("RUST_LOG", "orchestrator=debug").output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json_lines: Vec<serde_json::Value> =
        stderr.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        json_lines.iter().any(|v| v["fields"]["message"] == "admitted" && v["fields"]["stage"] == "up"),
        "{stderr}"
    );
    assert!(json_lines.iter().all(|v| v["level"].is_string() && v["timestamp"].is_string()));
}

#[test]
fn show_prints_what_produced_a_result() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  a: {kind: command, cmd: \"echo hi > ${outputs.o}\", outputs: [o]}\n");
    p.run(&["run", "p.yaml"]).assert_ok();
    let r = p.run(&["show", "p.yaml", "a"]);
    r.assert_ok();
    let line = |prefix: &str| r.stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_default().to_string();
    assert!(line("built by").contains(&format!("orchestrate {}", env!("CARGO_PKG_VERSION"))), "{}", r.stdout);
    assert!(line("built by").contains("rustc 1."), "{}", r.stdout);
    assert!(line("host").contains(" cores; "), "{}", r.stdout);
    assert!(line("code").contains("stage-command ") && line("code").contains("external crates "), "{}", r.stdout);
    let json = p.run(&["show", "p.yaml", "a", "--json"]).json();
    assert!(json["provenance"]["cpu_flags"].is_array(), "{json}");
    assert!(json["implementation"]["stage-api"].as_str().is_some_and(|d| d.len() == 64), "{json}");
    // `--version` states the same build as the results record: commit and compiler.
    let v = p.run(&["--version"]);
    v.assert_ok();
    let commit = json["provenance"]["commit"].as_str().map(|c| c[..12].to_string());
    assert!(commit.is_none_or(|c| v.stdout.contains(&format!("(commit {c}"))), "{} vs {json}", v.stdout);
    assert!(v.stdout.starts_with(&format!("orchestrate {} (", env!("CARGO_PKG_VERSION"))), "{}", v.stdout);
    assert!(v.stdout.contains("rustc 1."), "{}", v.stdout);
}
