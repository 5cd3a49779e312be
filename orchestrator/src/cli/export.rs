//! `orchestrate export`: copy a stage's outputs (or one, or every stage's) out of the store.

use std::path::PathBuf;

use anyhow::{anyhow, bail};

use super::{unknown_stage, Env, Failure, PipelineArgs};
use crate::diag::Diagnostic;
use crate::history::{resolve, short, Run};
use crate::pipeline::Pipeline;
use crate::store::{Manifest, Store};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    pub(super) p: PipelineArgs,
    /// STAGE or STAGE.OUTPUT (omit with --all).
    target: Option<String>,
    /// Where to: a new path; or a folder (existing, or named with a trailing `/`), which gets
    /// DEST/OUTPUT for STAGE.OUTPUT and DEST/<output> for each of a STAGE's outputs.
    dest: Option<PathBuf>,
    /// Export every stage's outputs to DEST/<stage>/<output>.
    #[arg(long, value_name = "DEST", conflicts_with = "dest")]
    all: Option<PathBuf>,
    /// Take the results a past run of the pipeline recorded (`latest~N`, a name such as
    /// `baseline`, or 4+ characters of an id), not those of the pipeline as it is now.
    #[arg(long, value_name = "RUN")]
    run: Option<String>,
}

/// The results export takes: the pipeline's as it is now, or those a past run recorded.
pub(super) struct Results {
    /// Stage → its result's manifest digest (none: not cached as the pipeline is now).
    pub(super) stages: Vec<(String, Option<String>)>,
    /// The past run (`--run`), by its short id; `None`: the pipeline as it is now.
    pub(super) run: Option<String>,
}

impl Results {
    pub(super) fn now(p: &Pipeline, dag: &crate::dag::Dag, store: &Store) -> Results {
        let entries = crate::plan::plan(p, dag, store);
        Results { stages: entries.into_iter().map(|e| (e.stage, e.manifest)).collect(), run: None }
    }

    pub(super) fn of_run(store: &Store, p: &Pipeline, spec: &str) -> Result<Results, Failure> {
        let runs: Vec<Run> = store.runs().into_iter().filter(|(_, r)| r.pipeline == p.name).collect();
        let invalid = |m: String| Failure::Invalid(Diagnostic::new("E-RUN", format!("--run {spec}: {m}")));
        let (id, run) = resolve(&runs, spec).map_err(|e| invalid(format!("{e} (among the runs of `{}`)", p.name)))?;
        let stages = run.manifests.iter().map(|(s, d)| (s.clone(), Some(d.clone()))).collect();
        Ok(Results { stages, run: Some(short(id).to_string()) })
    }

    pub(super) fn manifest(&self, store: &Store, stage: &str) -> anyhow::Result<Manifest> {
        Ok(self.result(store, stage)?.1)
    }

    /// `stage`'s result: its manifest's digest and the manifest.
    pub(super) fn result(&self, store: &Store, stage: &str) -> anyhow::Result<(String, Manifest)> {
        match (self.stages.iter().find(|(s, _)| s == stage), &self.run) {
            (Some((_, Some(d))), _) => Ok((d.clone(), store.load_manifest(d)?)),
            (_, None) => {
                bail!("stage `{stage}` is not cached for the pipeline as it is now; run it first (`orchestrate run`)")
            }
            (_, Some(run)) => bail!(
                "run {run} has no result of `{stage}` (it failed or was skipped there, or the run's --target \
                 left it out); its results: {}",
                self.stages.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// `STAGE` or `STAGE.OUTPUT` among a past run's stages (the pipeline may have changed since).
    pub(super) fn split(&self, p: &Pipeline, target: &str) -> Result<(String, Option<String>), Diagnostic> {
        if self.run.is_none() {
            return split_target(p, target);
        }
        split_among(target, |s| self.stages.iter().any(|(n, _)| n == s))
            .ok_or_else(|| self.no_stage(target.split_once('.').map_or(target, |(s, _)| s)))
    }

    fn no_stage(&self, stage: &str) -> Diagnostic {
        let names: Vec<&str> = self.stages.iter().map(|(s, _)| s.as_str()).collect();
        let run = self.run.as_deref().unwrap_or_default();
        Diagnostic::new("E-NO-STAGE", format!("run {run} has no result of `{stage}`")).help(crate::diag::suggest(
            stage,
            &names,
            "stages with results in that run",
        ))
    }
}

fn export_one(store: &Store, entry: &crate::objects::Entry, to: &std::path::Path, what: &str) -> anyhow::Result<()> {
    store.export(entry, to, what).map_err(|e| anyhow!(e))
}

/// `target` as `STAGE` or `STAGE.OUTPUT` for a stage `is_stage` knows: the whole, else the
/// first split at a `.` whose left side is one (stage names may hold `.`: foreach items).
fn split_among(target: &str, is_stage: impl Fn(&str) -> bool) -> Option<(String, Option<String>)> {
    if is_stage(target) {
        return Some((target.to_string(), None));
    }
    let i = target.match_indices('.').map(|(i, _)| i).find(|&i| is_stage(&target[..i]))?;
    Some((target[..i].to_string(), Some(target[i + 1..].to_string())))
}

/// `STAGE` or `STAGE.OUTPUT`; stage names may hold `.` (foreach items), so try each split.
pub(super) fn split_target(p: &Pipeline, target: &str) -> Result<(String, Option<String>), Diagnostic> {
    match split_among(target, |s| p.index_of(s).is_some()) {
        Some(split) => Ok(split),
        // `fit.out` for a `foreach` stage `fit`: the error is about `fit`, with its variants.
        None => match target.split_once('.') {
            Some((stage, _)) if p.stages.iter().any(|s| crate::pipeline::is_variant_of(&s.name, stage)) => {
                Err(unknown_stage(p, stage))
            }
            _ => Err(unknown_stage(p, target)),
        },
    }
}

pub(super) fn export(env: &Env, a: Args) -> Result<i32, Failure> {
    let (p, dag) = env.load(&a.p)?;
    let store = env.open_reader()?;
    let results = match &a.run {
        Some(spec) => Results::of_run(&store, &p, spec)?,
        None => Results::now(&p, &dag, &store),
    };
    let from = results.run.as_ref().map(|r| format!(" of run {r}")).unwrap_or_default();
    if let Some(dest) = a.all {
        for (stage, _) in &results.stages {
            let m = results.manifest(&store, stage)?;
            for (name, entry) in &m.outputs {
                export_one(&store, entry, &dest.join(stage).join(name), &format!("{stage}.{name}"))?;
            }
        }
        eprintln!("exported {} stages{from} to {}", results.stages.len(), dest.display());
        return Ok(0);
    }
    let (Some(target), Some(dest)) = (a.target, a.dest) else {
        return Err(Diagnostic::new("E-CLI", "export needs STAGE[.OUTPUT] and DEST, or --all DEST").into());
    };
    let (stage, output) = results.split(&p, &target)?;
    let m = results.manifest(&store, &stage)?;
    let to = match output {
        Some(o) => {
            let entry = super::output_of(&m, &o)?;
            // Into an existing folder, as `cp` does, or one a trailing `/` names: DEST/OUTPUT.
            let folder = dest.is_dir() || dest.as_os_str().as_encoded_bytes().ends_with(b"/");
            let to = if folder { dest.join(&o) } else { dest };
            export_one(&store, entry, &to, &target)?;
            to
        }
        None => {
            for (name, entry) in &m.outputs {
                export_one(&store, entry, &dest.join(name), &format!("{stage}.{name}"))?;
            }
            dest
        }
    };
    eprintln!("exported {target}{from} to {}", to.display());
    Ok(0)
}
