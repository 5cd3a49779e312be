//! The remote cache end to end: two stores standing for two machines share results through a
//! real S3-compatible server (moto) and through a directory; corrupt, missing and half-pushed
//! blobs never reach a store; credentials are asked for by name and never printed or stored.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e_tests::{files_containing, Project, Run, S3Server, PHASE4_SMALL as SMALL, TEST_SECRET};

/// `VERB FILE --store STORE --set … EXTRA…` against the S3 server.
fn s3(p: &Project, server: &S3Server, verb: &str, file: &str, sets: &[&str], extra: &[&str]) -> Run {
    let store = p.store().display().to_string();
    let mut args = vec![verb, file, "--store", &store];
    for s in sets {
        args.extend(["--set", s]);
    }
    args.extend(extra);
    p.run_env(&args, &server.env())
}

/// Stage → manifest digest from a `run --json` summary.
fn manifests(r: &Run) -> Vec<(String, String)> {
    let j = r.json();
    let stages = j["stages"].as_array().expect("stages").clone();
    stages.iter().map(|s| (s["stage"].as_str().unwrap().to_string(), s["manifest"].to_string())).collect()
}

/// "N new" from a push report line.
fn published(stderr: &str) -> usize {
    let line = stderr.lines().find(|l| l.starts_with("pushed to")).unwrap_or_else(|| panic!("no push line:\n{stderr}"));
    let n = line.split(" results (").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok());
    n.unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn two_machines_share_a_reduced_phase4_through_s3() {
    let server = S3Server::start();
    server.create_bucket("team-cache");
    let remote = "s3://team-cache/phase4";
    let a = Project::new();
    let fa = a.shipped_copy("phase4");
    let cold = s3(&a, &server, "run", &fa, SMALL, &["--json"]);
    cold.assert_ok();
    let push = s3(&a, &server, "push", &fa, SMALL, &["--remote", remote]);
    push.assert_ok();
    assert_eq!(published(&push.stderr), 16, "{}", push.stderr);
    let again = s3(&a, &server, "push", &fa, SMALL, &["--remote", remote]);
    again.assert_ok();
    assert!(again.stderr.contains("(0 new, 16 already there); 0 blobs checked, 0 uploaded"), "{}", again.stderr);

    // B starts empty: the plan names the remote, and the run downloads everything, runs nothing.
    let b = Project::new();
    let fb = b.shipped_copy("phase4");
    let plan = s3(&b, &server, "plan", &fb, SMALL, &["--remote", remote]);
    plan.assert_ok();
    assert!(plan.stdout.contains("0 of 16 stages will run, 16 will be pulled from the remote"), "{}", plan.stdout);
    let pulled = s3(&b, &server, "run", &fb, SMALL, &["--remote", remote, "--json"]);
    pulled.assert_ok();
    assert!(pulled.statuses().iter().all(|(_, s)| s == "pulled"), "{}", pulled.stdout);
    assert_eq!(manifests(&pulled), manifests(&cold), "B holds A's very results");
    let report = |p: &Project| std::fs::read(p.path().join("reports/phase4/report.md")).expect("published report");
    assert_eq!(report(&b), report(&a), "the published report is byte for byte A's");
    let out = b.path().join("cli.md").display().to_string();
    let store = b.store().display().to_string();
    let template = b.path().join("templates/phase4.md.j2").display().to_string();
    let mut args = vec!["report", &template, "--pipeline", &fb, "--store", &store, "-o", &out];
    for s in SMALL {
        args.extend(["--set", s]);
    }
    b.run(&args).assert_ok();
    assert!(std::fs::read_to_string(&out).unwrap().contains("## Headline"));
    b.run(&["verify", "--store", &store]).assert_ok();

    // B changes one parameter: only what depends on it runs, and only that is pushed.
    let mut edited = SMALL.to_vec();
    edited.push("int4.group_size=64");
    let rerun = s3(&b, &server, "run", &fb, &edited, &["--remote", remote, "--push", "--json"]);
    rerun.assert_ok();
    let ran: Vec<String> = rerun.statuses().into_iter().filter(|(_, s)| s == "ran").map(|(n, _)| n).collect();
    assert!(ran.contains(&"int4".to_string()) && ran.len() < 16, "{ran:?}");
    assert!(rerun.statuses().iter().all(|(_, s)| s == "ran" || s == "cached"), "{}", rerun.stdout);
    assert_eq!(published(&rerun.stderr), ran.len(), "only the stages that ran are new on the remote");
    assert!(rerun.stderr.contains("run history: 1 run shared"), "{}", rerun.stderr);

    // Before pulling, A sees B's run on the remote beside its own, and who made each.
    let team = s3(&a, &server, "runs", &fa, &[], &["--remote", remote, "--json"]);
    team.assert_ok();
    let rows = team.json().as_array().expect("runs").clone();
    let here: Vec<bool> = rows.iter().map(|r| r["here"].as_bool().expect("here")).collect();
    assert_eq!(here, [false, true], "B's run, newest, is not in A's store yet: {}", team.stdout);
    assert_eq!(rows[0]["id"].as_str(), rerun.json()["run"].as_str().map(|id| &id[..12]));

    // A pulls B's results, and B's run with them: A can compare its own run against B's.
    let back = s3(&a, &server, "pull", &fa, &edited, &["--remote", remote, "--json"]);
    back.assert_ok();
    assert_eq!(back.json()["runs"]["pulled"], 1, "{}", back.stdout);
    let b_run = rerun.json()["run"].as_str().expect("B's run id").to_string();
    let store = a.store().display().to_string();
    let compared = a.run(&["compare", &cold.json()["run"].as_str().unwrap()[..12], &b_run[..12], "--store", &store]);
    compared.assert_ok();
    assert!(compared.stdout.contains("int4.group_size"), "{}", compared.stdout);

    // The secret went to the server and nowhere else.
    for p in [&a, &b] {
        assert!(files_containing(p.path(), TEST_SECRET.as_bytes()).is_empty(), "the secret was written to disk");
    }
    for r in [&cold, &push, &pulled, &rerun] {
        assert!(!r.stdout.contains(TEST_SECRET) && !r.stderr.contains(TEST_SECRET));
    }
}

const SMALL_PIPELINE: &str = r#"name: shared
stages:
  a: {kind: command, cmd: "echo hello > ${outputs.o}; mkdir ${outputs.d}; echo deep > ${outputs.d}/f", outputs: [o, d]}
  b: {kind: command, cmd: "cat ${inputs.x} ${inputs.y}/f > ${outputs.o}", inputs: {x: a.o, y: a.d}, outputs: [o]}
"#;

/// The file in the directory remote's `cas/` whose content is `content`.
fn remote_blob(remote: &Path, content: &[u8]) -> PathBuf {
    let cas = remote.join("cas");
    let found =
        std::fs::read_dir(&cas).unwrap().flatten().map(|e| e.path()).find(|p| std::fs::read(p).unwrap() == content);
    found.unwrap_or_else(|| panic!("no blob with {content:?} in {}", cas.display()))
}

fn run_in(p: &Project, args: &[&str]) -> Run {
    p.run_env(args, &[])
}

/// Two outputs that are one tree, as a training stage's `best` and `model` often are.
const TWIN_OUTPUTS: &str = r#"name: twins
stages:
  t:
    kind: command
    cmd: "mkdir ${outputs.best} ${outputs.model}; head -c 65536 /dev/zero | tr '\\0' x | tee ${outputs.best}/w > ${outputs.model}/w"
    outputs: [best, model]
"#;

#[test]
fn a_pull_downloads_a_blob_two_outputs_share_once() {
    let base = Project::new();
    let remote = base.path().join("remote").display().to_string();
    let a = Project::new();
    a.write("p.yaml", TWIN_OUTPUTS);
    run_in(&a, &["run", "p.yaml"]).assert_ok();
    let pushed = run_in(&a, &["push", "p.yaml", "--remote", &remote, "--json"]);
    pushed.assert_ok();
    let b = Project::new();
    b.write("p.yaml", TWIN_OUTPUTS);
    let pulled = run_in(&b, &["pull", "p.yaml", "--remote", &remote, "--json"]);
    pulled.assert_ok();
    let (up, down) = (pushed.json(), pulled.json());
    // Three blobs: the 64 KiB file, the tree `best` and `model` both are, and the manifest.
    // Each is downloaded once.
    assert_eq!(up["blobs_uploaded"], 3, "{up}");
    assert_eq!(down["blobs_downloaded"], up["blobs_uploaded"], "{down}");
    assert_eq!(down["bytes_downloaded"], up["bytes_uploaded"], "{down}");
    run_in(&b, &["verify"]).assert_ok();
    run_in(&b, &["export", "p.yaml", "t.model", "m"]).assert_ok();
    assert_eq!(b.read("m/w").len(), 65536);
}

/// `--rerun` executes a stage the remote holds instead of pulling it; the rest is pulled.
#[test]
fn a_rerun_stage_is_not_pulled() {
    let base = Project::new();
    let remote = base.path().join("remote").display().to_string();
    let a = Project::new();
    a.write("p.yaml", SMALL_PIPELINE);
    run_in(&a, &["run", "p.yaml", "--remote", &remote, "--push"]).assert_ok();
    let b = Project::new();
    b.write("p.yaml", SMALL_PIPELINE);
    let r = run_in(&b, &["run", "p.yaml", "--remote", &remote, "--rerun", "b", "--json"]);
    r.assert_ok();
    assert_eq!((r.status_of("a"), r.status_of("b")), ("pulled".into(), "ran".into()), "{}", r.stderr);
}

/// `pull --target` downloads what that stage needs and nothing of the other branches.
#[test]
fn a_targeted_pull_takes_only_what_the_target_needs() {
    let base = Project::new();
    let remote = base.path().join("remote").display().to_string();
    let pipeline =
        format!("{SMALL_PIPELINE}  c: {{kind: command, cmd: \"echo other > ${{outputs.o}}\", outputs: [o]}}\n");
    let a = Project::new();
    a.write("p.yaml", &pipeline);
    run_in(&a, &["run", "p.yaml", "--remote", &remote, "--push"]).assert_ok();
    let b = Project::new();
    b.write("p.yaml", &pipeline);
    let pulled = run_in(&b, &["pull", "p.yaml", "--remote", &remote, "--target", "b", "--json"]);
    pulled.assert_ok();
    let results = pulled.json()["results"].clone();
    assert_eq!(results, serde_json::json!({"a": "pulled", "b": "pulled"}), "{}", pulled.stdout);
    let plan = run_in(&b, &["plan", "p.yaml"]);
    let c_runs = plan.stdout.lines().any(|l| l.starts_with("c ") && l.contains("will run"));
    assert!(plan.stdout.contains("1 of 3 stages will run") && c_runs, "{}", plan.stdout);
    let no_file = run_in(&b, &["pull", "--remote", &remote, "--target", "b"]);
    assert_eq!(no_file.code, 2, "{}", no_file.stderr);

    // `push --target` uploads that stage and what it needs, so a teammate's targeted run finds
    // the whole chain; the other branch stays local.
    let remote2 = base.path().join("remote2").display().to_string();
    run_in(&a, &["push", "p.yaml", "--remote", &remote2, "--target", "b"]).assert_ok();
    let c = Project::new();
    c.write("p.yaml", &pipeline);
    let pulled = run_in(&c, &["pull", "p.yaml", "--remote", &remote2, "--json"]);
    assert_eq!(
        pulled.json()["results"],
        serde_json::json!({"a": "pulled", "b": "pulled", "c": "absent"}),
        "{}",
        pulled.stdout
    );
    let no_file = run_in(&a, &["push", "--remote", &remote2, "--target", "b"]);
    assert_eq!(no_file.code, 2, "{}", no_file.stderr);
}

#[test]
fn a_directory_remote_refuses_corrupt_and_missing_blobs_and_repairs_on_push() {
    let base = Project::new();
    let remote = base.path().join("remote");
    let remote_s = remote.display().to_string();
    let a = Project::new();
    a.write("p.yaml", SMALL_PIPELINE);
    run_in(&a, &["run", "p.yaml"]).assert_ok();
    let only_b = base.path().join("only-b").display().to_string();
    let one = run_in(&a, &["push", "p.yaml", "--stage", "b", "--remote", &only_b]);
    assert_eq!(published(&one.stderr), 1, "{}", one.stderr);
    run_in(&a, &["push", "p.yaml", "--remote", &remote_s]).assert_ok();

    // A blob of `a` rots on the remote (same size, other bytes): B refuses it and recomputes.
    let blob = remote_blob(&remote, b"hello\n");
    std::fs::write(&blob, "jello\n").unwrap();
    let b = Project::new();
    b.write("p.yaml", SMALL_PIPELINE);
    let r = run_in(&b, &["run", "p.yaml", "--remote", &remote_s, "--push", "--json"]);
    r.assert_ok();
    assert_eq!(r.status_of("a"), "ran", "{}", r.stderr);
    assert!(
        r.stderr.contains("is corrupt") && r.stderr.contains(&blob.file_name().unwrap().to_string_lossy().to_string()),
        "{}",
        r.stderr
    );
    assert_eq!(b.read("artifacts/outputs/shared/b/o"), "hello\ndeep\n");
    run_in(&b, &["verify"]).assert_ok();
    assert_eq!(std::fs::read(&blob).unwrap(), b"hello\n", "B's push replaced the corrupt blob");

    // A blob the remote lost: C pulls what it can and runs the rest, with a warning.
    let lost = remote_blob(&remote, b"hello\ndeep\n");
    std::fs::remove_file(&lost).unwrap();
    let c = Project::new();
    c.write("p.yaml", SMALL_PIPELINE);
    let r = run_in(&c, &["run", "p.yaml", "--remote", &remote_s, "--json"]);
    r.assert_ok();
    assert_eq!((r.status_of("a"), r.status_of("b")), ("pulled".into(), "ran".into()), "{}", r.stderr);
    assert!(r.stderr.contains("warning: `b` could not be pulled") && r.stderr.contains("is missing"), "{}", r.stderr);
    run_in(&c, &["verify"]).assert_ok();

    // A's results are the ones on the remote. A plain push trusts their entries, so the loss
    // stays, and a pull says what it cannot use and how to mend it; `push --repair` sends
    // every blob again.
    let again = run_in(&a, &["push", "p.yaml", "--remote", &remote_s]);
    again.assert_ok();
    // (`a`'s entry is B's since B's push, so A writes its own again; `b`'s is A's.)
    assert!(again.stderr.contains("(1 new, 1 already there)") && !lost.exists(), "{}", again.stderr);
    let d = Project::new();
    d.write("p.yaml", SMALL_PIPELINE);
    let r = run_in(&d, &["pull", "p.yaml", "--remote", &remote_s]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("1 results downloaded, 0 already here, 0 not on the remote, 1 on it but unusable;")
            && r.stderr.contains("is missing (`orchestrate push --repair`"),
        "{}",
        r.stderr
    );
    let repaired = run_in(&a, &["push", "p.yaml", "--remote", &remote_s, "--repair"]);
    assert!(repaired.stderr.contains("2 results (2 written again, 0 already there)"), "{}", repaired.stderr);
    assert_eq!(std::fs::read(&lost).unwrap(), b"hello\ndeep\n");
    run_in(&d, &["pull", "p.yaml", "--remote", &remote_s]).assert_ok();
    run_in(&d, &["verify"]).assert_ok();
    let r = run_in(&d, &["run", "p.yaml", "--json"]);
    assert_eq!((r.status_of("a"), r.status_of("b")), ("cached".into(), "cached".into()), "{}", r.stderr);
    assert_eq!(d.read("artifacts/outputs/shared/b/o"), "hello\ndeep\n");
}

fn holds_a_file(dir: &Path) -> bool {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    entries.map(|e| e.path()).any(|p| if p.is_dir() { holds_a_file(&p) } else { true })
}

/// Wait until `dir` (recursively) holds a file, or panic after a minute.
fn wait_for_file(dir: &Path) {
    let t0 = Instant::now();
    while !holds_a_file(dir) {
        assert!(t0.elapsed() < Duration::from_secs(60), "nothing appeared under {}", dir.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Start `args` in `p`, wait until `dir` holds a file, then send `signal`. True when the signal
/// ended the process; false when it had already finished (then the interruption was not
/// exercised and the caller tries again: on a loaded machine the transfer can win the race).
fn interrupted(p: &Project, args: &[&str], dir: &Path, signal: i32) -> bool {
    use std::os::unix::process::ExitStatusExt as _;
    let child = p.cmd().args(args).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_file(dir);
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    match (out.status.signal(), out.status.code()) {
        (Some(s), _) if s == signal => true,
        // Interrupted, and said so (exit code 130).
        (_, Some(130)) => true,
        (_, Some(0)) => false,
        _ => panic!("{args:?} failed on its own ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
    }
}

const BIG: &str =
    "name: big\nstages:\n  big: {kind: command, cmd: \"head -c 400000000 /dev/zero > ${outputs.o}\", outputs: [o]}\n";

#[test]
fn a_killed_push_or_pull_leaves_both_stores_consistent() {
    let base = Project::new();
    let a = Project::new();
    // Large enough that the transfer is usually still going when it is killed.
    a.write("p.yaml", BIG);
    run_in(&a, &["run", "p.yaml"]).assert_ok();
    // kill -9 in the middle of a push (a fresh remote per try, until the kill lands mid-push).
    let remote = (0..5)
        .map(|i| base.path().join(format!("remote{i}")))
        .find(|r| {
            interrupted(&a, &["push", "p.yaml", "--remote", &r.display().to_string()], &r.join("cas"), libc::SIGKILL)
        })
        .expect("five pushes all finished before the kill landed");
    let remote_s = remote.display().to_string();
    let entries = std::fs::read_dir(remote.join("ac")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries, 0, "a killed push must not publish a result");
    let b = Project::new();
    b.write("p.yaml", BIG);
    let plan = run_in(&b, &["plan", "p.yaml", "--remote", &remote_s]);
    assert!(plan.stdout.contains("1 of 1 stages will run"), "{}", plan.stdout);
    run_in(&a, &["verify"]).assert_ok();
    let again = run_in(&a, &["push", "p.yaml", "--remote", &remote_s]);
    again.assert_ok();
    assert_eq!(published(&again.stderr), 1, "{}", again.stderr);

    // Ctrl-C in the middle of a pull: B's store stays valid and the next pull finishes the job.
    let mut pull = b.cmd().args(["pull", "p.yaml", "--remote", &remote_s]).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_file(&b.store().join("tmp"));
    // SAFETY: signalling a child we spawned.
    unsafe { libc::kill(pull.id() as i32, libc::SIGINT) };
    let _ = pull.wait();
    run_in(&b, &["verify"]).assert_ok();
    let pulled = run_in(&b, &["pull", "p.yaml", "--remote", &remote_s]);
    pulled.assert_ok();
    // Where the signal landed depends on timing (on CI machines the pull often finished first):
    // either way the store verifies and, after this pull, holds the whole result.
    assert!(
        pulled.stderr.contains("1 results downloaded, 0 already here")
            || pulled.stderr.contains("0 results downloaded, 1 already here"),
        "{}",
        pulled.stderr
    );
    let r = run_in(&b, &["run", "p.yaml", "--json"]);
    r.assert_ok();
    assert_eq!(r.status_of("big"), "cached", "{}", r.stderr);
    let size = std::fs::metadata(b.store().join("outputs/big/big/o")).unwrap().len();
    assert_eq!(size, 400_000_000);
    run_in(&b, &["verify"]).assert_ok();
}

fn q_run(p: &Project, server: &S3Server, args: &[&str]) -> Run {
    p.run_env(args, &server.env())
}

#[test]
fn remote_errors_are_clear() {
    let p = Project::new();
    p.write("p.yaml", SMALL_PIPELINE);
    let no_creds = run_in(&p, &["push", "p.yaml", "--remote", "s3://team-cache/x"]);
    assert_eq!(no_creds.code, 2, "{}", no_creds.stderr);
    for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"] {
        assert!(no_creds.stderr.contains(var), "{}", no_creds.stderr);
    }
    let unknown = run_in(&p, &["run", "p.yaml", "--remote", "team"]);
    assert_eq!(unknown.code, 2, "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("no orchestrate.toml") || unknown.stderr.contains("orchestrate.toml was found"),
        "{}",
        unknown.stderr
    );
    p.write(
        "orchestrate.toml",
        "default_remote = \"team\"\n[remote.team]\nurl = \"shared-cache\"\n[remote.s3]\nurl = \"s3://b/p\"\n",
    );
    let misnamed = run_in(&p, &["run", "p.yaml", "--remote", "teem"]);
    assert_eq!(misnamed.code, 2);
    assert!(misnamed.stderr.contains("has no remote `teem` (it has s3, team)"), "{}", misnamed.stderr);
    let push_alone = run_in(&p, &["run", "p.yaml", "--push"]);
    assert_eq!(push_alone.code, 2);
    assert!(push_alone.stderr.contains("--push needs --remote"), "{}", push_alone.stderr);
    p.write("bad/orchestrate.toml", "[remote.team]\nurl = \"s3://b\"\naws_secret_access_key = \"x\"\n");
    p.write("bad/p.yaml", SMALL_PIPELINE);
    let secret = run_in(&p, &["run", "bad/p.yaml", "--remote", "team"]);
    assert_eq!(secret.code, 2);
    assert!(secret.stderr.contains("credentials do not belong in orchestrate.toml"), "{}", secret.stderr);

    // The default remote is the config's; it is a directory beside the config file.
    run_in(&p, &["run", "p.yaml"]).assert_ok();
    let pushed = run_in(&p, &["push"]);
    pushed.assert_ok();
    assert!(
        pushed.stderr.contains(&format!("pushed to {}", p.path().join("shared-cache").display())),
        "{}",
        pushed.stderr
    );

    // A bucket that does not exist: named once (not once per blob), with what to do and
    // without the server's XML; a pull says so too rather than "not on the remote", and a
    // run warns once and computes here.
    let server = S3Server::start();
    let missing = q_run(&p, &server, &["push", "p.yaml", "--remote", "s3://no-such-bucket/x"]);
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    assert!(missing.stderr.contains("the bucket does not exist: create it"), "{}", missing.stderr);
    assert!(missing.stderr.contains("NoSuchBucket: The specified bucket does not exist"), "{}", missing.stderr);
    assert_eq!(missing.stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{}", missing.stderr);
    assert!(!missing.stderr.contains("<?xml") && !missing.stderr.contains("RequestId"), "{}", missing.stderr);
    let pulled = q_run(&p, &server, &["pull", "p.yaml", "--remote", "s3://no-such-bucket/x"]);
    assert_eq!(pulled.code, 1, "{}", pulled.stderr);
    assert!(pulled.stderr.contains("the bucket does not exist: create it"), "{}", pulled.stderr);
    assert!(!pulled.stderr.contains("not on the remote"), "{}", pulled.stderr);
    let fresh = Project::new();
    fresh.write("p.yaml", SMALL_PIPELINE);
    let ran = q_run(&fresh, &server, &["run", "p.yaml", "--remote", "s3://no-such-bucket/x"]);
    ran.assert_ok();
    assert_eq!(ran.stderr.matches("the bucket does not exist").count(), 1, "{}", ran.stderr);
    drop(server);

    // A server that does not answer: the run warns once and computes everything here.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let q = Project::new();
    q.write("p.yaml", SMALL_PIPELINE);
    let env = [
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "k".into()),
        ("AWS_SECRET_ACCESS_KEY", TEST_SECRET.into()),
    ];
    let r = q.run_env(&["run", "p.yaml", "--remote", "s3://team-cache/x", "--json"], &env);
    r.assert_ok();
    assert!(r.statuses().iter().all(|(_, s)| s == "ran"), "{}", r.stdout);
    assert_eq!(r.stderr.matches("the remote cache failed").count(), 1, "{}", r.stderr);
    assert!(!r.stderr.contains(TEST_SECRET));
    // A push to it fails once, saying what to check, and not once per result or blob.
    let pushed = q.run_env(&["push", "p.yaml", "--remote", "s3://team-cache/x"], &env);
    assert_eq!(pushed.code, 1, "{}", pushed.stderr);
    assert_eq!(pushed.stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{}", pushed.stderr);
    assert!(pushed.stderr.contains("the server did not answer: check the endpoint"), "{}", pushed.stderr);
}

/// A pipeline with a metric, for run history: `b.lines` counts the lines `a` wrote.
const COUNTED: &str = r#"name: counted
params: {n: 3}
metrics: {b.lines: max}
stages:
  a: {kind: command, cmd: "seq ${params.n} > ${outputs.o}", outputs: [o]}
  b: {kind: command, cmd: "echo \"{\\\"lines\\\": $(wc -l < ${inputs.x})}\" > $ORCH_METRICS; cp ${inputs.x} ${outputs.o}", inputs: {x: a.o}, outputs: [o]}
"#;

/// Names of the runs a store lists, newest first (`-` for none).
fn run_names(p: &Project) -> Vec<String> {
    let listed = run_in(p, &["runs", "--json"]);
    listed.assert_ok();
    let runs = listed.json().as_array().expect("runs").clone();
    runs.iter().map(|r| r["name"].as_str().unwrap_or("-").to_string()).collect()
}

/// A project that ran COUNTED twice: `baseline` (n=3), then n=5.
fn two_counted_runs() -> Project {
    let a = Project::new();
    a.write("p.yaml", COUNTED);
    run_in(&a, &["run", "p.yaml", "--name", "baseline"]).assert_ok();
    run_in(&a, &["run", "p.yaml", "--set", "params.n=5"]).assert_ok();
    a
}

/// Overwrite the blob of one run record on a directory remote with other bytes, which a reader
/// must refuse by the blob's hash.
fn damage_a_run_record(remote: &Path) {
    let id = std::fs::read_dir(remote.join("runs")).unwrap().flatten().next().unwrap().file_name();
    std::fs::write(remote.join("cas").join(&id), br#"{"orchestrate":"run"}"#).unwrap();
}

/// Runs travel with their results: a teammate who pulls can list and compare them, a name
/// given later follows, a run whose results are not all on the remote stays local, and a
/// damaged record is refused.
#[test]
fn run_history_and_names_travel_with_the_results() {
    let base = Project::new();
    let remote = base.path().join("remote").display().to_string();
    let a = two_counted_runs();
    let pushed = run_in(&a, &["push", "--remote", &remote, "--json"]);
    pushed.assert_ok();
    assert_eq!(pushed.json()["runs"], serde_json::json!({"shared": 2, "already": 0, "names": 0, "not_shared": []}));
    let again = run_in(&a, &["push", "p.yaml", "--remote", &remote]);
    assert!(again.stderr.contains("run history: 0 runs shared, 2 already there"), "{}", again.stderr);
    // A history that cannot be written is an error beside the results pushed, not instead.
    let blocked = base.path().join("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("runs"), "a file where the runs/ folder goes").unwrap();
    let half = run_in(&a, &["push", "--remote", blocked.to_str().unwrap()]);
    assert_eq!(half.code, 1, "{}", half.stderr);
    assert!(half.stderr.contains("4 results (4 new, 0 already there)"), "{}", half.stderr);
    assert!(half.stderr.contains("runs/"), "the error names the entry it could not write: {}", half.stderr);

    let b = Project::new();
    b.write("p.yaml", COUNTED);
    let pulled = run_in(&b, &["pull", "--remote", &remote]);
    pulled.assert_ok();
    assert!(pulled.stderr.contains("run history: 2 runs pulled"), "{}", pulled.stderr);
    assert_eq!(run_names(&b), ["-", "baseline"]);
    let compared = run_in(&b, &["compare", "baseline", "latest"]);
    compared.assert_ok();
    let line = compared.stdout.lines().find(|l| l.trim_start().starts_with("b.lines")).unwrap_or_default();
    assert!(line.contains('3') && line.contains('5') && line.contains("better"), "{}", compared.stdout);
    assert_eq!(run_in(&b, &["pull", "--remote", &remote, "--json"]).json()["runs"]["pulled"], 0, "pulled once");

    // A name given on A after the run reaches B, and moves the name there too.
    run_in(&a, &["name", "latest", "baseline"]).assert_ok();
    let named = run_in(&a, &["push", "--remote", &remote, "--json"]);
    assert_eq!(named.json()["runs"]["names"], 1, "{}", named.stdout);
    let pulled = run_in(&b, &["pull", "p.yaml", "--remote", &remote, "--json"]);
    assert_eq!(pulled.json()["runs"]["names"], 1, "{}", pulled.stdout);
    assert_eq!(run_names(&b), ["baseline", "baseline"]);
    let moved = run_in(&b, &["compare", "latest~1", "baseline"]);
    assert!(moved.stdout.contains("params.n=5"), "`baseline` means the run named last:\n{}", moved.stdout);

    // A run whose results are not all on the remote stays local, saying which one is missing.
    run_in(&a, &["run", "p.yaml", "--set", "params.n=7"]).assert_ok();
    let partial = run_in(&a, &["push", "p.yaml", "--set", "params.n=7", "--stage", "a", "--remote", &remote]);
    partial.assert_ok();
    assert!(partial.stderr.contains("the result of stage `b` is not on the remote"), "{}", partial.stderr);
    // C pulls only `a`: no run's results are all there, so none joins its history.
    let c = Project::new();
    c.write("p.yaml", COUNTED);
    let only_a = run_in(&c, &["pull", "p.yaml", "--target", "a", "--remote", &remote, "--json"]);
    only_a.assert_ok();
    assert_eq!(only_a.json()["runs"], serde_json::json!({"pulled": 0, "waiting": 2, "names": 0}));
    assert!(run_in(&c, &["runs"]).stdout.contains("no runs"));
    assert!(run_in(&c, &["pull", "--remote", &remote, "--no-runs", "--json"]).json().get("runs").is_none());

    // One run by its name, with the very results it recorded (`baseline` now means the n=5
    // run), though the pipeline as it is says n=3: what a teammate compares against.
    let e = Project::new();
    e.write("p.yaml", COUNTED);
    let one = run_in(&e, &["pull", "--run", "baseline", "--remote", &remote, "--json"]);
    one.assert_ok();
    assert_eq!(one.json()["results"], serde_json::json!({"a": "pulled", "b": "pulled"}), "{}", one.stdout);
    assert_eq!(run_names(&e), ["baseline"]);
    run_in(&e, &["export", "p.yaml", "a.o", "base.txt", "--run", "baseline"]).assert_ok();
    assert_eq!(e.read("base.txt").lines().count(), 5);
    assert!(run_in(&e, &["plan", "p.yaml"]).stdout.contains("2 of 2 stages will run"), "n=3 is not cached here");
    let too_far = run_in(&e, &["pull", "--run", "latest~9", "--remote", &remote]);
    assert!(too_far.code != 0 && too_far.stderr.contains("has only 2 runs"), "{}", too_far.stderr);

    // A damaged record on the remote is refused by its hash, and the pull says so.
    damage_a_run_record(Path::new(&remote));
    let d = Project::new();
    let damaged = run_in(&d, &["pull", "--remote", &remote]);
    assert_eq!(damaged.code, 1, "{}", damaged.stderr);
    assert!(damaged.stderr.contains("(run record) is corrupt"), "{}", damaged.stderr);
    assert_eq!(run_names(&d).len(), 1, "the other run is pulled");
    let repaired = run_in(&a, &["push", "--remote", &remote, "--repair", "--json"]);
    repaired.assert_ok();
    run_in(&d, &["pull", "--remote", &remote]).assert_ok();
    assert_eq!(run_names(&d).len(), 3);
}

/// `runs --remote`: the team's history as the remote holds it, before pulling anything — names,
/// metrics read from the remote's manifests, which runs are here — and a damaged record is an
/// error beside the runs that could be read.
#[test]
fn a_teammate_lists_the_remotes_runs_before_pulling() {
    let base = Project::new();
    let remote = base.path().join("remote").display().to_string();
    let a = two_counted_runs();
    run_in(&a, &["push", "--remote", &remote]).assert_ok();

    let b = Project::new();
    let listed = run_in(&b, &["runs", "--remote", &remote, "--metric", "b.lines", "--json"]);
    listed.assert_ok();
    let rows = listed.json().as_array().expect("runs").clone();
    let field = |k: &str| rows.iter().map(|r| r[k].clone()).collect::<Vec<_>>();
    assert_eq!(field("name"), [serde_json::Value::Null, "baseline".into()], "{}", listed.stdout);
    assert_eq!(field("metric"), [5.0, 3.0], "read from the remote's manifests: {}", listed.stdout);
    assert_eq!(field("here"), [false, false]);
    assert!(!b.store().exists(), "listing creates no store and downloads nothing into one");

    run_in(&b, &["pull", "--run", "baseline", "--remote", &remote]).assert_ok();
    let missing = run_in(&b, &["compare", "nightly", "baseline"]);
    assert!(missing.code == 2 && missing.stderr.contains("`orchestrate runs --remote R`"), "{}", missing.stderr);
    let text = run_in(&b, &["runs", "--remote", &remote]);
    text.assert_ok();
    let line = |name: &str| text.stdout.lines().find(|l| l.contains(name)).unwrap_or_default().to_string();
    assert!(line("baseline").contains(" yes "), "{}", text.stdout);
    assert!(line("params.n=5").contains(" no "), "{}", text.stdout);
    assert!(text.stdout.contains("pull --run ID --remote"), "how to bring one here: {}", text.stdout);
    b.write("other.yaml", "name: other\nstages:\n  a: {kind: command, cmd: \"true\"}\n");
    let none = run_in(&b, &["runs", "other.yaml", "--remote", &remote]);
    none.assert_ok();
    assert!(none.stdout.contains("no runs shared on") && none.stdout.contains("`other`"), "{}", none.stdout);

    // A record damaged on the remote: an error line naming it, the other run still listed.
    damage_a_run_record(Path::new(&remote));
    let damaged = run_in(&b, &["runs", "--remote", &remote, "--json"]);
    assert_eq!(damaged.code, 1, "{}", damaged.stderr);
    assert!(damaged.stderr.contains("(run record) is corrupt"), "{}", damaged.stderr);
    assert_eq!(damaged.json().as_array().map(Vec::len), Some(1), "{}", damaged.stdout);
    // A mistyped directory (or a share not mounted) is an error, not an empty remote, and is
    // not created by reading it: only a push creates a directory remote.
    let typo = base.path().join("remtoe");
    for verb in [&["runs"][..], &["pull"], &["plan", "other.yaml"], &["run", "other.yaml"]] {
        let read = run_in(&b, &[verb, &["--remote", typo.to_str().unwrap()]].concat());
        assert_eq!(read.code, 2, "{verb:?}: {}", read.stderr);
        assert!(read.stderr.contains("does not exist: check the path"), "{verb:?}: {}", read.stderr);
        assert!(!typo.exists(), "{verb:?} created the remote directory");
    }
    run_in(&b, &["run", "other.yaml", "--remote", typo.to_str().unwrap(), "--push"]).assert_ok();
    assert!(typo.join("runs").is_dir(), "a push creates it");
}

/// `gc --remote` on one remote: keeps what the newest run and the named run use, and
/// everything written within the grace period; what it removes leaves no entry dangling.
fn collect_remote(remote: &str, env: &[(&str, String)]) {
    let run = |p: &Project, args: &[&str]| p.run_env(args, env);
    let a = Project::new();
    a.write("p.yaml", COUNTED);
    for (n, name) in [("3", Some("keep")), ("4", None), ("5", None)] {
        let set = format!("params.n={n}");
        let mut args = vec!["run", "p.yaml", "--set", &set, "--remote", remote, "--push"];
        args.extend(name.map(|n| ["--name", n]).into_iter().flatten());
        run(&a, &args).assert_ok();
    }
    let unasked = run(&a, &["gc", "--remote", remote]);
    assert!(unasked.code == 2 && unasked.stderr.contains("needs --keep-last N"), "{}", unasked.stderr);
    let young = run(&a, &["gc", "--remote", remote, "--keep-last", "1"]);
    young.assert_ok();
    assert!(
        young.stdout.contains("removed 0 blobs (0 B) and 0 entries"),
        "all of it is a day old at most: {}",
        young.stdout
    );
    let dry = run(&a, &["gc", "--remote", remote, "--keep-last", "1", "--keep-newer", "0s", "--dry-run"]);
    assert!(
        dry.stdout.contains("would remove 4 blobs") && dry.stdout.contains("1 older run(s) would leave"),
        "{}",
        dry.stdout
    );
    let still = Project::new();
    assert_eq!(
        run(&still, &["pull", "--remote", remote, "--json"]).json()["runs"]["pulled"],
        3,
        "a dry run deletes nothing"
    );

    // n=4's run goes with its two results (2 outputs, 2 manifests), its record and 2 ac entries.
    let gone = run(&a, &["gc", "--remote", remote, "--keep-last", "1", "--keep-newer", "0s"]);
    gone.assert_ok();
    assert!(gone.stdout.contains("removed 4 blobs") && gone.stdout.contains("and 3 entries"), "{}", gone.stdout);
    assert!(gone.stdout.contains("the last 1 run(s) and 1 older named run(s)"), "{}", gone.stdout);
    let c = Project::new();
    c.write("p.yaml", COUNTED);
    let pulled = run(&c, &["pull", "--remote", remote, "--json"]);
    pulled.assert_ok();
    assert_eq!(pulled.json()["runs"]["pulled"], 2, "{}", pulled.stdout);
    assert_eq!(run_names(&c), ["-", "keep"]);
    let plan = run(&c, &["plan", "p.yaml", "--set", "params.n=4", "--remote", remote]);
    assert!(plan.stdout.contains("2 of 2 stages will run"), "n=4's results left the remote: {}", plan.stdout);
    run(&c, &["verify"]).assert_ok();
}

#[test]
fn gc_of_a_remote_keeps_what_its_runs_use() {
    let base = Project::new();
    collect_remote(&base.path().join("remote").display().to_string(), &[]);
    let server = S3Server::start();
    server.create_bucket("gc-cache");
    collect_remote("s3://gc-cache/team", &server.env());
}
