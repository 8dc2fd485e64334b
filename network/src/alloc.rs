//! Allocator tuning for the CPU kernels (performance only, no numerical effect). A training step
//! allocates and frees tens of activation and gradient buffers of 1–50 MB. By default glibc
//! serves blocks above its mmap threshold (dynamic, at most 32 MiB) with fresh `mmap`s and
//! returns freed heap tops to the kernel, so every step page-faulted all of them in again.
//! Worse, a fresh zeroed gradient buffer is first *read* by the accumulating gemm (the zero page
//! is mapped) and then written, which costs a copy-on-write fault and a TLB-shootdown IPI per
//! 4 KiB page: ≈ 10 % of a `cpu-small` step at batch 16 × 256 before this tuning, and ≈ 25 % at
//! 32 × 512, where the FFN buffers (46 MB) exceed the largest threshold glibc accepts.
//!
//! So the heap keeps what it gets: no `mmap` for single blocks (`M_MMAP_MAX` = 0: large blocks
//! come from the brk heap, or on another thread from its arena's heaps — a block larger than
//! such a heap, 64 MiB, glibc still maps afresh there; under [`crate::tune_threads`] the tape
//! and its big buffers run on the main thread), no trimming
//! (`M_TRIM_THRESHOLD` at its maximum) and a 16 MiB top pad. A step's allocation pattern repeats,
//! so after the first step every buffer is carved from memory that is already resident; the
//! process's peak resident memory is unchanged (+1.5 % at 32 × 512), but it does not shrink
//! after the peak either. Measurements in `bench/NOTES.md`.
//!
//! With [`CacheLineAlloc`] as the global allocator, the tuning also has the kernel back big
//! blocks with transparent huge pages (`madvise(MADV_HUGEPAGE)`, Linux/glibc; where THP is
//! `madvise`, as many distributions ship it, nothing gets them unasked): one TLB entry per 2 MiB
//! instead of per 4 KiB for the buffers gemm and the kernels sweep. The `cpu-small` train step
//! gained ≈ 1–4 % from it (more at bf16), peak memory within 1 %. `MASKDIFF_HUGE_PAGES=0` turns
//! this part off alone.
//!
//! Opt-in: the library never applies it (a process-wide allocator setting is the program's
//! choice). The `maskdiff` binary and the benchmarks/examples call [`tune_allocator`] first thing
//! in `main`; a program embedding the crates that trains on the CPU should do the same. Setting
//! `MASKDIFF_MALLOC_TUNING=0` makes the call a no-op (glibc's defaults, for instance in a
//! long-running process that trains only briefly).

/// Applies the tuning once per process (glibc only; a no-op elsewhere, or when the environment
/// variable `MASKDIFF_MALLOC_TUNING` is `0`; the huge-page advice also off with
/// `MASKDIFF_HUGE_PAGES=0`). Call it at the start of `main`, before the
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
        // after the heap stopped shrinking: an advised range stays mapped
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        if std::env::var_os("MASKDIFF_HUGE_PAGES").is_none_or(|v| v != "0") {
            HUGE_PAGES.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
}

/// Set by [`tune_allocator`] (glibc on Linux): [`CacheLineAlloc`] advises the kernel to back
/// its blocks of [`CacheLineAlloc::HUGE`] bytes or more with transparent huge pages.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static HUGE_PAGES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The part of the brk heap [`CacheLineAlloc`] has advised for huge pages, one range (empty
/// at first). A futex lock: it never allocates, so the allocator may take it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
static HEAP_ADVISED: std::sync::Mutex<(usize, usize)> = std::sync::Mutex::new((0, 0));

/// A global allocator for binaries built on this crate: the system allocator, with blocks of
/// 64 KiB or more starting on a cache line (64 bytes). glibc's `malloc` aligns to 16 bytes, so
/// a tensor's rows start at a fixed offset inside their cache lines; AMX tile loads and stores
/// of such rows (the bf16 products' C blocks: `kernels::amx`) straddle two lines each, which
/// took 14.5 ns a tile against 2.2 ns on the Xeon this was written on. A big block is a system
/// block 64 bytes longer, the returned pointer the first cache line boundary at least 8 bytes
/// into it, and the distance stored in the 8 bytes before that pointer (asking glibc for the
/// alignment instead, `posix_memalign`, raised the train step's peak memory by a quarter:
/// its split-off fragments). Opt in with `#[global_allocator] static ALLOC:
/// maskdiff_network::CacheLineAlloc = maskdiff_network::CacheLineAlloc;` (the `maskdiff`
/// binary and the benchmarks do); without it everything works, at the unaligned speed.
pub struct CacheLineAlloc;

impl CacheLineAlloc {
    /// Blocks this large or larger start on a cache line.
    pub const BIG: usize = 1 << 16;
    /// A cache line.
    pub const LINE: usize = 64;

    /// Whether a block of this layout gets the cache-line treatment (a function of the layout
    /// alone, so `dealloc` and `realloc` see what `alloc` did).
    fn big(l: std::alloc::Layout) -> bool {
        l.size() >= Self::BIG && l.align() <= 16
    }

    /// The system block behind a big block of `size` bytes.
    fn outer(size: usize) -> Option<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(size.checked_add(Self::LINE)?, 16).ok()
    }

    /// The cache-line pointer inside the system block `raw` (null stays null), with the
    /// distance recorded before it.
    ///
    /// # Safety
    /// `raw` null or a fresh system block of at least `size + LINE` bytes, 16-byte aligned.
    unsafe fn place(raw: *mut u8) -> *mut u8 {
        if raw.is_null() {
            return raw;
        }
        // the first line boundary at least 8 bytes in: 8..=64 bytes in, since raw is 16-aligned
        let off = (raw.addr() + 8).next_multiple_of(Self::LINE) - raw.addr();
        // SAFETY: off ≤ LINE, so the pointer and the `size` bytes after it lie in the block;
        // the usize before it (off ≥ 8) too, at an 8-aligned address (off and raw are).
        unsafe {
            let p = raw.add(off);
            p.cast::<usize>().sub(1).write(off);
            p
        }
    }

    /// Zeroed blocks this large or larger, asked for on a worker of a rayon pool with more than
    /// one thread, are zeroed by the pool's threads, one piece per thread.
    pub const POOL_ZERO: usize = 1 << 20;

    /// Whether a zeroed block of `size` bytes is zeroed on the pool: a big one asked for on a
    /// worker (the main thread under `tune_threads`: dfdx's zero-filled gradient buffers, each
    /// a serial `memset` of up to tens of MB while the other cores waited, ≈ 5 % of a bf16
    /// `cpu-small` step), and never off the pool (there a join would inject and wait).
    fn zero_on_pool(size: usize) -> bool {
        size >= Self::POOL_ZERO
            && rayon::current_thread_index().is_some()
            && rayon::current_num_threads() > 1
    }

    /// Blocks this large or larger are advised as huge-page candidates once
    /// [`tune_allocator`] has run; also the alignment of the advised ranges (a transparent
    /// huge page on x86-64, and on aarch64 with 4 KiB pages).
    pub const HUGE: usize = 2 << 20;

    /// Asks the kernel (`madvise(MADV_HUGEPAGE)`) to back big blocks with transparent huge
    /// pages, when [`tune_allocator`] enabled it: one TLB entry per 2 MiB instead of per 4 KiB
    /// for the step's activation and gradient buffers (4–16 MiB at `cpu-small`), which gemm and
    /// the kernels sweep again and again. Where THP is `madvise` (as many distributions ship it)
    /// nothing gets huge pages without the advice. Called with `None` before every big block
    /// ([`Self::BIG`]) is asked of the system, and with the system block after.
    ///
    /// In the brk heap (glibc's main arena, where `tune_allocator` sends big blocks and which
    /// it never trims) the advised part is one range growing from the first big block's huge
    /// page to the last whole huge page below the heap's end, and left alone once the blocks
    /// repeat step after step (no syscall, no mmap lock taken from the other threads' page
    /// faults). The advice comes before the system carves the block, so the heap top's fresh
    /// pages fault in huge on their first touch (glibc writes chunk headers there), and it stops
    /// short of the heap's end: a heap grown by `brk` extends its unadvised last mapping, which
    /// the next advice then merges into the advised one, so the advised part stays one mapping
    /// with 2 MiB-aligned ends, every huge page inside it eligible (advising past the end split
    /// the heap into a mapping per growth, their unaligned edges 4 KiB-backed: ≈ 70 % of the
    /// heap huge against ≈ 98 % with glibc's own `glibc.malloc.hugetlb=1`, which advises at
    /// `sbrk` time but is read only at process start). A block outside the heap (another
    /// arena's) is advised rounded out to whole huge pages. Advice only: no byte of memory and
    /// no mapping's validity changes, so covering neighbouring blocks' pages is harmless, and a
    /// kernel without THP refuses it (ignored).
    fn advise_huge(block: Option<(*mut u8, usize)>) {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            use std::ptr::without_provenance_mut;
            // SAFETY: an address range handed to the kernel, never dereferenced;
            // MADV_HUGEPAGE only changes how the kernel backs the mapped pages in it (the
            // unmapped ones it reports and skips).
            let advise = |start: usize, end: usize| unsafe {
                libc::madvise(
                    without_provenance_mut(start),
                    end - start,
                    libc::MADV_HUGEPAGE,
                )
            };
            if !HUGE_PAGES.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            // SAFETY: brk(0) changes nothing and returns the current program break (the brk
            // heap's end); a plain syscall, safe from any thread.
            let top = unsafe { libc::syscall(libc::SYS_brk, 0) } as usize;
            // the last whole huge page below the end, never the end itself: the heap's last
            // mapping stays unadvised for `brk` to extend
            let cap = top.saturating_sub(1) / Self::HUGE * Self::HUGE;
            let start = match block {
                None => cap,
                // in the heap: below its end and above the program's static data (which the
                // brk heap follows; the mappings of libraries, stacks and other arenas lie far
                // above it)
                Some((raw, _))
                    if (&raw const HEAP_ADVISED).addr() < raw.addr() && raw.addr() < top =>
                {
                    raw.addr() / Self::HUGE * Self::HUGE
                }
                Some((raw, len)) => {
                    if !raw.is_null() && len >= Self::HUGE {
                        let end = (raw.addr() + len).next_multiple_of(Self::HUGE);
                        advise(raw.addr() / Self::HUGE * Self::HUGE, end);
                    }
                    return;
                }
            };
            // a poisoned lock (impossible: nothing panics under it) only skips the advice
            let Ok(mut advised) = HEAP_ADVISED.lock() else {
                return;
            };
            let (lo, hi) = *advised;
            let (start, end) = match (lo < hi, block) {
                (true, _) => (start.min(lo), cap.max(hi)),
                // nothing advised yet: the first big block starts the range
                (false, Some(_)) => (start, cap),
                (false, None) => return,
            };
            if start >= end || (lo < hi && (start, end) == (lo, hi)) {
                return;
            }
            advise(start, end);
            *advised = (start, end);
        }
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        let _ = block;
    }

    /// The system block of a big block `p` (from [`Self::place`]).
    ///
    /// # Safety
    /// `p` returned by `place` and not freed.
    unsafe fn raw(p: *mut u8) -> *mut u8 {
        // SAFETY: `place` wrote the distance in the usize before `p`, inside the block.
        unsafe { p.sub(p.cast::<usize>().sub(1).read()) }
    }
}

// SAFETY: a small block is the system allocator's, asked for with the caller's layout. A big
// block (`big(layout)`, decided from the layout alone, which `dealloc` and `realloc` receive
// unchanged) lies inside a system block of size + LINE bytes at a 64-aligned address (so it
// fits the layout, whose alignment is ≤ 16) and is returned to the system through the
// distance stored before it.
unsafe impl std::alloc::GlobalAlloc for CacheLineAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if !Self::big(layout) {
            // SAFETY: the caller's layout, passed on.
            return unsafe { std::alloc::System.alloc(layout) };
        }
        match Self::outer(layout.size()) {
            // SAFETY: a non-zero layout; `place` gets a fresh block of size + LINE bytes.
            Some(o) => unsafe {
                Self::advise_huge(None);
                let raw = std::alloc::System.alloc(o);
                Self::advise_huge(Some((raw, o.size())));
                Self::place(raw)
            },
            None => std::ptr::null_mut(),
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if !Self::big(layout) {
            // SAFETY: as for `alloc`.
            return unsafe { std::alloc::System.alloc_zeroed(layout) };
        }
        if Self::zero_on_pool(layout.size()) {
            // SAFETY: as for `alloc`; then the block's `size` bytes, all of them its own, zeroed.
            unsafe {
                let p = self.alloc(layout);
                if !p.is_null() {
                    zero_on_pool(p, layout.size());
                }
                return p;
            }
        }
        match Self::outer(layout.size()) {
            // SAFETY: as for `alloc`; the distance is written before the zeroed `size` bytes.
            Some(o) => unsafe {
                Self::advise_huge(None);
                let raw = std::alloc::System.alloc_zeroed(o);
                Self::advise_huge(Some((raw, o.size())));
                Self::place(raw)
            },
            None => std::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if !Self::big(layout) {
            // SAFETY: allocated by the system with this layout.
            return unsafe { std::alloc::System.dealloc(ptr, layout) };
        }
        if let Some(o) = Self::outer(layout.size()) {
            // SAFETY: a big block from `place`, its system block allocated with `o`.
            unsafe { std::alloc::System.dealloc(Self::raw(ptr), o) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees new_size > 0 and no overflow at layout.align().
        let want =
            unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !Self::big(layout) && !Self::big(want) {
            // SAFETY: a system block with `layout`, resized by the system.
            return unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: a fresh block for `want`, the common prefix copied, the old block freed with
        // its layout (both through this allocator's own paths).
        unsafe {
            let fresh = self.alloc(want);
            if !fresh.is_null() {
                std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            fresh
        }
    }
}

/// Zeroes the `len` bytes at `p` in one piece per thread of the current rayon pool, split by
/// `join` from this worker (so the pieces go to the pool's deques, not its injector). Called
/// from inside the allocator: it allocates nothing of its own size class (a join's jobs live
/// on the stack; a deque that grows asks for a small block), so it never re-enters itself, and
/// the zeroing cannot panic.
///
/// # Safety
/// `p` valid for writes of `len` bytes, which nothing else accesses until this returns.
unsafe fn zero_on_pool(p: *mut u8, len: usize) {
    use crate::kernels::disjoint::Out;
    fn zero(b: Out<u8>, range: std::ops::Range<usize>, piece: usize) {
        if range.len() <= piece {
            // SAFETY: `range` lies inside the caller's `len` bytes and no other task's range
            // overlaps it (the halves below are disjoint).
            unsafe { std::ptr::write_bytes(b.get().add(range.start), 0, range.len()) };
            return;
        }
        let mid = range.start + (range.len() / 2).next_multiple_of(4096).min(range.len());
        rayon::join(
            || zero(b, range.start..mid, piece),
            || zero(b, mid..range.end, piece),
        );
    }
    let piece = len.div_ceil(rayon::current_num_threads()).max(4096);
    zero(Out(p), 0..len, piece);
}

/// Test support (Linux): the mappings of /proc/self/smaps that overlap [lo, hi), as (start,
/// end, advised for huge pages: `hg` among the VmFlags).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[doc(hidden)]
pub fn mappings(lo: usize, hi: usize) -> Vec<(usize, usize, bool)> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let (mut out, mut cur) = (Vec::new(), None);
    for line in smaps.lines() {
        let range = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'));
        if let Some((a, b)) = range {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                cur = Some((a, b));
                continue;
            }
        }
        if let (Some(flags), Some((a, b))) = (line.strip_prefix("VmFlags:"), cur) {
            if a < hi && lo < b {
                out.push((a, b, flags.split_whitespace().any(|f| f == "hg")));
            }
        }
    }
    out
}

/// Test support: applies [`tune_allocator`], then tells whether it turned the huge-page advice
/// on (not switched off by its environment variables) and the advice shows in /proc/self/smaps
/// (the kernel has THP, not `never`, not disabled for the process, and no emulator between:
/// qemu's user mode drops the advice), probed with a mapping of its own.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[doc(hidden)]
pub fn huge_pages_to_advise() -> bool {
    tune_allocator();
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !HUGE_PAGES.load(std::sync::atomic::Ordering::Relaxed)
        || thp.is_err()
        || thp.is_ok_and(|t| t.contains("[never]"))
        || status.contains("THP_enabled:\t0")
    {
        return false;
    }
    let len = 2 * CacheLineAlloc::HUGE;
    let (rw, private) = (
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
    );
    // SAFETY: a fresh anonymous mapping of our own, advised, never dereferenced, and unmapped
    // with its length.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), len, rw, private, -1, 0);
        if p == libc::MAP_FAILED {
            return false;
        }
        let shown = libc::madvise(p, len, libc::MADV_HUGEPAGE) == 0
            && mappings(p.addr(), p.addr() + len).iter().any(|m| m.2);
        libc::munmap(p, len);
        shown
    }
}

#[cfg(test)]
mod tests {
    use super::CacheLineAlloc;
    use std::alloc::{GlobalAlloc, Layout};

    /// Big blocks start on a cache line and keep their contents through growing and shrinking
    /// reallocations across the size class; small ones are the system's; nothing is lost.
    #[test]
    fn big_blocks_are_line_aligned_and_hold_their_bytes() {
        let a = CacheLineAlloc;
        let big = Layout::from_size_align(CacheLineAlloc::BIG + 3, 4).unwrap();
        let small = Layout::from_size_align(100, 8).unwrap();
        // SAFETY: every block is used within its size and freed with its layout.
        unsafe {
            let p = a.alloc(big);
            assert_eq!(p.addr() % CacheLineAlloc::LINE, 0);
            for i in 0..big.size() {
                p.add(i).write(i as u8);
            }
            let z = a.alloc_zeroed(big);
            assert_eq!(z.addr() % CacheLineAlloc::LINE, 0);
            assert!((0..big.size()).all(|i| z.add(i).read() == 0));
            a.dealloc(z, big);
            // shrink below BIG, then grow back past it
            let q = a.realloc(p, big, 100);
            assert!((0..100).all(|i| q.add(i).read() == i as u8));
            let r = a.realloc(
                q,
                Layout::from_size_align(100, 4).unwrap(),
                2 * CacheLineAlloc::BIG,
            );
            assert_eq!(r.addr() % CacheLineAlloc::LINE, 0);
            assert!((0..100).all(|i| r.add(i).read() == i as u8));
            a.dealloc(
                r,
                Layout::from_size_align(2 * CacheLineAlloc::BIG, 4).unwrap(),
            );
            let s = a.alloc(small);
            assert_eq!(s.addr() % 8, 0);
            a.dealloc(s, small);
        }
    }

    /// A big zeroed block asked for on a worker of a 3-thread pool (zeroed in pieces by the
    /// pool) is zero in every byte, after the same memory held other bytes; sizes around the
    /// piece and page boundaries, and a block below the threshold (the system's calloc).
    #[test]
    fn zeroed_blocks_on_the_pool_are_zero() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            let a = CacheLineAlloc;
            for size in [
                CacheLineAlloc::POOL_ZERO - 1,
                CacheLineAlloc::POOL_ZERO,
                CacheLineAlloc::POOL_ZERO + 4095,
                3 * CacheLineAlloc::POOL_ZERO + 17,
            ] {
                assert_eq!(
                    CacheLineAlloc::zero_on_pool(size),
                    size >= CacheLineAlloc::POOL_ZERO
                );
                let l = Layout::from_size_align(size, 4).unwrap();
                // SAFETY: each block is used within its size and freed with its layout.
                unsafe {
                    let p = a.alloc(l);
                    std::ptr::write_bytes(p, 0xA5, size);
                    a.dealloc(p, l);
                    let z = a.alloc_zeroed(l);
                    assert_eq!(z.addr() % CacheLineAlloc::LINE, 0);
                    let bytes = std::slice::from_raw_parts(z, size);
                    assert!(bytes.iter().all(|&b| b == 0), "size {size}");
                    a.dealloc(z, l);
                }
            }
        });
        // off the pool: never on it
        assert!(std::thread::spawn(|| CacheLineAlloc::zero_on_pool(1 << 30))
            .join()
            .map(|on| !on)
            .unwrap());
    }

    /// Once `tune_allocator` has run (`huge_pages_to_advise` applies it), a big block of
    /// another arena than the brk heap's (this test thread's: the harness runs tests off the
    /// main thread) lies in mappings advised for transparent huge pages, rounded out to whole
    /// huge pages, whether asked for zeroed or not. Skipped where the kernel has no THP to
    /// advise. The brk heap's range, on the main thread: `tests/huge_pages.rs`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn big_blocks_of_an_arena_are_advised_for_huge_pages() {
        if !super::huge_pages_to_advise() {
            eprintln!("no transparent huge pages to advise here: skipped");
            return;
        }
        let huge = CacheLineAlloc::HUGE;
        let a = CacheLineAlloc;
        for size in [3 * huge + 5, huge] {
            let l = Layout::from_size_align(size, 4).unwrap();
            // SAFETY: each block is freed with its layout and never read or written here.
            unsafe {
                for p in [a.alloc(l), a.alloc_zeroed(l)] {
                    let (lo, hi) = (p.addr(), p.addr() + size);
                    let ms = super::mappings(lo / huge * huge, hi.next_multiple_of(huge));
                    assert!(
                        !ms.is_empty() && ms.iter().all(|m| m.2),
                        "{size} bytes at {lo:x}: {ms:x?}"
                    );
                    a.dealloc(p, l);
                }
            }
        }
    }
}
