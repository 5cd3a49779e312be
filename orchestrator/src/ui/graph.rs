//! A run's stage graph drawn as inline SVG on the server: stages in columns by depth (left to
//! right, as data flows), ordered in each column by where their inputs sit, coloured by status
//! through CSS classes (`st-ran`, `st-cached`, …) that the live view changes in place.

use std::collections::HashMap;
use std::fmt::Write;

/// One stage to draw: its name, status and the stages it reads from.
pub struct GraphNode<'a> {
    pub name: &'a str,
    pub status: &'a str,
    pub needs: &'a [String],
}

const BOX_W: f64 = 150.0;
const BOX_H: f64 = 40.0;
const COL_GAP: f64 = 44.0;
const ROW_GAP: f64 = 14.0;
const MARGIN: f64 = 8.0;
/// Longer names are cut (the full name is the node's tooltip).
const MAX_CHARS: usize = 20;

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Column of each node: 0 for a stage that reads no other, else one past its deepest input.
/// `nodes` come in an order where every input precedes its reader (the DAG order).
fn columns(nodes: &[GraphNode]) -> Vec<usize> {
    let mut col: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::with_capacity(nodes.len());
    for n in nodes {
        let c = n.needs.iter().filter_map(|d| col.get(d.as_str())).map(|c| c + 1).max().unwrap_or(0);
        col.insert(n.name, c);
        out.push(c);
    }
    out
}

/// Row of each node within its column: by the mean row of its inputs (barycentre), ties in
/// the given order, so edges cross little for the pipelines people write.
fn rows(nodes: &[GraphNode], cols: &[usize]) -> Vec<usize> {
    let mut row_of: HashMap<&str, usize> = HashMap::new();
    let mut out = vec![0; nodes.len()];
    let depth = cols.iter().max().map_or(0, |m| m + 1);
    for c in 0..depth {
        let mut members: Vec<(f64, usize)> = (0..nodes.len())
            .filter(|&i| cols[i] == c)
            .map(|i| {
                let ups: Vec<usize> = nodes[i].needs.iter().filter_map(|d| row_of.get(d.as_str()).copied()).collect();
                let centre =
                    if ups.is_empty() { i as f64 } else { ups.iter().sum::<usize>() as f64 / ups.len() as f64 };
                (centre, i)
            })
            .collect();
        members.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (r, (_, i)) in members.into_iter().enumerate() {
            out[i] = r;
            row_of.insert(nodes[i].name, r);
        }
    }
    out
}

fn shortened(name: &str) -> String {
    if name.chars().count() <= MAX_CHARS {
        name.to_string()
    } else {
        name.chars().take(MAX_CHARS - 1).collect::<String>() + "…"
    }
}

/// The graph as an `<svg>` element; `href` gives each stage's link.
pub fn svg(nodes: &[GraphNode], href: impl Fn(&str) -> String) -> String {
    let (cols, rows) = (columns(nodes), rows(nodes, &columns(nodes)));
    let at = |i: usize| (MARGIN + cols[i] as f64 * (BOX_W + COL_GAP), MARGIN + rows[i] as f64 * (BOX_H + ROW_GAP));
    let width = MARGIN * 2.0 + (cols.iter().max().map_or(0, |c| c + 1) as f64) * (BOX_W + COL_GAP) - COL_GAP;
    let height = MARGIN * 2.0 + (rows.iter().max().map_or(0, |r| r + 1) as f64) * (BOX_H + ROW_GAP) - ROW_GAP;
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name, i)).collect();
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="stage graph">"#,
        w = width.max(1.0),
        h = height.max(1.0)
    );
    out.push_str(r#"<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" class="arrowhead"/></marker></defs>"#);
    for (i, n) in nodes.iter().enumerate() {
        for up in n.needs.iter().filter_map(|d| index.get(d.as_str())) {
            let ((x0, y0), (x1, y1)) = (at(*up), at(i));
            let (sx, sy, tx, ty) = (x0 + BOX_W, y0 + BOX_H / 2.0, x1, y1 + BOX_H / 2.0);
            let mid = (sx + tx) / 2.0;
            let _ = write!(
                out,
                r#"<path class="edge" data-from="{}" data-to="{}" d="M{sx},{sy} C{mid},{sy} {mid},{ty} {tx},{ty}" marker-end="url(#arrow)"/>"#,
                escape(nodes[*up].name),
                escape(n.name)
            );
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let (x, y) = at(i);
        let _ = write!(
            out,
            r#"<a href="{href}"><g class="node st-{class}" data-stage="{name}"><title>{name}: {status}</title><rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6"/><text class="name" x="{tx}" y="{ty}">{short}</text><text class="status" x="{tx}" y="{sy}">{status}</text></g></a>"#,
            href = escape(&href(n.name)),
            class = n.status.replace(' ', "-"),
            name = escape(n.name),
            status = escape(n.status),
            tx = x + 8.0,
            ty = y + 16.0,
            sy = y + 32.0,
            short = escape(&shortened(n.name)),
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node<'a>(name: &'a str, needs: &'a [String]) -> GraphNode<'a> {
        GraphNode { name, status: "ran", needs }
    }

    #[test]
    fn columns_follow_the_deepest_input_and_rows_their_inputs() {
        let (none, a, ab) = (vec![], vec!["a".to_string()], vec!["a".to_string(), "b".to_string()]);
        let nodes = [node("a", &none), node("x", &none), node("b", &a), node("c", &ab)];
        let cols = columns(&nodes);
        assert_eq!(cols, vec![0, 0, 1, 2]);
        assert_eq!(rows(&nodes, &cols), vec![0, 1, 0, 0]);
        let svg = svg(&nodes, |n| format!("/s/{n}"));
        assert_eq!(svg.matches("class=\"edge\"").count(), 3);
        assert!(svg.contains(r#"<a href="/s/c"><g class="node st-ran" data-stage="c">"#), "{svg}");
    }

    #[test]
    fn names_are_escaped_and_long_ones_cut() {
        let none = vec![];
        let nodes = [node("<script>&a_very_long_stage_name_indeed", &none)];
        let svg = svg(&nodes, |_| "/".into());
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;&amp;a_very_lon…"), "{svg}");
    }
}
