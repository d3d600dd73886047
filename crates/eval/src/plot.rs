//! The plots of an eval run, as SVG (always) and PNG (when a TrueType font is found: plotters'
//! pure-Rust ab_glyph text needs the font's bytes):
//! - the Pareto plot: quality vs compression ratio, one line per method (its budgets joined in
//!   ratio order), hetero and its strongest rival drawn bold with paired-interval error bars,
//!   the rest faded;
//! - per budget, the plans: keep, K bits, V bits, key rank and scorer against layer.
use crate::error::{EvalError, Result};
use crate::methods::PlanRecord;
use axis_evict::ScorerKind;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// One method at one budget.
pub struct Point {
    /// Method name (the line it belongs to).
    pub method: String,
    /// fp16 bytes / measured bytes.
    pub ratio: f64,
    /// Metric values, in the order of [`METRICS`].
    pub values: [f64; 3],
    /// Error bar per metric: the paired interval against full, relative to the value.
    pub bars: [Option<(f64, f64)>; 3],
    /// Drawn bold (hetero and its strongest rival); the rest is faded.
    pub highlight: bool,
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

/// Registers a TrueType font for PNG text once; `false` when none is installed.
fn font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        let Some(bytes) = FONTS.iter().find_map(|f| std::fs::read(f).ok()) else {
            return false;
        };
        // ab_glyph wants 'static bytes; one font per process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    })
}

/// Runs `$draw(area, $arg)` into `<stem>.png` (with a font) and `<stem>.svg` in `$dir`.
macro_rules! png_and_svg {
    ($dir:expr, $stem:expr, $size:expr, $draw:ident, $arg:expr) => {{
        let mut written: Vec<PathBuf> = Vec::new();
        fn fail(path: &Path) -> impl FnOnce(String) -> EvalError + '_ {
            move |why| EvalError::Plot {
                path: path.to_path_buf(),
                why,
            }
        }
        if font() {
            let png = $dir.join(format!("{}.png", $stem));
            $draw(BitMapBackend::new(&png, $size).into_drawing_area(), $arg).map_err(fail(&png))?;
            written.push(png);
        }
        let svg = $dir.join(format!("{}.svg", $stem));
        $draw(SVGBackend::new(&svg, $size).into_drawing_area(), $arg).map_err(fail(&svg))?;
        written.push(svg);
        written
    }};
}

/// Writes `pareto.svg` and, if a TrueType font is available, `pareto.png` into `dir`. Returns
/// the paths written (without a font only the SVG).
pub fn pareto(points: &[Point], dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(png_and_svg!(
        dir,
        "pareto",
        (1500, 520),
        draw_pareto,
        points
    ))
}

/// Writes `plans_<budget>.svg` (and `.png` with a font): each method's plan at `budget` for
/// the longest context it was planned for, one line per method, against layer. Nothing when no
/// plan was made at the budget.
pub fn layers(plans: &[PlanRecord], budget: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut chosen: Vec<&PlanRecord> = Vec::new();
    for p in plans.iter().filter(|p| p.budget == budget) {
        let longest = |q: &PlanRecord| q.tokens.iter().copied().max().unwrap_or(0);
        match chosen.iter_mut().find(|c| c.method == p.method) {
            Some(c) if longest(c) < longest(p) => *c = p,
            Some(_) => {}
            None => chosen.push(p),
        }
    }
    // Methods with the same plan are one line, named after all of them.
    let mut lines: Vec<(String, &PlanRecord)> = Vec::new();
    for p in chosen {
        match lines.iter_mut().find(|(_, q)| q.plan == p.plan) {
            Some((name, _)) => {
                name.push_str(" = ");
                name.push_str(&p.method);
            }
            None => lines.push((p.method.clone(), p)),
        }
    }
    if lines.is_empty() {
        return Ok(Vec::new());
    }
    let stem = format!("plans_{}", budget.replace(['/', ' '], "-"));
    Ok(png_and_svg!(
        dir,
        stem,
        (1600, 900),
        draw_layers,
        (&lines, budget)
    ))
}

/// A faded version of a palette colour.
fn faded(c: RGBAColor) -> RGBAColor {
    RGBAColor(c.0, c.1, c.2, 0.45)
}

fn draw_pareto<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    points: &[Point],
) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| format!("{x:?}");
    root.fill(&WHITE).map_err(e)?;
    let root = root
        .titled(
            "bold: hetero (red) and its most frequent best rival (blue); error bars: 95 % paired interval of the difference to full",
            ("sans-serif", 14),
        )
        .map_err(e)?;
    // Faded methods first, so the highlighted ones are drawn on top and listed last.
    let mut methods: Vec<(&str, bool)> = Vec::new();
    for p in points {
        if !methods.iter().any(|(m, _)| *m == p.method) {
            methods.push((&p.method, p.highlight));
        }
    }
    methods.sort_by_key(|(_, h)| *h);
    let xmax = points.iter().map(|p| p.ratio).fold(1.0, f64::max) * 1.1;
    for (m, panel) in root.split_evenly((1, 3)).iter().enumerate() {
        let ys: Vec<f64> = points
            .iter()
            .flat_map(|p| {
                let v = p.values[m];
                let (lo, hi) = p.bars[m].filter(|_| p.highlight).unwrap_or((0.0, 0.0));
                [v + lo, v + hi]
            })
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
        for (i, (method, highlight)) in methods.iter().enumerate() {
            let color = if *highlight {
                if *method == "hetero" || method.starts_with("hetero =") {
                    RED.to_rgba()
                } else {
                    BLUE.to_rgba()
                }
            } else {
                faded(Palette99::pick(i).to_rgba())
            };
            let width = if *highlight { 3 } else { 1 };
            let mine: Vec<&Point> = points
                .iter()
                .filter(|p| p.method == *method && p.values[m].is_finite())
                .collect();
            let mut pts: Vec<(f64, f64)> = mine.iter().map(|p| (p.ratio, p.values[m])).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(width)))
                .map_err(e)?
                .label(*method)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(width))
                });
            chart
                .draw_series(
                    pts.iter()
                        .map(|&p| Circle::new(p, width + 1, color.filled())),
                )
                .map_err(e)?;
            if *highlight {
                chart
                    .draw_series(mine.iter().filter_map(|p| {
                        let (lo, hi) = p.bars[m]?;
                        let v = p.values[m];
                        Some(ErrorBar::new_vertical(
                            p.ratio,
                            v + lo,
                            v,
                            v + hi,
                            color.stroke_width(2),
                            8,
                        ))
                    }))
                    .map_err(e)?;
            }
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

/// Hetero bold red, its variants bold, the rest thin palette colours.
fn style(name: &str, i: usize) -> (RGBAColor, u32) {
    match name {
        n if n == "hetero" || n.starts_with("hetero =") => (RED.to_rgba(), 3),
        n if n.starts_with("hetero") => (Palette99::pick(i + 3).to_rgba(), 3),
        _ => (Palette99::pick(i + 3).to_rgba(), 1),
    }
}

/// The value of one plan panel at a layer.
type Field = fn(&router::Expert) -> f64;

/// Panels of the plan plot: title and what each layer's expert shows there.
const FIELDS: [(&str, Field); 6] = [
    ("keep ratio", |e| e.evict.map_or(1.0, |s| s.keep.get())),
    ("K bits (16 = fp16)", |e| {
        e.quant.map_or(16.0, |q| f64::from(q.k_bits.get()))
    }),
    ("V bits (16 = fp16)", |e| {
        e.quant.map_or(16.0, |q| f64::from(q.v_bits.get()))
    }),
    ("key rank (0 = not projected)", key_rank),
    ("scorer", |e| {
        e.evict
            .and_then(|s| ScorerKind::ALL.iter().position(|k| *k == s.scorer))
            .map_or(-1.0, |i| i as f64)
    }),
    ("fp16 window (tokens)", |e| e.residual() as f64),
];

/// The width keys reach quantization with, whichever stage projected them (low rank, shared
/// bases); 0 when none did.
fn key_rank(e: &router::Expert) -> f64 {
    const WIDE: usize = 1 << 20;
    let shape = kv_tensor::LayerShape {
        batch: 1,
        kv_heads: 1,
        tokens: 1,
        head_dim: WIDE,
    };
    let w = kv_tensor::output_shape(&e.plan_stages(), kv_tensor::Side::Keys, &shape).head_dim;
    if w < WIDE { w as f64 } else { 0.0 }
}

fn draw_layers<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    (plans, budget): (&[(String, &PlanRecord)], &str),
) -> Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| format!("{x:?}");
    root.fill(&WHITE).map_err(e)?;
    let root = root
        .titled(
            &format!("plans at {budget} of fp16 (longest context)"),
            ("sans-serif", 20),
        )
        .map_err(e)?;
    let layers = plans
        .iter()
        .map(|(_, p)| p.plan.layers.len())
        .max()
        .unwrap_or(1);
    let panels = root.split_evenly((2, 3));
    for (f, (title, field)) in FIELDS.iter().enumerate() {
        let values: Vec<f64> = plans
            .iter()
            .flat_map(|(_, p)| p.plan.layers.iter().map(field))
            .collect();
        let hi = values.iter().copied().fold(1.0, f64::max);
        let lo = values.iter().copied().fold(0.0, f64::min);
        let mut chart = ChartBuilder::on(&panels[f])
            .caption(*title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(if f == 4 { 130 } else { 45 })
            .build_cartesian_2d(
                -0.5..(layers as f64 - 0.5),
                (lo - 0.05 * (hi - lo + 1.0))..(hi * 1.05 + 0.05),
            )
            .map_err(e)?;
        let scorer_name = |y: &f64| {
            let i = y.round();
            if (y - i).abs() > 0.01 || i < 0.0 {
                return if i < 0.0 && (y - i).abs() < 0.01 {
                    "none".into()
                } else {
                    String::new()
                };
            }
            ScorerKind::ALL
                .get(i as usize)
                .map_or(String::new(), |k| k.name().to_string())
        };
        let mut mesh = chart.configure_mesh();
        mesh.x_desc("layer")
            .x_label_formatter(&|x: &f64| format!("{x:.0}"));
        if f == 4 {
            mesh.y_label_formatter(&scorer_name)
                .y_labels(ScorerKind::ALL.len() + 2);
        }
        mesh.draw().map_err(e)?;
        for (i, (name, p)) in plans.iter().enumerate() {
            let (color, width) = style(name, i);
            // Methods drawn side by side within a layer so equal values stay visible.
            let dx = (i as f64 - plans.len() as f64 / 2.0) * 0.04;
            let pts: Vec<(f64, f64)> = p
                .plan
                .layers
                .iter()
                .enumerate()
                .map(|(l, x)| (l as f64 + dx, field(x)))
                .collect();
            // The scorer is a category: points only.
            if f != 4 {
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(width)))
                    .map_err(e)?;
            }
            chart
                .draw_series(
                    pts.iter()
                        .map(|&q| Circle::new(q, width + 1, color.filled())),
                )
                .map_err(e)?;
        }
    }
    // The legend in the sixth panel.
    let legend = &panels[5];
    for (i, (name, p)) in plans.iter().enumerate() {
        let (color, width) = style(name, i);
        let y = 40 + 26 * i as i32;
        legend
            .draw(&PathElement::new(
                vec![(20, y), (60, y)],
                color.stroke_width(width + 1),
            ))
            .map_err(e)?;
        let longest = p.tokens.iter().copied().max().unwrap_or(0);
        let text = format!("{name} (plan for {longest} tokens)");
        legend
            .draw(&Text::new(text, (70, y - 8), ("sans-serif", 15)))
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}
