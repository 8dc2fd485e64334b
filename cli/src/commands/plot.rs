//! `maskdiff plot metrics|schedule|exponents`.

use crate::args::{PlotArgs, PlotWhat};
use crate::error::Result;
use std::path::{Path, PathBuf};

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
            crate::plot::exponents(&recs, &out)?;
        }
    }
    Ok(())
}
