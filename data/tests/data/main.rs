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

/// The project's shared data directory (`../shared/data` from the repository root).
pub fn shared_data() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data")
}
