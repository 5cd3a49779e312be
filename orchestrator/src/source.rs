//! The revision of the repository a pipeline file lives in, recorded with each run: results
//! follow the content of inputs and code through their keys, and this says which commit of the
//! team's own pipelines and scripts a run started from (MLflow's `source.git.commit`).

use std::path::Path;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceRev {
    /// The commit checked out (`HEAD`).
    pub commit: String,
    /// Whether tracked files differed from it (`git status`, untracked files left out: a
    /// store or scratch folder in the repository is not a change to the code).
    pub dirty: bool,
}

impl SourceRev {
    /// The revision of the git repository holding `dir`; none when `dir` is in no repository,
    /// the repository has no commit yet, or git is not installed.
    pub fn of(dir: &Path) -> Option<SourceRev> {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(args)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .ok()?;
            out.status.success().then_some(out.stdout)
        };
        let commit = String::from_utf8(git(&["rev-parse", "--verify", "--quiet", "HEAD"])?).ok()?.trim().to_string();
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|o| !o.is_empty());
        Some(SourceRev { commit, dirty })
    }

    /// `0123456789ab`, or `0123456789ab with uncommitted changes`.
    pub fn described(&self) -> String {
        let changes = if self.dirty { " with uncommitted changes" } else { "" };
        format!("{}{changes}", &self.commit[..self.commit.len().min(12)])
    }

    /// `0123456789ab`, with `*` when tracked files had changes.
    pub fn short(&self) -> String {
        format!("{}{}", &self.commit[..self.commit.len().min(12)], if self.dirty { "*" } else { "" })
    }
}
