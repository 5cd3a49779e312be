//! `run --executor slurm` against a real one-node Slurm cluster (slurmctld, slurmd and munge
//! from Debian, started by `.ci/slurm`): same outputs and cache keys as a local run, cached
//! stages never submitted, Slurm's failure states reported by stage, cancellation, a killed
//! coordinator's jobs adopted or cancelled, one status query per poll interval, and bad input
//! refused before anything is submitted.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e_tests::{Project, Run, SlurmCluster, TINY_TWO_MODELS};
use serde_json::Value;

fn run_in(p: &Project, cluster: &SlurmCluster, args: &[&str]) -> Run {
    p.run_env(args, &cluster.env())
}

/// A stage's result: (stage, cache key, [(output, digest)]).
type StageResult = (String, String, Vec<(String, String)>);

/// `show --json` of every stage.
fn results(p: &Project, pipeline: &str, stages: &[&str], sets: &[&str]) -> Vec<StageResult> {
    stages
        .iter()
        .map(|s| {
            let mut args = vec!["show", pipeline, s, "--json"];
            for set in sets {
                args.extend(["--set", set]);
            }
            let r = p.run(&args);
            r.assert_ok();
            let v: Value = r.json();
            let outputs = v["outputs"]
                .as_object()
                .expect("outputs")
                .iter()
                .map(|(k, o)| (k.clone(), o["digest"].as_str().unwrap_or("").to_string()))
                .collect();
            (s.to_string(), v["key"].as_str().unwrap_or("").to_string(), outputs)
        })
        .collect()
}

fn ran_on(p: &Project, pipeline: &str, stage: &str) -> String {
    let r = p.run(&["show", pipeline, stage, "--json"]);
    r.json()["provenance"]["ran_on"].as_str().unwrap_or("").to_string()
}

fn phase4_shape(p: &Project) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/examples");
    p.write("data/essay.txt", &std::fs::read_to_string(repo.join("data/essay.txt")).expect("essay"));
    let text = std::fs::read_to_string(repo.join("phase4-shape.yaml")).expect("phase4-shape");
    p.write("phase4-shape.yaml", &text).display().to_string()
}

const SHAPE_STAGES: &[&str] = &["corpus", "vocab", "train", "quantize", "distill", "export", "report"];

#[test]
fn a_command_pipeline_on_slurm_matches_a_local_run_and_a_cached_rerun_submits_nothing() {
    let cluster = SlurmCluster::start();
    let (local, remote) = (Project::new(), Project::new());
    let (lp, sp) = (phase4_shape(&local), phase4_shape(&remote));
    local.run(&["run", &lp]).assert_ok();
    let r = run_in(&remote, &cluster, &["run", &sp, "--executor", "slurm", "--json"]);
    r.assert_ok();
    assert!(r.statuses().iter().all(|(_, s)| s == "ran"), "{}", r.stdout);
    assert_eq!(results(&local, &lp, SHAPE_STAGES, &[]), results(&remote, &sp, SHAPE_STAGES, &[]));
    assert_eq!(cluster.calls_of("sbatch").len(), SHAPE_STAGES.len(), "one job per stage");
    let where_ = ran_on(&remote, &sp, "train");
    assert!(where_.starts_with("slurm job "), "provenance names the job: {where_:?}");
    assert!(cluster.active_jobs().is_empty(), "nothing left queued: {:?}", cluster.active_jobs());

    // One status query per poll interval (1 s by default), never one per job.
    let queries = cluster.calls_of("squeue");
    assert!(!queries.is_empty());
    for w in queries.windows(2) {
        assert!(w[1] - w[0] >= 0.9, "two status queries {:.3} s apart: {queries:?}", w[1] - w[0]);
    }

    cluster.reset_calls();
    let again = run_in(&remote, &cluster, &["run", &sp, "--executor", "slurm", "--json"]);
    again.assert_ok();
    assert!(again.statuses().iter().all(|(_, s)| s == "cached"), "{}", again.stdout);
    assert!(cluster.calls_of("sbatch").is_empty(), "a cached rerun submitted a job");
}

#[test]
fn a_fan_out_is_watched_by_one_query_per_interval_whatever_the_number_of_jobs() {
    let cluster = SlurmCluster::start();
    let p = Project::new();
    let file = p.write(
        "fan.yaml",
        "name: fan\nexecutor: {poll: 1s, max_poll: 2s}\nstages:\n  work:\n    kind: command\n    foreach: [1, 2, 3, 4, 5, 6, 7, 8]\n    \
         cmd: \"sleep 2; echo ${item} > ${outputs.out}\"\n    outputs: [out]\n",
    );
    let file = file.display().to_string();
    let t0 = Instant::now();
    run_in(&p, &cluster, &["run", &file, "--executor", "slurm"]).assert_ok();
    let wall = t0.elapsed().as_secs_f64();
    let queries = cluster.calls_of("squeue");
    assert_eq!(cluster.calls_of("sbatch").len(), 8);
    for w in queries.windows(2) {
        assert!(w[1] - w[0] >= 0.9, "two status queries {:.3} s apart", w[1] - w[0]);
    }
    // At most one query per second of the run (plus the one at start): 8 jobs did not multiply it.
    assert!((queries.len() as f64) <= wall + 1.0, "{} queries in {wall:.1} s", queries.len());
}

#[test]
fn an_ml_pipeline_on_slurm_gives_the_same_models_as_a_local_run() {
    let cluster = SlurmCluster::start();
    let (local, remote) = (Project::new(), Project::new());
    let (lf, sf) = (local.shipped_copy("train"), remote.shipped_copy("train"));
    let sets: Vec<String> = TINY_TWO_MODELS.iter().flat_map(|s| ["--set".to_string(), s.to_string()]).collect();
    let args = |file: &str, slurm: bool| {
        let mut a: Vec<String> = vec!["run".into(), file.into()];
        a.extend(sets.iter().cloned());
        if slurm {
            a.extend(["--executor".into(), "slurm".into()]);
        }
        a
    };
    let r = local.run_env(&args(&lf, false), &[]);
    r.assert_ok();
    run_in_args(&remote, &cluster, &args(&sf, true)).assert_ok();
    let stages = ["corpus", "vocab", "itera", "transformer"];
    let (a, b) = (results(&local, &lf, &stages, TINY_TWO_MODELS), results(&remote, &sf, &stages, TINY_TWO_MODELS));
    for ((stage, ka, oa), (_, kb, ob)) in a.iter().zip(&b) {
        assert_eq!(ka, kb, "cache key of `{stage}`");
        // The train stage's volatile outputs (metrics.csv, summary.json) hold timings; the
        // models, corpus and tokenizer must be the same bytes.
        let keep = |o: &&(String, String)| o.0 != "metrics.csv" && o.0 != "summary.json";
        let (fa, fb): (Vec<_>, Vec<_>) = (oa.iter().filter(keep).collect(), ob.iter().filter(keep).collect());
        assert_eq!(fa, fb, "outputs of `{stage}`");
    }
    assert_eq!(cluster.calls_of("sbatch").len(), stages.len());
}

fn run_in_args(p: &Project, cluster: &SlurmCluster, args: &[String]) -> Run {
    p.run_env(args, &cluster.env())
}

#[test]
fn failed_timed_out_and_out_of_memory_jobs_are_reported_by_stage_and_state() {
    let cluster = SlurmCluster::start();
    let p = Project::new();
    let file = p
        .write(
            "bad.yaml",
            r#"name: bad
stages:
  fails:
    kind: command
    cmd: "echo about to fail; exit 3"
    outputs: [out]
  hungry:
    kind: command
    resources: {mem: 40M}
    cmd: "python3 -c 'import time; a = [bytearray(8 << 20) for _ in range(40)]; time.sleep(30)'; touch ${outputs.out}"
    outputs: [out]
  slow:
    kind: command
    timeout: 1m
    cmd: "sleep 600; touch ${outputs.out}"
    outputs: [out]
  fine:
    kind: command
    timeout: 20s
    cmd: "echo ok > ${outputs.out}"
    outputs: [out]
"#,
        )
        .display()
        .to_string();
    let r = run_in(&p, &cluster, &["run", &file, "--executor", "slurm", "--keep-going", "--json"]);
    assert_eq!(r.code, 1, "stage failures exit 1:\n{}\n{}", r.stdout, r.stderr);
    let summary = r.json();
    let error_of = |stage: &str| -> String {
        let s = summary["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).cloned().unwrap();
        assert_eq!(s["status"], if stage == "fine" { "ran" } else { "failed" }, "{stage}: {s}");
        s["error"].as_str().unwrap_or("").to_string()
    };
    let fails = error_of("fails");
    assert!(fails.contains("status 3") && fails.contains("FAILED"), "{fails}");
    assert!(r.stderr.contains("about to fail"), "the failed job's log tail is shown:\n{}", r.stderr);
    let hungry = error_of("hungry");
    assert!(hungry.contains("OUT_OF_MEMORY") && hungry.contains("40M"), "{hungry}");
    let slow = error_of("slow");
    assert!(slow.contains("TIMEOUT"), "{slow}");
    error_of("fine");
    // A limit under Slurm's one-minute granularity is pointed out before anything runs.
    assert!(r.stderr.contains("stage `fine` has a time limit under a minute"), "{}", r.stderr);
    assert!(!r.stderr.contains("stage `slow` has a time limit"), "{}", r.stderr);
    assert!(cluster.active_jobs().is_empty(), "{:?}", cluster.active_jobs());
    let verify = p.run(&["verify"]);
    verify.assert_ok();
}

#[test]
fn retries_resubmit_a_failed_job() {
    let cluster = SlurmCluster::start();
    let p = Project::new();
    // Fails the first time (no marker yet), succeeds the second.
    let marker = p.path().join("tried");
    let file = p
        .write(
            "retry.yaml",
            &format!(
                "name: retry\nstages:\n  flaky:\n    kind: command\n    retries: 1\n    \
                 cmd: \"if [ -f {m} ]; then echo ok > ${{outputs.out}}; else touch {m}; exit 1; fi\"\n    outputs: [out]\n",
                m = marker.display()
            ),
        )
        .display()
        .to_string();
    run_in(&p, &cluster, &["run", &file, "--executor", "slurm"]).assert_ok();
    assert_eq!(cluster.calls_of("sbatch").len(), 2);
}

fn sleepers(p: &Project, n: usize) -> String {
    let mut y = String::from("name: sleepers\nstages:\n");
    for i in 0..n {
        y.push_str(&format!(
            "  s{i}:\n    kind: command\n    cmd: \"sleep 300; touch ${{outputs.out}}\"\n    outputs: [out]\n"
        ));
    }
    p.write("sleepers.yaml", &y).display().to_string()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn spawn_run(p: &Project, cluster: &SlurmCluster, file: &str, extra: &[&str]) -> std::process::Child {
    let mut c = p.cmd();
    c.envs(cluster.env()).args(["run", file, "--executor", "slurm"]).args(extra);
    // Output goes to files, so the run never writes into a closed pipe.
    let log = std::fs::File::create(p.path().join("coordinator.log")).expect("log");
    c.stdout(Stdio::null()).stderr(log).spawn().expect("starting orchestrate")
}

/// Without `--keep-going`, a failed job stops new submissions but cancels nothing: the job
/// running beside it finishes and its result is stored.
#[test]
fn after_a_failed_job_the_jobs_already_submitted_finish_and_are_stored() {
    let cluster = SlurmCluster::start();
    let p = Project::new();
    let mark = p.path().join("bad-failed").display().to_string();
    let file = p.write(
        "fail.yaml",
        &format!(
            "stages:\n  bad: {{kind: command, cmd: \"touch {mark}; exit 3\", outputs: [o]}}\n  \
             slow: {{kind: command, cmd: \"while [ ! -e {mark} ]; do sleep 0.1; done; sleep 2; echo ok > ${{outputs.o}}\", outputs: [o]}}\n"
        ),
    );
    let file = file.display().to_string();
    let r = run_in(&p, &cluster, &["run", &file, "--executor", "slurm", "--json"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.status_of("bad"), "failed", "{}", r.stderr);
    assert_eq!(r.status_of("slow"), "ran", "{}", r.stderr);
    assert!(r.stderr.contains("waiting for `slow` to finish so its result is kept"), "{}", r.stderr);
    assert!(cluster.calls_of("scancel").is_empty(), "nothing is cancelled: {:?}", cluster.calls_of("scancel"));
    let again = run_in(&p, &cluster, &["run", &file, "--executor", "slurm", "--target", "slow", "--json"]);
    assert_eq!(again.status_of("slow"), "cached", "{}", again.stderr);
}

#[test]
fn ctrl_c_cancels_every_job_of_the_run() {
    let cluster = SlurmCluster::start();
    let p = Project::new();
    let file = sleepers(&p, 4);
    let mut child = spawn_run(&p, &cluster, &file, &[]);
    wait_for("4 jobs queued", Duration::from_secs(60), || cluster.active_jobs().len() == 4);
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().expect("wait");
    let log = p.read("coordinator.log");
    assert_ne!(status.code(), Some(0), "{log}");
    assert!(cluster.active_jobs().is_empty(), "jobs left after Ctrl-C: {:?}\n{log}", cluster.active_jobs());
    assert!(cluster.calls_of("scancel").len() <= 2, "cancels are batched: {:?}", cluster.calls_of("scancel"));
    p.run(&["verify"]).assert_ok();
}

#[test]
fn a_killed_coordinator_s_finished_jobs_are_adopted_and_the_rest_cancelled() {
    let cluster = SlurmCluster::start();
    let p = Project::new();
    // `quick` finishes only when the test says so, after the coordinator is frozen.
    let go = p.path().join("go");
    let file = p
        .write(
            "mixed.yaml",
            &format!(
                "name: mixed\nstages:\n  quick:\n    kind: command\n    \
                 cmd: \"while [ ! -f {go} ]; do sleep 0.1; done; echo done > ${{outputs.out}}\"\n    outputs: [out]\n  \
                 slow:\n    kind: command\n    cmd: \"sleep 300; touch ${{outputs.out}}\"\n    outputs: [out]\n  \
                 after:\n    kind: command\n    inputs: {{q: quick.out, s: slow.out}}\n    \
                 cmd: \"cat ${{inputs.q}} > ${{outputs.out}}\"\n    outputs: [out]\n",
                go = go.display()
            ),
        )
        .display()
        .to_string();
    let mut child = spawn_run(&p, &cluster, &file, &[]);
    wait_for("both jobs running", Duration::from_secs(60), || {
        cluster.active_jobs().iter().filter(|(_, _, s)| s == "RUNNING").count() == 2
    });
    // Frozen, the coordinator cannot see `quick` finish; then it dies as if by an OOM kill.
    // SAFETY: signalling the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    std::fs::write(&go, "").expect("go");
    let quick_done = || {
        std::fs::read_dir(p.store().join("slurm"))
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with("-quick") && e.path().join("exit").exists())
            })
            .unwrap_or(false)
    };
    wait_for("`quick` to finish on the cluster", Duration::from_secs(60), quick_done);
    wait_for("`slow` to run", Duration::from_secs(60), || {
        cluster.active_jobs().iter().any(|(_, n, s)| n.ends_with("-slow") && s == "RUNNING")
    });
    child.kill().expect("kill -9");
    child.wait().expect("wait");
    assert_eq!(cluster.active_jobs().len(), 1, "the dead coordinator's job is still there");

    cluster.reset_calls();
    let r = run_in(&p, &cluster, &["run", &file, "--executor", "slurm", "--target", "quick", "--json"]);
    r.assert_ok();
    assert!(r.stderr.contains("cancelled 1 job"), "{}", r.stderr);
    assert_eq!(r.status_of("quick"), "ran");
    assert!(cluster.calls_of("sbatch").is_empty(), "`quick` was adopted, not run again");
    assert!(cluster.active_jobs().is_empty(), "{:?}", cluster.active_jobs());
    let out = p.run(&["export", &file, "quick.out", "quick.txt"]);
    out.assert_ok();
    assert_eq!(p.read("quick.txt"), "done\n");
    p.run(&["verify"]).assert_ok();

    // The cancelled `slow` job's scratch folder is left; gc removes it (and keeps the result).
    let leftovers = || std::fs::read_dir(p.store().join("slurm")).map(|rd| rd.count()).unwrap_or(0);
    assert_eq!(leftovers(), 1, "the cancelled job's folder");
    let dry = p.run(&["gc", "--dry-run"]);
    assert!(dry.stdout.contains("would remove 1 cluster job scratch folder"), "{}", dry.stdout);
    assert_eq!(leftovers(), 1);
    let gc = p.run(&["gc"]);
    assert!(gc.stdout.contains("removed 1 cluster job scratch folder"), "{}", gc.stdout);
    assert_eq!(leftovers(), 0);
    let again = run_in(&p, &cluster, &["run", &file, "--executor", "slurm", "--target", "quick", "--json"]);
    assert_eq!(again.status_of("quick"), "cached");
}

#[test]
fn bad_input_is_refused_before_anything_is_submitted() {
    let cluster = SlurmCluster::start();
    let p = Project::new();
    let ok = "  a:\n    kind: command\n    cmd: \"echo > ${outputs.out}\"\n    outputs: [out]\n";
    let write = |name: &str, text: &str| p.write(name, text).display().to_string();

    let f = write("part.yaml", &format!("name: part\nexecutor: {{partition: nosuch}}\nstages:\n{ok}"));
    let r = run_in(&p, &cluster, &["run", &f, "--executor", "slurm"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("part.yaml:2:") && r.stderr.contains("nosuch") && r.stderr.contains("debug"),
        "{}",
        r.stderr
    );

    let f = write(
        "mem.yaml",
        "name: mem\nstages:\n  a:\n    kind: command\n    resources: {mem: lots}\n    cmd: \"true\"\n",
    );
    let r = run_in(&p, &cluster, &["run", &f, "--executor", "slurm"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("mem.yaml:5:") && r.stderr.contains("500M"), "{}", r.stderr);

    // More CPUs than any node has: Slurm queues the job as never startable (PartitionConfig);
    // the stage fails by name instead of waiting forever, and the job is cancelled.
    let f = write("cpus.yaml", "name: cpus\nstages:\n  big:\n    kind: command\n    threads: 64\n    cmd: \"true\"\n");
    let r = run_in(&p, &cluster, &["run", &f, "--executor", "slurm"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("big") && r.stderr.contains("never start") && r.stderr.contains("64 CPUs"),
        "{}",
        r.stderr
    );
    assert!(cluster.active_jobs().is_empty(), "{:?}", cluster.active_jobs());

    // No Slurm commands on PATH.
    let f = write("ok.yaml", &format!("name: ok\nstages:\n{ok}"));
    let bare = p.run_env(&["run", &f, "--executor", "slurm"], &[("PATH", "/nonexistent".to_string())]);
    assert_eq!(bare.code, 2, "{}", bare.stderr);
    assert!(bare.stderr.contains("sbatch") && bare.stderr.contains("PATH"), "{}", bare.stderr);

    // slurmctld down.
    cluster.stop();
    let down = run_in(&p, &cluster, &["run", &f, "--executor", "slurm"]);
    assert_eq!(down.code, 2, "{}", down.stderr);
    assert!(down.stderr.contains("cannot use the Slurm cluster"), "{}", down.stderr);
    p.run(&["verify"]).assert_ok();
}
