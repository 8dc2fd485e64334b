//! The calling thread as worker 0 of rayon's global pool (performance only, no numerical
//! effect). Every CPU kernel splits its work with rayon. Called from a thread outside the pool
//! (a program's main thread, by default), each parallel loop is injected into the pool's shared
//! queue, a sleeping worker is woken to take it, and the caller sleeps on a latch until the loop
//! is done: two context switches per loop, and a training step runs hundreds of loops (most of
//! them well under a millisecond). With the caller as one of the pool's workers
//! (`ThreadPoolBuilder::use_current_thread`), a loop starts on the caller's own deque, the caller
//! works on it at once and the other workers steal halves of it, as inside any rayon job; the
//! pool still has one thread per core (the caller and n − 1 spawned), not n + 1 threads on n
//! cores.
//!
//! Measured (`bench/NOTES.md`, "The main thread as a pool worker"; 2-core Xeon, alternated):
//! `cpu-small` train step +9–10 % at bf16, +2–9 % at f32; `unet-small` +8 % (f32), +11 % (bf16).
//!
//! Opt-in, like [`crate::tune_allocator`]: the library never builds the global pool (that is
//! the program's choice, once per process). The `maskdiff` binary and the benchmarks/examples
//! call [`tune_threads`] first thing in `main`, before anything uses rayon.
//! `MASKDIFF_MAIN_WORKER=0` makes the call a no-op (rayon's default pool: n spawned workers).
//! The pool's size is rayon's default either way (`RAYON_NUM_THREADS`, else one per core).
//!
//! What a program that calls it must not do: block its main thread on work that only another
//! thread's rayon loop would finish while the pool has a single thread (`RAYON_NUM_THREADS=1`:
//! the main thread is then the pool, and a loop injected from elsewhere waits for it to enter
//! rayon). The `maskdiff` binary runs every loop from its main thread.

use std::sync::OnceLock;

/// Makes the calling thread worker 0 of rayon's global pool, once per process (a no-op when
/// `MASKDIFF_MAIN_WORKER` is `0`, or when the global pool already exists: then it returns
/// false). Returns whether the global pool runs on the thread that first called it.
pub fn tune_threads() -> bool {
    static BUILT: OnceLock<bool> = OnceLock::new();
    *BUILT.get_or_init(|| {
        if std::env::var_os("MASKDIFF_MAIN_WORKER").is_some_and(|v| v == "0") {
            return false;
        }
        rayon::ThreadPoolBuilder::new()
            .use_current_thread()
            .build_global()
            .is_ok()
    })
}

#[cfg(test)]
mod tests {
    /// What `tune_threads` relies on, on a local pool (the global one belongs to the test
    /// harness): the builder thread becomes worker 0 of a pool of the asked size, its loops run
    /// on the pool from it (no injection: `current_thread_index` is 0 there), both threads take
    /// part, and a parallel sum is the serial one.
    #[test]
    fn the_building_thread_is_worker_0_and_loops_run_from_it() {
        use rayon::prelude::*;
        std::thread::spawn(|| {
            assert_eq!(rayon::current_thread_index(), None);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .use_current_thread()
                .build()
                .unwrap();
            assert_eq!(pool.current_num_threads(), 2);
            assert_eq!(rayon::current_thread_index(), Some(0));
            // A second pool cannot adopt a thread that is already a worker.
            assert!(rayon::ThreadPoolBuilder::new()
                .use_current_thread()
                .build()
                .is_err());
            // Jobs that block until both threads have entered: only finishes if the spawned
            // worker steals one while worker 0 (this thread) runs the other.
            let arrived = std::sync::atomic::AtomicUsize::new(0);
            let who: Vec<usize> = (0..2)
                .into_par_iter()
                .with_max_len(1)
                .map(|_| {
                    arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    while arrived.load(std::sync::atomic::Ordering::SeqCst) < 2 {
                        std::hint::spin_loop();
                    }
                    rayon::current_thread_index().unwrap()
                })
                .collect();
            let mut sorted = who.clone();
            sorted.sort();
            assert_eq!(sorted, [0, 1], "both workers ran a job: {who:?}");
            let xs: Vec<u64> = (0..100_000).collect();
            assert_eq!(
                xs.par_iter().sum::<u64>(),
                xs.iter().sum::<u64>(),
                "a parallel loop from worker 0"
            );
        })
        .join()
        .unwrap();
    }
}
