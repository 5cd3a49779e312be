//! pipelines/train.yaml end to end with tiny budgets: corpus → vocab → two models in parallel.

use e2e_tests::{shipped_pipeline, Project, TINY_TWO_MODELS as SMALL};

#[test]
fn train_pipeline_runs_caches_and_replays_identically() {
    let p = Project::new();
    let file = shipped_pipeline("train");
    let cli = p.pipeline(&file, SMALL);
    let cold = cli.run("run", &["--json"]);
    cold.assert_ok();
    assert!(cold.statuses().iter().all(|(_, s)| s == "ran"), "{}", cold.stdout);

    let show = cli.run("show", &["itera", "--json"]).json();
    let summary_path = show["outputs"]["summary.json"]["path"].as_str().unwrap().to_string();
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(summary_path).unwrap()).unwrap();
    assert_eq!(summary["model"], "itera_lite");
    assert_eq!(summary["steps"], 12);
    assert_eq!(summary["tokens_seen"], 12 * 4 * 32);
    assert!(summary["val_loss"].as_f64().unwrap() > 0.0);
    assert!(summary["params"]["total"].as_u64().unwrap() > 800_000);
    assert_eq!(show["outputs"]["model"]["type"], "tree");

    let vocab = cli.run("show", &["vocab", "--json"]).json();
    assert!(vocab["metrics"]["vocab_size"].as_u64().unwrap() > 30);
    let corpus = cli.run("show", &["corpus", "--json"]).json();
    assert_eq!(corpus["metrics"]["synthetic"], true);

    let warm = cli.run("run", &["--json"]);
    warm.assert_ok();
    assert!(warm.statuses().iter().all(|(_, s)| s == "cached"), "{}", warm.stdout);

    let replay = cli.run("replay", &[]);
    assert_eq!(
        replay.code, 0,
        "training is deterministic, so replay must reproduce it:\n{}{}",
        replay.stdout, replay.stderr
    );
    for stage in ["corpus", "vocab", "itera", "transformer"] {
        assert!(
            replay.stdout.lines().any(|l| l.starts_with(stage) && l.ends_with("yes")),
            "{stage}: {}",
            replay.stdout
        );
    }

    let dest = p.path().join("exported");
    let e = cli.run("export", &["itera.best", dest.to_str().unwrap()]);
    e.assert_ok();
    assert!(dest.join("model.safetensors").exists() && dest.join("config.json").exists());
}

#[test]
fn train_params_are_checked_before_anything_runs() {
    let p = Project::new();
    let r = p.run(&["run", &shipped_pipeline("train"), "--store", p.store().to_str().unwrap(), "--set", "itera.lr=7"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("error[E-PARAM]") && r.stderr.contains("`lr` must be in (0, 1)"), "{}", r.stderr);
    // The value came from --set, and the error says so, and where the stage is declared.
    assert!(r.stderr.starts_with("--set: error[E-PARAM]: stage `itera`"), "{}", r.stderr);
    assert!(r.stderr.contains("the value comes from --set; stage `itera` is declared at "), "{}", r.stderr);
    assert!(r.stderr.contains("train.yaml:"), "points into the pipeline file: {}", r.stderr);
    assert!(p.store_is_empty());
}
