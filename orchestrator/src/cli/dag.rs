//! `orchestrate dag`: the stage graph as Graphviz dot or Mermaid.

use clap::ValueEnum;

use super::{Env, Failure, PipelineArgs};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(super) enum DagFormat {
    Dot,
    Mermaid,
}

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    p: PipelineArgs,
    /// Graphviz dot, or a Mermaid flowchart (renders in GitHub markdown).
    #[arg(long, value_enum, default_value_t = DagFormat::Dot)]
    format: DagFormat,
}

pub(super) fn dag(env: &Env, a: Args) -> Result<i32, Failure> {
    let (p, dag) = env.load(&a.p)?;
    print!(
        "{}",
        match a.format {
            DagFormat::Dot => dag.to_dot(&p),
            DagFormat::Mermaid => dag.to_mermaid(&p),
        }
    );
    Ok(0)
}
