//! [`Out`]: a raw pointer to a buffer that the tasks of one parallel call write at disjoint
//! places (a gemm's C, each task its own tiles; a conversion's output blocks; attention's
//! (sequence, head) blocks; the allocator's zeroed pieces), so that it may cross to rayon's
//! workers; [`In`]: one to a buffer they only read.

/// A buffer the tasks of one call write at disjoint places.
pub(crate) struct Out<T>(pub(crate) *mut T);
impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Out<T> {}
impl<T> Out<T> {
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: a raw pointer carries no ownership and these impls never dereference it; every
// dereference is in an `unsafe` block of a user whose comment shows that the tasks sharing the
// pointer write disjoint elements and read nothing another task writes (no data race).
unsafe impl<T> Send for Out<T> {}
// SAFETY: as for `Send`.
unsafe impl<T> Sync for Out<T> {}

/// A buffer the tasks of one call only read (no task, nor anything else, writes it meanwhile).
pub(crate) struct In<T>(pub(crate) *const T);
impl<T> Clone for In<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for In<T> {}
impl<T> In<T> {
    pub(crate) fn get(self) -> *const T {
        self.0
    }
}
// SAFETY: as for `Out`: the impls never dereference it, and every user's `unsafe` block shows
// the buffer unwritten while the tasks read it (shared reads only).
unsafe impl<T> Send for In<T> {}
// SAFETY: as for `Send`.
unsafe impl<T> Sync for In<T> {}
