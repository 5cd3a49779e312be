//! A report stage's `report.md` rendered to HTML (pulldown-cmark), its plots served from the
//! same stored folder. Relative links and images are pointed at that folder; raw HTML in the
//! markdown is shown as text, so a template cannot put script into the view.

use axum::extract::{Path, State};
use minijinja::context;
use pulldown_cmark::{html, CowStr, Event, Options, Parser, Tag};

use super::pages::{file_response, seg};
use super::{PageError, PageResult, Shared, Ui};
use crate::history::{resolve, short};
use crate::objects::{ObjKind, Tree};
use crate::store::{load_manifest, Manifest};

const REPORT_FILE: &str = "report.md";

/// The stored folder output of a report stage and the digest of its `report.md`.
pub fn report_md(ui: &Ui, m: &Manifest) -> Option<(Tree, String)> {
    if m.key_input.kind != "report" {
        return None;
    }
    (m.outputs.values()).filter(|e| e.kind == ObjKind::Tree).find_map(|e| {
        let tree = ui.objects.read_tree(&e.digest, "report folder").ok()?;
        let md = tree.entries.iter().find(|t| t.name == REPORT_FILE && t.kind == ObjKind::File)?.digest.clone();
        Some((tree, md))
    })
}

fn report_of(ui: &Ui, id: &str, stage: &str) -> Result<(String, Tree, String), PageError> {
    let runs = ui.runs()?;
    let run = resolve(&runs, id).map_err(PageError::NotFound)?;
    let digest = run
        .1
        .manifests
        .get(stage)
        .ok_or_else(|| PageError::NotFound(format!("run {} has no finished stage `{stage}`", short(&run.0))))?;
    let m = load_manifest(&ui.objects, digest).map_err(|e| PageError::Internal(e.to_string()))?;
    let (tree, md) = report_md(ui, &m).ok_or_else(|| {
        PageError::NotFound(format!("stage `{stage}` is a `{}` stage with no report.md", m.key_input.kind))
    })?;
    Ok((short(&run.0).to_string(), tree, md))
}

/// Whether a link in the markdown points into the report's own folder.
fn is_relative(url: &str) -> bool {
    !(url.is_empty()
        || url.starts_with('/')
        || url.starts_with('#')
        || url.contains("://")
        || url.starts_with("mailto:"))
}

/// Markdown to HTML, relative URLs under `files`, raw HTML escaped.
pub fn to_html(markdown: &str, files: &str) -> String {
    let relink = |url: CowStr<'static>| -> CowStr<'static> {
        if is_relative(&url) {
            CowStr::from(format!("{files}/{}", url.trim_start_matches("./")))
        } else {
            url
        }
    };
    let events = Parser::new_ext(markdown, Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH).map(|e| {
        match e.into_static() {
            Event::Start(Tag::Image { link_type, dest_url, title, id }) => {
                Event::Start(Tag::Image { link_type, dest_url: relink(dest_url), title, id })
            }
            Event::Start(Tag::Link { link_type, dest_url, title, id }) => {
                Event::Start(Tag::Link { link_type, dest_url: relink(dest_url), title, id })
            }
            Event::Html(raw) | Event::InlineHtml(raw) => Event::Text(raw),
            other => other,
        }
    });
    let mut out = String::new();
    html::push_html(&mut out, events);
    out
}

pub async fn page(State(ui): State<Shared>, Path((id, stage)): Path<(String, String)>) -> PageResult {
    let (run, _tree, md) = report_of(&ui, &id, &stage)?;
    let bytes = ui.objects.read_verified(&md, REPORT_FILE).map_err(|e| PageError::Internal(e.to_string()))?;
    let files = format!("/runs/{run}/reports/{}/files", seg(&stage));
    let body = to_html(&String::from_utf8_lossy(&bytes), &files);
    let raw = format!("{files}/{REPORT_FILE}");
    ui.render("report.html", context! { run => run, stage => stage, body => body, raw => raw })
}

/// A file of the report's folder, found by walking the stored tree name by name: `..`, `.`
/// and empty parts match no entry, so nothing outside the folder can be named.
pub async fn file(State(ui): State<Shared>, Path((id, stage, path)): Path<(String, String, String)>) -> PageResult {
    let (_, mut tree, _) = report_of(&ui, &id, &stage)?;
    let parts: Vec<&str> = path.split('/').collect();
    let missing = || PageError::NotFound(format!("the report of `{stage}` has no file `{path}`"));
    for (i, part) in parts.iter().enumerate() {
        let entry = tree.entries.iter().find(|e| e.name == *part).ok_or_else(missing)?.clone();
        match (entry.kind, i + 1 == parts.len()) {
            (ObjKind::File, true) => return file_response(&ui, &entry.digest, part),
            (ObjKind::Tree, false) => {
                tree = ui.objects.read_tree(&entry.digest, part).map_err(|e| PageError::Internal(e.to_string()))?
            }
            _ => return Err(missing()),
        }
    }
    Err(missing())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_links_point_into_the_report_and_raw_html_is_text() {
        let html = to_html(
            "# T\n\n![loss](loss.png) [abs](https://x.org/a) [top](#t)\n\n<script>alert(1)</script>\n\n| a |\n|---|\n| 1 |\n",
            "/runs/abc/reports/report/files",
        );
        assert!(html.contains(r#"<img src="/runs/abc/reports/report/files/loss.png" alt="loss" />"#), "{html}");
        assert!(html.contains(r#"href="https://x.org/a""#) && html.contains(r##"href="#t""##), "{html}");
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("<table>"), "{html}");
    }
}
