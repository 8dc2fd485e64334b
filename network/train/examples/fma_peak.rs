//! Benchmark (not a test): the machine's *measured* arithmetic peak, the denominator of
//! "achieved GFLOP/s against the machine's peak" in `bench/side_by_side.sh` (issue 13).
//!
//! The formula peak (cores × GHz × lanes × FMA units × 2) needs two numbers /proc/cpuinfo does
//! not give: the clock the cores really run at (a KVM guest reports the nominal clock; the
//! cores boost above it) and the number of full-width FMA units (two 512-bit units on Intel
//! Xeon, one 512-bit FMA per cycle on AMD Zen 4, whose AVX-512 runs on two 256-bit units). So
//! this runs what a matrix-product microkernel runs at best: every thread issues independent
//! fused multiply-adds (12 accumulator chains, more than latency × issue width on current
//! cores) at the kernels' level (the widest the CPU has, or lower with `MASKDIFF_ISA`, as for
//! the kernels), and the same for `vdpbf16ps` (the bf16 pair dot
//! product with f32 accumulation, 2 multiply-adds per f32 lane) where AVX512-BF16 exists, and
//! AMX's `tdpbf16ps` (16 × 16 × 32 multiply-adds per instruction, four independent C tiles)
//! where the CPU and OS allow tiles — the bf16 peak of the kernels' bf16 products is AMX's
//! there, `vdpbf16ps`'s otherwise.
//!
//! `cargo run --release -p maskdiff-train --example fma_peak -- [--millis MS] [--tries N]`
//! (best of N runs of MS milliseconds each, for each kind).
//! Threads: `RAYON_NUM_THREADS` (default all cores, as the kernels), one busy loop each.
//! Last line (machine-readable): `peak_f32_gflops=X peak_bf16_gflops=Y|none threads=T isa=..
//! bf16_path=amx|avx512bf16|none` (Y: the peak of the path the bf16 products use).

#[path = "common/args.rs"]
mod args;
use args::arg;
use std::time::{Duration, Instant};

type Err = Box<dyn std::error::Error>;

/// Independent accumulator chains per thread.
const CHAINS: usize = 12;
/// Loop trips between clock reads.
const TRIPS: u64 = 1 << 16;

/// The arithmetic the loop can run.
#[derive(Clone, Copy, PartialEq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Kind {
    /// `vfmadd` on 16 f32 lanes.
    Avx512,
    /// `vfmadd` on 8 f32 lanes.
    Avx2,
    /// `vdpbf16ps`: 16 lanes × 2 bf16 products.
    Bf16,
    /// Scalar `mul_add` (the baseline target has no FMA instruction: a lower bound only).
    Scalar,
    /// AMX `tdpbf16ps`: 4 per trip, 16 × 16 × 32 multiply-adds each (not chained).
    Amx,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Avx512 => "avx512",
            Kind::Avx2 => "avx2",
            Kind::Bf16 => "avx512bf16",
            Kind::Scalar => "scalar",
            Kind::Amx => "amx",
        }
    }
    /// Multiply-adds per chain per trip.
    fn madds(self) -> u64 {
        match self {
            Kind::Avx512 => 16,
            Kind::Avx2 => 8,
            Kind::Bf16 => 32,
            Kind::Scalar => 1,
            Kind::Amx => 4 * 16 * 16 * 32,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHAINS, TRIPS};
    use std::arch::x86_64::*;

    /// TRIPS × CHAINS 16-lane FMAs; returns a value that depends on every chain.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(seed: f32) -> f32 {
        let mut acc = [_mm512_set1_ps(seed); CHAINS];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..TRIPS {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }

    /// TRIPS × CHAINS 8-lane FMAs.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(seed: f32) -> f32 {
        let mut acc = [_mm256_set1_ps(seed); CHAINS];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..TRIPS {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let mut lanes = [0.0f32; 8];
        let mut s = 0.0;
        for x in acc {
            // SAFETY: `lanes` holds 8 f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), x) };
            s += lanes.iter().sum::<f32>();
        }
        s
    }

    /// TRIPS × CHAINS `vdpbf16ps` (16 lanes, 2 products each).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16(seed: f32) -> f32 {
        let mut acc = [_mm512_set1_ps(seed); CHAINS];
        // bf16 pairs (0.5, 0.25) and (1e-3, 1e-3): small products keep the sums finite
        let a: __m512bh = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.25));
        let b: __m512bh = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
        for _ in 0..TRIPS {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
}

/// Scalar chains (`f32::mul_add` without the FMA target feature may call libm: a lower bound).
fn scalar(seed: f32) -> f32 {
    let mut acc = [seed; CHAINS];
    for _ in 0..TRIPS {
        for x in acc.iter_mut() {
            *x = std::hint::black_box(*x).mul_add(0.999_999, 1e-7);
        }
    }
    acc.iter().sum()
}

/// The kernels' level ([`maskdiff_network::isa::level`]: the widest the CPU has, or what
/// `MASKDIFF_ISA` lowers it to, so a run emulating a narrower CPU measures that CPU's peak): its
/// f32 FMA kind, whether `vdpbf16ps` is on, whether AMX tiles are.
fn detect() -> (Kind, bool, bool) {
    use maskdiff_network::isa::{level, Isa};
    let l = level();
    let f32k = match l.isa() {
        Isa::Amx | Isa::Avx512 => Kind::Avx512,
        Isa::Avx2 => Kind::Avx2,
        Isa::Portable => Kind::Scalar,
    };
    (f32k, l.bf16().is_some(), l.amx().is_some())
}

/// One block of TRIPS trips of `kind` on this thread.
fn block(kind: Kind, seed: f32) -> f32 {
    if kind == Kind::Amx {
        // per chain, so that `measure`'s count (trips × CHAINS × madds) holds
        let done = maskdiff_network::isa::amx_spin(TRIPS * CHAINS as u64).unwrap_or(0);
        std::hint::black_box(done);
        return seed;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `detect` found each kind's features (the level never exceeds the CPU's)
        // before any thread runs it.
        match kind {
            Kind::Avx512 => return unsafe { x86::avx512(seed) },
            Kind::Avx2 => return unsafe { x86::avx2(seed) },
            Kind::Bf16 => return unsafe { x86::bf16(seed) },
            Kind::Scalar | Kind::Amx => {}
        }
    }
    scalar(seed)
}

/// GFLOP/s (2 flops per multiply-add) of `threads` threads each running `kind` for ≈ `span`.
fn measure(kind: Kind, threads: usize, span: Duration) -> f64 {
    let start = Instant::now();
    let trips: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                s.spawn(move || {
                    let mut n = 0u64;
                    let mut sink = 0.0f32;
                    while start.elapsed() < span {
                        sink += block(kind, i as f32 * 1e-3);
                        n += TRIPS;
                    }
                    std::hint::black_box(sink);
                    n
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("peak thread"))
            .sum()
    });
    let secs = start.elapsed().as_secs_f64();
    (trips * CHAINS as u64 * kind.madds() * 2) as f64 / secs / 1e9
}

fn main() -> Result<(), Err> {
    args::only(&["--millis", "--tries"]);
    let millis: u64 = arg("--millis", 200);
    let tries: usize = arg("--tries", 5);
    let span = Duration::from_millis(millis.max(50));
    // the kernels' thread count: rayon's, which RAYON_NUM_THREADS sets (default all cores)
    let threads = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&t| t > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (f32k, has_bf16, has_amx) = detect();
    // best of `tries`: other processes only ever take cycles away
    let best = |k: Kind| {
        (0..tries.max(1))
            .map(|_| measure(k, threads, span))
            .fold(0.0, f64::max)
    };
    let f32_peak = best(f32k);
    println!(
        "f32 FMA ({}), {threads} threads: {f32_peak:.1} GFLOP/s",
        f32k.name()
    );
    let (mut bf16_peak, mut path) = ("none".to_string(), "none");
    if has_bf16 {
        let p = best(Kind::Bf16);
        println!("bf16 dot (vdpbf16ps), {threads} threads: {p:.1} GFLOP/s");
        (bf16_peak, path) = (format!("{p:.1}"), "avx512bf16");
    } else {
        println!("bf16 dot: no AVX512-BF16 at the kernels' level");
    }
    if has_amx && maskdiff_network::isa::amx_spin(0).is_some() {
        let p = best(Kind::Amx);
        println!("bf16 tiles (AMX tdpbf16ps), {threads} threads: {p:.1} GFLOP/s");
        (bf16_peak, path) = (format!("{p:.1}"), "amx");
    }
    println!(
        "peak_f32_gflops={f32_peak:.1} peak_bf16_gflops={bf16_peak} threads={threads} isa={} bf16_path={path}",
        f32k.name()
    );
    Ok(())
}
