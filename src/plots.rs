//! The report's plots as SVG, drawn with plotters' SVG backend (text stays SVG text: no font
//! files, nothing fetched): the job's timeline, the trainers' loss curves and the ablations'
//! data-scaling curve.

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

/// Series colours (the SVG writes them as `#RRGGBB`).
const GENERATED: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const KEPT: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const COMMITTED: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
const STEPS: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const TUNING: RGBColor = RGBColor(0x94, 0x67, 0xbd);
const MARKER: RGBColor = RGBColor(0x55, 0x55, 0x55);

/// What happened when in a job (µs since the epoch).
#[derive(Clone, Debug, Default)]
pub(crate) struct Timeline {
    /// When the pipeline started.
    pub start_us: i64,
    /// When each proxy was generated.
    pub generated_us: Vec<i64>,
    /// When each kept proxy was judged.
    pub kept_us: Vec<i64>,
    /// When each commit of proxies landed, with the proxies written by then.
    pub committed: Vec<(i64, u64)>,
    /// When each student step started.
    pub student_steps_us: Vec<i64>,
    /// When each of the supervisor's DreamBooth steps started.
    pub supervisor_steps_us: Vec<i64>,
}

fn plot_error(e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow!("drawing a plot: {e:?}")
}

/// A cumulative count as a step curve from `(0, 0)`: `(t, n)` for each event, `t` in seconds.
fn staircase(events: impl IntoIterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    let mut points = vec![(0.0, 0.0)];
    for (t, n) in events {
        let last = points.last().expect("starts with a point").1;
        points.push((t, last));
        points.push((t, n));
    }
    points
}

impl Timeline {
    fn seconds(&self, us: i64) -> f64 {
        (us - self.start_us) as f64 / 1e6
    }

    /// The count of `times` against time, one step per event.
    fn counted(&self, times: &[i64]) -> Vec<(f64, f64)> {
        let mut times = times.to_vec();
        times.sort_unstable();
        staircase(times.iter().enumerate().map(|(i, &t)| (self.seconds(t), (i + 1) as f64)))
    }

    /// Proxies generated, kept and committed (left axis) and student steps (right axis) against
    /// seconds since the pipeline started, with the first student step and the last proxy
    /// marked; `None` when nothing happened.
    pub(crate) fn svg(&self, width: u32, height: u32) -> anyhow::Result<Option<String>> {
        if self.generated_us.is_empty()
            && self.student_steps_us.is_empty()
            && self.supervisor_steps_us.is_empty()
        {
            return Ok(None);
        }
        let generated = self.counted(&self.generated_us);
        let kept = self.counted(&self.kept_us);
        let committed = staircase(self.committed.iter().map(|&(t, n)| (self.seconds(t), n as f64)));
        let steps = self.counted(&self.student_steps_us);
        let tuning = self.counted(&self.supervisor_steps_us);
        let all = [&generated, &kept, &committed, &steps, &tuning];
        let t_max = all.iter().flat_map(|s| s.iter().map(|p| p.0)).fold(1e-3, f64::max) * 1.03;
        let proxies_max =
            [&generated, &kept, &committed].iter().flat_map(|s| s.iter().map(|p| p.1)).fold(1.0, f64::max)
                * 1.05;
        let steps_max = steps.iter().chain(&tuning).map(|p| p.1).fold(1.0, f64::max) * 1.05;
        let first_step = self.student_steps_us.iter().min().map(|&t| self.seconds(t));
        let last_proxy = self.generated_us.iter().max().map(|&t| self.seconds(t));

        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_error)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    "Timeline: the supervisor's tuning, the proxies and the student's steps",
                    ("sans-serif", 18),
                )
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(52)
                .right_y_label_area_size(52)
                .build_cartesian_2d(0.0..t_max, 0.0..proxies_max)
                .map_err(plot_error)?
                .set_secondary_coord(0.0..t_max, 0.0..steps_max);
            chart
                .configure_mesh()
                .x_desc("seconds since the pipeline started")
                .y_desc("proxies")
                .y_label_formatter(&|v| format!("{v:.0}"))
                .light_line_style(WHITE)
                .draw()
                .map_err(plot_error)?;
            chart
                .configure_secondary_axes()
                .y_desc("optimiser steps")
                .y_label_formatter(&|v| format!("{v:.0}"))
                .draw()
                .map_err(plot_error)?;
            for (points, colour, label) in [
                (generated, GENERATED, "proxies generated"),
                (kept, KEPT, "proxies kept"),
                (committed, COMMITTED, "proxies committed"),
            ] {
                chart
                    .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                    .map_err(plot_error)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
            }
            for (points, colour, label) in [
                (tuning, TUNING, "supervisor steps (right axis)"),
                (steps, STEPS, "student steps (right axis)"),
            ] {
                if points.len() > 1 {
                    chart
                        .draw_secondary_series(LineSeries::new(points, colour.stroke_width(2)))
                        .map_err(plot_error)?
                        .label(label)
                        .legend(move |(x, y)| {
                            PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2))
                        });
                }
            }
            for (at, label) in [(first_step, "first student step"), (last_proxy, "last proxy")] {
                let Some(t) = at else { continue };
                let colour = if label == "last proxy" { GENERATED } else { STEPS };
                chart
                    .draw_series(DashedLineSeries::new(
                        [(t, 0.0), (t, proxies_max)],
                        6,
                        4,
                        colour.stroke_width(1),
                    ))
                    .map_err(plot_error)?
                    .label(format!("{label} ({t:.1} s)"))
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(1)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .border_style(MARKER)
                .background_style(WHITE.mix(0.85))
                .draw()
                .map_err(plot_error)?;
            root.present().map_err(plot_error)?;
        }
        Ok(Some(svg))
    }
}

/// Loss against optimiser step, one panel per trainer side by side (their scales differ); trainers
/// without steps are left out, and `None` when none has any.
pub(crate) fn losses_svg(
    curves: &[(&str, &[f64])],
    width: u32,
    height: u32,
) -> anyhow::Result<Option<String>> {
    let curves: Vec<_> = curves.iter().filter(|(_, l)| !l.is_empty()).collect();
    if curves.is_empty() {
        return Ok(None);
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let panels = root.split_evenly((1, curves.len()));
        for (panel, (title, losses)) in panels.iter().zip(&curves) {
            loss_panel(panel, title, losses)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(Some(svg))
}

/// Series colours of [`scaling_svg`], in order.
const SERIES: [RGBColor; 3] = [GENERATED, KEPT, STEPS];

/// A line with points per named series against a count (`x_desc`), for the data-scaling curve;
/// `None` without a point.
pub(crate) fn scaling_svg(
    series: &[(&str, Vec<(f64, f64)>)],
    x_desc: &str,
    width: u32,
    height: u32,
) -> anyhow::Result<Option<String>> {
    let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if points.is_empty() {
        return Ok(None);
    }
    let (x_hi, y_lo, y_hi) =
        points.iter().fold((1.0f64, f64::INFINITY, f64::NEG_INFINITY), |(x, lo, hi), &(px, py)| {
            (x.max(px), lo.min(py), hi.max(py))
        });
    let pad = ((y_hi - y_lo) * 0.1).max(0.01);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("scores against the proxies trained on", ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_hi * 1.05, (y_lo - pad)..(y_hi + pad))
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("score")
            .light_line_style(WHITE)
            .draw()
            .map_err(plot_error)?;
        for ((name, points), colour) in series.iter().zip(SERIES.iter().cycle()) {
            let colour = *colour;
            chart
                .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
                .map_err(plot_error)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2)));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(plot_error)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(MARKER)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(Some(svg))
}

fn loss_panel(area: &DrawingArea<SVGBackend<'_>, Shift>, title: &str, losses: &[f64]) -> anyhow::Result<()> {
    let finite = losses.iter().copied().filter(|l| l.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| (lo.min(l), hi.max(l)));
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1.0..(losses.len() as f64).max(2.0), (lo - pad)..(hi + pad))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(LineSeries::new(
            losses.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| ((i + 1) as f64, l)),
            STEPS.stroke_width(2),
        ))
        .map_err(plot_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `points` of the polylines drawn in `colour` (`#rrggbb`), as coordinate pairs.
    fn polylines(svg: &str, colour: &str) -> Vec<Vec<(f64, f64)>> {
        svg.split("<polyline")
            .skip(1)
            .filter(|tag| {
                tag[..tag.find("/>").unwrap()].to_lowercase().contains(&format!("stroke=\"{colour}\""))
            })
            .map(|tag| {
                let start = tag.find("points=\"").unwrap() + 8;
                let end = start + tag[start..].find('"').unwrap();
                tag[start..end]
                    .split_whitespace()
                    .map(|p| {
                        let (x, y) = p.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02x}{:02x}{:02x}", c.0, c.1, c.2)
    }

    #[test]
    fn the_timeline_plots_each_count_as_a_staircase_and_marks_the_first_step_and_the_last_proxy() {
        let s = 1_000_000;
        let timeline = Timeline {
            start_us: 5 * s,
            generated_us: vec![6 * s, 7 * s, 8 * s, 9 * s],
            kept_us: vec![7 * s, 9 * s],
            committed: vec![(8 * s, 2), (10 * s, 4)],
            student_steps_us: vec![8 * s + s / 2, 9 * s, 10 * s, 11 * s, 12 * s],
            supervisor_steps_us: vec![5 * s + s / 10, 5 * s + s / 5, 5 * s + s / 2],
        };
        let svg = timeline.svg(800, 400).unwrap().unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for text in [
            "proxies generated",
            "proxies kept",
            "proxies committed",
            "student steps (right axis)",
            "supervisor steps (right axis)",
        ] {
            assert!(svg.contains(text), "{text}");
        }
        // The markers name their times: the first step 3.5 s and the last proxy 4.0 s after the start.
        assert!(svg.contains("first student step (3.5 s)") && svg.contains("last proxy (4.0 s)"));
        // A staircase from the origin: two points an event, one x per pair, climbing (SVG y grows
        // downwards). The first polyline of a colour is the series, the next its legend sample.
        let generated = &polylines(&svg, &hex(GENERATED))[0];
        assert_eq!(generated.len(), 1 + 2 * 4);
        for pair in generated[1..].chunks(2) {
            assert_eq!(pair[0].0, pair[1].0);
            assert!(pair[1].1 < pair[0].1);
        }
        assert_eq!(polylines(&svg, &hex(KEPT))[0].len(), 1 + 2 * 2);
        assert_eq!(polylines(&svg, &hex(COMMITTED))[0].len(), 1 + 2 * 2);
        let steps = &polylines(&svg, &hex(STEPS))[0];
        assert_eq!(steps.len(), 1 + 2 * 5);
        let tuning = &polylines(&svg, &hex(TUNING))[0];
        assert_eq!(tuning.len(), 1 + 2 * 3);
        // The supervisor's steps come before every proxy.
        assert!(tuning.last().unwrap().0 < generated[1].0);
        // The last step (7 s) lies right of the last proxy (4 s): x grows with time.
        assert!(steps.last().unwrap().0 > generated.last().unwrap().0);
        // Kept proxies never exceed generated ones: on the same axis the kept curve ends lower.
        assert!(polylines(&svg, &hex(KEPT))[0].last().unwrap().1 > generated.last().unwrap().1);
    }

    #[test]
    fn a_job_that_did_nothing_has_no_timeline_and_untrained_models_no_loss_panel() {
        assert!(Timeline::default().svg(800, 400).unwrap().is_none());
        assert!(losses_svg(&[("supervisor", &[]), ("student", &[])], 800, 300).unwrap().is_none());
    }

    #[test]
    fn the_scaling_curve_draws_each_series_through_its_points_in_order() {
        let series = [
            ("DINO", vec![(16.0, 0.3), (64.0, 0.4), (256.0, 0.45)]),
            ("CLIP-T", vec![(16.0, 0.2), (64.0, 0.25)]),
        ];
        let svg = scaling_svg(&series, "kept proxies trained on", 720, 420).unwrap().unwrap();
        let dino = polylines(&svg, &hex(SERIES[0]));
        let lines: Vec<&Vec<(f64, f64)>> = dino.iter().filter(|l| l.len() == 3).collect();
        assert_eq!(lines.len(), 1, "one DINO line of three points");
        let xs: Vec<f64> = lines[0].iter().map(|p| p.0).collect();
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "left to right: {xs:?}");
        assert!(lines[0][2].1 < lines[0][0].1, "a higher score is drawn higher: {:?}", lines[0]);
        assert!(polylines(&svg, &hex(SERIES[1])).iter().any(|l| l.len() == 2));
        assert!(svg.contains("kept proxies trained on") && svg.contains("CLIP-T"));
        assert!(scaling_svg(&[("DINO", vec![])], "x", 100, 100).unwrap().is_none());
    }

    #[test]
    fn loss_curves_get_a_panel_each_with_one_point_a_step() {
        let supervisor = [0.4, 0.3, 0.35, 0.2];
        let student = [9.0, 7.5, 6.0, 5.5, 5.0, f64::NAN];
        let svg = losses_svg(
            &[("supervisor loss", &supervisor), ("student loss", &student), ("none", &[])],
            900,
            300,
        )
        .unwrap()
        .unwrap();
        assert!(svg.contains("supervisor loss") && svg.contains("student loss") && !svg.contains(">none<"));
        let lines = polylines(&svg, &hex(STEPS));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), 4);
        // The non-finite loss is left out, not drawn off the chart.
        assert_eq!(lines[1].len(), 5);
        // Side by side: the student's panel lies right of the supervisor's.
        assert!(lines[1][0].0 > lines[0].last().unwrap().0);
    }
}
