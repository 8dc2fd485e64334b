//! Integration tests of maskdiff-data (one test binary, one module per concept).

mod batches;
mod corpus;
mod fuzz;
mod images;
mod textcache;
mod tokenfile;
mod tokenizers;
mod zeroshot;

/// A fresh temporary directory for one test.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("maskdiff-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The project's shared data directory (`../shared/data` from the repository root; only this
/// project's layout has it).
pub fn shared_data() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}

/// The fetch cache of `scripts/fetch-data.sh` at the repository root (`data-cache/`).
pub fn data_cache() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data-cache")
}

/// Whether a test's data outside the repository (`../shared`, or `data-cache/` filled by
/// `scripts/fetch-data.sh`) is at `path`. When it is not, the test is skipped with a message
/// saying why and how to get it — unless `MASKDIFF_REQUIRE_SHARED=1` (set by `.ci/run`), which
/// makes the absence a failure, so CI never skips silently.
pub fn have_data(path: &std::path::Path, how: &str) -> bool {
    if path.exists() {
        return true;
    }
    if std::env::var("MASKDIFF_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
        panic!(
            "test data missing at {} and MASKDIFF_REQUIRE_SHARED=1 ({how})",
            path.display()
        );
    }
    // Written to stderr directly, not with `eprintln!`: the test harness captures the macros'
    // output of passing tests, and a skip must be visible.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: test data not found at {} ({how}); set MASKDIFF_REQUIRE_SHARED=1 to fail instead",
        path.display()
    );
    false
}
