//! `status.svg`: rank 0's loss and tokens/s over the run's time, the tidal windows shaded
//! behind them (plotters' SVG backend; its text is SVG text, no font files needed).

use std::path::Path;

use plotters::prelude::*;

use super::ledger::Ledger;
use crate::error::{Error, Result};
use crate::events::Event;

fn draw_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |e| Error::Launch(format!("drawing {}: {e}", path.display()))
}

/// Draw the run in `run_dir` (its ledger `l`) to `path`.
pub fn draw(run_dir: &Path, l: &Ledger, path: &Path) -> Result<()> {
    let records = crate::events::read(&run_dir.join("events.jsonl"))?;
    let steps: Vec<(f64, f64, f64)> = records
        .iter()
        .filter(|r| r.rank == Some(0))
        .filter_map(|r| match &r.event {
            Event::Step(s) => Some((r.time, s.stats.loss, s.stats.tokens_per_s)),
            _ => None,
        })
        .filter(|s| s.1.is_finite() && s.2.is_finite())
        .collect();
    let t0 = l
        .windows
        .iter()
        .map(|w| w.start)
        .chain(steps.iter().map(|s| s.0))
        .fold(f64::INFINITY, f64::min);
    let t1 = l
        .windows
        .iter()
        .map(|w| w.end)
        .chain(steps.iter().map(|s| s.0))
        .fold(f64::NEG_INFINITY, f64::max);
    let (t0, t1) = match t0.is_finite() && t1 > t0 {
        true => (t0, t1),
        false => (0.0, 1.0),
    };
    // Minutes since the first window opened.
    let x = |t: f64| (t - t0) / 60.0;
    let xmax = x(t1);
    let err = draw_err(path);
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let panels = root.split_evenly((2, 1));
    let series: [(&str, Vec<(f64, f64)>); 2] = [
        (
            "loss (rank 0)",
            steps.iter().map(|s| (x(s.0), s.1)).collect(),
        ),
        (
            "tokens/s (rank 0)",
            steps.iter().map(|s| (x(s.0), s.2)).collect(),
        ),
    ];
    for (panel, (name, points)) in panels.iter().zip(series) {
        let (lo, hi) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        // No point (a window that stopped before its first step) or one value: a range
        // all the same (plotters never ends on an infinite one).
        let (lo, hi) = match (lo.is_finite() && hi.is_finite(), hi > lo) {
            (true, true) => (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)),
            (true, false) => (lo - 0.5, lo + 0.5),
            (false, _) => (0.0, 1.0),
        };
        let mut chart = ChartBuilder::on(panel)
            .caption(name, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..xmax.max(1e-3), lo..hi)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("minutes since the first window opened")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let band = RGBColor(214, 228, 250).filled();
        chart
            .draw_series(
                l.windows
                    .iter()
                    .map(|w| Rectangle::new([(x(w.start), lo), (x(w.end), hi)], band)),
            )
            .map_err(|e| err(e.to_string()))?
            .label("tidal window");
        let handback = RGBColor(230, 120, 40);
        chart
            .draw_series(l.windows.iter().map(|w| {
                PathElement::new(vec![(x(w.handback), lo), (x(w.handback), hi)], handback)
            }))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(points, &BLUE))
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
