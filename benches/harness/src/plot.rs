//! The PNG: round-trip time against percentile, HdrHistogram style (the x axis is
//! −log10(1 − q), so 90 %, 99 %, 99.9 % ... are evenly spaced and the tail gets the room),
//! one panel per topology for the passive and the active VMI workloads.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::register_font;

use crate::work::Workload;
use crate::{Row, Topology};

/// Where Debian's fonts-dejavu-core puts its sans font (`make bench` installs it).
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const WIDTH_PX: u32 = 1800;
const HEIGHT_PX: u32 = 1000;
/// Contenders drawn (the others are in the tables); colors in this order.
const DRAWN: [(&str, RGBColor); 7] = [
    ("direct", RGBColor(0, 0, 0)),
    ("kvmi-relay", RGBColor(0, 114, 178)),
    ("kvmi-relay copy", RGBColor(0, 158, 115)),
    ("copy loop", RGBColor(120, 120, 120)),
    ("socat", RGBColor(213, 94, 0)),
    ("socat nodelay", RGBColor(230, 159, 0)),
    ("proxyd", RGBColor(204, 121, 167)),
];

/// A contender's name, color and (x = −log10(1 − q), RTT µs) points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

fn load_font() -> Result<(), String> {
    let bytes = std::fs::read(FONT_PATH).map_err(|e| format!("font {FONT_PATH}: {e}"))?;
    // plotters keeps fonts for the life of the process; this runs once per bench run.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| format!("{FONT_PATH} is not a usable font"))
}

fn percentile_label(x: f64) -> String {
    let decimals = (x.round() as i64 - 2).max(0) as usize;
    format!("{:.decimals$}%", 100.0 * (1.0 - 10f64.powf(-x)))
}

pub fn draw(path: &Path, rows: &[Row]) -> Result<(), String> {
    load_font()?;
    let root = BitMapBackend::new(path, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled("kvmi-relay bench: round-trip time by percentile (same run, interleaved)", ("sans-serif", 26))
        .map_err(|e| e.to_string())?;
    let panels = root.split_evenly((2, 3));
    let mut i = 0;
    for w in [Workload::Passive, Workload::Active] {
        for t in Topology::ALL {
            let area = &panels[i];
            i += 1;
            let series: Vec<Series> = DRAWN
                .iter()
                .filter_map(|(name, color)| {
                    let r = rows.iter().find(|r| r.workload == w && r.topology == t && r.contender == *name)?;
                    let h = r.rtt.as_ref()?;
                    // Up to the percentile the sample count can still resolve.
                    let x_end = (h.len() as f64).log10().floor().max(1.0);
                    let pts = (0..=(x_end * 20.0) as usize)
                        .map(|k| {
                            let x = k as f64 / 20.0;
                            (x, h.value_at_quantile(1.0 - 10f64.powf(-x)).max(1) as f64 / 1000.0)
                        })
                        .collect();
                    Some((*name, *color, pts))
                })
                .collect();
            if series.is_empty() {
                continue;
            }
            let pts = series.iter().flat_map(|s| s.2.iter());
            let x_max = pts.clone().map(|p| p.0).fold(1.0, f64::max);
            let y_min = pts.clone().map(|p| p.1).fold(f64::MAX, f64::min).max(1.0) * 0.8;
            let y_max = pts.map(|p| p.1).fold(0.0, f64::max) * 1.3;
            let caption = format!("{} — {}", w.name(), t.name());
            let mut chart = ChartBuilder::on(area)
                .caption(caption, ("sans-serif", 20))
                .margin(10)
                .margin_right(36)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_labels(x_max as usize + 1)
                .x_label_formatter(&|x| percentile_label(*x))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .x_desc("percentile")
                .y_desc("RTT µs (log)")
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(|e| e.to_string())?;
            for (name, color, pts) in series {
                chart
                    .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(|e| e.to_string())?;
        }
    }
    root.present().map_err(|e| e.to_string())
}
