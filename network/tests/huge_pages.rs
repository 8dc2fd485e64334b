//! [`CacheLineAlloc`]'s huge-page advice in glibc's brk heap, where `tune_allocator` sends the
//! main thread's big blocks: run without the test harness, so on the main thread, whose arena
//! the brk heap is. Two 24 MiB blocks, the heap grown for each (past its 16 MiB top pad), lie
//! in one mapping advised for transparent huge pages up to the last whole huge page below the
//! heap's end: the advice reached the second block's pages, and the heap's growth between them
//! did not split the advised part (which would leave the edges of every piece on 4 KiB pages).
//! Skipped where the kernel has no THP to advise, and off Linux/glibc.

#[global_allocator]
static ALLOC: maskdiff_network::CacheLineAlloc = maskdiff_network::CacheLineAlloc;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    use maskdiff_network::CacheLineAlloc;
    if !maskdiff_network::huge_pages_to_advise() {
        println!("huge_pages: no transparent huge pages to advise here: skipped");
        return;
    }
    // (tune_allocator applied by the check above)
    let blocks: Vec<Vec<u8>> = (0..2).map(|_| Vec::with_capacity(24 << 20)).collect();
    // SAFETY: brk(0) changes nothing; it returns the current program break.
    let top = unsafe { libc::syscall(libc::SYS_brk, 0) } as usize;
    let huge = CacheLineAlloc::HUGE;
    let cap = (top - 1) / huge * huge;
    let addrs: Vec<usize> = blocks.iter().map(|b| b.as_ptr().addr()).collect();
    for &p in &addrs {
        assert!(
            p < top,
            "a block at {p:x} outside the brk heap (break {top:x})"
        );
    }
    let lo = addrs.iter().min().unwrap().next_multiple_of(huge);
    let hi = (addrs.iter().max().unwrap() + (24 << 20)).min(cap);
    assert!(
        lo < hi,
        "blocks at {addrs:x?} hold no whole huge page below {cap:x}"
    );
    let ms = maskdiff_network::mappings(lo, hi);
    assert!(
        ms.len() == 1 && ms[0].2 && ms[0].0 <= lo && hi <= ms[0].1,
        "the heap's huge pages {lo:x}..{hi:x} lie in {ms:x?}"
    );
    println!("huge_pages: {lo:x}..{hi:x} in one advised mapping {ms:x?}: ok");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("huge_pages: Linux/glibc only: skipped");
}
