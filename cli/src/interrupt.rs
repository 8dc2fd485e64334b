//! Ctrl-C handling: the first SIGINT/SIGTERM only sets a flag; the training loop checks it after
//! each step, writes a checkpoint and exits cleanly. A second signal aborts at once — unless it
//! arrives within [`GRACE`] of the first: supervisors deliver one stop request twice (GNU
//! `timeout` signals the command and then its whole process group, batch schedulers signal
//! every process of a job step), and taking that echo for a user's second Ctrl-C would throw
//! away the work since the last checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Signals this soon after the first are the same stop request.
pub const GRACE: Duration = Duration::from_secs(1);

/// A shared "stop requested" flag.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
}

/// What a signal means given when the first one came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// The first: checkpoint and stop.
    Stop,
    /// Within [`GRACE`] of the first: the same request again.
    Echo,
    /// Later: abort at once.
    Abort,
}

fn classify(first: Option<Instant>, now: Instant) -> Signal {
    match first {
        None => Signal::Stop,
        Some(t) if now.saturating_duration_since(t) < GRACE => Signal::Echo,
        Some(_) => Signal::Abort,
    }
}

/// Install the handler (once per process) and return the flag it sets.
pub fn install() -> StopFlag {
    let flag = StopFlag::default();
    let f = flag.clone();
    let first: Mutex<Option<Instant>> = Mutex::new(None);
    // Failing to install (e.g. a handler already exists) only loses graceful Ctrl-C. The
    // handler runs on ctrlc's own thread, not in signal context, so it may lock and print.
    let _ = ctrlc::set_handler(move || {
        let now = Instant::now();
        let mut first = first.lock().unwrap_or_else(|p| p.into_inner());
        match classify(*first, now) {
            Signal::Stop => {
                *first = Some(now);
                eprintln!(
                    "\nmaskdiff: interrupt received, saving a checkpoint and stopping (interrupt \
                     again to abort)"
                );
                f.set();
            }
            Signal::Echo => {}
            Signal::Abort => {
                eprintln!("\nmaskdiff: second interrupt, aborting without a checkpoint");
                std::process::exit(130);
            }
        }
    });
    flag
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_within_the_grace_period_is_the_same_request() {
        let t0 = Instant::now();
        assert_eq!(classify(None, t0), Signal::Stop);
        assert_eq!(classify(Some(t0), t0), Signal::Echo);
        assert_eq!(
            classify(Some(t0), t0 + GRACE - Duration::from_millis(1)),
            Signal::Echo
        );
        assert_eq!(classify(Some(t0), t0 + GRACE), Signal::Abort);
        assert_eq!(classify(Some(t0), t0 + 10 * GRACE), Signal::Abort);
    }
}
