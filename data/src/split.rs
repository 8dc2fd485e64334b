//! Train/valid/test splits by token offset (MD4 §9.1: text8 uses [0, 90M), [90M, 95M), [95M, 100M)).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Which part of a corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Valid,
    Test,
}

/// Relative sizes of train/valid/test; boundaries are `floor(len·(train)/sum)` and
/// `floor(len·(train+valid)/sum)` in exact integer arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitRatio {
    pub train: u32,
    pub valid: u32,
    pub test: u32,
}

impl Default for SplitRatio {
    /// The text8 convention, 90/5/5.
    fn default() -> Self {
        Self {
            train: 90,
            valid: 5,
            test: 5,
        }
    }
}

impl SplitRatio {
    /// A ratio with a non-zero sum.
    pub fn new(train: u32, valid: u32, test: u32) -> Result<Self> {
        if train as u64 + valid as u64 + test as u64 == 0 {
            return Err(DataError::InvalidArgument("split ratio sums to 0".into()));
        }
        Ok(Self { train, valid, test })
    }

    /// The offsets of the three splits of a stream of `len` tokens; disjoint, in order, covering
    /// `0..len`.
    pub fn ranges(&self, len: usize) -> [Range<usize>; 3] {
        let sum = (self.train as u128 + self.valid as u128 + self.test as u128).max(1);
        let cut = |parts: u128| (len as u128 * parts / sum) as usize;
        let a = cut(self.train as u128);
        let b = cut(self.train as u128 + self.valid as u128);
        [0..a, a..b, b..len]
    }

    /// The offsets of one split.
    pub fn range(&self, len: usize, split: Split) -> Range<usize> {
        let [tr, va, te] = self.ranges(len);
        match split {
            Split::Train => tr,
            Split::Valid => va,
            Split::Test => te,
        }
    }
}

impl std::str::FromStr for Split {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "valid" | "validation" | "val" | "eval" => Ok(Split::Valid),
            "test" => Ok(Split::Test),
            _ => Err(DataError::InvalidArgument(format!("unknown split {s:?}"))),
        }
    }
}
