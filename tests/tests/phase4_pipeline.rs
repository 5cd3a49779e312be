//! pipelines/phase4.yaml end to end with tiny budgets: it runs cold, reruns fully cached,
//! replays every deterministic stage identically, and its report has every section and valid PNGs.

use e2e_tests::{Project, PHASE4_SMALL as SMALL};

#[test]
fn reduced_phase4_runs_caches_replays_and_reports() {
    let p = Project::new();
    let file = p.shipped_copy("phase4");
    let cli = p.pipeline(&file, SMALL);
    let store = p.store().display().to_string();
    let run = |a: Vec<String>| p.run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let cold = cli.run("run", &["--json"]);
    cold.assert_ok();
    let statuses = cold.statuses();
    assert_eq!(statuses.len(), 16, "{}", cold.stdout);
    assert!(statuses.iter().all(|(_, s)| s == "ran"), "{}", cold.stdout);
    // `publish:` put the report where the run says, with its plots.
    let published = p.path().join("reports/phase4");
    let outputs = &cold.json()["outputs"];
    assert_eq!(outputs[0]["path"], published.display().to_string(), "{outputs}");
    let md = std::fs::read_to_string(published.join("report.md")).unwrap();
    for png in md.split("](").skip(1).filter_map(|s| s.split(')').next()).filter(|s| s.ends_with(".png")) {
        assert!(published.join(png).is_file(), "{png} is linked from the published report but missing");
    }

    let warm = cli.run("run", &[]);
    warm.assert_ok();
    assert!(warm.stderr.contains("cached     report"), "{}", warm.stderr);
    let named = "report.report  reports/phase4  (folder of";
    assert!(warm.stderr.contains(named), "the run names the report's path:\n{}", warm.stderr);
    let warm = cli.run("run", &["--json"]);
    assert!(warm.statuses().iter().all(|(_, s)| s == "cached"), "{}", warm.stdout);

    let replay = cli.run("replay", &[]);
    assert_eq!(replay.code, 0, "every deterministic stage must reproduce:\n{}{}", replay.stdout, replay.stderr);
    for stage in [
        "corpus",
        "vocab@384",
        "vocab@1024",
        "teacher",
        "transformer",
        "int8",
        "int4",
        "student",
        "export_teacher",
        "export_int8",
        "report",
    ] {
        assert!(
            replay.stdout.lines().any(|l| l.starts_with(stage) && l.ends_with("yes")),
            "{stage}: {}",
            replay.stdout
        );
    }

    let dest = p.path().join("report");
    cli.run("export", &["report.report", dest.to_str().unwrap()]).assert_ok();
    let md = std::fs::read_to_string(dest.join("report.md")).unwrap();
    for section in [
        "## Headline",
        "## The original study's claims beside ours",
        "## Training",
        "## Quantization",
        "## Distillation, with its control",
        "## ONNX: tract and ONNX Runtime",
        "## Throughput and quality against size",
    ] {
        assert!(md.contains(section), "missing {section}:\n{md}");
    }
    for label in [
        "itera_f32",
        "itera_int8",
        "itera_int4",
        "student",
        "control",
        "transformer",
        "onnx_itera@tract",
        "onnx_itera@onnxruntime",
        "onnx_transformer@onnxruntime",
    ] {
        assert!(md.contains(&format!("| {label} |")), "headline row {label}:\n{md}");
    }
    assert!(!md.contains("| NO |") && !md.contains("DIFFERS") && !md.contains("DIFFERENT"), "{md}");
    // The cold run computed everything, and the report says so, per section and per stage.
    let commit = std::process::Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short=12", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let source = format!("*Source: `benchmark`, measured in this run — by commit {commit}");
    assert!(md.contains("## Provenance") && md.contains(&source), "{source}\n{md}");
    assert!(
        md.contains("| teacher | ") && !md.contains("| from cache |") && !md.contains(", from cache (measured"),
        "{md}"
    );
    let pngs: Vec<&str> = md
        .match_indices("](")
        .filter_map(|(i, _)| md[i + 2..].split(')').next())
        .filter(|l| l.ends_with(".png"))
        .collect();
    assert_eq!(pngs, ["training.png", "compression.png", "throughput.png", "quality_vs_size.png"]);
    for png in pngs {
        let bytes = std::fs::read(dest.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
        assert!(bytes.len() > 10_000, "{png}: {} bytes", bytes.len());
    }

    // `orchestrate report` renders the same template from the cache, with provenance, running nothing.
    let template = p.path().join("templates/phase4.md.j2").display().to_string();
    let out = p.path().join("cli/phase4.md");
    let report_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "report",
            template.as_str(),
            "--pipeline",
            file.as_str(),
            "--store",
            store.as_str(),
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(cli.set_flags().iter().cloned());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let objects_before = p.objects().len();
    run(report_args(&[])).assert_ok();
    let cli_md = std::fs::read_to_string(&out).unwrap();
    assert!(
        cli_md.contains("## Headline") && cli_md.contains("## Provenance") && cli_md.contains("| teacher |"),
        "{cli_md}"
    );
    assert!(p.path().join("cli/training.png").exists());
    assert_eq!(p.objects().len(), objects_before, "report must not run or store anything");
    assert!(cli_md.contains("*Source: `teacher`, from cache (measured "), "{cli_md}");
    let missing = run(report_args(&["--set", "steps=13"]));
    assert_ne!(missing.code, 0);
    assert!(missing.stderr.contains("not cached"), "{}", missing.stderr);

    // Only the benchmark changes: the report stage re-renders and marks what this run measured
    // (the benchmark) apart from what it took from the cache (everything upstream).
    let partial = cli.run("run", &["--json", "--set", "benchmark.generate=9"]);
    partial.assert_ok();
    let ran: Vec<String> = partial.statuses().into_iter().filter(|(_, s)| s == "ran").map(|(n, _)| n).collect();
    assert_eq!(ran, ["benchmark", "report"], "{}", partial.stdout);
    let dest2 = p.path().join("report2");
    cli.run("export", &["report.report", dest2.to_str().unwrap(), "--set", "benchmark.generate=9"]).assert_ok();
    let md2 = std::fs::read_to_string(dest2.join("report.md")).unwrap();
    assert!(md2.contains("*Source: `benchmark`, measured in this run — by commit "), "{md2}");
    assert!(md2.contains("*Source: `teacher`, from cache (measured "), "{md2}");
    assert!(md2.contains("*Source: `int8`, from cache (measured "), "{md2}");
    assert!(md2.lines().any(|l| l.starts_with("| benchmark | ") && l.contains("| computed |")), "{md2}");
    assert!(md2.lines().any(|l| l.starts_with("| student | ") && l.contains("| from cache |")), "{md2}");
}

#[test]
fn reduced_phase3_runs_and_reports() {
    let p = Project::new();
    let file = p.shipped_copy("phase3");
    let small = [
        "lrs=[0.001, 0.003, 0.01]",
        "short=8",
        "long=12",
        "batch=4",
        "seq_len=32",
        "eval_interval=4",
        "eval_tokens=512",
        "corpus.documents=300",
        "benchmark.runs=1",
        "benchmark.eval_tokens=256",
        "benchmark.generate=8",
    ];
    let cli = p.pipeline(&file, &small);
    cli.run("run", &[]).assert_ok();
    let dest = p.path().join("r3");
    cli.run("export", &["report.report", dest.to_str().unwrap()]).assert_ok();
    let md = std::fs::read_to_string(dest.join("report.md")).unwrap();
    for needle in [
        "## Who wins, at which budget",
        "| 8 steps | 1,024 |",
        "| 12 steps | 1,536 |",
        "## The learning-rate sweeps",
        "| model | budget | lr=0.001 | lr=0.003 | lr=0.01 |",
        "| Transformer tiny | long | ",
        "| Itera-Lite tiny |",
        "| Transformer tiny |",
        "## Training",
        "](training.png)",
        "](throughput.png)",
    ] {
        assert!(md.contains(needle), "missing {needle}:\n{md}");
    }
    // Each budget names its winner, and each sweep row marks exactly one best value.
    assert_eq!(md.matches(" wins**").count() + md.matches("tie at").count(), 2, "{md}");
    let sweep_rows: Vec<&str> = md
        .lines()
        .filter(|l| {
            l.starts_with("| Itera-Lite tiny | short")
                || l.starts_with("| Itera-Lite tiny | long")
                || l.starts_with("| Transformer tiny | short")
                || l.starts_with("| Transformer tiny | long")
        })
        .collect();
    assert_eq!(sweep_rows.len(), 4, "{md}");
    assert!(sweep_rows.iter().all(|r| r.matches("**").count() >= 2), "{md}");
    // The sweep's best variant is what the benchmark got, and `compare --sweep` ranks the same way.
    let table = p.run(&["compare", "--sweep", "itera_long", "--store", p.store().to_str().unwrap()]);
    table.assert_ok();
    assert!(table.stdout.contains("sweep of `itera_long`") && table.stdout.contains("lr=0.001"), "{}", table.stdout);
    for png in ["training.png", "throughput.png"] {
        assert_eq!(&std::fs::read(dest.join(png)).unwrap()[..4], b"\x89PNG");
    }
}
