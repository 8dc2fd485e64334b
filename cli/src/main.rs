//! The `maskdiff` binary: parses arguments, runs the command, and on failure prints the whole
//! cause chain on one line (`maskdiff: error: ...`) and exits with status 1.

use clap::Parser;

fn main() {
    // glibc: keep the training step's large buffers in the heap (opt-in, see the function)
    maskdiff_network::tune_allocator();
    let cli = maskdiff_cli::args::Cli::parse();
    if let Err(e) = maskdiff_cli::run(cli) {
        eprintln!("maskdiff: error: {}", maskdiff_cli::error::one_line(&e));
        std::process::exit(1);
    }
}
