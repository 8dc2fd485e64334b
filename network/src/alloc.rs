//! Allocator tuning for the CPU kernels (performance only, no numerical effect). A training step
//! allocates and frees tens of activation and gradient buffers of 1–50 MB. By default glibc
//! serves blocks above its mmap threshold (dynamic, at most 32 MiB) with fresh `mmap`s and
//! returns freed heap tops to the kernel, so every step page-faulted all of them in again.
//! Worse, a fresh zeroed gradient buffer is first *read* by the accumulating gemm (the zero page
//! is mapped) and then written, which costs a copy-on-write fault and a TLB-shootdown IPI per
//! 4 KiB page: ≈ 10 % of a `cpu-small` step at batch 16 × 256 before this tuning, and ≈ 25 % at
//! 32 × 512, where the FFN buffers (46 MB) exceed the largest threshold glibc accepts.
//!
//! So the heap keeps what it gets: no `mmap` for single blocks (`M_MMAP_MAX` = 0, large blocks
//! come from the brk heap, or for a worker thread's arena from the main one), no trimming
//! (`M_TRIM_THRESHOLD` at its maximum) and a 16 MiB top pad. A step's allocation pattern repeats,
//! so after the first step every buffer is carved from memory that is already resident; the
//! process's peak resident memory is unchanged (+1.5 % at 32 × 512), but it does not shrink
//! after the peak either. Measurements in `bench/NOTES.md`.
//!
//! Opt-in: the library never applies it (a process-wide allocator setting is the program's
//! choice). The `maskdiff` binary and the benchmarks/examples call [`tune_allocator`] first thing
//! in `main`; a program embedding the crates that trains on the CPU should do the same. Setting
//! `MASKDIFF_MALLOC_TUNING=0` makes the call a no-op (glibc's defaults, for instance in a
//! long-running process that trains only briefly).

/// Applies the tuning once per process (glibc only; a no-op elsewhere, or when the environment
/// variable `MASKDIFF_MALLOC_TUNING` is `0`). Call it at the start of `main`, before the
/// training allocates; calling it again does nothing.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("MASKDIFF_MALLOC_TUNING").is_some_and(|v| v == "0") {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt takes plain integers and touches no memory of ours; glibc serialises
        // it with the arena locks, so it is thread-safe, and it only changes how glibc obtains
        // and returns memory, never the validity of existing allocations.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
            libc::mallopt(libc::M_TOP_PAD, 16 << 20);
        }
    });
}
