//! `orchestrate ui`: a read-only web view of a store — the run history, each run's stage graph
//! coloured by status, stage pages, `compare` and sweep tables, rendered reports, and the run in
//! progress (server-sent events from `live.json`).
//!
//! It never takes the store's lock and never writes: run records and manifests are read from
//! `objects/` (they never change once written), the run in progress from `live.json`. URLs name
//! things by run id, stage name and object digest only; files inside a stored folder are found
//! by walking its tree entry by entry, so no URL becomes a filesystem path.

mod catalog;
mod curves;
mod graph;
mod live_view;
mod pages;
mod report;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use minijinja::Environment;

use crate::objects::ObjectStore;

pub use graph::escape;

/// What every page handler reads from.
pub struct Ui {
    root: PathBuf,
    objects: ObjectStore,
    catalog: Mutex<catalog::Catalog>,
    env: Environment<'static>,
    /// Set when the server stops: event streams end then, or a graceful shutdown would wait
    /// for every open live page.
    stop: tokio::sync::watch::Sender<bool>,
}

type Shared = Arc<Ui>;

/// A page that could not be shown: 404 for what does not exist, 400 for a malformed query,
/// 500 for a store that could not be read. Each is an HTML page saying what to do.
#[derive(Debug)]
pub enum PageError {
    NotFound(String),
    BadRequest(String),
    Internal(String),
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (code, title, msg) = match self {
            PageError::NotFound(m) => (StatusCode::NOT_FOUND, "Not found", m),
            PageError::BadRequest(m) => (StatusCode::BAD_REQUEST, "Bad request", m),
            PageError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, "Could not read the store", m),
        };
        let body = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} · orchestrate</title>\
             <link rel=\"stylesheet\" href=\"/static/ui.css\"></head><body><nav><a href=\"/\">Runs</a> \
             <a href=\"/live\">Live</a> <a href=\"/compare\">Compare</a></nav><main><h1>{code} {title}</h1>\
             <p class=\"error\" id=\"error\">{}</p><p><a href=\"/\">Back to the runs</a></p></main></body></html>",
            escape(&msg),
            code = code.as_u16()
        );
        (code, Html(body)).into_response()
    }
}

type PageResult = Result<Response, PageError>;

const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("runs.html", include_str!("templates/runs.html")),
    ("run.html", include_str!("templates/run.html")),
    ("stage.html", include_str!("templates/stage.html")),
    ("compare.html", include_str!("templates/compare.html")),
    ("sweep.html", include_str!("templates/sweep.html")),
    ("report.html", include_str!("templates/report.html")),
    ("tree.html", include_str!("templates/tree.html")),
    ("live.html", include_str!("templates/live.html")),
];

impl Ui {
    /// The view of the store at `root`; `None` if there is no store there.
    pub fn open(root: &std::path::Path) -> Option<Ui> {
        let objects = ObjectStore::open_existing(root)?;
        let mut env = Environment::new();
        for (name, text) in TEMPLATES {
            // The templates are part of the binary; one that does not parse is a build bug
            // the unit test below catches, so it is skipped rather than taking the server down.
            if let Err(e) = env.add_template(name, text) {
                tracing::error!("ui template {name}: {e}");
            }
        }
        env.add_filter("when", |t: f64| crate::store::iso8601(t));
        env.add_filter("bytes", |n: u64| crate::objects::human_bytes(n));
        env.add_filter("secs", |s: f64| format_secs(s));
        // Numbers as `compare` prints them (`history::shown`): 0.1, not 0.09999999999999998.
        env.add_filter("num", |v: Option<f64>| v.map_or_else(|| "—".to_string(), crate::history::shown));
        env.add_filter("seg", |s: String| pages::seg(&s));
        env.add_filter("pct", |p: Option<f64>| p.map_or_else(|| "—".to_string(), |p| format!("{p:+.2}%")));
        let stop = tokio::sync::watch::Sender::new(false);
        Some(Ui { root: root.to_path_buf(), objects, catalog: Mutex::default(), env, stop })
    }

    fn render(&self, template: &str, ctx: minijinja::Value) -> PageResult {
        let t = self.env.get_template(template).map_err(|e| PageError::Internal(format!("{template}: {e}")))?;
        let html = t.render(ctx).map_err(|e| PageError::Internal(format!("rendering {template}: {e:#}")))?;
        Ok(Html(html).into_response())
    }

    fn runs(&self) -> Result<Vec<crate::history::Run>, PageError> {
        let mut catalog = self.catalog.lock().unwrap_or_else(|e| e.into_inner());
        catalog.runs(&self.objects).map_err(PageError::Internal)
    }
}

/// `0.4 s`, `12.3 s`, `4 min 05 s`.
pub fn format_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

pub fn router(ui: Shared) -> Router {
    Router::new()
        .route("/", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/runs/{id}/stages/{stage}", get(pages::stage))
        .route("/runs/{id}/stages/{stage}/curves.png", get(curves::stage_png))
        .route("/runs/{id}/sweeps/{stage}", get(pages::sweep))
        .route("/runs/{id}/reports/{stage}", get(report::page))
        .route("/runs/{id}/reports/{stage}/files/{*path}", get(report::file))
        .route("/compare", get(pages::compare))
        .route("/compare/curves.png", get(curves::compare_png))
        .route("/objects/{digest}", get(pages::object))
        .route("/live", get(live_view::page))
        .route("/live/state", get(live_view::state))
        .route("/live/events", get(live_view::events))
        .route(
            "/static/ui.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css")], include_str!("assets/ui.css")) }),
        )
        .route(
            "/static/ui.js",
            get(|| async { ([(header::CONTENT_TYPE, "text/javascript")], include_str!("assets/ui.js")) }),
        )
        .fallback(|uri: axum::http::Uri| async move {
            PageError::NotFound(format!("nothing at {uri}: the view has runs (/), live (/live) and compare (/compare)"))
        })
        .with_state(ui)
}

/// Serve `ui` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    ui: Ui,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ui = Arc::new(ui);
    let stopping = ui.clone();
    let signal = async move {
        shutdown.await;
        stopping.stop.send_replace(true);
    };
    axum::serve(listener, router(ui)).with_graceful_shutdown(signal).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        let mut env = Environment::new();
        for (name, text) in TEMPLATES {
            env.add_template(name, text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
