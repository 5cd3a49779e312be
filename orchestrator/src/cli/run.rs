//! `orchestrate run`: run what is not cached, within a CPU budget.

use std::collections::HashSet;
use std::sync::Arc;

use super::{cores_arg, print_json, runtime, stage_index, Env, Failure, PipelineArgs};
use crate::progress::Progress;
use crate::sched::{self, RunOptions};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    pub(super) p: PipelineArgs,
    /// Run only these stages and what they need.
    #[arg(long = "target", value_name = "STAGE")]
    targets: Vec<String>,
    /// CPU budget: the sum of running stages' threads stays within it (default: all cores).
    #[arg(long)]
    cores: Option<u32>,
    /// After a failure, finish every branch that does not depend on it.
    #[arg(long)]
    keep_going: bool,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
}

pub(super) fn run(env: &Env, a: Args) -> Result<i32, Failure> {
    let (p, dag) = env.load(&a.p)?;
    let cores = cores_arg(a.cores)?;
    let only = if a.targets.is_empty() {
        None
    } else {
        let mut set = HashSet::new();
        for t in &a.targets {
            set.extend(dag.with_upstream(stage_index(&p, t)?));
        }
        Some(set)
    };
    let store = Arc::new(env.open_store()?);
    store.clean_tmp();
    let mut progress = Progress::new(a.json);
    let opts = RunOptions { cores, keep_going: a.keep_going, only };
    let summary = runtime()?.block_on(sched::run(&p, &dag, store, opts, &mut progress));
    if a.json {
        print_json(&summary)?;
    }
    Ok(summary.exit_code())
}
