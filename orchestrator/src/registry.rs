//! The stage kinds this binary knows. Adding a stage = a new crate + one line here. This is the
//! only module of the orchestrator that names stage crates.

use stage_api::Stage;

pub struct Registry {
    stages: Vec<Box<dyn Stage>>,
}

impl Registry {
    pub fn builtin() -> Registry {
        Registry {
            stages: vec![
                Box::new(stage_command::CommandStage),
                Box::new(stage_corpus::CorpusStage),
                Box::new(stage_vocab::VocabStage),
                Box::new(stage_train::TrainStage),
                Box::new(stage_quantize::QuantizeStage),
                Box::new(stage_distill::DistillStage),
                Box::new(stage_onnx::OnnxExportStage),
                Box::new(stage_onnx::OnnxCheckStage),
                Box::new(stage_benchmark::BenchmarkStage),
                Box::new(stage_report::ReportStage),
            ],
        }
    }

    pub fn get(&self, kind: &str) -> Option<&dyn Stage> {
        self.stages.iter().find(|s| s.kind() == kind).map(|s| s.as_ref())
    }

    pub fn kinds(&self) -> Vec<&'static str> {
        let mut k: Vec<&'static str> = self.stages.iter().map(|s| s.kind()).collect();
        k.sort_unstable();
        k
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn Stage> {
        self.stages.iter().map(|s| s.as_ref())
    }
}

/// `orchestrate report` renders a template exactly as the `report` stage does (same context
/// shape, functions and filters), so one template works in both. These two functions are the
/// report stage's own, reached through here so that this file stays the only one in the
/// orchestrator that names a stage crate.
pub mod report_templates {
    use std::path::Path;

    use serde_json::Value;

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
        stage_report::names::paths(context).into_iter().map(|(p, v)| (p, stage_report::names::sample(v, 70))).collect()
    }

    /// The template functions and filters, for `--vars`.
    pub const FUNCTIONS_AND_FILTERS: &str = stage_report::FUNCTIONS_AND_FILTERS;
}
