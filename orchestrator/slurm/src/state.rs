//! Slurm job states, as `squeue %T` and `sacct State` print them, and what each means for a run.

/// A job's state. Terminal states end a job; the rest mean it may still run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Pending,
    Running,
    /// Started or ending: CONFIGURING, COMPLETING, SUSPENDED, REQUEUED, RESIZING, SIGNALING,
    /// STAGE_OUT, STOPPED — still in the cluster's hands.
    Active(String),
    Completed,
    Failed,
    Timeout,
    OutOfMemory,
    NodeFail,
    Cancelled,
    Preempted,
    BootFail,
    Deadline,
    /// Any other terminal state Slurm may add (REVOKED, SPECIAL_EXIT, …).
    OtherEnd(String),
}

impl JobState {
    /// Parse a state word; `sacct` may append a reason (`CANCELLED by 0`), which is ignored.
    pub fn parse(text: &str) -> JobState {
        let word = text.split_whitespace().next().unwrap_or("").trim_end_matches('+');
        match word {
            "PENDING" => JobState::Pending,
            "RUNNING" => JobState::Running,
            "CONFIGURING" | "COMPLETING" | "SUSPENDED" | "REQUEUED" | "REQUEUE_FED" | "REQUEUE_HOLD" | "RESIZING"
            | "SIGNALING" | "STAGE_OUT" | "STOPPED" | "RESV_DEL_HOLD" | "UPDATE_DB" | "POWER_UP_NODE" => {
                JobState::Active(word.to_string())
            }
            "COMPLETED" => JobState::Completed,
            "FAILED" => JobState::Failed,
            "TIMEOUT" => JobState::Timeout,
            "OUT_OF_MEMORY" => JobState::OutOfMemory,
            "NODE_FAIL" => JobState::NodeFail,
            "CANCELLED" => JobState::Cancelled,
            "PREEMPTED" => JobState::Preempted,
            "BOOT_FAIL" => JobState::BootFail,
            "DEADLINE" => JobState::Deadline,
            other => JobState::OtherEnd(other.to_string()),
        }
    }

    /// Whether the job has ended (it will not run any more).
    pub fn is_end(&self) -> bool {
        !matches!(self, JobState::Pending | JobState::Running | JobState::Active(_))
    }

    /// Slurm's own name for the state.
    pub fn name(&self) -> &str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Active(s) | JobState::OtherEnd(s) => s,
            JobState::Completed => "COMPLETED",
            JobState::Failed => "FAILED",
            JobState::Timeout => "TIMEOUT",
            JobState::OutOfMemory => "OUT_OF_MEMORY",
            JobState::NodeFail => "NODE_FAIL",
            JobState::Cancelled => "CANCELLED",
            JobState::Preempted => "PREEMPTED",
            JobState::BootFail => "BOOT_FAIL",
            JobState::Deadline => "DEADLINE",
        }
    }

    /// What an ended state means for the stage, in words a user acts on.
    pub fn explain(&self) -> &'static str {
        match self {
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Timeout => "hit its time limit (raise the stage's `timeout` or `resources.time`)",
            JobState::OutOfMemory => "ran out of memory (raise the stage's `resources.mem`)",
            JobState::NodeFail => "lost its node (a node failure; `retries` resubmits it)",
            JobState::Cancelled => "was cancelled outside this run (scancel or an administrator)",
            JobState::Preempted => "was preempted by a higher-priority job (`retries` resubmits it)",
            JobState::BootFail => "could not boot its node (`retries` resubmits it)",
            JobState::Deadline => "missed its deadline",
            _ => "ended",
        }
    }
}

/// Reasons a pending job gives when it can never start as submitted (it asks for more than its
/// partition, account or QOS allows per job); a run does not wait forever on such a job.
pub fn never_starts(reason: &str) -> bool {
    const HOPELESS: &[&str] = &[
        "PartitionConfig",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "BadConstraints",
        "InvalidAccount",
        "InvalidQOS",
        "QOSMaxCpuPerJobLimit",
        "QOSMaxMemoryPerJob",
        "QOSMaxWallDurationPerJobLimit",
        "AssocMaxCpuPerJobLimit",
        "AssocMaxMemPerJobLimit",
        "AssocMaxWallDurationPerJobLimit",
    ];
    HOPELESS.contains(&reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_and_end() {
        assert_eq!(JobState::parse("PENDING"), JobState::Pending);
        assert!(!JobState::parse("COMPLETING").is_end());
        assert_eq!(JobState::parse("CANCELLED by 0"), JobState::Cancelled);
        assert_eq!(JobState::parse("OUT_OF_MEMORY"), JobState::OutOfMemory);
        assert_eq!(JobState::parse("TIMEOUT"), JobState::Timeout);
        for s in ["COMPLETED", "FAILED", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "REVOKED"] {
            assert!(JobState::parse(s).is_end(), "{s}");
            assert_eq!(JobState::parse(s).name(), s);
        }
    }
}
