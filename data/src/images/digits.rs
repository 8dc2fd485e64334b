//! The 8×8 handwritten digits of scikit-learn (`sklearn/datasets/data/digits.csv.gz`, UCI optdigits
//! test set): 1797 rows of 64 intensities in 0..=16 followed by the digit label; V = 17.

use std::path::Path;

use super::{ImageSet, ImageShape};
use crate::error::{DataError, Result};
use crate::fsutil::read_maybe_gz;

/// Parse the digits CSV text.
pub fn parse_digits_csv(text: &str, what: &str) -> Result<ImageSet> {
    let mut tokens = Vec::new();
    let mut labels = Vec::new();
    for (ln, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let err = |detail: String| DataError::Parse {
            what: what.to_string(),
            line: ln + 1,
            detail,
        };
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 65 {
            return Err(err(format!("{} fields, expected 65", fields.len())));
        }
        for (k, f) in fields.iter().enumerate() {
            // Values are integers, sometimes written as floats ("16.0").
            let v: f64 = f
                .trim()
                .parse()
                .map_err(|_| err(format!("field {} = {f:?} is not a number", k + 1)))?;
            let max = if k == 64 { 9.0 } else { 16.0 };
            if !(0.0..=max).contains(&v) || v.fract() != 0.0 {
                return Err(err(format!(
                    "field {} = {f} is not an integer in 0..={max}",
                    k + 1
                )));
            }
            if k == 64 {
                labels.push(v as u8);
            } else {
                tokens.push(v as u8);
            }
        }
    }
    Ok(ImageSet {
        shape: ImageShape {
            height: 8,
            width: 8,
            channels: 1,
            levels: 17,
        },
        tokens,
        labels: Some(labels),
        num_classes: 10,
    })
}

/// Read `digits.csv[.gz]`.
pub fn load_digits(path: &Path) -> Result<ImageSet> {
    let bytes = read_maybe_gz(path)?;
    let what = path.display().to_string();
    let text = std::str::from_utf8(&bytes).map_err(|e| DataError::Parse {
        what: what.clone(),
        line: 0,
        detail: format!("not UTF-8: {e}"),
    })?;
    parse_digits_csv(text, &what)
}
