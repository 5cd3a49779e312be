//! `orchestrate plan`: what is cached, what will run, and why — running nothing.

use super::{folder_of, print_json, runtime, Env, Failure, PipelineArgs, RemoteArgs, SelectArgs};
use crate::plan::RemoteAnswer;
use crate::remote::Access;

#[derive(clap::Args, Debug)]
pub(super) struct Args {
    #[command(flatten)]
    pub(super) p: PipelineArgs,
    #[command(flatten)]
    select: SelectArgs,
    /// Also look up what the local store lacks in this remote cache (nothing is downloaded).
    #[command(flatten)]
    remote: RemoteArgs,
    /// Print the result as JSON on stdout (for scripts).
    #[arg(long)]
    json: bool,
}

pub(super) fn plan(env: &Env, a: Args) -> Result<i32, Failure> {
    let (p, dag) = env.load(&a.p)?;
    let scope = a.select.scope(&p, &dag)?;
    let store = env.open_reader()?;
    let entries =
        match a.remote.open(&folder_of(&a.p.pipeline), false, Access::Read)? {
            None => crate::plan::plan_with_remote(&p, &dag, &store, &scope, &mut |_| RemoteAnswer::Absent),
            Some(remote) => {
                let rt = runtime()?;
                crate::plan::plan_with_remote(&p, &dag, &store, &scope, &mut |key| match rt
                    .block_on(remote.manifest(key))
                {
                    Ok(Some((d, m, _))) => RemoteAnswer::Has(d, Box::new(m)),
                    Ok(None) => RemoteAnswer::Absent,
                    Err(e) => RemoteAnswer::Error(e.to_string()),
                })
            }
        };
    if a.json {
        print_json(&entries)?;
        return Ok(0);
    }
    let width = entries.iter().map(|e| e.stage.len()).max().unwrap_or(5).max(5);
    for e in &entries {
        let status = match e.status.as_str() {
            "cached" => "cached",
            "remote" => "will pull",
            "run" => "will run",
            _ => "error",
        };
        let why = if e.reasons.is_empty() { String::new() } else { format!("  ({})", e.reasons.join("; ")) };
        println!("{:<width$}  {status}{why}", e.stage);
    }
    let count = |s: &str| entries.iter().filter(|e| e.status == s).count();
    let pulls = match count("remote") {
        0 => String::new(),
        n => format!(", {n} will be pulled from the remote"),
    };
    let taken = match scope.only {
        Some(_) => format!(" (--target takes {} of the pipeline's {})", entries.len(), p.stages.len()),
        None => String::new(),
    };
    let runs = entries.len() - count("cached") - count("remote");
    println!("{runs} of {} stages will run{pulls}{taken}", entries.len());
    Ok(0)
}
