//! The stage kinds this binary knows. Adding a stage = a new crate + one line here. This is the
//! only module of the orchestrator that names stage crates.

use std::collections::BTreeMap;

use stage_api::Stage;

include!(concat!(env!("OUT_DIR"), "/fingerprints.rs"));

pub struct Registry {
    /// Each stage kind with the crate that implements it.
    stages: Vec<(Box<dyn Stage>, &'static str)>,
}

impl Registry {
    pub fn builtin() -> Registry {
        Registry {
            stages: vec![
                (Box::new(stage_command::CommandStage), "stage-command"),
                (Box::new(stage_corpus::CorpusStage), "stage-corpus"),
                (Box::new(stage_vocab::VocabStage), "stage-vocab"),
                (Box::new(stage_train::TrainStage), "stage-train"),
                (Box::new(stage_quantize::QuantizeStage), "stage-quantize"),
                (Box::new(stage_distill::DistillStage), "stage-distill"),
                (Box::new(stage_onnx::OnnxExportStage), "stage-onnx"),
                (Box::new(stage_onnx::OnnxCheckStage), "stage-onnx"),
                (Box::new(stage_benchmark::BenchmarkStage), "stage-benchmark"),
                (Box::new(stage_evaluate::EvaluateStage), "stage-evaluate"),
                (Box::new(stage_report::ReportStage), "stage-report"),
            ],
        }
    }

    pub fn get(&self, kind: &str) -> Option<&dyn Stage> {
        self.stages.iter().find(|(s, _)| s.kind() == kind).map(|(s, _)| s.as_ref())
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        let mut k: Vec<&'static str> = self.stages.iter().map(|(s, _)| s.kind()).collect();
        k.sort_unstable();
        k
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn Stage> {
        self.stages.iter().map(|(s, _)| s.as_ref())
    }

    /// The implementation fingerprint of `kind`, computed when this binary was built: one
    /// digest per workspace crate the kind builds from, and one for its locked external crates.
    /// Part of every cache key, so editing a stage's code (or a library it uses) reruns it.
    pub fn implementation(&self, kind: &str) -> BTreeMap<String, String> {
        let krate = self.stages.iter().find(|(s, _)| s.kind() == kind).map(|(_, c)| *c);
        let parts = FINGERPRINTS.iter().find(|(c, _)| Some(*c) == krate).map(|(_, p)| *p).unwrap_or(&[]);
        parts.iter().map(|(p, d)| (p.to_string(), d.to_string())).collect()
    }
}

/// `orchestrate report` renders a template exactly as the `report` stage does (same context
/// shape, functions and filters), so one template works in both. These functions are the
/// report stage's own, reached through here so that this file stays the only one in the
/// orchestrator that names a stage crate.
pub mod report_templates {
    use std::path::Path;

    use serde_json::Value;

    /// One horizontal bar per label, with its value (the report stage's bar plot): a metric
    /// across runs or sweep variants.
    pub fn bars(
        file: &Path,
        title: &str,
        labels: &[String],
        values: &[f64],
        value: &str,
        label: &str,
    ) -> Result<(), String> {
        stage_report::plots::bars(file, title, labels, values, value, label).map(|_| ()).map_err(|e| e.to_string())
    }

    /// Train (dashed) and validation (solid) loss against tokens seen, one colour per label
    /// (the report stage's plot): `series` is {label: [{tokens, train_loss, val_loss}, …]}.
    pub fn training_curves(file: &Path, series: &Value) -> Result<(), String> {
        stage_report::plots::training_curves(file, series).map(|_| ()).map_err(|e| e.to_string())
    }

    /// A CSV text as rows, as a template sees a CSV input.
    pub fn csv_rows(text: &str) -> Value {
        stage_report::csv_rows(text)
    }

    /// A stage output or file as the template sees it: JSON parsed, CSV as rows, text as text.
    pub fn load_input(path: &Path) -> Result<Value, String> {
        stage_report::load_input(path).map_err(|e| e.to_string())
    }

    /// Render `text` with `context` into `out_dir/file_name`; plots go beside it. With
    /// `append_provenance`, a template that does not call `provenance()` gets it appended.
    pub fn render_to(
        name: &str,
        text: &str,
        context: &Value,
        out_dir: &Path,
        file_name: &str,
        append_provenance: bool,
    ) -> Result<(), String> {
        stage_report::render_to(name, text, context, out_dir, file_name, append_provenance)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Every dotted name of `context` with a one-line sample of its value.
    pub fn names(context: &Value) -> Vec<(String, String)> {
        stage_report::names::paths(context)
            .into_iter()
            .map(|(p, v)| (stage_report::names::written(&p), stage_report::names::sample(v, 70)))
            .collect()
    }

    /// The template functions and filters, for `--vars`.
    pub const FUNCTIONS_AND_FILTERS: &str = stage_report::FUNCTIONS_AND_FILTERS;
}
