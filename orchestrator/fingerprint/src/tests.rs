use std::path::Path;

use super::*;

/// A workspace of three crates: `b` uses `a`; `c` uses the external `ext`.
fn workspace(dir: &Path) {
    let w = |rel: &str, text: &str| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    w("Cargo.toml", "[workspace]\nmembers = [\"a\", \"b\", \"c\"]\n");
    w("a/Cargo.toml", "[package]\nname = \"a\"\n");
    w("a/src/lib.rs", "pub fn f() {}\n#[cfg(test)]\nmod tests;\n");
    w("a/src/tests.rs", "#[test]\nfn t() {}\n");
    w("b/Cargo.toml", "[package]\nname = \"b\"\n[dependencies]\na = { path = \"../a\" }\n");
    w("b/src/lib.rs", "pub fn g() { a::f() }\n");
    w("c/Cargo.toml", "[package]\nname = \"c\"\n[dependencies]\next = \"1\"\n");
    w("c/src/lib.rs", "pub fn h() {}\n");
    w(
        "Cargo.lock",
        "version = 4\n[[package]]\nname = \"ext\"\nversion = \"1.0.0\"\ndependencies = [\"inner\"]\n\
         [[package]]\nname = \"inner\"\nversion = \"0.3.0\"\n",
    );
}

fn all(root: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    fingerprints(root, &["a", "b", "c"]).unwrap()
}

#[test]
fn a_source_edit_changes_its_crate_and_its_dependents_only() {
    let dir = tempfile::tempdir().unwrap();
    workspace(dir.path());
    let before = all(dir.path());
    assert_eq!(before["b"].keys().collect::<Vec<_>>(), ["a", "b", EXTERNAL]);
    std::fs::write(dir.path().join("a/src/lib.rs"), "pub fn f() { let _ = 1; }\n").unwrap();
    let after = all(dir.path());
    assert_ne!(before["a"], after["a"]);
    assert_ne!(before["b"]["a"], after["b"]["a"]);
    assert_eq!(before["b"]["b"], after["b"]["b"]);
    assert_eq!(before["c"], after["c"]);
}

#[test]
fn unit_tests_do_not_count_but_locked_versions_do() {
    let dir = tempfile::tempdir().unwrap();
    workspace(dir.path());
    let before = all(dir.path());
    std::fs::write(dir.path().join("a/src/tests.rs"), "#[test]\nfn other() {}\n").unwrap();
    assert_eq!(before, all(dir.path()), "editing a unit-test file changes nothing");
    let lock = std::fs::read_to_string(dir.path().join("Cargo.lock")).unwrap();
    std::fs::write(dir.path().join("Cargo.lock"), lock.replace("0.3.0", "0.3.1")).unwrap();
    let after = all(dir.path());
    assert_ne!(before["c"][EXTERNAL], after["c"][EXTERNAL], "a transitive external version is covered");
    assert_eq!(before["a"], after["a"]);
}

#[test]
fn unknown_crates_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    workspace(dir.path());
    assert!(fingerprints(dir.path(), &["nope"]).unwrap_err().contains("`nope`"));
}

/// The real workspace, copied: editing one file of the models library changes the ML stages'
/// fingerprints and leaves `command`, `corpus`, `vocab` and `report` alone.
#[test]
fn a_models_library_edit_changes_the_ml_stages_only() {
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path();
    for f in ["Cargo.toml", "Cargo.lock"] {
        std::fs::copy(real.join(f), copy.join(f)).unwrap();
    }
    let members = members(&real).unwrap();
    for m in members.values() {
        let rel = m.dir.strip_prefix(&real).unwrap();
        for file in source_files(&m.dir) {
            let to = copy.join(rel).join(&file);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(m.dir.join(&file), to).unwrap();
        }
    }
    let stages = [
        "stage-command",
        "stage-corpus",
        "stage-vocab",
        "stage-train",
        "stage-quantize",
        "stage-distill",
        "stage-onnx",
        "stage-benchmark",
        "stage-report",
    ];
    let before = fingerprints(copy, &stages).unwrap();
    assert_eq!(before, fingerprints(&real, &stages).unwrap(), "the copy fingerprints as the original");
    let scan = copy.join("stages/lib/models/src/scan.rs");
    let text = std::fs::read_to_string(&scan).unwrap();
    std::fs::write(&scan, text + "\n// edited\n").unwrap();
    let after = fingerprints(copy, &stages).unwrap();
    for s in ["stage-train", "stage-quantize", "stage-distill", "stage-onnx", "stage-benchmark"] {
        assert_ne!(before[s]["itera-models"], after[s]["itera-models"], "{s}");
        assert_eq!(before[s][s], after[s][s], "{s}: its own sources did not change");
    }
    for s in ["stage-command", "stage-corpus", "stage-vocab", "stage-report"] {
        assert_eq!(before[s], after[s], "{s} does not build from itera-models");
    }
}
