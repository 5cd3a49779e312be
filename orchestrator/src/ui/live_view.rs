//! The run in progress: its graph and stage table from `live.json`, then kept current in the
//! browser by server-sent events (`/live/events`, one event each time the file changes).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use futures::Stream;
use minijinja::context;
use serde::Serialize;

use super::graph::{svg, GraphNode};
use super::pages::seg;
use super::{PageResult, Shared};
use crate::live::{self, LiveRun};

/// How often the events stream looks at `live.json`.
const POLL: Duration = Duration::from_millis(300);

/// The live file as the view shows it: `running` becomes `interrupted` when the process that
/// wrote it is gone (it was killed before it could say how it ended).
#[derive(Serialize)]
pub struct LiveState {
    #[serde(flatten)]
    run: LiveRun,
    alive: bool,
    done: usize,
    total: usize,
}

pub fn state_of(root: &Path) -> Option<LiveState> {
    let mut run = live::read(root)?;
    let alive = live::process_alive(run.pid);
    if run.status == "running" && !alive {
        run.status = "interrupted".into();
    }
    let total = run.stages.iter().filter(|s| s.status != "not run").count();
    let done = (run.stages.iter()).filter(|s| !matches!(s.status.as_str(), "waiting" | "running" | "not run")).count();
    Some(LiveState { run, alive, done, total })
}

pub async fn page(State(ui): State<Shared>) -> PageResult {
    let Some(state) = state_of(&ui.root) else {
        return ui.render("live.html", context! { live => () });
    };
    let nodes: Vec<GraphNode> =
        (state.run.stages.iter()).map(|s| GraphNode { name: &s.name, status: &s.status, needs: &s.needs }).collect();
    // A stage's page exists once the run is recorded; until then the node links to its row.
    let graph = svg(&nodes, |name| format!("#stage-{}", seg(name)));
    ui.render("live.html", context! { live => state, graph => graph })
}

pub async fn state(State(ui): State<Shared>) -> impl IntoResponse {
    Json(state_of(&ui.root))
}

/// One event now, then one each time `live.json` changes (or appears or goes), until the
/// server stops.
pub async fn events(State(ui): State<Shared>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let root: PathBuf = ui.root.clone();
    let stopping = ui.stop.subscribe();
    let stream = futures::stream::unfold((root, None::<String>, stopping), |(root, last, mut stopping)| async move {
        loop {
            if *stopping.borrow() {
                return None;
            }
            let now = serde_json::to_string(&state_of(&root)).unwrap_or_else(|_| "null".into());
            if last.as_deref() != Some(now.as_str()) {
                let event = Event::default().event("state").data(now.clone());
                return Some((Ok(event), (root, Some(now), stopping)));
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = stopping.changed() => {}
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
