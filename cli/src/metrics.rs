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
    /// BD3-LM's clipped schedules. `train` records: the mask rates `[LO, HI]` the steps were
    /// trained on, so `loss_bits` is that clipped objective, not the NELBO (absent: the full
    /// range). Adaptive clip search (`val` records): the rates chosen at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_rate: Option<[f64; 2]>,
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
            mask_rate: None,
        }
    }
}

/// Appends records to a JSON-lines file; each record is one `write` of one full line.
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Open `path` for appending.
    ///
    /// * `keep_up_to = None` (a new run): the file starts empty — lines of an earlier run in the
    ///   same directory that never reached a checkpoint are not mixed into this one.
    /// * `keep_up_to = Some(step)` (resume): lines of steps after `step` — written after the
    ///   checkpoint we resume from — are dropped, so the file describes exactly one history. The
    ///   lines kept are kept byte for byte, and a file with nothing to drop is not rewritten.
    pub fn open(path: &Path, keep_up_to: Option<u64>) -> Result<Self> {
        match keep_up_to {
            None => crate::fsutil::write_atomic(path, b"")?,
            Some(last) if path.exists() => {
                let text = crate::fsutil::read_string(path)?;
                let records = parse(&text, path)?;
                let mut kept = String::with_capacity(text.len());
                let mut dropped = false;
                for (line, r) in text.lines().zip(records) {
                    match r {
                        Some(r) if r.step > last => dropped = true,
                        Some(_) => {
                            kept.push_str(line);
                            kept.push('\n');
                        }
                        // blank line or a truncated last line
                        None => dropped |= !line.trim().is_empty(),
                    }
                }
                if dropped || !text.ends_with('\n') && !text.is_empty() {
                    crate::fsutil::write_atomic(path, kept.as_bytes())?;
                }
            }
            Some(_) => {}
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
    Ok(parse(&text, path)?.into_iter().flatten().collect())
}

/// The record of every line of `text` (`None` for a blank line or a truncated last line).
fn parse(text: &str, path: &Path) -> Result<Vec<Option<Record>>> {
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            out.push(None);
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(Some(r)),
            Err(_) if i + 1 == lines.len() && !complete => out.push(None),
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
    fn a_new_run_starts_a_fresh_file_and_resume_keeps_lines_byte_for_byte() {
        let p = tmp("fresh");
        std::fs::write(&p, "{\"step\":7,\"split\":\"train\",\"loss_bits\":9.0}\n").unwrap();
        let mut w = MetricsWriter::open(&p, None).unwrap();
        w.write(&Record::new(1, "train", 1.0)).unwrap();
        let steps: Vec<u64> = read(&p).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![1], "the old run's line was kept");
        // Lines written by hand (another field order, spacing, digits serde would print
        // differently) survive a resume that drops nothing, and one that drops a later line.
        let kept = "{ \"split\": \"train\", \"step\": 1, \"loss_bits\": 1.50 }\n";
        std::fs::write(&p, kept).unwrap();
        drop(MetricsWriter::open(&p, Some(1)).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), kept);
        std::fs::write(
            &p,
            format!("{kept}{{\"step\":2,\"split\":\"val\",\"loss_bits\":2}}\n"),
        )
        .unwrap();
        drop(MetricsWriter::open(&p, Some(1)).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), kept);
    }

    #[test]
    fn floats_round_trip_exactly() {
        // serde_json without `float_roundtrip` parses some shortest-representation decimals
        // one ulp off; every metrics value must come back bit for bit.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // positive normal doubles below 2, of every exponent down to 2^-1022
            let v = f64::from_bits((x >> 2) | 0x0010_0000_0000_0000);
            let mut r = Record::new(1, "train", v);
            r.lr = Some(v * 1e-7);
            let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            assert_eq!(back.loss_bits.to_bits(), v.to_bits(), "{v:e}");
            assert_eq!(back.lr.unwrap().to_bits(), (v * 1e-7).to_bits(), "{v:e}");
        }
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
