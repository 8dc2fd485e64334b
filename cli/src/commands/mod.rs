//! One module per subcommand.

pub mod eval;
pub mod plot;
pub mod sample;
pub mod train;

use maskdiff_network::precision::{bf16_hardware, set_precision, Precision};

/// Sets the process's matrix-product precision; bf16 on a CPU without AVX512-BF16 (or with the
/// kernels lowered below AVX-512 by `MASKDIFF_ISA`) falls back to f32 with a one-line notice,
/// since its portable bf16 loop would only be slower than f32.
pub fn use_precision(p: Precision) {
    let p = if p == Precision::Bf16 && !bf16_hardware() {
        eprintln!(
            "maskdiff: precision bf16 needs AVX512-BF16 at the kernels' level ({}); using f32",
            maskdiff_network::isa::isa()
        );
        Precision::F32
    } else {
        p
    };
    set_precision(p);
}
