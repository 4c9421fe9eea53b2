//! SVG plot of one scenario: load with Tidal's forecast band (top), replicas per policy (bottom).

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use super::Scenario;

const MAX_POINTS: usize = 1200;

/// Averages `(x, y)` points into at most `bins` equal-width bins over `[0, x_max]`.
pub fn bin_mean(points: &[(f64, f64)], x_max: f64, bins: usize) -> Vec<(f64, f64)> {
    if points.len() <= bins || x_max <= 0.0 {
        return points.to_vec();
    }
    let w = x_max / bins as f64;
    let mut sum = vec![(0.0, 0.0, 0usize); bins];
    for &(x, y) in points {
        let b = ((x / w) as usize).min(bins - 1);
        sum[b].0 += x;
        sum[b].1 += y;
        sum[b].2 += 1;
    }
    sum.into_iter()
        .filter(|s| s.2 > 0)
        .map(|(x, y, n)| (x / n as f64, y / n as f64))
        .collect()
}

const COLORS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
];

fn color_of(policy: &str) -> RGBColor {
    match policy {
        "tidal" => COLORS[0],
        "hpa" => COLORS[1],
        "kpa" => COLORS[2],
        "aibrix" => COLORS[3],
        _ => COLORS[4],
    }
}

/// Writes the scenario's plot to `path` (SVG).
pub fn plot_scenario(sc: &Scenario, path: &Path) -> anyhow::Result<()> {
    let e = |x: &dyn std::fmt::Display| anyhow!("plotting {}: {x}", path.display());
    let dt = sc.trace.tick_s;
    let duration = sc.trace.duration_s();
    let (unit, div) = if duration > 3.0 * 3600.0 {
        ("hours", 3600.0)
    } else {
        ("minutes", 60.0)
    };
    let x_max = duration / div;
    // Load as the per-minute (or coarser) mean rate.
    let per = ((60.0 / dt).round() as usize).max(1);
    let load: Vec<(f64, f64)> = sc
        .cloud_arrivals
        .chunks(per)
        .enumerate()
        .map(|(i, c)| {
            let x = (i * per) as f64 * dt / div;
            (x, c.iter().sum::<f64>() / (c.len() as f64 * dt))
        })
        .collect();
    let load = bin_mean(&load, x_max, MAX_POINTS);
    let tidal = sc.runs.iter().find(|r| r.policy == "tidal");
    let fc: Vec<_> = tidal
        .map(|r| {
            r.forecasts
                .iter()
                .filter(|f| f.target_s <= duration)
                .copied()
                .collect()
        })
        .unwrap_or_default();
    let pts = |g: &dyn Fn(&super::engine::ForecastPoint) -> f64| {
        let v: Vec<(f64, f64)> = fc.iter().map(|f| (f.target_s / div, g(f))).collect();
        bin_mean(&v, x_max, MAX_POINTS)
    };
    let (upper, lower, pred) = (pts(&|f| f.upper), pts(&|f| f.lower), pts(&|f| f.predicted));
    let y_max = load
        .iter()
        .chain(&upper)
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(1e-6)
        * 1.1;
    let reps: Vec<(String, Vec<(f64, f64)>)> = sc
        .runs
        .iter()
        .map(|r| {
            let v: Vec<(f64, f64)> = r
                .syncs
                .iter()
                .map(|s| (s.time_s / div, (s.cloud_desired + s.edge_desired) as f64))
                .collect();
            (r.policy.clone(), bin_mean(&v, x_max, MAX_POINTS))
        })
        .collect();
    let r_max = reps
        .iter()
        .flat_map(|r| r.1.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;

    let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let (top, bottom) = root.split_vertically(400);
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("{}: load and Tidal forecast band", sc.trace.name),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(unit)
        .y_desc("requests/s (cloud)")
        .draw()
        .map_err(|x| e(&x))?;
    if !upper.is_empty() {
        let mut band: Vec<(f64, f64)> = upper.clone();
        band.extend(lower.iter().rev().copied());
        let fill = COLORS[0].mix(0.2);
        chart
            .draw_series(std::iter::once(Polygon::new(band, fill.filled())))
            .map_err(|x| e(&x))?
            .label("Tidal prediction interval (at horizon)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], fill.filled()));
        chart
            .draw_series(LineSeries::new(pred, COLORS[0].stroke_width(1)))
            .map_err(|x| e(&x))?
            .label("Tidal point forecast")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], COLORS[0]));
    }
    chart
        .draw_series(LineSeries::new(load, BLACK.stroke_width(1)))
        .map_err(|x| e(&x))?
        .label("arrivals (1-min mean)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;

    let mut chart = ChartBuilder::on(&bottom)
        .caption("replicas (cloud + edge) per policy", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..r_max)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc(unit)
        .y_desc("replicas")
        .draw()
        .map_err(|x| e(&x))?;
    for (name, v) in reps {
        let c = color_of(&name);
        chart
            .draw_series(LineSeries::new(v, c.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_mean_averages_within_bins() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, i as f64)).collect();
        let b = bin_mean(&pts, 10.0, 2);
        assert_eq!(b, vec![(2.0, 2.0), (7.0, 7.0)]);
        assert_eq!(bin_mean(&pts, 10.0, 20).len(), 10);
    }
}
