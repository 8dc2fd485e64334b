//! The training progress bar (indicatif): step, loss in bits per token, tokens/s, ETA. With
//! `--no-progress` or when stderr is not a terminal, periodic plain log lines are printed instead.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    bar: Option<ProgressBar>,
    start: Instant,
    start_step: u64,
    total: u64,
    unit: &'static str,
}

impl Progress {
    /// A bar from `start_step` to `total` steps; `unit` labels the loss (e.g. "bits/char").
    pub fn new(start_step: u64, total: u64, unit: &'static str, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(4));
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} step {pos}/{len} {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_position(start_step);
            b.reset_eta();
            b
        });
        Progress {
            bar,
            start: Instant::now(),
            start_step,
            total,
            unit,
        }
    }

    /// Report a finished step with its loss (bits/token) and throughput.
    pub fn step(&self, step: u64, loss_bits: f64, tokens_per_sec: f64) {
        let msg = format!(
            "loss {loss_bits:.4} {} | {tokens_per_sec:.0} tok/s",
            self.unit
        );
        if let Some(b) = &self.bar {
            b.set_position(step);
            b.set_message(msg);
        }
    }

    /// A plain log line (printed above the bar when one is drawn).
    pub fn log(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Seconds left at the current pace, for plain logs.
    pub fn eta_s(&self, step: u64) -> f64 {
        let done = step.saturating_sub(self.start_step).max(1) as f64;
        let el = self.start.elapsed().as_secs_f64();
        el / done * self.total.saturating_sub(step) as f64
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
