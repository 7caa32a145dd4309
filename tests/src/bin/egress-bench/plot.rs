//! A small hand-written SVG plot: one log-log panel per backend and node, median latency against
//! rule count, one line per approach, with p25–p75 bars. No plotting dependency.

use std::fmt::Write;

/// One line of a panel: (x, median, p25, p75) points.
pub struct Series {
    /// The legend text.
    pub name: &'static str,
    /// (rule count, p50 ms, p25 ms, p75 ms), in increasing rule count.
    pub points: Vec<(f64, f64, f64, f64)>,
}

/// One panel.
pub struct Panel {
    /// e.g. "nft, idle node".
    pub title: String,
    /// Up to three series, drawn in [`COLORS`].
    pub series: Vec<Series>,
}

const COLORS: [&str; 3] = ["#1b7837", "#2166ac", "#b2182b"];
const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 300.0;
const MARGIN_L: f64 = 100.0;
const MARGIN_T: f64 = 70.0;
const MARGIN_R: f64 = 40.0;
const GAP_X: f64 = 110.0;
const GAP_Y: f64 = 80.0;

/// The decades [10^lo, 10^hi] that hold every positive value.
fn decades(values: impl Iterator<Item = f64>) -> (i32, i32) {
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for v in values.filter(|v| *v > 0.0 && v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return (0, 1);
    }
    let (lo, hi) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    (lo, hi.max(lo + 1))
}

fn tick_label(exp: i32, unit: &str) -> String {
    let value = 10f64.powi(exp);
    let text = if exp < 0 {
        format!("{value}")
    } else {
        crate::stats::group_thousands(value as u64)
    };
    format!("{text}{unit}")
}

/// log10 of the smallest and largest positive value, a little apart so the ends are inside.
fn span(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for v in values.filter(|v| *v > 0.0 && v.is_finite()) {
        lo = lo.min(v.log10());
        hi = hi.max(v.log10());
    }
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.04).max(0.05);
    (lo - pad, hi + pad)
}

/// Renders the panels in a 2-column grid as a standalone SVG document.
pub fn render(panels: &[Panel]) -> String {
    let points = || {
        panels
            .iter()
            .flat_map(|p| &p.series)
            .flat_map(|s| &s.points)
    };
    let (x_lo, x_hi) = span(points().map(|p| p.0));
    let (y_lo, y_hi) = decades(points().flat_map(|p| [p.1, p.2, p.3]));
    let rows = panels.len().div_ceil(2).max(1);
    let width = MARGIN_L + 2.0 * PANEL_W + GAP_X + MARGIN_R;
    let height = MARGIN_T + rows as f64 * (PANEL_H + GAP_Y);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="16" text-anchor="middle">Switching the egress address of a chain of N rules: median latency (bars: p25–p75), log-log</text>"#,
        width / 2.0
    );
    for (i, series_name) in panels
        .first()
        .map(|p| p.series.iter().map(|s| s.name).collect::<Vec<_>>())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let x = MARGIN_L + i as f64 * 290.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="42" x2="{}" y2="42" stroke="{c}" stroke-width="2.5"/><circle cx="{}" cy="42" r="3.5" fill="{c}"/><text x="{}" y="46">{series_name}</text>"#,
            x + 24.0,
            x + 12.0,
            x + 30.0,
            c = COLORS[i % COLORS.len()]
        );
    }
    for (index, panel) in panels.iter().enumerate() {
        let left = MARGIN_L + (index % 2) as f64 * (PANEL_W + GAP_X);
        let top = MARGIN_T + (index / 2) as f64 * (PANEL_H + GAP_Y) + 20.0;
        let sx = |x: f64| left + (x.log10() - x_lo) / (x_hi - x_lo) * PANEL_W;
        let sy = |y: f64| {
            top + PANEL_H - (y.max(1e-9).log10() - y_lo as f64) / (y_hi - y_lo) as f64 * PANEL_H
        };
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" font-size="14" text-anchor="middle">{}</text><rect x="{left}" y="{top}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#444"/>"##,
            left + PANEL_W / 2.0,
            top - 8.0,
            panel.title
        );
        for exp in y_lo..=y_hi {
            let y = sy(10f64.powi(exp));
            let _ = writeln!(
                svg,
                r##"<line x1="{left}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                left + PANEL_W,
                left - 6.0,
                y + 4.0,
                tick_label(exp, " ms")
            );
        }
        let x_ticks: Vec<f64> = {
            let mut ticks: Vec<f64> = (x_lo.ceil() as i32..=x_hi.floor() as i32)
                .map(|e| 10f64.powi(e))
                .collect();
            // The rule counts themselves (e.g. 5,000) get a tick too.
            for p in panel.series.iter().flat_map(|s| &s.points) {
                if !ticks.iter().any(|t| (t - p.0).abs() < 0.5) {
                    ticks.push(p.0);
                }
            }
            ticks
        };
        for x in x_ticks {
            let px = sx(x);
            let _ = writeln!(
                svg,
                r##"<line x1="{px}" y1="{top}" x2="{px}" y2="{}" stroke="#eee"/><text x="{px}" y="{}" text-anchor="middle">{}</text>"##,
                top + PANEL_H,
                top + PANEL_H + 16.0,
                crate::stats::group_thousands(x as u64)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">rules in KILO-NAT</text>"#,
            left + PANEL_W / 2.0,
            top + PANEL_H + 34.0
        );
        for (i, series) in panel.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let path: Vec<String> = series
                .points
                .iter()
                .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
                .collect();
            if path.len() > 1 {
                let _ = writeln!(
                    svg,
                    r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2.5"/>"#,
                    path.join(" ")
                );
            }
            for &(x, p50, p25, p75) in &series.points {
                let px = sx(x);
                let _ = writeln!(
                    svg,
                    r#"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="{color}" stroke-width="1.5"/><circle cx="{px:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{}: {} rules, p50 {:.2} ms (p25 {:.2}, p75 {:.2})</title></circle>"#,
                    sy(p25),
                    sy(p75),
                    sy(p50),
                    series.name,
                    x,
                    p50,
                    p25,
                    p75
                );
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_polyline_per_series_on_log_axes() {
        let panel = Panel {
            title: "nft, idle node".into(),
            series: vec![
                Series {
                    name: "a",
                    points: vec![(10.0, 1.0, 0.9, 1.1), (1000.0, 2.0, 1.9, 2.1)],
                },
                Series {
                    name: "b",
                    points: vec![(10.0, 30.0, 29.0, 31.0), (1000.0, 3000.0, 2900.0, 3100.0)],
                },
            ],
        };
        let svg = render(&[panel]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(
            svg.contains(">10,000 ms<"),
            "y axis reaches the next decade"
        );
        assert!(svg.contains(">1,000<"), "x axis labels rule counts");
        assert_eq!(decades([0.5, 3000.0].into_iter()), (-1, 4));
    }
}
