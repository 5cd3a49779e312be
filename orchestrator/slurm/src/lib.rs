//! Slurm through its own commands, for running pipeline stages as cluster jobs.
//!
//! [`Cluster`] submits a job (`sbatch --parsable`, the script on stdin), lists the jobs whose
//! name starts with a tag (one `squeue` for all of them), and cancels (`scancel`). [`Monitor`]
//! is what a run waits on: every job of the run is watched by **one** status query per poll
//! interval, whatever the number of jobs, the interval growing while nothing changes — Slurm
//! sites object to tools that query once per job per second.

mod monitor;
mod state;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

pub use monitor::{JobEnd, Monitor};
pub use state::JobState;

/// A Slurm job id (`123`, or `123_4` for an array task).
pub type JobId = String;

#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error(
        "`{0}` is not on PATH: the Slurm executor needs Slurm's client commands (Debian: slurm-client) on this machine"
    )]
    Missing(String),
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("running `{command}`: {source}")]
    Io { command: String, source: std::io::Error },
}

/// How jobs are submitted and watched (the pipeline's `executor:` block).
#[derive(Clone, Debug)]
pub struct Config {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Passed to every `sbatch` as given, before the per-job options.
    pub sbatch_args: Vec<String>,
    /// The shortest time between two status queries (and the first wait).
    pub poll: Duration,
    /// The longest: the interval grows toward it while no watched job changes state.
    pub max_poll: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            partition: None,
            account: None,
            qos: None,
            sbatch_args: Vec::new(),
            poll: Duration::from_secs(1),
            max_poll: Duration::from_secs(10),
        }
    }
}

/// One job to submit.
#[derive(Clone, Debug)]
pub struct JobRequest {
    /// Job name; [`Cluster::list`] finds jobs by its prefix.
    pub name: String,
    /// The batch script (starting with `#!`), handed to sbatch on stdin.
    pub script: String,
    pub workdir: PathBuf,
    /// stdout and stderr of the job.
    pub log: PathBuf,
    pub cpus: u32,
    /// `--time`; Slurm counts whole minutes and enforces the limit on its own schedule.
    pub time: Option<Duration>,
    /// `--mem` as Slurm writes it (`500M`, `4G`).
    pub mem: Option<String>,
    /// Overrides the config's partition for this job.
    pub partition: Option<String>,
}

/// One job as a status query saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobStatus {
    pub id: JobId,
    pub name: String,
    pub state: JobState,
    /// Slurm's reason field (`Resources`, `JobLaunchFailure`, `None`, …).
    pub reason: String,
}

/// Slurm's `--time` text for a duration: `D-HH:MM:SS`, rounded up to a whole second.
pub fn time_limit(d: Duration) -> String {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    format!("{days}-{:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// The Slurm commands, with a count of the status queries made.
#[derive(Debug)]
pub struct Cluster {
    pub cfg: Config,
    queries: AtomicU64,
}

impl Cluster {
    pub fn new(cfg: Config) -> Self {
        Cluster { cfg, queries: AtomicU64::new(0) }
    }

    /// Status queries (`squeue`, `sacct`) made so far.
    pub fn status_queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Check the Slurm commands are there and slurmctld answers; returns its partitions.
    pub async fn preflight(&self) -> Result<Vec<String>, SlurmError> {
        for program in ["sbatch", "squeue", "scancel", "sinfo"] {
            if find_on_path(program).is_none() {
                return Err(SlurmError::Missing(program.into()));
            }
        }
        let out = run("sinfo", &["--noheader", "--format=%R"], None).await?;
        Ok(out.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect())
    }

    /// Submit a job; its id once slurmctld accepted it.
    pub async fn submit(&self, job: &JobRequest) -> Result<JobId, SlurmError> {
        let mut args: Vec<String> = vec!["--parsable".into()];
        let c = &self.cfg;
        if let Some(p) = job.partition.as_ref().or(c.partition.as_ref()) {
            args.push(format!("--partition={p}"));
        }
        if let Some(a) = &c.account {
            args.push(format!("--account={a}"));
        }
        if let Some(q) = &c.qos {
            args.push(format!("--qos={q}"));
        }
        args.extend(c.sbatch_args.iter().cloned());
        args.push(format!("--job-name={}", job.name));
        args.push(format!("--chdir={}", job.workdir.display()));
        args.push(format!("--output={}", job.log.display()));
        args.push("--nodes=1".into());
        args.push("--ntasks=1".into());
        args.push(format!("--cpus-per-task={}", job.cpus.max(1)));
        if let Some(t) = job.time {
            args.push(format!("--time={}", time_limit(t)));
        }
        if let Some(m) = &job.mem {
            args.push(format!("--mem={m}"));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run("sbatch", &refs, Some(job.script.as_bytes())).await?;
        let id = out.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.chars().all(|ch| ch.is_ascii_digit() || ch == '_') {
            return Err(SlurmError::Command {
                command: "sbatch --parsable".into(),
                message: format!("printed no job id: {:?}", out.trim()),
            });
        }
        Ok(id)
    }

    /// Every job of this user whose name starts with `prefix`, in one `squeue` (ended jobs
    /// included while slurmctld still remembers them, `MinJobAge`).
    pub async fn list(&self, prefix: &str) -> Result<Vec<JobStatus>, SlurmError> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let args = ["--me", "--noheader", "--states=all", "--format=%i|%T|%r|%j"];
        let out = run("squeue", &args, None).await?;
        Ok(out.lines().filter_map(parse_squeue_line).filter(|j| j.name.starts_with(prefix)).collect())
    }

    /// The end states `sacct` knows for `ids`, or `None` when the cluster keeps no accounting.
    pub async fn accounting(&self, ids: &[JobId]) -> Result<Option<Vec<(JobId, JobState)>>, SlurmError> {
        if ids.is_empty() || find_on_path("sacct").is_none() {
            return Ok(None);
        }
        self.queries.fetch_add(1, Ordering::Relaxed);
        let list = ids.join(",");
        match run("sacct", &["--noheader", "--parsable2", "-X", "--format=JobID,State", "-j", &list], None).await {
            Ok(out) => Ok(Some(
                out.lines()
                    .filter_map(|l| l.split_once('|'))
                    .map(|(id, st)| (id.trim().to_string(), JobState::parse(st)))
                    .collect(),
            )),
            // "Slurm accounting storage is disabled": nothing to ask.
            Err(SlurmError::Command { message, .. }) if message.contains("accounting storage is disabled") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Cancel jobs (one `scancel` for all); jobs already gone are not an error.
    pub async fn cancel(&self, ids: &[JobId]) -> Result<(), SlurmError> {
        if ids.is_empty() {
            return Ok(());
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        match run("scancel", &refs, None).await {
            Ok(_) => Ok(()),
            Err(SlurmError::Command { message, .. }) if message.contains("Invalid job id") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn parse_squeue_line(line: &str) -> Option<JobStatus> {
    let mut f = line.splitn(4, '|');
    let (id, state, reason, name) = (f.next()?, f.next()?, f.next()?, f.next()?);
    Some(JobStatus {
        id: id.trim().to_string(),
        name: name.trim().to_string(),
        state: JobState::parse(state.trim()),
        reason: reason.trim().to_string(),
    })
}

/// Where `program` is on PATH.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// Run a Slurm command; its stdout, or its stderr as the error.
async fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String, SlurmError> {
    let command = format!("{program} {}", args.join(" "));
    let io = |source| SlurmError::Io { command: command.clone(), source };
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SlurmError::Missing(program.into()),
        _ => io(e),
    })?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(bytes).await.map_err(io)?;
        drop(pipe);
    }
    let out = child.wait_with_output().await.map_err(io)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let message = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
    Err(SlurmError::Command { command, message: if message.is_empty() { out.status.to_string() } else { message } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_limits_are_slurm_durations() {
        assert_eq!(time_limit(Duration::from_secs(90)), "0-00:01:30");
        assert_eq!(time_limit(Duration::from_millis(500)), "0-00:00:01");
        assert_eq!(time_limit(Duration::from_secs(2 * 86_400 + 3600 + 61)), "2-01:01:01");
    }

    #[test]
    fn squeue_lines_parse_with_bars_in_names() {
        let j = parse_squeue_line("42|RUNNING|None|orc-ab-train@lr=0.1|x").unwrap();
        assert_eq!((j.id.as_str(), j.name.as_str()), ("42", "orc-ab-train@lr=0.1|x"));
        assert_eq!(j.state, JobState::Running);
        assert!(parse_squeue_line("garbage").is_none());
    }
}
