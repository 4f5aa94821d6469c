//! The report's plots (plotters): one SVG and one PNG per plot id of the recorded
//! [`crate::series`]; lines (log x when the points span decades) or horizontal bars.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::series::{Data, Series};

/// Fonts plotters measures and draws text with (DejaVu, from Debian's
/// `fonts-dejavu-core`).
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a font for plotters; false when none is installed.
pub fn register_font() -> bool {
    for f in FONTS {
        if let Ok(bytes) = std::fs::read(f) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Renders every plot into `dir` as `<plot>.svg` and `<plot>.png`; returns the files.
pub fn render(dir: &Path, series: &[Series], caption: &str) -> Result<Vec<PathBuf>, String> {
    let mut plots: BTreeMap<&str, Vec<&Series>> = BTreeMap::new();
    for s in series {
        plots.entry(s.plot.as_str()).or_default().push(s);
    }
    let mut files = Vec::new();
    for (id, ss) in plots {
        let svg = dir.join(format!("{id}.svg"));
        let png = dir.join(format!("{id}.png"));
        {
            let root = SVGBackend::new(&svg, (960, 540)).into_drawing_area();
            draw(&root, &ss, caption).map_err(|e| format!("{id}.svg: {e}"))?;
            root.present().map_err(|e| format!("{id}.svg: {e}"))?;
        }
        {
            let root = BitMapBackend::new(&png, (960, 540)).into_drawing_area();
            draw(&root, &ss, caption).map_err(|e| format!("{id}.png: {e}"))?;
            root.present().map_err(|e| format!("{id}.png: {e}"))?;
        }
        files.push(svg);
        files.push(png);
    }
    Ok(files)
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, ss: &[&Series], caption: &str) -> Res
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(510);
    lower.draw_text(caption, &("sans-serif", 13).into_text_style(root), (10, 8))?;
    let title = ss.first().map_or("", |s| s.title.as_str());
    let lines: Vec<(&str, &[(f64, f64)])> = ss
        .iter()
        .filter_map(|s| match &s.data {
            Data::Line { label, points } => Some((label.as_str(), points.as_slice())),
            Data::Bars(_) => None,
        })
        .collect();
    if !lines.is_empty() {
        return draw_lines(&upper, title, &lines);
    }
    let bars: Vec<(String, f64)> = ss
        .iter()
        .flat_map(|s| match &s.data {
            Data::Bars(b) => b.clone(),
            Data::Line { .. } => Vec::new(),
        })
        .collect();
    draw_bars(&upper, title, &bars)
}

fn draw_lines<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    lines: &[(&str, &[(f64, f64)])],
) -> Res
where
    DB::ErrorType: 'static,
{
    let pts = || {
        lines
            .iter()
            .flat_map(|(_, p)| p.iter())
            .filter(|p| p.1.is_finite())
    };
    let (xmin, xmax) = pts().fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
    let ymax = pts().fold(0.0f64, |a, p| a.max(p.1)) * 1.15;
    let ymax = if ymax > 0.0 { ymax } else { 1.0 };
    let log_x = xmin > 0.0 && xmax / xmin >= 50.0;
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64);
    let palette = |i: usize| Palette99::pick(i).to_rgba();
    if log_x {
        let mut c = b.build_cartesian_2d((xmin * 0.8..xmax * 1.25).log_scale(), 0.0..ymax)?;
        c.configure_mesh().draw()?;
        for (i, (label, p)) in lines.iter().enumerate() {
            let col = palette(i);
            let p: Vec<(f64, f64)> = p.iter().copied().filter(|q| q.0 > 0.0).collect();
            c.draw_series(LineSeries::new(p.clone(), col.stroke_width(2)))?
                .label(*label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], col.stroke_width(2)));
            c.draw_series(p.iter().map(|q| Circle::new(*q, 3, col.filled())))?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    } else {
        let span = (xmax - xmin).max(1e-9);
        let mut c = b.build_cartesian_2d(xmin - 0.05 * span..xmax + 0.05 * span, 0.0..ymax)?;
        c.configure_mesh().draw()?;
        for (i, (label, p)) in lines.iter().enumerate() {
            let col = palette(i);
            c.draw_series(LineSeries::new(p.to_vec(), col.stroke_width(2)))?
                .label(*label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], col.stroke_width(2)));
            c.draw_series(p.iter().map(|q| Circle::new(*q, 3, col.filled())))?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    bars: &[(String, f64)],
) -> Res
where
    DB::ErrorType: 'static,
{
    let n = bars.len().max(1);
    let xmax = bars.iter().map(|b| b.1).fold(0.0f64, f64::max) * 1.2;
    let xmax = if xmax > 0.0 { xmax } else { 1.0 };
    let mut c = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(300)
        .build_cartesian_2d(0.0..xmax, 0.0..n as f64)?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    c.configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            let i = y.floor() as usize;
            if (y - y.floor() - 0.5).abs() < 0.01 && i < labels.len() {
                labels[n - 1 - i].clone()
            } else {
                String::new()
            }
        })
        .draw()?;
    for (i, (_, v)) in bars.iter().enumerate() {
        let y = (n - 1 - i) as f64;
        let col = Palette99::pick(i).to_rgba();
        c.draw_series(std::iter::once(Rectangle::new(
            [(0.0, y + 0.15), (*v, y + 0.85)],
            col.filled(),
        )))?;
        c.draw_series(std::iter::once(Text::new(
            format!("{v:.3}"),
            (*v, y + 0.5),
            ("sans-serif", 12).into_font(),
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::Data;

    #[test]
    fn renders_lines_and_bars_to_svg_and_png() {
        if !register_font() {
            eprintln!("no DejaVu font installed (fonts-dejavu-core): plots not tested");
            return;
        }
        let dir = std::env::temp_dir().join(format!("twinrun-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = vec![
            Series {
                plot: "p".into(),
                title: "pause (us) vs dirty pages".into(),
                data: Data::Line {
                    label: "256 MiB".into(),
                    points: vec![(100.0, 10.0), (1000.0, 50.0), (10000.0, 200.0)],
                },
            },
            Series {
                plot: "b".into(),
                title: "GB/s".into(),
                data: Data::Bars(vec![("raw".into(), 2.0), ("alink".into(), 1.5)]),
            },
        ];
        let files = render(&dir, &s, "test machine").unwrap();
        assert_eq!(files.len(), 4);
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() > 500, "{f:?}");
        }
        let svg = std::fs::read_to_string(dir.join("p.svg")).unwrap();
        assert!(svg.contains("256 MiB") && svg.contains("<svg"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
