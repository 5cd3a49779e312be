use serde_json::json;

use super::{format_bytes, format_int, provenance, render};

fn png_ok(path: &std::path::Path) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert!(b.len() > 5_000, "{} is suspiciously small ({} bytes): text or marks missing?", path.display(), b.len());
}

#[test]
fn renders_filters_tables_and_every_plot() {
    let dir = tempfile::tempdir().unwrap();
    let rows = |s: f64| json!([{"tokens": 1000, "train_loss": 3.0 * s, "val_loss": 2.9 * s}, {"tokens": 2000, "train_loss": 2.0 * s, "val_loss": 2.1 * s}]);
    let ctx = json!({"inputs": {"a": rows(1.0), "b": rows(1.2), "bench": {"models": [{"label": "x", "bytes": 3500000, "ppl": 2.84}, {"label": "y", "bytes": 690000, "ppl": 3.17}]}}});
    let tmpl = r#"# Report
| model | bytes | perplexity |
|---|---|---|
{% for m in inputs.bench.models %}| {{ m.label }} | {{ m.bytes | bytes }} | {{ m.ppl | fixed(3) }} |
{% endfor %}
ratio {{ 3.9 | ratio }}, change {{ 0.00028 | signed_pct }}, share {{ 0.5 | pct }}, n {{ 874528 | int }}
![curves]({{ training_curves("curves.png", {"Itera": inputs.a, "Transformer": inputs.b}) }})
![bars]({{ bars("bars.png", "forward tokens/s", [{"label": "native", "fwd": {"median": 6000}}, {"label": "tract", "fwd": {"median": 480}}, {"label": "ort", "fwd": {"median": 16000}}], "fwd.median", "tokens/s") }})
![scatter]({{ scatter("scatter.png", "quality vs size", inputs.bench.models, ["bytes", "bytes"], ["ppl", "perplexity"]) }})
![chain]({{ progression("chain.png", [{"label": "f32", "params": 874528, "bytes": 3505897, "perplexity": 2.84}, {"label": "int8", "params": 874528, "bytes": 1067328, "perplexity": 2.844}]) }})
"#;
    let text = render("t.md.j2", tmpl, &ctx, dir.path()).unwrap();
    assert!(text.contains("| x | 3.50 MB | 2.840 |"), "{text}");
    assert!(text.contains("ratio 3.90×, change +0.028 %, share 50.00 %, n 874,528"), "{text}");
    for f in ["curves.png", "bars.png", "scatter.png", "chain.png"] {
        assert!(text.contains(&format!("]({f})")));
        png_ok(&dir.path().join(f));
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("report.md")).unwrap(), text);
    if let Some(keep) = std::env::var_os("REPORT_TEST_KEEP") {
        for f in ["curves.png", "bars.png", "scatter.png", "chain.png"] {
            std::fs::copy(dir.path().join(f), std::path::Path::new(&keep).join(f)).unwrap();
        }
    }
}

#[test]
fn template_errors_name_the_template_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let e = render("phase4.md.j2", "ok\nline two\n{{ inputs.missing.value }}\n", &json!({"inputs": {}}), dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("phase4.md.j2:3"), "{e}");
    let e = render("x.md.j2", "{% for %}", &json!({}), dir.path()).unwrap_err().to_string();
    assert!(e.contains("x.md.j2:1"), "{e}");
}

/// A plot never draws a mark for data it does not have: an item with no name, items that are
/// not a list, a step missing a number are errors naming them. `run.stages` entries are named
/// by their `stage`.
#[test]
fn plots_refuse_items_they_cannot_name_or_place() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = json!({"run": {"stages": [{"stage": "fit@n=3", "metrics": {"score": 3.1}}, {"stage": "fit@n=5", "metrics": {"score": 5.1}}]}});
    let render_err = |t: &str| render("t.md.j2", t, &ctx, dir.path()).unwrap_err().to_string();
    let ok = render("t.md.j2", r#"{{ bars("b.png", "s", run.stages, "metrics.score", "score") }}"#, &ctx, dir.path());
    assert_eq!(ok.unwrap(), "b.png\n");
    png_ok(&dir.path().join("b.png"));
    let e = render_err(r#"{{ bars("b.png", "s", [{"v": 1}, {"v": 2}], "v", "score") }}"#);
    assert!(e.contains("bars: item 0 has no `label` (the name its mark is drawn with): {v}"), "{e}");
    let e = render_err(
        r#"{{ scatter("s.png", "s", [{"label": "a", "x": 1, "y": 2}, {"x": 2, "y": 3}], ["x", "x"], ["y", "y"]) }}"#,
    );
    assert!(e.contains("scatter: item 1 has no `label`"), "{e}");
    let e = render_err(r#"{{ bars("b.png", "s", run, "v", "score") }}"#);
    assert!(e.contains("bars: the items must be a list of objects, got {stages}"), "{e}");
    let e = render_err(r#"{{ progression("p.png", [{"label": "f32", "params": 1, "bytes": 2}]) }}"#);
    assert!(e.contains("progression: step 0 has no `perplexity`"), "{e}");
    let e =
        render_err(r#"{{ progression("p.png", [{"label": "f32", "params": 1, "bytes": "big", "perplexity": 2}]) }}"#);
    assert!(e.contains("progression: step `f32`'s `bytes` is not a number"), "{e}");
}

#[test]
fn number_formats() {
    assert_eq!(format_bytes(512.0), "512 B");
    assert_eq!(format_bytes(1_067_328.0), "1.07 MB");
    assert_eq!(format_int(-1234567.0), "-1,234,567");
}

#[test]
fn sections_say_whether_this_run_measured_them() {
    let dir = tempfile::tempdir().unwrap();
    let run = json!({
        "date": "2026-11-27T09:00:00Z", "rendered_from": "this run's report stage", "pipeline": "p", "pipeline_file": "p.yaml",
        "pipeline_digest": "0123456789abcdef0123", "git_commit": null,
        "stages": [
            {"stage": "train", "key": "aaaaaaaaaaaaaaaaaaaa", "cached": true, "computed_at": "2026-11-26T08:00:00Z", "duration_s": 61.0},
            {"stage": "bench", "key": "bbbbbbbbbbbbbbbbbbbb", "cached": false, "computed_at": "2026-11-27T08:59:00Z", "duration_s": 2.5}
        ],
        "by_stage": {
            "train": {"stage": "train", "cached": true, "computed_at": "2026-11-26T08:00:00Z"},
            "bench": {"stage": "bench", "cached": false, "computed_at": "2026-11-27T08:59:00Z"}
        }
    });
    let tmpl =
        "{{ origin(\"train\") }}\n{{ origin(\"bench\") }}\n{{ origin(\"bench\", \"train\") }}\n{{ provenance() }}";
    let text = render("t.md.j2", tmpl, &json!({"run": run}), dir.path()).unwrap();
    assert!(text.contains("*Source: `train`, from cache (measured 2026-11-26T08:00:00Z).*"), "{text}");
    assert!(text.contains("*Source: `bench`, measured in this run.*"), "{text}");
    assert!(
        text.contains("*Source: `bench`, measured in this run; `train`, from cache (measured 2026-11-26T08:00:00Z).*"),
        "{text}"
    );
    assert!(text.contains("| train | aaaaaaaaaaaaaaaa… | from cache | 2026-11-26T08:00:00Z | 61.0 s |"), "{text}");
    assert!(text.contains("| bench | bbbbbbbbbbbbbbbb… | computed | 2026-11-27T08:59:00Z | 2.5 s |"), "{text}");
    // Rendered without a run (a stage run by hand): sources named, no provenance section.
    let bare = render("t.md.j2", tmpl, &json!({}), dir.path()).unwrap();
    assert!(bare.contains("*Source: `train`.*") && !bare.contains("Provenance"), "{bare}");
    // The pipeline's repository: its commit, and whether tracked files had changes.
    let mut at = run.clone();
    at["git_commit"] = json!("0123456789abcdef0123456789abcdef01234567");
    assert!(provenance(&at).contains("blake3 0123456789abcdef…), git commit 0123456789ab."), "{}", provenance(&at));
    at["git_dirty"] = json!(true);
    let dirty = provenance(&at);
    assert!(dirty.contains("git commit 0123456789ab with uncommitted changes."), "{dirty}");
}

#[test]
fn tick_units_read_as_people_write_them() {
    use super::plots::{tick, Unit};
    assert_eq!(tick(100_000.0, Unit::Count), "100k");
    assert_eq!(tick(150_000.0, Unit::Count), "150k");
    assert_eq!(tick(1_500_000.0, Unit::Count), "1.5M");
    assert_eq!(tick(950.0, Unit::Count), "950");
    assert_eq!(tick(0.0, Unit::Count), "0");
    assert_eq!(tick(1_200_000.0, Unit::Bytes), "1.2 MB");
    assert_eq!(tick(766_440.0, Unit::Bytes), "766 kB");
    assert_eq!(tick(512.0, Unit::Bytes), "512 B");
    assert_eq!(tick(2.5, Unit::Plain), "2.5");
    assert_eq!(tick(20.0, Unit::Plain), "20");
    assert_eq!(tick(0.125, Unit::Plain), "0.125");
    assert_eq!(Unit::for_axis("bytes on disk", 10.0), Unit::Bytes);
    assert_eq!(Unit::for_axis("tokens/s", 130_000.0), Unit::Count);
    assert_eq!(Unit::for_axis("perplexity", 20.0), Unit::Plain);
}

/// No tick is a raw float like `1000000.0` or `0.000`: at most 4 significant characters before
/// a unit, and no trailing `.0`.
fn readable(ticks: &[String]) -> bool {
    !ticks.is_empty()
        && ticks.iter().all(|t| {
            let number: String = t.chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-').collect();
            number.len() <= 5 && !number.ends_with(".0") && !number.ends_with('.')
        })
}

#[test]
fn every_plot_kind_has_titled_axes_and_readable_ticks() {
    use super::plots;
    let dir = tempfile::tempdir().unwrap();
    let rows = |s: f64| {
        json!([{"tokens": 102_400, "train_loss": 5.1 * s, "val_loss": 4.7 * s},
               {"tokens": 307_200, "train_loss": 3.0 * s, "val_loss": 3.2 * s},
               {"tokens": 614_400, "train_loss": 2.0 * s, "val_loss": 2.1 * s}])
    };
    let curves = plots::training_curves(&dir.path().join("c.png"), &json!({"a": rows(1.0), "b": rows(1.2)})).unwrap();
    assert_eq!((curves.x_desc.as_str(), curves.y_desc.as_str()), ("tokens seen", "loss (nats/token)"));
    assert!(readable(&curves.x_ticks) && curves.x_ticks.iter().any(|t| t.ends_with('k')), "{:?}", curves.x_ticks);
    assert!(readable(&curves.y_ticks), "{:?}", curves.y_ticks);
    assert_eq!(curves.legend, ["a", "b"]);

    let labels: Vec<String> =
        ["control", "itera_f32", "onnx_transformer@onnxruntime", "onnx_itera@tract"].map(String::from).to_vec();
    let bars = plots::bars(
        &dir.path().join("b.png"),
        "t",
        &labels,
        &[130_927.0, 34_376.0, 41_968.0, 1_035.0],
        "tokens/s",
        "model",
    )
    .unwrap();
    assert_eq!((bars.x_desc.as_str(), bars.y_desc.as_str()), ("tokens/s", "model"));
    assert!(readable(&bars.x_ticks) && bars.x_ticks.iter().any(|t| t.ends_with('k')), "{:?}", bars.x_ticks);
    let mut named = bars.y_ticks.clone();
    named.reverse();
    assert_eq!(named, labels, "every model named once, on its own row, the first on top");

    let pts =
        json!([["control", 766_440.0, 10.1], ["itera_f32", 3_650_000.0, 7.03], ["itera_int8", 1_220_000.0, 7.04]]);
    let sc = plots::scatter(&dir.path().join("s.png"), "t", &pts, "bytes on disk", "validation perplexity").unwrap();
    assert!(readable(&sc.x_ticks) && sc.x_ticks.iter().all(|t| t.ends_with("B")), "{:?}", sc.x_ticks);
    assert!(readable(&sc.y_ticks), "{:?}", sc.y_ticks);
    assert_eq!(sc.legend, ["control", "itera_f32", "itera_int8"], "points are named in a legend");

    let steps = json!([{"label": "f32", "params": 911_648, "bytes": 3_650_000, "perplexity": 7.03},
                       {"label": "int8", "params": 911_648, "bytes": 1_220_000, "perplexity": 7.04},
                       {"label": "student", "params": 190_232, "bytes": 766_440, "perplexity": 10.98}]);
    let panels = plots::progression(&dir.path().join("p.png"), &steps).unwrap();
    assert_eq!(panels.len(), 3);
    assert!(panels.iter().all(|a| !a.x_desc.is_empty() && a.y_desc == "step"));
    assert!(panels[1].x_ticks.iter().all(|t| t.ends_with("B")), "{:?}", panels[1].x_ticks);
    assert!(panels.iter().all(|a| readable(&a.x_ticks)), "{panels:?}");
    for f in ["c.png", "b.png", "s.png", "p.png"] {
        png_ok(&dir.path().join(f));
    }
}
