//! Allocator tuning for the CPU kernels (performance only, no numerical effect). A training step
//! allocates and frees tens of activation and gradient buffers of 1–20 MB; glibc serves blocks
//! above its mmap threshold (dynamic, starting at 128 KiB) with fresh `mmap`s and returns freed
//! heap tops to the kernel, so every step page-faulted all of them in again (≈ 10 % of a
//! `cpu-small` step in kernel page-fault handling). Raising the mmap threshold to glibc's
//! maximum (32 MiB) and the trim threshold keeps freed blocks in the heap for reuse; peak
//! resident memory is unchanged (measured in `bench/NOTES.md`).

/// Applies the tuning once per process (glibc only; a no-op elsewhere). Called by the CPU
/// kernels on first use; calling it again does nothing.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; it is thread-safe in glibc.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_TOP_PAD, 16 << 20);
        }
    });
}
