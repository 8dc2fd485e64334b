//! Peak resident memory of this process on Linux (`/proc/self/status` VmHWM / VmRSS, in MB);
//! `reset_peak` restarts the high-water mark (`/proc/self/clear_refs` ← 5) so that one phase can
//! be measured on its own. NaN where /proc is unavailable.

fn status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Peak resident set since start or the last [`reset_peak`], MB.
pub fn peak_mb() -> f64 {
    status_mb("VmHWM:")
}

/// Restart the high-water mark; returns the current resident set, MB.
pub fn reset_peak() -> f64 {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    status_mb("VmRSS:")
}
