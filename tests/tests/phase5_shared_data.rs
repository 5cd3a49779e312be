//! pipelines/phase5.yaml end to end on the shared data folder (`../shared/data` beside the
//! repository: WikiText-2 test/valid and TinyStories) with tiny budgets: zero-shot and
//! in-domain evaluation, bits/byte beside nats/token, the cost per 1k tokens in CPU-seconds and
//! joules only where RAPL is readable, a fully cached rerun, a bit-identical replay of the
//! scores, and the report. Without the shared data folder these tests fail, naming it.

use std::path::{Path, PathBuf};

use e2e_tests::{PipelineCli, Project};
use serde_json::Value;

/// The shared data folder, which must be there (CI has it beside the clone).
fn shared_data() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data");
    for f in ["wikitext-2/test.txt", "wikitext-2/valid.txt", "tinystories/TinyStories-train-prefix-2MiB.txt"] {
        assert!(
            dir.join(f).is_file(),
            "MISSING SHARED DATA: {} not found. The phase5 tests need the shared data folder \
             (WikiText-2, TinyStories) at ../shared/data beside the repository, as on the CI \
             machines; see README, 'Phase 5'.",
            dir.join(f).display()
        );
    }
    dir.canonicalize().unwrap_or(dir)
}

/// Tiny budgets: the zero-shot models and the WikiText-2 sweep train 12 steps; each text is
/// scored on its first 20,000 bytes; generation is measured once over 8 tokens.
const SMALL: &[&str] = &[
    "steps=12",
    "wiki_steps=12",
    "batch=4",
    "seq_len=32",
    "wiki_lrs=[0.003, 0.01]",
    "test_bytes=20000",
    "stories_bytes=20000",
    "generate=8",
    "generate_runs=1",
    "stories.source=[file:../../shared/data/tinystories/TinyStories-train-prefix-2MiB.txt]",
    "int8.eval_tokens=1024",
    "int4.eval_tokens=1024",
    "wiki_int8.eval_tokens=1024",
    "wiki_int4.eval_tokens=1024",
    "int8.bench_runs=1",
    "int4.bench_runs=1",
    "wiki_int8.bench_runs=1",
    "wiki_int4.bench_runs=1",
];

/// The repository's layout inside the project: `proj/pipelines/phase5.yaml`, `proj/templates/`,
/// and `shared` → the real shared data's parent, so `../../shared/data` resolves as it does
/// in the repository.
fn phase5_project(p: &Project) -> String {
    let data = shared_data();
    std::os::unix::fs::symlink(data.parent().unwrap(), p.path().join("shared")).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let file =
        p.write("proj/pipelines/phase5.yaml", &std::fs::read_to_string(repo.join("pipelines/phase5.yaml")).unwrap());
    let template = std::fs::read_to_string(repo.join("templates/phase5.md.j2")).unwrap();
    p.write("proj/templates/phase5.md.j2", &template);
    file.display().to_string()
}

fn exported(p: &Project, cli: &PipelineCli, output: &str) -> Value {
    let dest = p.path().join("exported").join(output);
    cli.run("export", &[output, dest.to_str().unwrap()]).assert_ok();
    serde_json::from_str(&std::fs::read_to_string(&dest).unwrap()).unwrap()
}

fn model<'a>(evaluation: &'a Value, label: &str) -> &'a Value {
    evaluation["models"].as_array().unwrap().iter().find(|m| m["label"] == label).unwrap()
}

/// Whether this host's kernel has a readable RAPL package counter.
fn host_has_rapl() -> bool {
    let root = Path::new("/sys/class/powercap");
    std::fs::read_dir(root).into_iter().flatten().flatten().any(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        name.strip_prefix("intel-rapl:").is_some_and(|r| !r.contains(':'))
            && std::fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.starts_with("package"))
            && std::fs::read_to_string(e.path().join("energy_uj")).is_ok()
    })
}

#[test]
fn phase5_on_shared_data_scores_costs_caches_replays_and_reports() {
    let p = Project::new();
    let file = phase5_project(&p);
    let cli = p.pipeline(&file, SMALL);
    let cold = cli.run("run", &["--json"]);
    cold.assert_ok();
    let statuses = cold.statuses();
    assert_eq!(statuses.len(), 20, "{}", cold.stdout);
    assert!(statuses.iter().all(|(_, s)| s == "ran"), "{}", cold.stdout);

    // Zero-shot: six TinyStories models on the first 20,000 bytes of WikiText-2 test.
    let zero = exported(&p, &cli, "zero_shot.evaluation.json");
    let test_bytes = std::fs::metadata(shared_data().join("wikitext-2/test.txt")).unwrap().len();
    assert_eq!(zero["text"]["of_file_bytes"], test_bytes, "{}", zero["text"]);
    let scored = zero["text"]["bytes"].as_u64().unwrap();
    // Cut after the last whole line within the limit (WikiText-2 lines are paragraphs).
    assert!(scored <= 20_000 && scored > 15_000, "{}", zero["text"]);
    assert!(zero["text"]["unknown_tokens"].as_u64().unwrap() > 0, "WikiText-2's <unk> markers are counted");
    for label in ["itera_f32", "itera_int8", "itera_int4", "student", "control", "transformer"] {
        let m = model(&zero, label);
        let (bpb, nats) = (m["bits_per_byte"].as_f64().unwrap(), m["nats_per_token"].as_f64().unwrap());
        assert!(bpb.is_finite() && bpb > 0.0 && nats > 0.0, "{m}");
        let bytes = m["bytes_scored"].as_u64().unwrap();
        assert!(bytes < scored && bytes + 8 > scored, "all but the first token's bytes: {m}");
        // bits/byte = nats/token × tokens/byte ÷ ln 2, from the same sums.
        let tokens = m["tokens_scored"].as_f64().unwrap();
        assert!((bpb - nats * tokens / bytes as f64 / std::f64::consts::LN_2).abs() < 1e-9, "{m}");
    }
    // Trained on WikiText-2, the same architecture does better on WikiText-2 than zero-shot.
    let in_domain = exported(&p, &cli, "in_domain.evaluation.json");
    for label in ["itera_f32", "transformer"] {
        let (d, z) = (model(&in_domain, label), model(&zero, label));
        assert!(d["bits_per_byte"].as_f64() < z["bits_per_byte"].as_f64(), "{label}: in-domain {d} vs zero-shot {z}");
    }
    let show = cli.run("show", &["in_domain"]);
    show.assert_ok();
    assert!(show.stdout.contains("wiki_itera@lr=") && show.stdout.contains("wiki_transformer@lr="), "{}", show.stdout);

    // The cost: CPU-seconds always; joules exactly when this host has RAPL.
    let cost = exported(&p, &cli, "zero_shot.energy.json");
    let rapl = host_has_rapl();
    assert_eq!(cost["has_joules"], rapl, "{}", cost["measured"]);
    for c in cost["models"].as_array().unwrap() {
        for phase in ["scoring", "generation"] {
            assert!(c[phase]["cpu_seconds_per_1k"].as_f64().unwrap() > 0.0, "{c}");
            assert_eq!(c[phase]["joules_per_1k"].is_number(), rapl, "{c}");
        }
        assert_eq!(c["generation"]["units"], 8);
    }

    // The report, published with its plots.
    let published = p.path().join("proj/reports/phase5");
    let md = std::fs::read_to_string(published.join("report.md")).unwrap();
    for section in [
        "## Zero-shot: TinyStories models on WikiText-2",
        "## In-domain: trained on WikiText-2 valid, scored on WikiText-2 test",
        "### The learning-rate sweeps",
        "## What a token costs",
        "### The original's energy claim beside what was measured",
        "## Provenance",
    ] {
        assert!(md.contains(section), "missing {section}:\n{md}");
    }
    assert_eq!(md.contains("no joules are reported"), !rapl, "{md}");
    assert!(md.contains("| Itera-Lite tiny INT4 | int4 |"), "{md}");
    for png in md.split("](").skip(1).filter_map(|s| s.split(')').next()).filter(|s| s.ends_with(".png")) {
        let bytes = std::fs::read(published.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }

    let warm = cli.run("run", &["--json"]);
    assert!(warm.statuses().iter().all(|(_, s)| s == "cached"), "{}", warm.stdout);
    // Scores are deterministic; the cost file is volatile and is reported, not held to identity.
    let replay = cli.run("replay", &["--stage", "zero_shot", "--stage", "in_domain"]);
    assert_eq!(replay.code, 0, "{}{}", replay.stdout, replay.stderr);
    for stage in ["zero_shot", "in_domain"] {
        assert!(
            replay.stdout.lines().any(|l| l.starts_with(stage) && l.ends_with("yes")),
            "{stage}: {}",
            replay.stdout
        );
    }
}
