//! The report's PNG plots. Text is drawn with the DejaVu Sans font compiled into the binary
//! (`assets/`, with its licence), so rendering needs no system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
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
pub fn training_curves(file: &Path, series: &Value) -> Result<(), PlotError> {
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
    chart
        .configure_mesh()
        .x_desc("tokens seen")
        .y_desc("loss (nats/token)")
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
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font((FAMILY, 14))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// One bar per label.
pub fn bars(file: &Path, title: &str, labels: &[String], values: &[f64], y_label: &str) -> Result<(), PlotError> {
    ensure_font();
    let e = draw_err(file);
    if labels.len() != values.len() || labels.is_empty() {
        let msg = format!("bars needs as many values as labels ({} vs {})", values.len(), labels.len());
        return Err(data_err(file, msg));
    }
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let look = BarLook { caption: 22, text: 13, margin: 15, x_area: 90, y_area: 70, headroom: 1.15 };
    bar_panel(&root, title, labels, values, Some(y_label), &look).map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Sizes of one bar panel: font sizes, margins, label areas, and the room above the tallest bar.
struct BarLook {
    caption: u32,
    text: u32,
    margin: u32,
    x_area: u32,
    y_area: u32,
    headroom: f64,
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawResult = Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

/// Labelled bars with their values written above them, on `area`.
fn bar_panel(
    area: &Area,
    title: &str,
    labels: &[String],
    values: &[f64],
    y_label: Option<&str>,
    look: &BarLook,
) -> DrawResult {
    let top = values.iter().cloned().fold(0.0, f64::max) * look.headroom + 1e-12;
    let n = labels.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, look.caption))
        .margin(look.margin)
        .x_label_area_size(look.x_area)
        .y_label_area_size(look.y_area)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)?;
    let names = labels.to_vec();
    let x_label = move |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
        _ => String::new(),
    };
    let y_value = |v: &f64| format_value(*v);
    let mut mesh = chart.configure_mesh();
    mesh.disable_x_mesh()
        .y_label_formatter(&y_value)
        .label_style((FAMILY, look.text))
        .x_labels(n)
        .x_label_formatter(&x_label);
    if let Some(y) = y_label {
        mesh.y_desc(y);
    }
    mesh.draw()?;
    for (i, &v) in values.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let bar = [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), v)];
        chart.draw_series(std::iter::once(Rectangle::new(bar, c.mix(0.8).filled())))?;
        let at = (SegmentValue::CenterOf(i), v + top * 0.02);
        chart.draw_series(std::iter::once(Text::new(format_value(v), at, (FAMILY, look.text).into_font())))?;
    }
    Ok(())
}

fn format_value(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Labelled points: `[[label, x, y], …]`.
pub fn scatter(file: &Path, title: &str, points: &Value, x_label: &str, y_label: &str) -> Result<(), PlotError> {
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
    let root = BitMapBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1 + (x1 - x0) * 0.25, y0..y1)
        .map_err(|x| e(&x))?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).label_style((FAMILY, 14)).draw().map_err(|x| e(&x))?;
    for (i, (label, x, y)) in pts.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart.draw_series(std::iter::once(Circle::new((*x, *y), 6, c.filled()))).map_err(|x| e(&x))?;
        chart
            .draw_series(std::iter::once(Text::new(format!("  {label}"), (*x, *y), (FAMILY, 14).into_font())))
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Three panels along a compression chain: parameters, bytes on disk, perplexity per step.
/// `steps`: [{label, params, bytes, perplexity}, …].
pub fn progression(file: &Path, steps: &Value) -> Result<(), PlotError> {
    ensure_font();
    let e = draw_err(file);
    let steps = steps.as_array().ok_or_else(|| data_err(file, "progression needs a list of steps"))?;
    let labels: Vec<String> =
        steps.iter().map(|s| s.get("label").and_then(Value::as_str).unwrap_or("?").to_string()).collect();
    let col = |k: &str| -> Vec<f64> { steps.iter().map(|s| s.get(k).and_then(Value::as_f64).unwrap_or(0.0)).collect() };
    let root = BitMapBackend::new(file, (1200, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let panels = root.split_evenly((1, 3));
    let look = BarLook { caption: 18, text: 11, margin: 10, x_area: 70, y_area: 60, headroom: 1.2 };
    for (panel, (key, title)) in panels.iter().zip([
        ("params", "parameters"),
        ("bytes", "bytes on disk"),
        ("perplexity", "validation perplexity"),
    ]) {
        bar_panel(panel, title, &labels, &col(key), None, &look).map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
