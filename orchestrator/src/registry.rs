//! The stage kinds this binary knows. Adding a stage = a new crate + one line here.

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
