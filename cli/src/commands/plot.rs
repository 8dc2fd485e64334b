//! `maskdiff plot metrics|schedule|exponents|frontier`.

use crate::args::{PlotArgs, PlotWhat};
use crate::dataset::{token_pieces, Codec};
use crate::error::Result;
use crate::metrics::Record;
use std::path::{Path, PathBuf};

/// One label per token value from the tokenizer of the run `p` belongs to (the run directory,
/// or the one holding the metrics file); images, and metrics without a checkpoint beside them,
/// get numeric labels.
fn token_names(p: &Path) -> Result<Option<Vec<String>>> {
    let run = if p.is_dir() { Some(p) } else { p.parent() };
    let Some(Ok(dir)) = run.map(crate::run::resolve_checkpoint) else {
        return Ok(None);
    };
    let (_, extra, _) = crate::run::read_checkpoint_meta(&dir)?;
    let Codec::Text(tok) = Codec::from_identity(&extra.data)? else {
        return Ok(None);
    };
    let ids: Vec<u32> = (0..extra.data.vocab as u32).collect();
    let pieces = token_pieces(&tok, &ids)?;
    Ok(Some(
        pieces.iter().map(|p| crate::plot::token_label(p)).collect(),
    ))
}

/// The last exponents of the labelled values, largest first.
fn print_extremes(recs: &[Record], names: Option<&[String]>) {
    let Some((step, last)) = recs
        .iter()
        .rev()
        .find_map(|r| r.exponents.as_ref().map(|e| (r.step, e)))
    else {
        return;
    };
    let mut vals = crate::plot::labelled_values(last);
    vals.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let name = |k: usize| names.map_or_else(|| k.to_string(), |n| n[k].clone());
    let list: Vec<String> = vals
        .iter()
        .map(|&k| format!("{} {:.4}", name(k), last[k]))
        .collect();
    println!("exponents w_v at step {step}: {}", list.join(", "));
}

/// A metrics file, or `metrics.jsonl` inside a run directory.
fn metrics_file(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("metrics.jsonl")
    } else {
        p.to_path_buf()
    }
}

pub fn run(a: PlotArgs) -> Result<()> {
    match a.what {
        PlotWhat::Metrics { metrics, out } => {
            let f = metrics_file(&metrics);
            let recs = crate::metrics::read(&f)?;
            crate::plot::metrics(&recs, &f.display().to_string(), &out)?;
        }
        PlotWhat::Schedule { names, eps, out } => crate::plot::schedules(&names, eps, &out)?,
        PlotWhat::Exponents { metrics, out } => {
            let recs = crate::metrics::read(&metrics_file(&metrics))?;
            let names = token_names(&metrics)?;
            crate::plot::exponents(&recs, names.as_deref(), &out)?;
            print_extremes(&recs, names.as_deref());
        }
        PlotWhat::Frontier { points, out } => {
            let pts = crate::plot::read_frontier(&points)?;
            crate::plot::frontier(&pts, &out)?;
        }
    }
    Ok(())
}
