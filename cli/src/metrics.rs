//! Training metrics as JSON lines (one object per line, appended as training goes), and the
//! reader used by `maskdiff plot`. Losses are stored in bits per token (spec §3.4).

use crate::error::{CliError, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub step: u64,
    /// `train`, `val` or `test`.
    pub split: String,
    /// Negative ELBO in bits per token (bits/char for text8-style data, bits/dim for images);
    /// for `train` records the mean of the one-batch estimates since the previous record.
    pub loss_bits: f64,
    /// Standard error of `loss_bits` (evaluation records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_bits: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_sec: Option<f64>,
    /// Seconds since the run (or the resumed run) started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// GenMD4: the learned per-token exponents w_v at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exponents: Option<Vec<f64>>,
}

impl Record {
    pub fn new(step: u64, split: &str, loss_bits: f64) -> Self {
        Record {
            step,
            split: split.to_string(),
            loss_bits,
            stderr_bits: None,
            lr: None,
            grad_norm: None,
            tokens_per_sec: None,
            elapsed_s: None,
            exponents: None,
        }
    }
}

/// Appends records to a JSON-lines file; each record is one `write` of one full line.
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Open `path` for appending. With `keep_up_to = Some(step)` (resume), lines of steps after
    /// `step` — written after the checkpoint we resume from — are dropped first, so the file
    /// describes exactly one history.
    pub fn open(path: &Path, keep_up_to: Option<u64>) -> Result<Self> {
        if let Some(last) = keep_up_to {
            if path.exists() {
                let kept: Vec<Record> =
                    read(path)?.into_iter().filter(|r| r.step <= last).collect();
                let mut text = String::new();
                for r in &kept {
                    text.push_str(&serde_json::to_string(r).expect("records serialise"));
                    text.push('\n');
                }
                crate::fsutil::write_atomic(path, text.as_bytes())?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| CliError::io("cannot open metrics file", path, e))?;
        Ok(MetricsWriter {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn write(&mut self, r: &Record) -> Result<()> {
        let mut line = serde_json::to_string(r).expect("records serialise");
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| CliError::io("cannot append to", &self.path, e))
    }
}

/// Read every record of a metrics file. A truncated last line (a crash mid-write) is skipped;
/// any other malformed line is an error naming its line number.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = crate::fsutil::read_string(path)?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !complete => {}
            Err(e) => {
                return Err(CliError::Format {
                    what: "metrics record",
                    path: path.to_path_buf(),
                    message: format!("line {}: {e}", i + 1),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("maskdiff-metrics-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("m.jsonl")
    }

    #[test]
    fn round_trip_and_resume_truncation() {
        let p = tmp("rt");
        let mut w = MetricsWriter::open(&p, None).unwrap();
        for s in [10u64, 20, 30] {
            w.write(&Record::new(s, "train", s as f64 / 10.0)).unwrap();
        }
        drop(w);
        let back = read(&p).unwrap();
        assert_eq!(
            back.iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![10, 20, 30]
        );
        assert_eq!(back[1].loss_bits, 2.0);
        // Resuming from step 20 forgets step 30.
        let mut w = MetricsWriter::open(&p, Some(20)).unwrap();
        w.write(&Record::new(25, "val", 1.5)).unwrap();
        let steps: Vec<u64> = read(&p).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![10, 20, 25]);
    }

    #[test]
    fn truncated_last_line_is_skipped_but_corruption_elsewhere_is_an_error() {
        let p = tmp("trunc");
        std::fs::write(
            &p,
            "{\"step\":1,\"split\":\"train\",\"loss_bits\":4.0}\n{\"step\":2,\"spl",
        )
        .unwrap();
        assert_eq!(read(&p).unwrap().len(), 1);
        std::fs::write(
            &p,
            "garbage\n{\"step\":1,\"split\":\"train\",\"loss_bits\":4.0}\n",
        )
        .unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
