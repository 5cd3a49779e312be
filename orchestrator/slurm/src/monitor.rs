//! Waiting for many jobs with one status query per poll interval.
//!
//! A [`Monitor`] owns a task that holds every job a run is waiting on. Each tick it makes one
//! `squeue` for all of them (filtered by the run's job-name tag) and hands each ended job its
//! state; jobs slurmctld has already forgotten are asked of `sacct` in one query, when the
//! cluster keeps accounting. The interval is `poll` while jobs keep changing state; after
//! [`CALM_TICKS`] ticks without a change it grows by half each tick, up to `max_poll`; any
//! change brings it back to `poll`.
//! Cancels that arrive together are sent as one `scancel`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::{Cluster, JobId, JobState};

/// How a watched job ended.
#[derive(Clone, Debug, PartialEq)]
pub struct JobEnd {
    /// `None`: the job left the queue and the cluster keeps no accounting to say how (or the
    /// cluster stopped answering — see `reason`).
    pub state: Option<JobState>,
    pub reason: String,
}

enum Msg {
    Watch(JobId, oneshot::Sender<JobEnd>),
    Cancel(JobId),
}

/// Unchanged ticks before the interval starts to grow: short jobs keep it at `poll`, long ones
/// let it relax.
pub const CALM_TICKS: u32 = 5;

/// Status queries in a row that may fail (slurmctld restarting) before every waiting job is
/// reported as lost.
const FAILURES_TOLERATED: u32 = 10;

/// Watches jobs for a run; cheap to clone.
#[derive(Clone)]
pub struct Monitor {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Monitor {
    /// Start watching jobs whose names start with `tag` (must be called within a tokio runtime).
    /// The task ends when every `Monitor` clone is dropped and no job is left to watch.
    pub fn start(cluster: Arc<Cluster>, tag: String) -> Monitor {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(watch_loop(cluster, tag, rx));
        Monitor { tx }
    }

    /// Wait until job `id` ends.
    pub async fn wait(&self, id: &JobId) -> JobEnd {
        let (tx, rx) = oneshot::channel();
        let lost = |reason: &str| JobEnd { state: None, reason: reason.to_string() };
        if self.tx.send(Msg::Watch(id.clone(), tx)).is_err() {
            return lost("the job monitor has stopped");
        }
        rx.await.unwrap_or_else(|_| lost("the job monitor has stopped"))
    }

    /// Ask for job `id` to be cancelled (batched with other cancels); `wait` reports its end.
    pub fn cancel(&self, id: &JobId) {
        let _ = self.tx.send(Msg::Cancel(id.clone()));
    }
}

struct Watch {
    cluster: Arc<Cluster>,
    tag: String,
    waiting: HashMap<JobId, Vec<oneshot::Sender<JobEnd>>>,
    last: HashMap<JobId, JobState>,
    to_cancel: Vec<JobId>,
    interval: Duration,
    failures: u32,
    /// Ticks since a watched job last changed state.
    calm: u32,
}

async fn watch_loop(cluster: Arc<Cluster>, tag: String, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let interval = cluster.cfg.poll;
    let mut w = Watch {
        cluster,
        tag,
        waiting: HashMap::new(),
        last: HashMap::new(),
        to_cancel: Vec::new(),
        interval,
        failures: 0,
        calm: 0,
    };
    let mut open = true;
    loop {
        if w.waiting.is_empty() {
            if !open {
                return;
            }
            // Nothing to watch: sleep until a job is submitted (no queries while idle).
            match rx.recv().await {
                Some(m) => w.take(m),
                None => return,
            }
            w.interval = w.cluster.cfg.poll;
        }
        let next = Instant::now() + w.interval;
        while open {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => w.take(m),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(next) => break,
            }
            while let Ok(m) = rx.try_recv() {
                w.take(m);
            }
            w.send_cancels().await;
        }
        if !open {
            tokio::time::sleep_until(next).await;
        }
        if !w.waiting.is_empty() {
            w.tick().await;
        }
    }
}

impl Watch {
    fn take(&mut self, m: Msg) {
        match m {
            Msg::Watch(id, tx) => self.waiting.entry(id).or_default().push(tx),
            Msg::Cancel(id) => self.to_cancel.push(id),
        }
    }

    async fn send_cancels(&mut self) {
        if self.to_cancel.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.to_cancel);
        if let Err(e) = self.cluster.cancel(&ids).await {
            tracing::warn!("cancelling jobs {}: {e}", ids.join(","));
        }
    }

    /// One status query for every watched job; hand out the ends.
    async fn tick(&mut self) {
        let seen = match self.cluster.list(&self.tag).await {
            Ok(seen) => seen,
            Err(e) => {
                self.failures += 1;
                tracing::warn!("job status query failed ({} in a row): {e}", self.failures);
                if self.failures >= FAILURES_TOLERATED {
                    let why = format!("the cluster stopped answering status queries: {e}");
                    for id in self.waiting.keys().cloned().collect::<Vec<_>>() {
                        self.end(&id, JobEnd { state: None, reason: why.clone() });
                    }
                }
                self.interval = (self.interval * 2).min(self.cluster.cfg.max_poll);
                return;
            }
        };
        self.failures = 0;
        let mut changed = false;
        let mut missing: Vec<JobId> = self.waiting.keys().cloned().collect();
        let mut hopeless = Vec::new();
        for job in seen {
            missing.retain(|id| *id != job.id);
            if !self.waiting.contains_key(&job.id) {
                continue;
            }
            if self.last.get(&job.id) != Some(&job.state) {
                changed = true;
                self.last.insert(job.id.clone(), job.state.clone());
            }
            if job.state.is_end() {
                self.end(&job.id, JobEnd { state: Some(job.state), reason: job.reason });
            } else if job.state == JobState::Pending && crate::state::never_starts(&job.reason) {
                // Waiting would be forever: cancel it, then report it as it stood.
                self.to_cancel.push(job.id.clone());
                hopeless.push(job);
            }
        }
        if !missing.is_empty() {
            changed = true;
            self.forgotten(missing).await;
        }
        self.send_cancels().await;
        for job in hopeless {
            self.end(&job.id, JobEnd { state: Some(job.state), reason: job.reason });
        }
        self.calm = if changed { 0 } else { self.calm + 1 };
        self.interval = if self.calm <= CALM_TICKS {
            self.cluster.cfg.poll
        } else {
            self.interval.mul_f64(1.5).min(self.cluster.cfg.max_poll)
        };
    }

    /// Jobs the queue no longer lists: their end from accounting, if the cluster keeps it.
    async fn forgotten(&mut self, ids: Vec<JobId>) {
        let known = match self.cluster.accounting(&ids).await {
            Ok(k) => k.unwrap_or_default(),
            Err(e) => {
                tracing::warn!("sacct failed: {e}");
                Vec::new()
            }
        };
        for id in ids {
            let end = match known.iter().find(|(k, _)| *k == id) {
                Some((_, st)) => JobEnd { state: Some(st.clone()), reason: "from accounting".into() },
                None => JobEnd {
                    state: None,
                    reason: "the job left the queue and the cluster keeps no accounting of it".into(),
                },
            };
            self.end(&id, end);
        }
    }

    fn end(&mut self, id: &JobId, end: JobEnd) {
        self.last.remove(id);
        for tx in self.waiting.remove(id).unwrap_or_default() {
            let _ = tx.send(end.clone());
        }
    }
}
