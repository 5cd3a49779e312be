//! What a finished run leaves in the store: its run record (stages, manifests, how each
//! ended, what the run was given), which `runs`, `compare`, `gc` and the web view read.

use std::collections::BTreeMap;

use super::{RunLoop, State};
use crate::events::Status;
use crate::store::{now_unix, Provenance, RunRecord, RunStage, RUN_TAG};

impl RunLoop<'_> {
    /// The stages that ended with `status`, in DAG order.
    fn with_status(&self, status: Status) -> Vec<String> {
        let of = |i: usize| self.outcomes[i].as_ref().filter(|o| o.status == status).map(|o| o.stage.clone());
        self.dag.order.iter().filter_map(|&i| of(i)).collect()
    }

    /// Every considered stage's ending and upstream stages, in DAG order.
    fn recorded_stages(&self) -> Vec<RunStage> {
        (self.dag.order.iter())
            .filter_map(|&i| {
                let o = self.outcomes[i].as_ref()?;
                Some(RunStage {
                    name: o.stage.clone(),
                    status: o.status.as_str().to_string(),
                    needs: self.dag.upstream(i).into_iter().map(|j| self.p.stages[j].name.clone()).collect(),
                    error: o.error.clone(),
                    log_tail: o.log_tail.clone(),
                })
            })
            .collect()
    }

    /// Store the run record: every stage that is done, by name, with its manifest. Its id.
    pub(super) fn record(&self, status: &str) -> Option<String> {
        let manifests: BTreeMap<String, String> = (self.state.iter().enumerate())
            .filter_map(|(i, s)| match s {
                State::Done { manifest, .. } => Some((self.p.stages[i].name.clone(), manifest.clone())),
                _ => None,
            })
            .collect();
        let record = RunRecord {
            orchestrate: RUN_TAG.into(),
            format: 1,
            pipeline: self.p.name.clone(),
            pipeline_file: self.p.file.display().to_string(),
            started_at: self.started_at,
            finished_at: now_unix(),
            status: status.into(),
            manifests,
            sets: self.p.sets.clone(),
            targets: self.opts.targets.clone(),
            ran: Some(self.with_status(Status::Ran)),
            pulled: self.with_status(Status::Pulled),
            metrics: self.p.metrics.clone(),
            name: self.opts.name.clone(),
            source: self.source.clone(),
            provenance: Some(Provenance::here(None)),
            stages: self.recorded_stages(),
            by: crate::store::user_at_host(),
            renamed_at: None,
        };
        match self.store.record_run(&record) {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::warn!("could not record the run: {e}");
                None
            }
        }
    }
}
