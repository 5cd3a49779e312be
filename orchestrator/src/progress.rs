//! What the user sees while a run goes: a live display on a terminal, plain lines otherwise.
//! [`Progress`] is the terminal's [`RunEvents`].

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::events::{RunEvents, RunSummary, Status};

pub struct Progress {
    live: Option<Live>,
    quiet: bool,
    total: usize,
    finished: usize,
}

struct Live {
    multi: MultiProgress,
    overall: ProgressBar,
    running: HashMap<String, ProgressBar>,
}

impl Progress {
    /// `quiet`: nothing but failures (for `--json`, where stdout is the summary).
    pub fn new(quiet: bool) -> Progress {
        let live = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let overall = multi.add(ProgressBar::new(0));
            overall.set_style(
                ProgressStyle::with_template("{prefix:>8.bold} [{bar:30}] {pos}/{len} stages  {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            overall.set_prefix("pipeline");
            Live { multi, overall, running: HashMap::new() }
        });
        Progress { live, quiet, total: 0, finished: 0 }
    }

    fn line(&self, text: String) {
        match &self.live {
            Some(l) => {
                let _ = l.multi.println(text);
            }
            None if !self.quiet => eprintln!("{text}"),
            None => {}
        }
    }

    /// A line shown even in quiet mode.
    fn always(&self, text: String) {
        match &self.live {
            Some(l) => {
                let _ = l.multi.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    fn tick(&mut self) {
        self.finished += 1;
        if let Some(l) = &self.live {
            l.overall.set_position(self.finished as u64);
        }
    }

    fn stop_spinner(&mut self, name: &str) {
        if let Some(l) = &mut self.live {
            if let Some(pb) = l.running.remove(name) {
                pb.finish_and_clear();
                l.multi.remove(&pb);
            }
        }
    }
}

impl RunEvents for Progress {
    fn begin(&mut self, total: usize) {
        self.total = total;
        if let Some(l) = &self.live {
            l.overall.set_length(total as u64);
        }
    }

    fn cached(&mut self, name: &str) {
        self.line(format!("  cached     {name}"));
        self.tick();
    }

    fn pulled(&mut self, name: &str, bytes: u64) {
        self.line(format!("  pulled     {name} ({} downloaded)", crate::objects::human_bytes(bytes)));
        self.tick();
    }

    fn started(&mut self, name: &str, threads: u32) {
        match &mut self.live {
            Some(l) => {
                let pb = l.multi.insert_before(&l.overall, ProgressBar::new_spinner());
                pb.set_style(
                    ProgressStyle::with_template("  {spinner} running  {prefix} ({msg}) {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                pb.set_prefix(name.to_string());
                pb.set_message(format!("{threads} thread{}", if threads == 1 { "" } else { "s" }));
                pb.enable_steady_tick(Duration::from_millis(120));
                l.running.insert(name.to_string(), pb);
            }
            None => self.line(format!("  running    {name} ({threads} thread{})", if threads == 1 { "" } else { "s" })),
        }
    }

    /// A running stage's latest progress message (e.g. step, loss, tokens/s).
    fn progress(&mut self, name: &str, message: &str) {
        match &self.live {
            Some(l) => {
                if let Some(pb) = l.running.get(name) {
                    pb.set_message(message.to_string());
                }
            }
            None => self.line(format!("  progress   {name}: {message}")),
        }
    }

    fn done(&mut self, name: &str, secs: f64) {
        self.stop_spinner(name);
        self.line(format!("  done       {name} in {secs:.2}s"));
        self.tick();
    }

    fn failed(&mut self, name: &str, message: &str, log_tail: &str) {
        self.stop_spinner(name);
        let mut text = format!("  FAILED     {name}: {message}");
        if !log_tail.trim().is_empty() {
            text.push_str("\n             last lines of its output:");
            for l in log_tail.lines() {
                text.push_str("\n             | ");
                text.push_str(l);
            }
        }
        self.always(text);
        self.tick();
    }

    fn skipped(&mut self, name: &str, why: &str) {
        self.line(format!("  skipped    {name}: {why}"));
        self.tick();
    }

    fn cancelled(&mut self, name: &str) {
        self.stop_spinner(name);
        self.line(format!("  cancelled  {name}"));
        self.tick();
    }

    /// Notes say why the run is stopping (a failure, Ctrl-C): shown even in quiet mode, as
    /// failures are, since the run may still wait for stages.
    fn note(&mut self, text: &str) {
        self.always(format!("  {text}"));
    }

    fn warning(&mut self, text: &str) {
        self.always(format!("  warning: {text}"));
    }

    fn finish(&mut self, s: &RunSummary) {
        if let Some(l) = &self.live {
            l.overall.finish_and_clear();
        }
        self.line(format!(
            "{}: {} — {} ran, {} cached{}, {} failed, {} skipped{} in {:.2}s ({}){}",
            s.pipeline,
            s.status,
            s.count(Status::Ran),
            s.count(Status::Cached),
            match s.count(Status::Pulled) {
                0 => String::new(),
                n => format!(", {n} pulled"),
            },
            s.count(Status::Failed),
            s.count(Status::Skipped),
            match s.count(Status::Cancelled) {
                0 => String::new(),
                n => format!(", {n} cancelled"),
            },
            s.wall_s,
            if s.cores >= crate::sched::CLUSTER_BUDGET {
                "on the cluster".to_string()
            } else {
                format!("{} cores", s.cores)
            },
            // The id `runs`, `compare` and the web view know the run by.
            s.run.as_deref().map(|id| format!("; run {}", crate::history::short(id))).unwrap_or_default()
        ));
    }
}
