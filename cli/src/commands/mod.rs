//! One module per subcommand.

pub mod eval;
pub mod plot;
pub mod sample;
pub mod train;
