//! `maskdiff plot`: PNG plots drawn with `plotters` (bitmap backend, embedded bitmap font):
//! training/validation loss against step, masking schedules α_t and their ELBO weights against t
//! (the paper's Figure 1), and GenMD4's learned per-token exponents against step (§6).

mod glyph;

use crate::error::{CliError, Result};
use crate::metrics::Record;
use glyph::GlyphBackend;
use maskdiff_schedule::{AnySchedule, MaskingSchedule, Shifted};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

const SIZE: (u32, u32) = (960, 540);
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn perr<E: std::fmt::Display>(e: E) -> CliError {
    CliError::Plot(e.to_string())
}

/// Render into an RGB buffer with `draw`, then write the PNG atomically.
fn render(
    out: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<GlyphBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![255u8; (size.0 * size.1 * 3) as usize];
    {
        let root =
            GlyphBackend::new(BitMapBackend::with_buffer(&mut buf, size)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        draw(&root)?;
        root.present().map_err(perr)?;
    }
    crate::images::write_png_rgb(out, size.0, size.1, &buf)
}

/// (min, max) of `vals` widened by 5 % (or ±0.5 when flat).
fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = vals
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
    (lo - pad, hi + pad)
}

/// One coloured line per named series (with point markers when it has fewer than 60 points)
/// and the legend, on any f64 × f64 chart (linear or log axes).
fn named_lines<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(perr)?
            .label(*name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        if pts.len() < 60 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(perr)?;
        }
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 12))
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(perr)?;
    Ok(())
}

/// The loss curves of a metrics file: one per split in the order train, val, test, and the
/// train records of a clipped run (BD3-LM's mask rates, `mask_rate` set) apart from the
/// full-range ones, one curve per clip named after it — its loss is the clipped objective,
/// not the NELBO the other curves show. Empty curves are left out.
fn loss_series(records: &[Record]) -> Vec<(String, Vec<(f64, f64)>)> {
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for split in ["train", "val", "test"] {
        for r in records
            .iter()
            .filter(|r| r.split == split && r.loss_bits.is_finite())
        {
            let name = match r.mask_rate {
                Some([lo, hi]) if split == "train" => {
                    format!("train: clipped loss [{lo}, {hi}]")
                }
                _ => split.to_string(),
            };
            let pt = (r.step as f64, r.loss_bits);
            match series.iter_mut().find(|(n, _)| *n == name) {
                Some((_, pts)) => pts.push(pt),
                None => series.push((name, vec![pt])),
            }
        }
    }
    series
}

/// Training and validation loss (bits/token) against step.
pub fn metrics(records: &[Record], title: &str, out: &Path) -> Result<()> {
    let owned = loss_series(records);
    let series: Vec<(&str, Vec<(f64, f64)>)> =
        owned.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
    if series.is_empty() {
        return Err(CliError::Plot(
            "the metrics file has no loss records".into(),
        ));
    }
    let (x0, x1) = range(series.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
    let (y0, y1) = range(series.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    render(out, SIZE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("NELBO (bits/token)")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(perr)?;
        named_lines(&mut chart, &series)
    })
}

/// α_t (left) and the ELBO weight magnitude −α'_t/(1 − α_t) on a log axis (right) against t.
pub fn schedules(names: &[String], eps: f64, out: &Path) -> Result<()> {
    let mut scheds: Vec<(String, Shifted<AnySchedule>)> = Vec::new();
    for n in names {
        let base: AnySchedule = n.parse()?;
        scheds.push((n.clone(), Shifted::new(base, eps)?));
    }
    if scheds.is_empty() {
        return Err(CliError::Plot("no schedule to plot".into()));
    }
    const K: usize = 400;
    let ts: Vec<f64> = (0..=K).map(|i| i as f64 / K as f64).collect();
    let (wlo, whi) = (1e-2f64, 1e3f64);
    render(out, (1200, 500), |root| {
        let (left, right) = root.split_horizontally(600);
        let mut a = ChartBuilder::on(&left)
            .caption("alpha_t", ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)
            .map_err(perr)?;
        a.configure_mesh()
            .x_desc("t")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(perr)?;
        let mut w = ChartBuilder::on(&right)
            .caption("weight -alpha'_t / (1 - alpha_t)", ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..1f64, (wlo..whi).log_scale())
            .map_err(perr)?;
        w.configure_mesh()
            .x_desc("t")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(perr)?;
        for (i, (name, s)) in scheds.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let alpha: Vec<(f64, f64)> = ts.iter().map(|&t| (t, s.alpha(t))).collect();
            a.draw_series(LineSeries::new(alpha, c.stroke_width(2)))
                .map_err(perr)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            // The weight diverges at t → 0 for unshifted schedules and vanishes at t = 1 for
            // cosine: draw only the part inside the axis range.
            let weight: Vec<(f64, f64)> = ts
                .iter()
                .map(|&t| (t, -MaskingSchedule::<f64>::weight(s, t)))
                .filter(|&(_, v)| v.is_finite() && (wlo..=whi).contains(&v))
                .collect();
            w.draw_series(LineSeries::new(weight, c.stroke_width(2)))
                .map_err(perr)?;
        }
        a.configure_series_labels()
            .label_font(("sans-serif", 12))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(perr)?;
        Ok(())
    })
}

/// Every token value is labelled up to this vocabulary size; above it, the `EXTREMES` largest and
/// smallest final exponents are.
const LABEL_ALL: usize = 32;
const EXTREMES: usize = 6;

/// The token values whose lines get a label: all of them for a small vocabulary, else the
/// `EXTREMES` with the largest and the smallest final exponent (largest first, then smallest
/// first), which are the ones a reader looks for.
pub fn labelled_values(last: &[f64]) -> Vec<usize> {
    if last.len() <= LABEL_ALL {
        return (0..last.len()).collect();
    }
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
    let mut picked: Vec<usize> = order[..EXTREMES].to_vec();
    picked.extend(order[order.len() - EXTREMES..].iter().rev());
    picked
}

/// GenMD4's per-token exponents w_v against step, from the records that carry them. `names`
/// (one per token value, e.g. decoded by the run's tokenizer) label the lines of
/// [`labelled_values`] at their last point; without names the labels are the token ids.
pub fn exponents(records: &[Record], names: Option<&[String]>, out: &Path) -> Result<()> {
    let rows: Vec<(f64, &Vec<f64>)> = records
        .iter()
        .filter_map(|r| r.exponents.as_ref().map(|e| (r.step as f64, e)))
        .collect();
    let (Some((_, first)), Some(&(x_last, last))) = (rows.first(), rows.last()) else {
        return Err(CliError::Plot(
            "no GenMD4 exponents in the metrics (is this a GenMD4 run?)".into(),
        ));
    };
    let v = first.len();
    if let Some(n) = names {
        if n.len() != v {
            return Err(CliError::Plot(format!(
                "{} token names for {v} exponents",
                n.len()
            )));
        }
    }
    let (x0, x1) = range(rows.iter().map(|r| r.0));
    // room on the right for the labels
    let x1 = x1 + 0.12 * (x1 - x0.max(0.0));
    let (y0, y1) = range(rows.iter().flat_map(|r| r.1.iter().copied()));
    render(out, SIZE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(
                format!("GenMD4 exponents w_v ({v} token values)"),
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("w_v")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(perr)?;
        for k in 0..v {
            let c = PALETTE[k % PALETTE.len()];
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|(s, e)| e.get(k).map(|&w| (*s, w)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(1)))
                .map_err(perr)?;
        }
        let labels = labelled_values(last).into_iter().filter_map(|k| {
            let w = *last.get(k)?;
            let name = names.map_or_else(|| k.to_string(), |n| n[k].clone());
            let style = ("sans-serif", 12)
                .into_font()
                .color(&PALETTE[k % PALETTE.len()]);
            Some(Text::new(name, (x_last, w), style))
        });
        chart.draw_series(labels).map_err(perr)?;
        Ok(())
    })
}

/// A token's piece as a one-line label: spaces and control characters made visible.
pub fn token_label(piece: &str) -> String {
    let s: String = piece
        .chars()
        .map(|c| match c {
            ' ' => '␣',
            '\n' => '⏎',
            c if c.is_control() => '·',
            c => c,
        })
        .collect();
    if s.is_empty() {
        "∅".into()
    } else {
        s
    }
}

/// One point of the sampler frontier (a line of `bench/frontier.sh`'s JSON-lines output).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct FrontierPoint {
    /// The line this point belongs to (e.g. `ancestral`, `remdm cap 0.02`, `threshold`).
    pub sampler: String,
    /// Mean network calls per sample.
    pub nfe: f64,
    /// Generative perplexity of the samples under the judge.
    pub gen_perplexity: f64,
}

/// Reads frontier points, one JSON object per non-empty line (other fields are ignored).
pub fn read_frontier(path: &Path) -> Result<Vec<FrontierPoint>> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::io("cannot read", path, e))?;
    let mut pts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: FrontierPoint = serde_json::from_str(line).map_err(|e| CliError::Format {
            what: "frontier point",
            path: path.to_path_buf(),
            message: format!("line {}: {e}", i + 1),
        })?;
        if !(p.nfe > 0.0 && p.nfe.is_finite() && p.gen_perplexity.is_finite()) {
            return Err(CliError::Format {
                what: "frontier point",
                path: path.to_path_buf(),
                message: format!("line {}: nfe must be positive, perplexity finite", i + 1),
            });
        }
        pts.push(p);
    }
    if pts.is_empty() {
        return Err(CliError::Plot(format!(
            "{} holds no points",
            path.display()
        )));
    }
    Ok(pts)
}

/// Network calls per sample (log axis) against generative perplexity, one line per sampler in
/// order of first appearance, each sorted by calls.
pub fn frontier(points: &[FrontierPoint], out: &Path) -> Result<()> {
    let mut names: Vec<&str> = Vec::new();
    for p in points {
        if !names.contains(&p.sampler.as_str()) {
            names.push(&p.sampler);
        }
    }
    let series: Vec<(&str, Vec<(f64, f64)>)> = names
        .iter()
        .map(|&n| {
            let mut pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.sampler == n)
                .map(|p| (p.nfe, p.gen_perplexity))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (n, pts)
        })
        .collect();
    let (xlo, xhi) = points.iter().fold((f64::INFINITY, 0.0f64), |(a, b), p| {
        (a.min(p.nfe), b.max(p.nfe))
    });
    let (y0, y1) = range(points.iter().map(|p| p.gen_perplexity));
    render(out, SIZE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("sampler frontier", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((xlo / 1.2..xhi * 1.2).log_scale(), y0..y1)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("network calls per sample")
            .y_desc("generative perplexity (judge)")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(perr)?;
        named_lines(&mut chart, &series)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("maskdiff-plot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A PNG decodes to the expected size and is not blank.
    fn check_png(p: &Path, size: (u32, u32)) {
        let dec = png::Decoder::new(std::fs::File::open(p).unwrap());
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), size);
        let non_white = buf[..info.buffer_size()]
            .chunks(3)
            .filter(|p| p != &[255, 255, 255])
            .count();
        assert!(
            non_white > 1000,
            "plot nearly blank: {non_white} coloured pixels"
        );
    }

    #[test]
    fn schedule_plot_is_a_png_with_content() {
        let out = tmpdir("sched").join("s.png");
        let names: Vec<String> = ["linear", "cosine", "poly3", "geometric"]
            .map(String::from)
            .into();
        schedules(&names, 1e-4, &out).unwrap();
        check_png(&out, (1200, 500));
    }

    #[test]
    fn metrics_plot_needs_loss_records() {
        let out = tmpdir("metrics").join("m.png");
        let recs: Vec<Record> = (0..20)
            .map(|i| {
                Record::new(
                    i * 10,
                    if i % 5 == 0 { "val" } else { "train" },
                    4.7 - i as f64 * 0.1,
                )
            })
            .collect();
        metrics(&recs, "run", &out).unwrap();
        check_png(&out, SIZE);
        assert!(metrics(&[], "run", &out).is_err());
    }

    #[test]
    fn clipped_train_records_get_their_own_named_curve() {
        // a run trained on the full range, then (adaptive search) on [0.3, 0.8], then [0.5, 1]
        let rec = |step: u64, split: &str, clip: Option<[f64; 2]>| {
            let mut r = Record::new(step, split, 4.0 - step as f64 * 1e-3);
            r.mask_rate = clip;
            r
        };
        let recs = vec![
            rec(10, "train", None),
            rec(20, "train", None),
            rec(20, "val", Some([0.3, 0.8])),
            rec(30, "train", Some([0.3, 0.8])),
            rec(40, "train", Some([0.3, 0.8])),
            rec(40, "val", Some([0.5, 1.0])),
            rec(50, "train", Some([0.5, 1.0])),
            rec(50, "test", None),
        ];
        let s = loss_series(&recs);
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "train",
                "train: clipped loss [0.3, 0.8]",
                "train: clipped loss [0.5, 1]",
                "val",
                "test"
            ]
        );
        let steps = |i: usize| s[i].1.iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(steps(0), [10.0, 20.0]);
        assert_eq!(steps(1), [30.0, 40.0]);
        assert_eq!(steps(2), [50.0]);
        // the search's choice on a validation record does not split the validation curve
        assert_eq!(steps(3), [20.0, 40.0]);
        let out = tmpdir("clipped").join("m.png");
        metrics(&recs, "clipped run", &out).unwrap();
        check_png(&out, SIZE);
    }

    #[test]
    fn small_vocabularies_label_every_value() {
        assert_eq!(labelled_values(&[0.5, 2.0, 1.0]), vec![0, 1, 2]);
        assert_eq!(labelled_values(&[1.0; 32]).len(), 32);
    }

    #[test]
    fn large_vocabularies_label_the_extremes() {
        // 40 values: w_k = k except two swapped, so the order is not the index order
        let mut w: Vec<f64> = (0..40).map(|k| k as f64).collect();
        w.swap(3, 38);
        let l = labelled_values(&w);
        assert_eq!(l, vec![39, 3, 37, 36, 35, 34, 0, 1, 2, 38, 4, 5]);
    }

    #[test]
    fn exponents_plot_draws_labelled_lines() {
        let out = tmpdir("exp").join("e.png");
        let recs: Vec<Record> = (0..10)
            .map(|i| {
                let mut r = Record::new(i * 100, "train", 4.0);
                r.exponents = Some((0..27).map(|k| 1.0 + 0.01 * (i * k) as f64).collect());
                r
            })
            .collect();
        let names: Vec<String> = std::iter::once(" ".to_string())
            .chain(('a'..='z').map(String::from))
            .map(|p| token_label(&p))
            .collect();
        assert_eq!(names[0], "␣");
        exponents(&recs, Some(&names), &out).unwrap();
        check_png(&out, SIZE);
        exponents(&recs, None, &out).unwrap();
        // wrong name count and no exponents at all are errors
        assert!(exponents(&recs, Some(&names[..3]), &out).is_err());
        assert!(exponents(&[Record::new(0, "train", 4.0)], None, &out).is_err());
    }

    #[test]
    fn frontier_points_are_read_checked_and_plotted() {
        let d = tmpdir("frontier");
        let f = d.join("f.jsonl");
        let lines = [
            r#"{"sampler": "ancestral", "nfe": 16, "gen_perplexity": 34.5, "wall_s": 1}"#,
            "",
            r#"{"sampler": "threshold", "nfe": 16, "gen_perplexity": 22.4}"#,
            r#"{"sampler": "ancestral", "nfe": 256, "gen_perplexity": 30.5}"#,
        ];
        std::fs::write(&f, lines.join("\n")).unwrap();
        let pts = read_frontier(&f).unwrap();
        assert_eq!(pts.len(), 3);
        assert_eq!(pts[2].sampler, "ancestral");
        assert_eq!(pts[2].nfe, 256.0);
        let out = d.join("f.png");
        frontier(&pts, &out).unwrap();
        check_png(&out, SIZE);
        // a point without calls, malformed JSON and an empty file are errors naming the line
        std::fs::write(&f, r#"{"sampler": "a", "nfe": 0, "gen_perplexity": 3}"#).unwrap();
        assert!(read_frontier(&f)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        std::fs::write(&f, "{\"sampler\": 1}\n").unwrap();
        assert!(read_frontier(&f).is_err());
        std::fs::write(&f, "\n").unwrap();
        assert!(read_frontier(&f).is_err());
    }
}
