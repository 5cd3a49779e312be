//! `orchestrate plan`: what is cached, what will run, and why — running nothing.

use super::{print_json, Env, Failure, PipelineArgs};

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    pub(super) p: PipelineArgs,
    #[arg(long)]
    json: bool,
}

pub(super) fn plan(env: &Env, a: Args) -> Result<i32, Failure> {
    let (p, dag) = env.load(&a.p)?;
    let store = env.open_store()?;
    let entries = crate::plan::plan(&p, &dag, &store);
    if a.json {
        print_json(&entries)?;
        return Ok(0);
    }
    let width = entries.iter().map(|e| e.stage.len()).max().unwrap_or(5).max(5);
    for e in &entries {
        let status = match e.status.as_str() {
            "cached" => "cached",
            "run" => "will run",
            _ => "error",
        };
        let why = if e.reasons.is_empty() { String::new() } else { format!("  ({})", e.reasons.join("; ")) };
        println!("{:<width$}  {status}{why}", e.stage);
    }
    let runs = entries.iter().filter(|e| e.status != "cached").count();
    println!("{} of {} stages will run", runs, entries.len());
    Ok(0)
}
