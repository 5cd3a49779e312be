//! `orchestrate report` for a template written from docs/reports.md alone, against a cached
//! pipeline: it renders on the first try, `--vars` lists the names, an undefined name gets a
//! "did you mean", provenance is appended unless the template shows it or `--no-provenance`,
//! and the file ends with a newline.

use e2e_tests::{Project, Run};

const PIPELINE: &str = r#"name: metrics
stages:
  train:
    kind: command
    cmd: "printf '{\"val_loss\": 1.95, \"model\": \"itera\"}\n' > ${outputs.summary.json}; printf 'step,loss\n1,3.5\n2,2.25\n' > ${outputs.metrics.csv}"
    outputs: [summary.json, metrics.csv]
  bench:
    kind: command
    cmd: "printf '{\"models\": [{\"label\": \"a\", \"tok_s\": 1200}, {\"label\": \"b\", \"tok_s\": 800}]}\n' > ${outputs.bench.json}"
    outputs: [bench.json]
"#;

/// The worked example of docs/reports.md, as written there.
const TEMPLATE: &str = r#"# {{ run.pipeline }}: results

Validation loss of `train`: **{{ stages.train.summary_json.val_loss | fixed(3) }}**
{{ origin("train") }}

| step | loss |
|---|---|
{% for row in stages.train.metrics_csv %}| {{ row.step }} | {{ row.loss | fixed(2) }} |
{% endfor %}
![speed]({{ bars("speed.png", "forward speed", stages.bench.bench_json.models, "tok_s", "tokens/s") }})
"#;

fn cached_project() -> Project {
    let p = Project::new();
    p.write("p.yaml", PIPELINE);
    p.run(&["run", "p.yaml"]).assert_ok();
    p
}

fn report(p: &Project, template: &str, extra: &[&str]) -> Run {
    p.write("t.md.j2", template);
    let mut args = vec!["report", "t.md.j2", "--pipeline", "p.yaml", "-o", "out/r.md"];
    args.extend_from_slice(extra);
    p.run(&args)
}

#[test]
fn the_documented_example_renders_with_provenance_and_a_final_newline() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reports.md")).unwrap();
    let example = TEMPLATE.trim_end();
    assert!(docs.contains(example), "the template here must be the one docs/reports.md shows");
    let p = cached_project();
    let objects = p.objects().len();
    report(&p, TEMPLATE, &[]).assert_ok();
    let md = p.read("out/r.md");
    assert!(md.starts_with("# metrics: results\n"), "{md}");
    assert!(md.contains("Validation loss of `train`: **1.950**"), "{md}");
    assert!(md.contains("*Source: `train`, from cache (measured "), "{md}");
    assert!(md.contains("| 1 | 3.50 |\n| 2 | 2.25 |"), "{md}");
    assert!(md.contains("![speed](speed.png)"), "{md}");
    let png = std::fs::read(p.path().join("out/speed.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(md.matches("## Provenance").count(), 1, "provenance appended once: {md}");
    assert!(md.contains("| train |") && md.contains("| bench |"), "{md}");
    assert!(md.ends_with('\n') && !md.ends_with("\n\n\n"), "{md:?}");
    assert_eq!(p.objects().len(), objects, "rendering from the cache writes nothing to the store");
}

#[test]
fn provenance_is_not_doubled_and_can_be_left_out() {
    let p = cached_project();
    report(&p, "# x\n{{ provenance() }}\nend", &[]).assert_ok();
    let md = p.read("out/r.md");
    assert_eq!(md.matches("## Provenance").count(), 1, "{md}");
    assert!(md.ends_with("end\n"), "{md:?}");
    report(&p, "# x {{ stages.train.summary_json.model }}", &["--no-provenance"]).assert_ok();
    assert_eq!(p.read("out/r.md"), "# x itera\n");
}

#[test]
fn vars_lists_every_name_with_a_sample() {
    let p = cached_project();
    let r = p.run(&["report", "--vars", "--pipeline", "p.yaml"]);
    r.assert_ok();
    let line =
        |name: &str| r.stdout.lines().find(|l| l.trim_start().starts_with(&format!("{name} "))).map(str::to_string);
    assert!(line("stages.train.summary_json.val_loss").is_some_and(|l| l.ends_with("1.95")), "{}", r.stdout);
    assert!(
        line("stages.train.metrics_csv").is_some_and(|l| l.contains("list of 2 rows of {loss, step}")),
        "{}",
        r.stdout
    );
    assert!(line("run.git_commit").is_some(), "{}", r.stdout);
    assert!(r.stdout.contains("functions: training_curves(") && r.stdout.contains("filters: bytes"), "{}", r.stdout);
}

#[test]
fn an_undefined_name_suggests_the_closest_ones() {
    let p = cached_project();
    let r = report(&p, "loss {{ train.summary.val_loss }}\n", &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("t.md.j2:1"), "{}", r.stderr);
    assert!(r.stderr.contains("did you mean `stages.train.summary_json.val_loss`?"), "{}", r.stderr);
    let r = report(&p, "loss {{ inputs.train.val_loss }}\n", &[]);
    assert!(r.stderr.contains("`stages.train.summary_json.val_loss`"), "{}", r.stderr);
    assert!(!p.path().join("out/r.md").exists(), "nothing is written on an error");
}

#[test]
fn report_without_a_template_says_what_it_needs() {
    let p = cached_project();
    let r = p.run(&["report", "--pipeline", "p.yaml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("report needs TEMPLATE and -o OUT.md"), "{}", r.stderr);
}
