//! `orchestrate replay`: re-execute cached stages and compare their outputs bit for bit.

use anyhow::Context;

use super::{cores_arg, print_json, runtime, stage_index, Env, Failure, PipelineArgs};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    pub(super) p: PipelineArgs,
    /// Replay only these stages (default: all).
    #[arg(long = "stage", value_name = "STAGE")]
    stages: Vec<String>,
    /// CPU budget for the replayed stages, as for `run` (default: all cores).
    #[arg(long)]
    cores: Option<u32>,
    /// Print the result as JSON on stdout (for scripts).
    #[arg(long)]
    json: bool,
}

pub(super) fn replay(env: &Env, a: Args) -> Result<i32, Failure> {
    let (p, dag) = env.load(&a.p)?;
    let cores = cores_arg(a.cores)?;
    let only = if a.stages.is_empty() {
        None
    } else {
        Some(a.stages.iter().map(|s| stage_index(&p, s)).collect::<Result<Vec<_>, _>>()?)
    };
    let store = env.open_existing()?;
    store.clean_tmp();
    let report =
        runtime()?.block_on(crate::replay::replay(&p, &dag, &store, only.as_deref(), cores)).context("replay")?;
    if a.json {
        print_json(&report)?;
    } else {
        print!("{}", crate::replay::render_table(&report));
        if report.failed {
            let mut stages: Vec<&str> =
                report.rows.iter().filter(|r| r.deterministic && !r.identical).map(|r| r.stage.as_str()).collect();
            stages.dedup();
            println!("replay: MISMATCH — {} did not reproduce", stages.join(", "));
            println!(
                "  = help: the same inputs gave other bytes: look for an unseeded RNG, the clock, the thread \
                 count or file order in the stage; a stage whose output rightly varies is marked \
                 `deterministic: false`"
            );
        } else {
            println!("replay: every deterministic stage reproduced bit for bit");
        }
    }
    Ok(if report.failed { 1 } else { 0 })
}
