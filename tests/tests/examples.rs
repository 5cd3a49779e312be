//! Every pipeline in pipelines/examples runs, reruns fully cached, and replays identical.

use e2e_tests::Project;

#[test]
fn example_pipelines_run_cache_and_replay() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).expect("pipelines/examples") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        seen += 1;
        let store = Project::new();
        let file = path.to_str().expect("utf-8 path");
        let store_dir = store.store();
        let store_arg = store_dir.to_str().expect("utf-8 path");
        let r = store.run(&["run", file, "--store", store_arg, "--json"]);
        r.assert_ok();
        assert!(r.statuses().iter().all(|(_, s)| s == "ran"), "{file}: {}", r.stdout);
        let again = store.run(&["run", file, "--store", store_arg, "--json"]);
        assert!(again.statuses().iter().all(|(_, s)| s == "cached"), "{file}: {}", again.stdout);
        let replay = store.run(&["replay", file, "--store", store_arg]);
        assert_eq!(replay.code, 0, "{file}: {}{}", replay.stdout, replay.stderr);
        let dot = store.run(&["dag", file]);
        assert!(dot.stdout.starts_with("digraph"), "{file}");
    }
    assert!(seen >= 2, "at least two example pipelines are expected, found {seen}");
}
