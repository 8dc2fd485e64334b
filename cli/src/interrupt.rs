//! Ctrl-C handling: the first SIGINT/SIGTERM only sets a flag; the training loop checks it after
//! each step, writes a checkpoint and exits cleanly. A second signal aborts at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

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

/// Install the handler (once per process) and return the flag it sets.
pub fn install() -> StopFlag {
    let flag = StopFlag::default();
    let f = flag.clone();
    let count = Arc::new(AtomicUsize::new(0));
    // Failing to install (e.g. a handler already exists) only loses graceful Ctrl-C.
    let _ = ctrlc::set_handler(move || {
        if count.fetch_add(1, Ordering::SeqCst) >= 1 {
            eprintln!("\nmaskdiff: second interrupt, aborting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nmaskdiff: interrupt received, saving a checkpoint and stopping (Ctrl-C again to abort)");
        f.set();
    });
    flag
}
