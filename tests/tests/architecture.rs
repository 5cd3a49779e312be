//! docs/architecture.md and the README's layout cannot go stale silently: the crate map's
//! "workspace deps" column must equal each crate's `Cargo.toml` dependencies (from `cargo
//! metadata`), every `crate::` path in an orchestrator module must point to a module listed
//! above it (so there are no import cycles), and the README's layout names every crate. And the
//! CI entry point runs the README's test command and fails when any step of it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Crate name → (path relative to the workspace root, normal dependencies inside the workspace).
fn workspace_crates() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(root())
        .output()
        .expect("running cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    let root_dir = std::fs::canonicalize(root()).unwrap();
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages.iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    packages
        .iter()
        .map(|p| {
            let manifest = PathBuf::from(p["manifest_path"].as_str().unwrap());
            let dir = manifest.parent().unwrap().strip_prefix(&root_dir).unwrap().display().to_string();
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_string())
                .filter(|n| names.contains(n))
                .collect();
            (p["name"].as_str().unwrap().to_string(), (dir, deps))
        })
        .collect()
}

/// Rows of the crate table: (path, crate, workspace deps) as documented.
fn documented_crates(doc: &str) -> Vec<(String, String, BTreeSet<String>)> {
    let section = doc.split("## Crates").nth(1).expect("a `## Crates` section").split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let unquote = |s: &str| s.split('`').nth(1).unwrap_or(s).to_string();
            let deps = cells[4]
                .split(',')
                .map(|d| d.split('(').next().unwrap().trim().to_string())
                .filter(|d| !d.is_empty() && d != "—")
                .collect();
            (unquote(cells[1]), unquote(cells[2]), deps)
        })
        .collect()
}

#[test]
fn crate_map_matches_cargo_toml() {
    let actual = workspace_crates();
    let documented = documented_crates(&read("docs/architecture.md"));
    let doc_names: BTreeSet<&str> = documented.iter().map(|(_, c, _)| c.as_str()).collect();
    let real_names: BTreeSet<&str> = actual.keys().map(String::as_str).collect();
    assert_eq!(doc_names, real_names, "docs/architecture.md's crate table must list every workspace crate");
    for (path, name, deps) in &documented {
        let (real_path, real_deps) = &actual[name];
        assert_eq!(path, real_path, "crate `{name}`: documented path");
        assert_eq!(deps, real_deps, "crate `{name}`: documented workspace deps vs Cargo.toml");
    }
}

#[test]
fn readme_layout_lists_every_crate() {
    let readme = read("README.md");
    let layout = readme.split("## Layout").nth(1).expect("README has a Layout section");
    for (name, (path, _)) in workspace_crates() {
        assert!(
            layout.lines().any(|l| l.starts_with(&path) && l.contains(&format!("`{name}`"))),
            "README's layout has no line for `{name}` at {path}"
        );
    }
}

/// The documented bottom-up order of the orchestrator's modules.
fn module_order(doc: &str) -> Vec<String> {
    let section = doc.split("## The orchestrator's modules, bottom up").nth(1).expect("modules section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| {
            let (num, rest) = l.split_once(". `")?;
            num.trim().parse::<u32>().ok()?;
            Some(rest.split('`').next()?.to_string())
        })
        .collect()
}

/// Every `.rs` file of module `name` (a file `name.rs` or a folder `name/`).
fn module_files(src: &Path, name: &str) -> Vec<PathBuf> {
    let file = src.join(format!("{name}.rs"));
    if file.exists() {
        return vec![file];
    }
    let mut out = Vec::new();
    let mut stack = vec![src.join(name)];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("module `{name}`: {}: {e}", dir.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn orchestrator_modules_only_use_modules_below_them() {
    let order = module_order(&read("docs/architecture.md"));
    let src = root().join("orchestrator/src");
    let lib = read("orchestrator/src/lib.rs");
    let declared: BTreeSet<String> =
        lib.lines().filter_map(|l| l.strip_prefix("pub mod ")).map(|m| m.trim_end_matches(';').to_string()).collect();
    assert_eq!(declared, order.iter().cloned().collect(), "docs/architecture.md lists every module of lib.rs once");
    for (rank, name) in order.iter().enumerate() {
        for file in module_files(&src, name) {
            let text = std::fs::read_to_string(&file).unwrap();
            for (at, _) in text.match_indices("crate::") {
                let used: String =
                    text[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let used_rank = order.iter().position(|m| *m == used);
                assert!(
                    used_rank.is_some_and(|r| r < rank),
                    "{} (module `{name}`) uses `crate::{used}`, which is not below it in docs/architecture.md",
                    file.display()
                );
            }
        }
    }
}

#[test]
fn only_the_registry_names_stage_crates() {
    let src = root().join("orchestrator/src");
    let stage_crates: Vec<String> = workspace_crates()
        .keys()
        .filter(|n| n.starts_with("stage-") && *n != "stage-api")
        .map(|n| n.replace('-', "_"))
        .collect();
    for name in module_order(&read("docs/architecture.md")) {
        if name == "registry" {
            continue;
        }
        for file in module_files(&src, &name) {
            let text = std::fs::read_to_string(&file).unwrap();
            for c in &stage_crates {
                assert!(!text.contains(&format!("{c}::")), "{} names the stage crate {c}", file.display());
            }
        }
    }
}

/// `.ci/run` holds the README's test command verbatim, and a failing step stops it with that
/// step's status: run on a copy whose `.ci/setup` fails, it exits 3 and runs nothing after.
#[test]
fn ci_runs_the_readme_test_command_and_fails_when_a_step_fails() {
    let readme = read("README.md");
    let command = readme
        .lines()
        .find(|l| l.ends_with("# all checks and tests"))
        .and_then(|l| l.split("   #").next())
        .expect("README's test command");
    let run = read(".ci/run");
    assert!(run.contains(command), ".ci/run does not run README's test command `{command}`:\n{run}");
    let copy = tempfile::tempdir().expect("temp dir");
    let ci = copy.path().join(".ci");
    std::fs::create_dir_all(&ci).unwrap();
    std::fs::write(ci.join("run"), &run).unwrap();
    std::fs::write(ci.join("setup"), "exit 3\n").unwrap();
    std::fs::write(ci.join("slurm"), "touch ran-after-setup\n").unwrap();
    let out = Command::new("bash").arg(ci.join("run")).output().expect("running .ci/run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("== FAILED (exit 3)") && !stdout.contains("== done"), "{stdout}");
    assert!(!copy.path().join("ran-after-setup").exists(), "a step ran after the failed one");
}
