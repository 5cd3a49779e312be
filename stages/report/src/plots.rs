//! The report's PNG plots. Text is drawn with the DejaVu Sans font compiled into the binary
//! (`assets/`, with its licence), so rendering needs no system fonts.
//!
//! Every axis has a title and ticks in readable units (`100k`, `1.2 MB`, `2.5`), never raw
//! floats. Bars are horizontal, so long model names never collide; scatter points are named in
//! a legend, not beside the points. Each function returns the [`Axes`] it drew (titles and the
//! tick texts), which the tests check.

use std::cell::RefCell;
use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use serde_json::Value;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (960, 540);
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("plot {file}: {message}")]
    Draw { file: String, message: String },
    #[error("plot {file}: {message}")]
    Data { file: String, message: String },
}

/// What one panel's axes show: their titles and the tick texts drawn, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Axes {
    pub x_desc: String,
    pub y_desc: String,
    pub x_ticks: Vec<String>,
    pub y_ticks: Vec<String>,
    /// Series or point names shown in a legend.
    pub legend: Vec<String>,
}

/// How an axis's numbers read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Counts: `950`, `100k`, `1.5M`, `2G`.
    Count,
    /// Bytes, decimal: `512 B`, `800 kB`, `1.2 MB`.
    Bytes,
    /// Plain numbers with at most three decimals, trailing zeros dropped: `2.5`, `20`.
    Plain,
}

impl Unit {
    /// The unit an axis titled `title` over values up to `max` reads best in.
    pub fn for_axis(title: &str, max: f64) -> Unit {
        if title.to_lowercase().contains("bytes") {
            Unit::Bytes
        } else if max.abs() >= 10_000.0 {
            Unit::Count
        } else {
            Unit::Plain
        }
    }
}

/// `v` written in `unit`.
pub fn tick(v: f64, unit: Unit) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    let scaled = |steps: &[(f64, &str)], sep: &str| {
        let (div, suffix) = steps.iter().find(|(d, _)| v.abs() >= *d).copied().unwrap_or((1.0, ""));
        let x = v / div;
        let digits = if x.abs() >= 100.0 {
            0
        } else if x.abs() >= 10.0 {
            1
        } else {
            2
        };
        format!("{}{sep}{suffix}", trim(format!("{x:.digits$}")))
    };
    match unit {
        Unit::Count => scaled(&[(1e9, "G"), (1e6, "M"), (1e3, "k")], ""),
        Unit::Bytes if v.abs() < 1e3 => format!("{} B", trim(format!("{v:.0}"))),
        Unit::Bytes => scaled(&[(1e9, "GB"), (1e6, "MB"), (1e3, "kB")], " "),
        Unit::Plain => {
            let s = trim(format!("{v:.3}"));
            if s == "-0" {
                "0".into()
            } else {
                s
            }
        }
    }
}

/// Tick texts as plotters asks for them, each kept once, in order.
#[derive(Default)]
struct Recorder(RefCell<Vec<String>>);

impl Recorder {
    fn note(&self, s: String) -> String {
        let mut seen = self.0.borrow_mut();
        if !seen.contains(&s) {
            seen.push(s.clone());
        }
        s
    }
    fn take(&self) -> Vec<String> {
        self.0.take()
    }
}

static FONT_ONCE: Once = Once::new();

fn ensure_font() {
    FONT_ONCE.call_once(|| {
        // The font is compiled in and known to parse; a failure would show up as missing text.
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

fn draw_err(file: &Path) -> impl Fn(&dyn std::fmt::Display) -> PlotError + '_ {
    move |e| PlotError::Draw { file: file.display().to_string(), message: e.to_string() }
}

fn data_err(file: &Path, message: impl Into<String>) -> PlotError {
    PlotError::Data { file: file.display().to_string(), message: message.into() }
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if (hi - lo).abs() < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = 0.05 * (hi - lo);
    (lo - pad, hi + pad)
}

/// Train (dashed) and validation (solid) loss against tokens seen, one colour per model.
/// `series`: {label: [{tokens, train_loss, val_loss}, …]} (a train stage's metrics.csv rows).
pub fn training_curves(file: &Path, series: &Value) -> Result<Axes, PlotError> {
    ensure_font();
    let e = draw_err(file);
    let map =
        series.as_object().ok_or_else(|| data_err(file, "training_curves needs a map of label → metrics rows"))?;
    // (label, train points, validation points)
    type Curves = (String, Vec<(f64, f64)>, Vec<(f64, f64)>);
    let mut lines: Vec<Curves> = Vec::new();
    for (label, rows) in map {
        let rows = rows.as_array().ok_or_else(|| data_err(file, format!("`{label}`: expected metrics rows")))?;
        let get = |r: &Value, k: &str| r.get(k).and_then(Value::as_f64);
        let train = rows.iter().filter_map(|r| Some((get(r, "tokens")?, get(r, "train_loss")?))).collect();
        let val = rows.iter().filter_map(|r| Some((get(r, "tokens")?, get(r, "val_loss")?))).collect();
        lines.push((label.clone(), train, val));
    }
    let (x0, x1) = range(lines.iter().flat_map(|l| l.1.iter().chain(&l.2).map(|p| p.0)));
    let (y0, y1) = range(lines.iter().flat_map(|l| l.1.iter().chain(&l.2).map(|p| p.1)));
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Training curves (solid: validation, dashed: train)", (FAMILY, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0.max(0.0)..x1, y0.max(0.0)..y1)
        .map_err(|x| e(&x))?;
    let (xs, ys) = (Recorder::default(), Recorder::default());
    let mut axes = Axes { x_desc: "tokens seen".into(), y_desc: "loss (nats/token)".into(), ..Axes::default() };
    chart
        .configure_mesh()
        .x_desc(&axes.x_desc)
        .y_desc(&axes.y_desc)
        .x_label_formatter(&|v| xs.note(tick(*v, Unit::Count)))
        .y_label_formatter(&|v| ys.note(tick(*v, Unit::Plain)))
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (label, train, val)) in lines.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart.draw_series(DashedLineSeries::new(train.iter().copied(), 6, 4, c.stroke_width(1))).map_err(|x| e(&x))?;
        chart
            .draw_series(LineSeries::new(val.iter().copied(), c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        axes.legend.push(label.clone());
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FAMILY, 14))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    (axes.x_ticks, axes.y_ticks) = (xs.take(), ys.take());
    Ok(axes)
}

/// One horizontal bar per label, its value written at its end. `value_desc` titles the value
/// axis (and picks its unit: bytes when it says so), `label_desc` the axis of names.
pub fn bars(
    file: &Path,
    title: &str,
    labels: &[String],
    values: &[f64],
    value_desc: &str,
    label_desc: &str,
) -> Result<Axes, PlotError> {
    ensure_font();
    let e = draw_err(file);
    if labels.len() != values.len() || labels.is_empty() {
        let msg = format!("bars needs as many values as labels ({} vs {})", values.len(), labels.len());
        return Err(data_err(file, msg));
    }
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let look = BarLook { caption: 22, text: 13, margin: 15 };
    let axes = bar_panel(&root, title, labels, values, (value_desc, label_desc), &look).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(axes)
}

/// Sizes of one bar panel: font sizes and margin.
struct BarLook {
    caption: u32,
    text: u32,
    margin: u32,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult<T> = Result<T, DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

/// Horizontal labelled bars with their values written at their ends, on `area`; `descs` are
/// the (value axis, label axis) titles.
fn bar_panel(
    area: &Area,
    title: &str,
    labels: &[String],
    values: &[f64],
    descs: (&str, &str),
    look: &BarLook,
) -> DrawResult<Axes> {
    let top = values.iter().cloned().fold(0.0, f64::max) * 1.2 + 1e-12;
    let unit = Unit::for_axis(descs.0, top);
    let n = labels.len().max(1);
    // Room for the longest name at about 0.6 em a character.
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(1) as u32;
    let label_area = (longest * look.text * 6 / 10 + 24).clamp(40, area.dim_in_pixel().0 / 3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, look.caption))
        .margin(look.margin)
        .x_label_area_size(45)
        .y_label_area_size(label_area)
        .build_cartesian_2d(0.0..top, (0..n - 1).into_segmented())?;
    let (xs, ys) = (Recorder::default(), Recorder::default());
    // The first item on the top row, as in a table.
    let row = |i: usize| n - 1 - i;
    let names = labels.to_vec();
    let name_of = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(r) if *r < n => ys.note(names[row(*r)].clone()),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(descs.0)
        .y_desc(descs.1)
        .x_label_formatter(&|v| xs.note(tick(*v, unit)))
        .y_labels(n)
        .y_label_formatter(&name_of)
        .label_style((FAMILY, look.text))
        .draw()?;
    let value_style = TextStyle::from((FAMILY, look.text).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, &v) in values.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let bar = [(0.0, SegmentValue::Exact(row(i))), (v, SegmentValue::Exact(row(i) + 1))];
        let mut rect = Rectangle::new(bar, c.mix(0.8).filled());
        rect.set_margin(4, 4, 0, 0);
        chart.draw_series(std::iter::once(rect))?;
        let at = (v + top * 0.01, SegmentValue::CenterOf(row(i)));
        chart.draw_series(std::iter::once(Text::new(tick(v, unit), at, value_style.clone())))?;
    }
    Ok(Axes {
        x_desc: descs.0.into(),
        y_desc: descs.1.into(),
        x_ticks: xs.take(),
        y_ticks: ys.take(),
        legend: Vec::new(),
    })
}

/// Points 0–7 are circles in the eight colours, 8–15 triangles, and so on alternating.
fn round_marker(i: usize) -> bool {
    (i / COLORS.len()).is_multiple_of(2)
}

/// A marker for the `i`-th point: eight colours, then the same colours as triangles.
fn marker<DB: DrawingBackend>(i: usize, at: (f64, f64)) -> DynElement<'static, DB, (f64, f64)> {
    let c = COLORS[i % COLORS.len()];
    if round_marker(i) {
        Circle::new(at, 6, c.filled()).into_dyn()
    } else {
        TriangleMarker::new(at, 8, c.filled()).into_dyn()
    }
}

/// Labelled points: `[[label, x, y], …]`, named in a legend so labels never overlap.
pub fn scatter(file: &Path, title: &str, points: &Value, x_label: &str, y_label: &str) -> Result<Axes, PlotError> {
    ensure_font();
    let e = draw_err(file);
    let pts: Vec<(String, f64, f64)> = points
        .as_array()
        .ok_or_else(|| data_err(file, "scatter needs a list of [label, x, y]"))?
        .iter()
        .map(|p| Some((p.get(0)?.as_str()?.to_string(), p.get(1)?.as_f64()?, p.get(2)?.as_f64()?)))
        .collect::<Option<_>>()
        .ok_or_else(|| data_err(file, "each scatter point must be [label, x, y]"))?;
    let (x0, x1) = range(pts.iter().map(|p| p.1));
    let (y0, y1) = range(pts.iter().map(|p| p.2));
    let (xu, yu) = (Unit::for_axis(x_label, x1), Unit::for_axis(y_label, y1));
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    // The right third is left free of points for the legend.
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1 + (x1 - x0) * 0.5, y0..y1)
        .map_err(|x| e(&x))?;
    let (xs, ys) = (Recorder::default(), Recorder::default());
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| xs.note(tick(*v, xu)))
        .y_label_formatter(&|v| ys.note(tick(*v, yu)))
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (label, x, y)) in pts.iter().enumerate() {
        chart
            .draw_series(std::iter::once(marker(i, (*x, *y))))
            .map_err(|x| e(&x))?
            .label(label.clone())
            .legend(move |(lx, ly)| EmptyElement::at((lx + 8, ly)) + marker_in_pixels(i));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font((FAMILY, 13))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    let legend = pts.iter().map(|p| p.0.clone()).collect();
    Ok(Axes { x_desc: x_label.into(), y_desc: y_label.into(), x_ticks: xs.take(), y_ticks: ys.take(), legend })
}

/// The legend's copy of [`marker`], in pixel coordinates.
fn marker_in_pixels<DB: DrawingBackend>(i: usize) -> DynElement<'static, DB, (i32, i32)> {
    let c = COLORS[i % COLORS.len()];
    if round_marker(i) {
        Circle::new((0, 0), 5, c.filled()).into_dyn()
    } else {
        TriangleMarker::new((0, 0), 7, c.filled()).into_dyn()
    }
}

/// Three panels along a compression chain: parameters, bytes on disk, perplexity per step.
/// `steps`: [{label, params, bytes, perplexity}, …].
pub fn progression(file: &Path, steps: &Value) -> Result<Vec<Axes>, PlotError> {
    ensure_font();
    let e = draw_err(file);
    let steps = steps.as_array().ok_or_else(|| data_err(file, "progression needs a list of steps"))?;
    // Every step needs its label and three numbers: a missing one drawn as 0 would be a figure
    // nobody measured.
    fn field<'v>(file: &Path, i: usize, s: &'v Value, k: &str) -> Result<&'v Value, PlotError> {
        s.get(k).ok_or_else(|| data_err(file, format!("progression: step {i} has no `{k}`")))
    }
    let mut labels = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let label =
            field(file, i, s, "label")?.as_str().ok_or_else(|| data_err(file, "progression: a `label` is text"))?;
        labels.push(label.to_string());
        for k in ["params", "bytes", "perplexity"] {
            if !field(file, i, s, k)?.as_f64().is_some_and(f64::is_finite) {
                return Err(data_err(file, format!("progression: step `{label}`'s `{k}` is not a number")));
            }
        }
    }
    let col = |k: &str| -> Vec<f64> { steps.iter().filter_map(|s| s.get(k).and_then(Value::as_f64)).collect() };
    let root = BitMapBackend::new(file, (1200, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let panels = root.split_evenly((1, 3));
    let look = BarLook { caption: 18, text: 12, margin: 10 };
    let mut axes = Vec::new();
    for (panel, (key, title, desc)) in panels.iter().zip([
        ("params", "parameters", "parameters"),
        ("bytes", "bytes on disk", "bytes"),
        ("perplexity", "validation perplexity", "perplexity"),
    ]) {
        axes.push(bar_panel(panel, title, &labels, &col(key), (desc, "step"), &look).map_err(|x| e(&x))?);
    }
    root.present().map_err(|x| e(&x))?;
    Ok(axes)
}
