//! The store survives crashes, corruption, concurrent use and lying stages.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e_tests::Project;

/// Three quick stages, then a slow one, then one after it.
const SLOW_TAIL: &str = r#"name: tail
stages:
  a: {kind: command, cmd: "echo a > ${outputs.o}", outputs: [o]}
  b: {kind: command, cmd: "cat ${inputs.i} > ${outputs.o}; echo b >> ${outputs.o}", inputs: {i: a.o}, outputs: [o]}
  c: {kind: command, cmd: "cat ${inputs.i} > ${outputs.o}; echo c >> ${outputs.o}", inputs: {i: b.o}, outputs: [o]}
  slow: {kind: command, cmd: "touch ${inputs.i}.started-marker 2>/dev/null; echo started > MARKERPATH; sleep 30; cat ${inputs.i} > ${outputs.o}", inputs: {i: c.o}, outputs: [o]}
  last: {kind: command, cmd: "cp ${inputs.i} ${outputs.o}", inputs: {i: slow.o}, outputs: [o]}
"#;

fn wait_for(path: &std::path::Path, limit: Duration) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < limit, "{} did not appear within {limit:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Command lines of live processes that contain `needle` (read from /proc).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(cmd);
            }
        }
    }
    out
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn kill_9_mid_run_then_rerun_keeps_finished_stages() {
    let p = Project::new();
    let marker = p.path().join("slow-started");
    p.write("p.yaml", &SLOW_TAIL.replace("MARKERPATH", &marker.display().to_string()));
    let mut child = p.cmd().args(["run", "p.yaml"]).stderr(Stdio::null()).spawn().unwrap();
    wait_for(&marker, Duration::from_secs(30));
    assert!(
        !processes_mentioning(&marker.display().to_string()).is_empty(),
        "the slow stage is running before the kill"
    );
    // SAFETY: SIGKILL to the orchestrate process we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    // The stage's process group dies with the scheduler (no orphan keeps `sleep 30` going).
    std::thread::sleep(Duration::from_millis(300));
    let orphans = processes_mentioning(&marker.display().to_string());
    assert!(orphans.is_empty(), "stage processes survived the scheduler: {orphans:?}");
    let v = p.run(&["verify"]);
    assert_eq!(v.code, 0, "verify after kill -9:\n{}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains("store OK"), "{}", v.stdout);
    // Rerun without the slow sleep: a, b, c come from the cache.
    let r = p.run(&["run", "p.yaml", "--set", "stages.slow.cmd=cat ${inputs.i} > ${outputs.o}", "--json"]);
    r.assert_ok();
    for s in ["a", "b", "c"] {
        assert_eq!(r.status_of(s), "cached", "{s} finished before the kill and must not be recomputed");
    }
    assert_eq!(r.status_of("slow"), "ran");
    assert_eq!(r.status_of("last"), "ran");
    assert!(p.run(&["verify"]).stdout.contains("store OK"));
}

#[test]
fn sigterm_stops_running_stages_and_commits_nothing_partial() {
    let p = Project::new();
    let marker = p.path().join("slow-started");
    p.write("p.yaml", &SLOW_TAIL.replace("MARKERPATH", &marker.display().to_string()));
    let child = p.cmd().args(["run", "p.yaml"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for(&marker, Duration::from_secs(30));
    let t = Instant::now();
    // SAFETY: SIGTERM to the orchestrate process we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(20), "the run must stop promptly, not wait for `sleep 30`");
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    // The stopped stage and the one that never started are counted as cancelled.
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("cancelled  slow") && text.contains("0 failed, 0 skipped, 2 cancelled in"), "{text}");
    assert_eq!(p.run(&["runs", "--json"]).json()[0]["status"], "cancelled");
    let plan = p.run(&["plan", "p.yaml", "--json"]).json();
    let status = |s: &str| plan.as_array().unwrap().iter().find(|e| e["stage"] == s).unwrap()["status"].clone();
    assert_eq!(status("c"), "cached");
    assert_eq!(status("slow"), "run", "an interrupted stage is never stored");
    let tmp: Vec<_> = std::fs::read_dir(p.store().join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "scratch folders are cleaned up: {tmp:?}");
}

#[test]
fn corrupted_object_is_named_by_verify_and_recomputed_by_the_next_run() {
    let p = Project::new();
    p.write("p.yaml", SLOW_TAIL.split("  slow:").next().unwrap());
    p.run(&["run", "p.yaml"]).assert_ok();
    let show = p.run(&["show", "p.yaml", "b", "--json"]).json();
    let digest = show["outputs"]["o"]["digest"].as_str().unwrap().to_string();
    let path = std::path::PathBuf::from(show["outputs"]["o"]["path"].as_str().unwrap());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, "a\nX\n").unwrap(); // same size, different bytes
    let v = p.run(&["verify"]);
    assert_eq!(v.code, 1, "{}", v.stdout);
    assert!(v.stdout.contains(&format!("CORRUPT  {digest}")), "{}", v.stdout);
    // The result whose output that was: named by stage, with what it lacks.
    let dangling = format!(
        "DANGLING  `b` of pipeline `tail` (key {}): output `o` ({}) missing; the next run computes it again",
        &show["key"].as_str().unwrap()[..12],
        &digest[..12]
    );
    assert!(v.stdout.contains(&dangling), "{}", v.stdout);
    let r = p.run(&["run", "p.yaml", "--json"]);
    r.assert_ok();
    assert_eq!(r.status_of("a"), "cached");
    assert_eq!(r.status_of("b"), "ran", "b's output was corrupt, so b is recomputed");
    assert_eq!(r.status_of("c"), "cached", "b reproduced the same bytes, so c stays cached");
    p.run(&["export", "p.yaml", "b.o", "b.txt"]).assert_ok();
    assert_eq!(p.read("b.txt"), "a\nb\n");
    assert!(p.run(&["verify"]).stdout.contains("store OK"));
}

#[test]
fn a_corrupt_object_is_never_handed_to_a_stage() {
    let p = Project::new();
    p.write("p.yaml", SLOW_TAIL.split("  slow:").next().unwrap());
    p.run(&["run", "p.yaml"]).assert_ok();
    let show = p.run(&["show", "p.yaml", "b", "--json"]).json();
    let path = std::path::PathBuf::from(show["outputs"]["o"]["path"].as_str().unwrap());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&path, "a\nX\n").unwrap();
    // c must rerun (its command changed) and would read b's corrupt output.
    let r = p.run(&["run", "p.yaml", "--set", "stages.c.cmd=cat ${inputs.i} > ${outputs.o}", "--json"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.status_of("c"), "failed");
    assert!(r.stderr.contains("is corrupt") && r.stderr.contains("quarantine"), "{}", r.stderr);
    // The next run recomputes b, then c from good bytes.
    let r = p.run(&["run", "p.yaml", "--set", "stages.c.cmd=cat ${inputs.i} > ${outputs.o}", "--json"]);
    r.assert_ok();
    assert_eq!(r.status_of("b"), "ran");
    p.run(&["export", "p.yaml", "--set", "stages.c.cmd=cat ${inputs.i} > ${outputs.o}", "c.o", "c.txt"]).assert_ok();
    assert_eq!(p.read("c.txt"), "a\nb\n");
}

#[test]
fn deleted_index_is_rebuilt_by_verify_repair_with_nothing_lost() {
    let p = Project::new();
    p.write("p.yaml", SLOW_TAIL.split("  slow:").next().unwrap());
    p.run(&["run", "p.yaml"]).assert_ok();
    std::fs::remove_dir_all(p.store().join("index.sled")).unwrap();
    let r = p.run(&["verify", "--repair"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("index rebuilt from objects/: 3 cache entries, 1 run records"), "{}", r.stdout);
    let r = p.run(&["run", "p.yaml", "--json"]);
    assert!(r.statuses().iter().all(|(_, s)| s == "cached"), "{}", r.stdout);
    assert!(p.run(&["plan", "p.yaml"]).stdout.contains("0 of 3 stages will run"));
    // An index rebuilt beside a lost output counts what it keeps, not what it dropped.
    let c = p.run(&["show", "p.yaml", "c", "--json"]).json();
    std::fs::remove_file(c["outputs"]["o"]["path"].as_str().unwrap()).unwrap();
    std::fs::remove_dir_all(p.store().join("index.sled")).unwrap();
    let r = p.run(&["verify", "--repair"]);
    assert!(r.stdout.contains("REMOVED   `c` of pipeline `tail`"), "{}", r.stdout);
    assert!(r.stdout.contains("index rebuilt from objects/: 2 cache entries, 2 run records"), "{}", r.stdout);
}

#[test]
fn garbage_index_is_moved_aside_and_rebuilt() {
    let p = Project::new();
    p.write("p.yaml", SLOW_TAIL.split("  slow:").next().unwrap());
    p.run(&["run", "p.yaml"]).assert_ok();
    let idx = p.store().join("index.sled");
    std::fs::remove_dir_all(&idx).unwrap();
    std::fs::write(&idx, "not a database").unwrap();
    let r = p.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("verify --repair"), "the error says what to do: {}", r.stderr);
    let r = p.run(&["verify", "--repair"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let r = p.run(&["run", "p.yaml", "--json"]);
    assert!(r.statuses().iter().all(|(_, s)| s == "cached"), "{}", r.stdout);
}

#[test]
fn two_concurrent_runs_on_one_store() {
    let p = Project::new();
    let marker = p.path().join("slow-started");
    p.write("p.yaml", &SLOW_TAIL.replace("MARKERPATH", &marker.display().to_string()).replace("sleep 30", "sleep 2"));
    let mut first = p.cmd().args(["run", "p.yaml"]).stderr(Stdio::null()).spawn().unwrap();
    wait_for(&marker, Duration::from_secs(30));
    let second = p.run(&["run", "p.yaml"]);
    assert_eq!(second.code, 3, "{}", second.stderr);
    let store = std::fs::canonicalize(p.store()).unwrap();
    assert!(second.stderr.contains(&format!("the store {} is in use", store.display())), "{}", second.stderr);
    assert!(second.stderr.contains(&format!("(pid {})", first.id())), "names the holder's pid: {}", second.stderr);
    assert!(second.stderr.contains("--wait"), "{}", second.stderr);
    assert!(pid_alive(first.id() as i32));
    // --wait queues behind the first run and then finds everything cached.
    let waited = p.run(&["run", "p.yaml", "--wait", "--json"]);
    waited.assert_ok();
    assert!(waited.stderr.contains("waiting for the store"), "{}", waited.stderr);
    assert!(first.wait().unwrap().success());
    assert!(waited.statuses().iter().all(|(_, s)| s == "cached"), "{}", waited.stdout);
}

/// A long run holds the store; what is stored stays readable meanwhile (a snapshot of the
/// objects, as the web view reads them), while verbs that write still say who holds it.
#[test]
fn results_and_history_are_readable_while_a_run_holds_the_store() {
    let p = Project::new();
    p.write("q.yaml", "name: quick\nparams: {n: 1}\nstages:\n  a: {kind: command, cmd: \"seq ${params.n} > ${outputs.o}\", outputs: [o]}\n");
    p.run(&["run", "q.yaml"]).assert_ok();
    p.run(&["run", "q.yaml", "--set", "n=2"]).assert_ok();
    let marker = p.path().join("slow-started");
    p.write("p.yaml", &SLOW_TAIL.replace("MARKERPATH", &marker.display().to_string()).replace("sleep 30", "sleep 3"));
    let mut first = p.cmd().args(["run", "p.yaml"]).stderr(Stdio::null()).spawn().unwrap();
    wait_for(&marker, Duration::from_secs(30));
    let note = |r: &e2e_tests::Run| {
        assert!(r.stderr.contains("is in use by") && r.stderr.contains("reading what its objects hold"), "{}", r.stderr)
    };
    let runs = p.run(&["runs", "--json"]);
    runs.assert_ok();
    note(&runs);
    assert_eq!(runs.json().as_array().map(Vec::len), Some(2), "the two finished runs: {}", runs.stdout);
    let compared = p.run(&["compare"]);
    compared.assert_ok();
    assert!(compared.stdout.contains("seq 1 >") && compared.stdout.contains("seq 2 >"), "{}", compared.stdout);
    let show = p.run(&["show", "q.yaml", "a", "--set", "n=2"]);
    show.assert_ok();
    assert!(show.stdout.contains("stage      a") && show.stdout.contains("4 B"), "{}", show.stdout);
    p.run(&["export", "q.yaml", "a.o", "out.txt"]).assert_ok();
    assert_eq!(std::fs::read_to_string(p.path().join("out.txt")).unwrap(), "1\n");
    // The running pipeline's finished stages are there; its running one is not yet.
    let plan = p.run(&["plan", "p.yaml", "--json"]);
    plan.assert_ok();
    assert!(plan.stdout.contains("\"cached\"") && plan.stdout.contains("\"run\""), "{}", plan.stdout);
    let gc = p.run(&["gc", "--dry-run"]);
    assert_eq!(gc.code, 3, "{}", gc.stderr);
    assert!(gc.stderr.contains("--wait"), "{}", gc.stderr);
    assert!(pid_alive(first.id() as i32));
    assert!(first.wait().unwrap().success());
    // Once it has ended, its record is in the index's history too.
    assert_eq!(p.run(&["runs", "--json"]).json().as_array().map(Vec::len), Some(3));
}

#[test]
fn replay_proves_determinism_and_catches_a_liar() {
    let p = Project::new();
    p.write(
        "p.yaml",
        r#"stages:
  det: {kind: command, cmd: "seq 1 1000 | sha256sum > ${outputs.o}", outputs: [o]}
  liar: {kind: command, cmd: "date +%s%N > ${outputs.o}", outputs: [o]}
  honest: {kind: command, cmd: "date +%s%N > ${outputs.o}", outputs: [o], deterministic: false, params: {x: 1}}
"#,
    );
    p.run(&["run", "p.yaml"]).assert_ok();
    let r = p.run(&["replay", "p.yaml", "--stage", "det", "--stage", "honest"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("identical"), "prints a table: {}", r.stdout);
    let r = p.run(&["replay", "p.yaml"]);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let liar = r.stdout.lines().find(|l| l.starts_with("liar")).unwrap();
    assert!(liar.ends_with("NO"), "{}", r.stdout);
    let det = r.stdout.lines().find(|l| l.starts_with("det")).unwrap();
    assert!(det.ends_with("yes"), "{}", r.stdout);
    let honest = r.stdout.lines().find(|l| l.starts_with("honest")).unwrap();
    assert!(honest.contains("declared non-deterministic"), "{}", r.stdout);
    assert!(r.stdout.contains("replay: MISMATCH — liar did not reproduce\n"), "names the stage: {}", r.stdout);
    assert!(r.stdout.contains("`deterministic: false`"), "says what to do: {}", r.stdout);
    let j = p.run(&["replay", "p.yaml", "--json"]).json();
    assert_eq!(j["failed"], true);
    // Replay never touches the cache: the run is still fully cached.
    let again = p.run(&["run", "p.yaml", "--json"]);
    assert!(again.statuses().iter().all(|(_, s)| s == "cached"));
}

#[test]
fn an_input_edited_while_the_stage_runs_fails_the_stage() {
    let p = Project::new();
    p.write("data/in.txt", "one\n");
    p.write(
        "p.yaml",
        "stages:\n  s: {kind: command, cmd: \"cp ${inputs.t} ${outputs.o}; echo two >> ${inputs.t}\", inputs: {t: file:data/in.txt}, outputs: [o]}\n",
    );
    let r = p.run(&["run", "p.yaml", "--json"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.status_of("s"), "failed");
    assert!(r.stderr.contains("changed while the stage ran"), "{}", r.stderr);
    assert_eq!(p.run(&["plan", "p.yaml", "--json"]).json()[0]["status"], "run");
}

#[test]
fn a_crashing_stage_is_reported_not_fatal() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "stages:\n  crash: {kind: command, cmd: \"kill -SEGV $$\", outputs: [o]}\n  fine: {kind: command, cmd: \"echo ok > ${outputs.o}\", outputs: [o]}\n",
    );
    let r = p.run(&["run", "p.yaml", "--keep-going", "--json"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.status_of("crash"), "failed");
    assert_eq!(r.status_of("fine"), "ran");
    assert!(r.stderr.contains("signal 11"), "{}", r.stderr);
}

#[test]
fn gc_keeps_the_last_runs_and_removes_the_rest() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "params: {v: 1}\nstages:\n  s: {kind: command, cmd: \"echo ${params.v} > ${outputs.o}\", outputs: [o]}\n",
    );
    p.run(&["run", "p.yaml"]).assert_ok();
    p.run(&["run", "p.yaml", "--set", "v=2"]).assert_ok();
    let before = p.objects().len();
    let dry = p.run(&["gc", "--keep-last", "1", "--dry-run"]);
    dry.assert_ok();
    assert!(dry.stdout.starts_with("would remove "), "{}", dry.stdout);
    assert!(dry.stdout.contains("1 older run record(s) would leave the history"), "{}", dry.stdout);
    assert_eq!(p.objects().len(), before, "a dry run removes nothing");
    let gc = p.run(&["gc", "--keep-last", "1"]);
    gc.assert_ok();
    assert!(gc.stdout.contains("1 older run record(s) left the history"), "{}", gc.stdout);
    assert_eq!(p.run(&["runs", "--json"]).json().as_array().map(Vec::len), Some(1), "the history says so too");
    assert!(p.objects().len() < before);
    assert_eq!(p.run(&["run", "p.yaml", "--set", "v=2", "--json"]).status_of("s"), "cached");
    assert_eq!(p.run(&["run", "p.yaml", "--json"]).status_of("s"), "ran", "v=1's result was collected");
    assert!(p.run(&["verify"]).stdout.contains("store OK"));
}

/// A named run is a reference a team compares against: `gc` keeps the run each name means (the
/// newest of `run --name`) with what it used, however old, and collects a name's older runs like
/// any other.
#[test]
fn gc_keeps_the_newest_run_of_each_name() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "params: {v: 1}\nstages:\n  s: {kind: command, cmd: \"echo ${params.v} > ${outputs.o}\", outputs: [o]}\n",
    );
    p.run(&["run", "p.yaml", "--set", "v=0", "--name", "base"]).assert_ok();
    p.run(&["run", "p.yaml", "--name", "base"]).assert_ok();
    p.run(&["run", "p.yaml", "--set", "v=2"]).assert_ok();
    p.run(&["run", "p.yaml", "--set", "v=3"]).assert_ok();
    let gc = p.run(&["gc", "--keep-last", "1"]);
    gc.assert_ok();
    assert!(gc.stdout.contains("used by the last 1 run(s) and 1 older named run(s)"), "{}", gc.stdout);
    assert!(gc.stdout.contains("2 older run record(s) left the history"), "{}", gc.stdout);
    p.run(&["compare", "base"]).assert_ok();
    assert_eq!(p.run(&["run", "p.yaml", "--json"]).status_of("s"), "cached", "base's result is kept");
    assert_eq!(p.run(&["run", "p.yaml", "--set", "v=0", "--json"]).status_of("s"), "ran", "an older base's is not");
    assert!(p.run(&["verify"]).stdout.contains("store OK"));
}

/// A run is often found to be the reference after it ran: `orchestrate name` names it then.
/// Its id stays; the name means it from then on (over an earlier run of that name) for
/// `compare`, `runs` and gc, survives an index rebuilt by `verify --repair`, and `--clear`
/// takes it away.
#[test]
fn a_run_named_after_it_ran_is_what_the_name_means() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "params: {v: 1}\nstages:\n  s: {kind: command, cmd: \"echo ${params.v} > ${outputs.o}\", outputs: [o]}\n",
    );
    p.run(&["run", "p.yaml", "--set", "v=0"]).assert_ok();
    p.run(&["run", "p.yaml", "--set", "v=2", "--name", "base"]).assert_ok();
    p.run(&["run", "p.yaml", "--set", "v=3"]).assert_ok();
    let ids = |p: &Project| -> Vec<String> {
        let j = p.run(&["runs", "--json"]).json();
        j.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_string()).collect()
    };
    let before = ids(&p);
    let named = p.run(&["name", "latest~2", "base"]);
    named.assert_ok();
    assert!(named.stdout.contains(&format!("run {} (", &before[2][..12])) && named.stdout.contains("is named `base`"));
    assert!(named.stdout.contains(&format!("`base` meant run {} until now", &before[1][..12])), "{}", named.stdout);
    assert_eq!(ids(&p), before, "a run's id does not change with its name");
    let base_id = |p: &Project| p.run(&["compare", "base", "latest", "--json"]).json()["a"]["id"].to_string();
    assert!(base_id(&p).starts_with(&format!("\"{}", before[2])), "{}", base_id(&p));
    let runs = p.run(&["runs", "--json"]).json();
    assert_eq!((runs[2]["name"].as_str(), runs[1]["name"].as_str()), (Some("base"), Some("base")), "{runs}");
    assert_eq!((runs[2]["name_moved"].as_bool(), runs[1]["name_moved"].as_bool()), (Some(false), Some(true)));
    let table = p.run(&["runs"]).stdout;
    assert!(table.contains(&format!("{}  (base)", &before[1][..12])), "{table}");
    assert!(table.contains(&format!("{}  base ", &before[2][..12])), "{table}");
    // compare marks the run that held the name before, not the one that holds it now.
    let header = p.run(&["compare", "latest~1", "base"]).stdout;
    assert!(header.contains("A: ") && header.contains("`base` (the name moved on) ("), "{header}");
    assert_eq!(header.matches("(the name moved on)").count(), 1, "{header}");
    let j = p.run(&["compare", "latest~1", "base", "--json"]).json();
    assert_eq!((j["a"]["name_moved"].as_bool(), j["b"]["name_moved"].as_bool()), (Some(true), Some(false)), "{j}");

    // A past run's results, by its name: exported and shown as it recorded them.
    p.run(&["export", "p.yaml", "s.o", "base.txt", "--run", "base"]).assert_ok();
    assert_eq!(p.read("base.txt"), "0\n");
    p.run(&["export", "p.yaml", "s.o", "now.txt", "--set", "v=3"]).assert_ok();
    assert_eq!(p.read("now.txt"), "3\n", "without --run: the pipeline as it is now");
    let shown = p.run(&["show", "p.yaml", "s", "--run", "base", "--json"]).json();
    assert_eq!((shown["run"].as_str(), shown["current"].as_bool()), (Some(&before[2][..12]), Some(false)), "{shown}");
    let text = p.run(&["show", "p.yaml", "s", "--run", "latest"]).stdout;
    assert!(text.contains(&format!("the result run {} recorded", &before[0][..12])), "{text}");
    let none = p.run(&["export", "p.yaml", "t.o", "x", "--run", "base"]);
    assert!(none.code != 0 && none.stderr.contains("has no result of `t`"), "{}", none.stderr);
    // gc keeps what the name means now, not the run that held it before.
    let gc = p.run(&["gc", "--keep-last", "1"]);
    assert!(gc.stdout.contains("and 1 older named run(s)"), "{}", gc.stdout);
    assert_eq!(p.run(&["run", "p.yaml", "--set", "v=0", "--json"]).status_of("s"), "cached");
    std::fs::remove_dir_all(p.store().join("index.sled")).unwrap();
    p.run(&["verify", "--repair"]).assert_ok();
    assert!(base_id(&p).starts_with(&format!("\"{}", before[2])), "{}", base_id(&p));

    let cleared = p.run(&["name", "base", "--clear"]);
    assert!(cleared.stdout.contains("is no longer named `base`"), "{}", cleared.stdout);
    let gone = p.run(&["compare", "base"]);
    assert!(gone.code != 0 && gone.stderr.contains("no run is named `base`"), "{}", gone.stderr);
    for (args, text) in [
        (&["name", "latest", "a b"][..], "`a b`: a run name has only letters"),
        (&["name", "nope", "base"], "error[E-NAME]: no run is named `nope`"),
        (&["name", "latest~9", "base"], "the store has only"),
    ] {
        let r = p.run(args);
        assert!(r.code != 0 && r.stderr.contains(text), "{args:?}: {}", r.stderr);
    }
}

/// A stage whose every result `gc` collected is not said never to have run.
#[test]
fn plan_and_show_after_gc_name_it_as_a_cause() {
    let p = Project::new();
    p.write(
        "p.yaml",
        "params: {n: [1]}\nstages:\n  s: {kind: command, foreach: \"${params.n}\", cmd: \"echo ${item} > ${outputs.o}\", outputs: [o]}\n",
    );
    p.run(&["run", "p.yaml"]).assert_ok();
    p.run(&["run", "p.yaml", "--set", "n=[2]"]).assert_ok();
    p.run(&["gc", "--keep-last", "1"]).assert_ok();
    let plan = p.run(&["plan", "p.yaml"]);
    assert!(plan.stdout.contains("will run  (not in this store: never run here, or removed by gc)"), "{}", plan.stdout);
    let show = p.run(&["show", "p.yaml", "s@1"]);
    assert_eq!(show.code, 1);
    assert!(show.stderr.contains("it has not run here, or `orchestrate gc` removed its results"), "{}", show.stderr);
    assert!(show.stderr.contains("`orchestrate run p.yaml --target s@1` computes it"), "{}", show.stderr);
}

#[test]
fn store_location_flag_and_environment() {
    let p = Project::new();
    p.write("p.yaml", "stages:\n  s: {kind: command, cmd: \"echo > ${outputs.o}\", outputs: [o]}\n");
    p.run(&["run", "p.yaml", "--store", "custom"]).assert_ok();
    assert!(p.path().join("custom/objects").is_dir());
    let r =
        p.cmd().args(["run", "p.yaml", "--json"]).env("ORCHESTRATE_STORE", p.path().join("custom")).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["stages"][0]["status"], "cached");
    assert!(!p.store().exists(), "./artifacts is only the default");
}

/// The `exec-stage` child protocol (every non-command stage's path), forced for command stages.
#[test]
fn stage_process_protocol_runs_reports_and_dies_with_the_scheduler() {
    let p = Project::new();
    let marker = p.path().join("slow-started");
    p.write("p.yaml", &SLOW_TAIL.replace("MARKERPATH", &marker.display().to_string()));
    p.write(
        "q.yaml",
        "stages:\n  m: {kind: command, cmd: \"echo hi > ${outputs.o}; echo '{\\\"n\\\": 2}' > $ORCH_METRICS\", outputs: [o]}\n  bad: {kind: command, cmd: \"exit 5\", outputs: [o]}\n",
    );
    let run = |args: &[&str]| {
        let o = p.cmd().args(args).env("ORCHESTRATE_STAGE_PROTOCOL", "process").output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, _, err) = run(&["run", "q.yaml", "--keep-going"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("FAILED     bad: command exited with status 5"), "{err}");
    let (_, out, _) = run(&["show", "q.yaml", "m", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["metrics"]["n"], 2);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);

    let mut child = p
        .cmd()
        .args(["run", "p.yaml"])
        .env("ORCHESTRATE_STAGE_PROTOCOL", "process")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&marker, Duration::from_secs(30));
    assert!(!processes_mentioning(&marker.display().to_string()).is_empty());
    // SAFETY: SIGKILL to the orchestrate process we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let orphans = processes_mentioning(&marker.display().to_string());
    assert!(orphans.is_empty(), "stage processes survived the scheduler: {orphans:?}");
}

/// Built-in stages' processes (`exec-stage`) run with malloc on transparent huge pages
/// (`itera_models::measure::run_on_huge_pages`); a GLIBC_TUNABLES of the user's that already
/// sets them is kept as it is. A command stage under the process protocol shows the environment.
#[test]
fn stage_processes_run_with_malloc_on_huge_pages() {
    // A project each: the environment is not part of the stage's key, so a rerun is cached.
    let tunables = |user: Option<&str>| {
        let p = Project::new();
        p.write(
            "t.yaml",
            "stages:\n  t:\n    kind: command\n    outputs: [o]\n    cmd: 'echo \"$GLIBC_TUNABLES\" > ${outputs.o}'\n",
        );
        let mut c = p.cmd();
        c.args(["run", "t.yaml"]).env("ORCHESTRATE_STAGE_PROTOCOL", "process");
        match user {
            Some(t) => c.env("GLIBC_TUNABLES", t),
            None => c.env_remove("GLIBC_TUNABLES"),
        };
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        p.run(&["export", "t.yaml", "t.o", "o.txt"]).assert_ok();
        p.read("o.txt").trim().to_string()
    };
    assert_eq!(tunables(None), "glibc.malloc.hugetlb=1");
    assert_eq!(tunables(Some("glibc.malloc.arena_max=2")), "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1");
    assert_eq!(tunables(Some("glibc.malloc.hugetlb=0")), "glibc.malloc.hugetlb=0");
}

#[test]
fn replacing_the_binary_mid_run_does_not_break_later_stages() {
    // A rebuild (`cargo build`) swaps the file under a running pipeline; built-in stages run as
    // `exec-stage` children of the running binary and must still start.
    let p = Project::new();
    let bin = p.path().join("orchestrate-copy");
    std::fs::copy(e2e_tests::binary(), &bin).unwrap();
    let marker = p.path().join("started");
    let file = p.write(
        "swap.yaml",
        &format!(
            "name: swap\nstages:\n  wait: {{kind: command, cmd: \"touch {} && sleep 2 && echo ok > ${{outputs.o}}\", outputs: [o]}}\n  corpus: {{kind: corpus, inputs: {{after: wait.o}}, params: {{source: builtin, documents: 20}}}}\n",
            marker.display()
        ),
    );
    let child = std::process::Command::new(&bin)
        .args(["run", file.to_str().unwrap(), "--store", p.store().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&marker, Duration::from_secs(30));
    std::fs::remove_file(&bin).unwrap();
    std::fs::write(&bin, b"#!/bin/sh\nexit 99\n").unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// Only `run` and `pull` make a store. A mistyped --store never turns a folder into one: the
/// verbs that read see nothing, the ones that maintain a store say there is none, and a file
/// is refused as a store.
#[test]
fn no_verb_but_run_and_pull_creates_a_store() {
    let p = Project::new();
    p.write("p.yaml", SLOW_TAIL.split("  slow:").next().unwrap());
    let nowhere = p.path().join("no/store");
    let at = nowhere.to_str().unwrap();
    for args in
        [&["runs"][..], &["plan", "p.yaml"], &["compare"], &["show", "p.yaml", "a"], &["export", "p.yaml", "a.o", "x"]]
    {
        let r = p.run(&[args, &["--store", at]].concat());
        assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
    }
    assert!(p.run(&["plan", "p.yaml", "--store", at]).stdout.contains("3 of 3 stages will run"));
    for args in [&["gc"][..], &["verify"], &["verify", "--repair"], &["replay", "p.yaml"]] {
        let r = p.run(&[args, &["--store", at]].concat());
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(&format!("no store at {at} (it has no objects/ folder)")), "{}", r.stderr);
    }
    assert!(!p.path().join("no").exists(), "nothing was created");
    p.write("afile", "x\n");
    let r = p.run(&["run", "p.yaml", "--store", "afile"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("opening the store afile (--store takes a folder)"), "{}", r.stderr);
    p.run(&["run", "p.yaml", "--store", at]).assert_ok();
    p.run(&["gc", "--store", at]).assert_ok();
}
