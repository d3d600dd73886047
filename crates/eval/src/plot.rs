//! The Pareto plot of an eval run: quality vs compression ratio, one line per method (its
//! budgets joined in ratio order), as SVG (always) and PNG (when a TrueType font is found:
//! plotters' pure-Rust ab_glyph text needs the font's bytes).
use crate::error::{EvalError, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// One method at one budget.
pub struct Point {
    /// Method name (the line it belongs to).
    pub method: String,
    /// fp16 bytes / measured bytes.
    pub ratio: f64,
    /// Metric values, in the order of [`METRICS`].
    pub values: [f64; 3],
}

/// Panel titles.
pub const METRICS: [&str; 3] = [
    "RULER score, free generation (0–100) ↑",
    "answer teacher-forced log-prob ↑",
    "prose KL to the full cache ↓",
];

const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Writes `pareto.svg` and, if a TrueType font is available, `pareto.png` into `dir`. Returns
/// the paths written (without a font only the SVG).
pub fn pareto(points: &[Point], dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let size = (1500, 480);
    let mut written = Vec::new();
    let font = FONTS.iter().find_map(|f| std::fs::read(f).ok());
    if let Some(bytes) = font {
        // ab_glyph wants 'static bytes; one font per process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
        let png = dir.join("pareto.png");
        draw(BitMapBackend::new(&png, size).into_drawing_area(), points).map_err(|why| {
            EvalError::Plot {
                path: png.clone(),
                why,
            }
        })?;
        written.push(png);
    }
    let svg = dir.join("pareto.svg");
    draw(SVGBackend::new(&svg, size).into_drawing_area(), points).map_err(|why| {
        EvalError::Plot {
            path: svg.clone(),
            why,
        }
    })?;
    written.push(svg);
    Ok(written)
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, points: &[Point]) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| format!("{x:?}");
    root.fill(&WHITE).map_err(e)?;
    let mut methods: Vec<&str> = Vec::new();
    for p in points {
        if !methods.contains(&p.method.as_str()) {
            methods.push(&p.method);
        }
    }
    let xmax = points.iter().map(|p| p.ratio).fold(1.0, f64::max) * 1.1;
    for (m, panel) in root.split_evenly((1, 3)).iter().enumerate() {
        let ys: Vec<f64> = points
            .iter()
            .map(|p| p.values[m])
            .filter(|v| v.is_finite())
            .collect();
        let (lo, hi) = ys
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| {
                (a.min(y), b.max(y))
            });
        // A metric no sample measured (e.g. KL without prose samples): an empty panel.
        let (lo, hi) = if ys.is_empty() { (0.0, 1.0) } else { (lo, hi) };
        let pad = ((hi - lo) * 0.08).max(1e-3);
        let mut chart = ChartBuilder::on(panel)
            .caption(METRICS[m], ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(38)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..xmax, (lo - pad)..(hi + pad))
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("compression ratio (fp16 bytes / cache bytes)")
            .draw()
            .map_err(e)?;
        for (i, method) in methods.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mut pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.method == *method && p.values[m].is_finite())
                .map(|p| (p.ratio, p.values[m]))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(e)?
                .label(*method)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(e)?;
        }
        if m == 0 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerLeft)
                .label_font(("sans-serif", 11))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(e)?;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}
