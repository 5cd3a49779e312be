//! `orchestrate export`: copy a stage's outputs (or one, or every stage's) out of the store.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};

use super::{unknown_stage, Env, Failure, PipelineArgs};
use crate::diag::Diagnostic;
use crate::pipeline::Pipeline;
use crate::plan::PlanEntry;
use crate::store::{Manifest, Store};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    pub(super) p: PipelineArgs,
    /// STAGE or STAGE.OUTPUT (omit with --all).
    target: Option<String>,
    /// Where to: a new path; or an existing folder, which gets DEST/OUTPUT for STAGE.OUTPUT
    /// and DEST/<output> for each of a STAGE's outputs.
    dest: Option<PathBuf>,
    /// Export every stage's outputs to DEST/<stage>/<output>.
    #[arg(long, value_name = "DEST", conflicts_with = "dest")]
    all: Option<PathBuf>,
}

/// The manifest of `stage` for the pipeline as it is now.
pub(super) fn manifest_of(store: &Store, entries: &[PlanEntry], stage: &str) -> anyhow::Result<Manifest> {
    let e = entries.iter().find(|e| e.stage == stage).context("no such stage")?;
    match &e.manifest {
        Some(d) => Ok(store.load_manifest(d)?),
        None => bail!("stage `{stage}` is not cached for the pipeline as it is now; run it first (`orchestrate run`)"),
    }
}

fn export_one(store: &Store, entry: &crate::objects::Entry, to: &std::path::Path, what: &str) -> anyhow::Result<()> {
    store.export(entry, to, what).map_err(|e| anyhow!(e))
}

/// `STAGE` or `STAGE.OUTPUT`; stage names may hold `.` (foreach items), so try each split.
pub(super) fn split_target(p: &Pipeline, target: &str) -> Result<(String, Option<String>), Diagnostic> {
    if p.index_of(target).is_some() {
        return Ok((target.to_string(), None));
    }
    let split = target.match_indices('.').map(|(i, _)| i).find(|&i| p.index_of(&target[..i]).is_some());
    match split {
        Some(i) => Ok((target[..i].to_string(), Some(target[i + 1..].to_string()))),
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
    let entries = crate::plan::plan(&p, &dag, &store);
    if let Some(dest) = a.all {
        for e in &entries {
            let m = manifest_of(&store, &entries, &e.stage)?;
            for (name, entry) in &m.outputs {
                export_one(&store, entry, &dest.join(&e.stage).join(name), &format!("{}.{name}", e.stage))?;
            }
        }
        eprintln!("exported {} stages to {}", entries.len(), dest.display());
        return Ok(0);
    }
    let (Some(target), Some(dest)) = (a.target, a.dest) else {
        return Err(Diagnostic::new("E-CLI", "export needs STAGE[.OUTPUT] and DEST, or --all DEST").into());
    };
    let (stage, output) = split_target(&p, &target)?;
    let m = manifest_of(&store, &entries, &stage)?;
    let to = match output {
        Some(o) => {
            let entry = super::output_of(&m, &o)?;
            // Into an existing folder, as `cp` does: DEST/OUTPUT.
            let to = if dest.is_dir() { dest.join(&o) } else { dest };
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
    eprintln!("exported {target} to {}", to.display());
    Ok(0)
}
