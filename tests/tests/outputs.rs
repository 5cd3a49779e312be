//! Where the results are after `run`: final outputs copied where a person opens them (under
//! the store, or the pipeline's `publish:` destinations), read-only copies that an edit cannot
//! carry back into the store, replaced only when the output changes, and never over a path
//! orchestrate did not create.

use std::os::unix::fs::PermissionsExt;

use e2e_tests::Project;

const PIPELINE: &str = r#"name: outs
params: {word: hello}
stages:
  make:
    kind: command
    cmd: "mkdir -p ${outputs.site} && echo ${params.word} > ${outputs.site}/index.txt && echo 1 > ${outputs.n}"
    outputs: [site, n]
  count:
    kind: command
    cmd: "wc -c < ${inputs.n} > ${outputs.count}"
    inputs: {n: make.n}
    outputs: [count]
"#;

#[test]
fn final_outputs_are_listed_and_copied_under_the_store() {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    let r = p.run(&["run", "p.yaml"]);
    r.assert_ok();
    // `count` is the only stage nothing depends on; `make.site` is used by no one but is not final.
    assert!(r.stderr.contains("count.count  artifacts/outputs/outs/count/count  (file)"), "{}", r.stderr);
    assert!(!r.stderr.contains("make.site"), "{}", r.stderr);
    assert!(r.stderr.contains("orchestrate export p.yaml STAGE.OUTPUT DEST"), "{}", r.stderr);
    let copy = p.path().join("artifacts/outputs/outs/count/count");
    assert_eq!(std::fs::read_to_string(&copy).unwrap().trim(), "2");
    assert_eq!(copy.metadata().unwrap().permissions().mode() & 0o222, 0, "copies are read-only");
    let json = p.run(&["run", "p.yaml", "--json"]).json();
    assert_eq!(json["outputs"][0]["path"], copy.display().to_string());
    assert_eq!(json["outputs"][0]["published"], false);
}

#[test]
fn publish_copies_replaces_on_change_and_an_edit_never_reaches_the_store() {
    let p = Project::new();
    p.write("p.yaml", &format!("{PIPELINE}publish:\n  make.site: out/site\n"));
    let r = p.run(&["run", "p.yaml"]);
    r.assert_ok();
    assert!(r.stderr.contains("published (read-only copies):"), "{}", r.stderr);
    assert!(r.stderr.contains("make.site  out/site  (folder of 1 entry)"), "{}", r.stderr);
    let index = p.path().join("out/site/index.txt");
    assert_eq!(p.read("out/site/index.txt"), "hello\n");

    // An edit of the copy (made possible by chmod) stays in the copy.
    std::fs::set_permissions(&index, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&index, "edited\n").unwrap();
    p.run(&["export", "p.yaml", "make.site", "fresh"]).assert_ok();
    assert_eq!(p.read("fresh/index.txt"), "hello\n", "the stored output is untouched");

    // A cached rerun copies nothing; a changed output replaces the copy.
    p.run(&["run", "p.yaml"]).assert_ok();
    assert_eq!(p.read("out/site/index.txt"), "edited\n");
    p.run(&["run", "p.yaml", "--set", "word=bye"]).assert_ok();
    assert_eq!(p.read("out/site/index.txt"), "bye\n");
}

#[test]
fn publish_never_overwrites_what_orchestrate_did_not_create() {
    let p = Project::new();
    p.write("p.yaml", &format!("{PIPELINE}publish:\n  count.count: mine.txt\n"));
    p.write("mine.txt", "my notes\n");
    let r = p.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("mine.txt already exists and was not published by orchestrate"), "{}", r.stderr);
    assert_eq!(p.read("mine.txt"), "my notes\n");
    assert!(p.run(&["run", "p.yaml", "--json"]).json()["stages"][1]["status"] == "cached", "results were stored");
}

#[test]
fn publish_names_checked_before_anything_runs() {
    let p = Project::new();
    p.write("p.yaml", &format!("{PIPELINE}publish:\n  make.sight: out/site\n"));
    let r = p.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("p.yaml:14:3") && r.stderr.contains("`publish` entry `make.sight`"), "{}", r.stderr);
    assert!(r.stderr.contains("valid outputs of `make`: site, n"), "{}", r.stderr);
    assert!(p.store_is_empty());
}

/// A copy put in one of the store's own folders would be taken for an object (a corrupt one,
/// by `verify`) or lost to the next run: `export` and `publish:` refuse such destinations,
/// also reached through `..` or a symbolic link, and the store stays whole.
#[test]
fn nothing_is_copied_into_the_stores_own_folders() {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    p.run(&["run", "p.yaml"]).assert_ok();
    std::os::unix::fs::symlink(p.store().join("objects"), p.path().join("link")).unwrap();
    for dest in ["artifacts/objects/zz/x", "artifacts/new/../tmp/x", "artifacts/outputs/outs/x", "link/x"] {
        let r = p.run(&["export", "p.yaml", "count.count", dest]);
        assert_eq!(r.code, 1, "{dest}: {}", r.stderr);
        assert!(r.stderr.contains("which only orchestrate writes; export somewhere outside it"), "{}", r.stderr);
    }
    assert!(!p.store().join("objects/zz").exists() && !p.store().join("new").exists());
    p.run(&["export", "p.yaml", "count.count", "artifacts/count.txt"]).assert_ok();
    let v = p.run(&["verify"]);
    assert!(v.code == 0 && v.stdout.contains("store OK"), "{}", v.stdout);
    p.write("p.yaml", &format!("{PIPELINE}publish:\n  count.count: artifacts/objects/x\n"));
    let r = p.run(&["run", "p.yaml"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("`publish:` puts `count.count` at") && r.stderr.contains("publish it somewhere outside it"),
        "{}",
        r.stderr
    );
    assert!(p.run(&["verify"]).stdout.contains("store OK"));
}
