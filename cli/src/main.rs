//! The `maskdiff` binary: parses arguments, runs the command, and on failure prints the whole
//! cause chain on one line (`maskdiff: error: ...`) and exits with status 1. Usage errors
//! (unknown flag, missing argument, bad value) are one line with exit status 1 too; `--help` and
//! `--version` print as clap does and exit 0.

use clap::Parser;

/// Big blocks on cache lines (AMX tile loads of the bf16 products; see the type).
#[global_allocator]
static ALLOC: maskdiff_network::CacheLineAlloc = maskdiff_network::CacheLineAlloc;

fn main() {
    // glibc: keep the training step's large buffers in the heap (opt-in, see the function)
    maskdiff_network::tune_allocator();
    // rayon: this thread as the pool's worker 0 (opt-in, see the function)
    maskdiff_network::tune_threads();
    let cli = match maskdiff_cli::args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => match maskdiff_cli::error::usage_error_line(&e) {
            Some(line) => {
                eprintln!("maskdiff: error: {line}");
                std::process::exit(1);
            }
            // --help, --version: clap's own output, exit 0
            None => e.exit(),
        },
    };
    if let Err(e) = maskdiff_cli::run(cli) {
        eprintln!("maskdiff: error: {}", maskdiff_cli::error::one_line(&e));
        std::process::exit(1);
    }
}
