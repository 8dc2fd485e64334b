//! The dfdx-free core of the kernels' storage access, std only (so its tests also run under Miri
//! on their own, see `storage.rs`):
//!
//! * [`HostBuf`]: shared read-only access to a heap buffer of `E`s through a pointer that carries
//!   provenance for the whole buffer, together with the buffer's owner, which the handle keeps
//!   alive. The owner is anything that holds the buffer and never writes to it while the handle
//!   exists: a `Vec<E>` moved into the handle, or (`storage.rs`) a clone of the dfdx tensor the
//!   buffer was moved into, whose `Arc`'d storage dfdx then never mutates in place because it is
//!   shared.
//! * The thread-local registry: the handles of the fused kernels' outputs, in frames opened and
//!   closed by [`KernelScope`] guards, and of the optimizer's outputs (parameters, moments, EMA)
//!   in a lasting tier, where each stays until the pass that replaces it consumes it or until
//!   no lookup has found it for a few forward passes. A kernel that reads an input looks its
//!   element 0's *address* up here (`find`); the entry's handle is what it then reads through.
//!
//! Why an address lookup is sound: an entry owns (a clone of) its buffer's owner, so the
//! allocation it points into stays allocated while the entry exists; two live allocations never
//! overlap, so a live object whose element 0 lies at an entry's start address is in that very
//! allocation, and reading it through the entry's pointer reads the same memory with valid
//! provenance. The address itself (a `usize`) is never turned back into a pointer.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::ops::Deref;
use std::rc::Rc;

/// The shared part of a [`HostBuf`]: the buffer's pointer and length, and its owner.
struct Inner<E> {
    ptr: *const E,
    len: usize,
    /// Dropped after the pointer is last used (only when the last handle goes).
    _owner: Box<dyn Any>,
}

/// Read-only access to `len` initialised elements that stay allocated and unmodified as long as
/// the handle (or a clone) lives. Cheap to clone; not `Send` (the registry is per thread).
pub(crate) struct HostBuf<E: 'static> {
    inner: Rc<Inner<E>>,
    /// The viewed prefix (≤ `inner.len`).
    len: usize,
}

impl<E: 'static> Clone for HostBuf<E> {
    fn clone(&self) -> Self {
        HostBuf {
            inner: Rc::clone(&self.inner),
            len: self.len,
        }
    }
}

impl<E: 'static> HostBuf<E> {
    /// A handle owning `v` (a copy the caller made, or a fresh result).
    pub(crate) fn from_vec(v: Vec<E>) -> Self {
        let (ptr, len) = (v.as_ptr(), v.len());
        // SAFETY: `Vec::as_ptr` does not materialise a reference to the elements, so `ptr`
        // carries the provenance of the whole heap buffer; moving `v` into the box moves only
        // its (pointer, capacity, length) header, not the buffer, and the boxed Vec is never
        // touched again until it is dropped together with the handle.
        unsafe { Self::adopt(ptr, len, v) }
    }

    /// A handle on `len` elements at `ptr`, kept alive by `owner`.
    ///
    /// # Safety
    /// `ptr` must be valid for reads of `len` initialised, properly aligned `E`s (with
    /// provenance for all of them, e.g. from `Vec::as_ptr`) for as long as `owner` is alive, and
    /// nothing may write to those elements while `owner` is alive.
    pub(crate) unsafe fn adopt<O: Any>(ptr: *const E, len: usize, owner: O) -> Self {
        HostBuf {
            inner: Rc::new(Inner {
                ptr,
                len,
                _owner: Box::new(owner),
            }),
            len,
        }
    }

    /// The first `len` elements (`len` ≤ the buffer's length).
    fn prefix(&self, len: usize) -> Self {
        assert!(len <= self.inner.len, "HostBuf prefix out of range");
        HostBuf {
            inner: Rc::clone(&self.inner),
            len,
        }
    }

    /// The buffer's start address (for lookups only; never dereferenced).
    pub(crate) fn addr(&self) -> usize {
        self.inner.ptr.addr()
    }
}

impl<E: 'static> Deref for HostBuf<E> {
    type Target = [E];
    fn deref(&self) -> &[E] {
        // SAFETY: by `adopt`'s contract the `len ≤ inner.len` elements at `ptr` are initialised
        // and unmodified while the owner lives, and `self` keeps the owner alive for the
        // lifetime of the returned borrow. An empty handle's pointer is `Vec`'s aligned dangling
        // pointer, which is valid for a zero-length slice.
        unsafe { std::slice::from_raw_parts(self.inner.ptr, self.len) }
    }
}

/// A registered handle, type-erased (one registry serves f32 and f64).
struct Entry {
    addr: usize,
    buf: Rc<dyn Any>,
}

/// One frame of the registry, tagged with the id of the [`KernelScope`] that opened it.
struct Frame {
    id: u64,
    entries: Vec<Entry>,
}

/// An entry of the lasting tier, with the epoch it was last registered or found in.
struct Lasting {
    entry: Entry,
    seen: u64,
}

/// Outermost frames (forward passes) after which an unused lasting entry is dropped.
pub(crate) const LASTING_IDLE_EPOCHS: u64 = 4;

#[derive(Default)]
struct Registry {
    frames: Vec<Frame>,
    next_id: u64,
    /// Long-lived buffers (the optimizer's outputs: parameters, moments, EMA), outside the
    /// frames: dropped when the pass that replaces them consumes them ([`forget`]), or when no
    /// lookup has found them during [`LASTING_IDLE_EPOCHS`] outermost frames.
    lasting: Vec<Lasting>,
    /// Number of outermost frames opened so far.
    epoch: u64,
}

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry::default());
}

/// Records `buf` in the innermost open frame of this thread; returns false (and records
/// nothing) when no frame is open or the buffer is empty.
pub(crate) fn register<E: 'static>(buf: &HostBuf<E>) -> bool {
    if buf.inner.len == 0 {
        return false;
    }
    REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        match r.frames.last_mut() {
            Some(f) => {
                let inner: Rc<dyn Any> = buf.inner.clone();
                f.entries.push(Entry {
                    addr: buf.addr(),
                    buf: inner,
                });
                true
            }
            None => false,
        }
    })
}

/// Records `buf` in this thread's lasting tier (see [`Registry::lasting`]); false for an empty
/// buffer.
pub(crate) fn register_lasting<E: 'static>(buf: &HostBuf<E>) -> bool {
    if buf.inner.len == 0 {
        return false;
    }
    REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let seen = r.epoch;
        let inner: Rc<dyn Any> = buf.inner.clone();
        r.lasting.push(Lasting {
            entry: Entry {
                addr: buf.addr(),
                buf: inner,
            },
            seen,
        });
        true
    })
}

/// Drops the lasting entry of the buffer starting at `addr`, if any (its tensor is being
/// replaced). Handles already given out stay valid.
pub(crate) fn forget(addr: usize) {
    let dropped: Vec<Lasting> = REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let (gone, kept) = std::mem::take(&mut r.lasting)
            .into_iter()
            .partition(|l| l.entry.addr == addr);
        r.lasting = kept;
        gone
    });
    drop(dropped);
}

/// The registered handle of `len` `E`s starting at address `addr`, if this thread's frames or
/// lasting tier hold one (see the module docs for why a match is the same allocation).
pub(crate) fn find<E: 'static>(addr: usize, len: usize) -> Option<HostBuf<E>> {
    REGISTRY.with(|r| {
        let mut r = r.borrow_mut();
        let epoch = r.epoch;
        let as_e = |e: &Entry| {
            (e.addr == addr)
                .then(|| e.buf.clone().downcast::<Inner<E>>().ok())
                .flatten()
        };
        let framed = r
            .frames
            .iter()
            .rev()
            .flat_map(|f| f.entries.iter().rev())
            .find_map(as_e);
        let hit = match framed {
            Some(hit) => hit,
            None => r.lasting.iter_mut().rev().find_map(|l| {
                let hit = as_e(&l.entry)?;
                l.seen = epoch;
                Some(hit)
            })?,
        };
        (hit.len >= len).then(|| HostBuf { inner: hit, len: 0 }.prefix(len))
    })
}

/// Number of handles registered in this thread's open frames and in its lasting tier.
#[cfg(test)]
pub(crate) fn registered() -> (usize, usize) {
    REGISTRY.with(|r| {
        let r = r.borrow();
        let framed = r.frames.iter().map(|f| f.entries.len()).sum();
        (framed, r.lasting.len())
    })
}

/// A frame of the CPU kernels' output registry (see [`crate::Kernels::scope`]): while the
/// guard lives, the fused CPU kernels' outputs on this thread are recorded in its frame, so
/// later kernels read them in place instead of copying them. Dropping the guard drops the
/// frame's entries (and with them the buffers that nothing else holds);
/// [`crate::Kernels::retain`] prunes the frame to the tensors still needed. Frames nest; a
/// guard only ever removes its own frame and the ones opened inside it. Device-agnostic: on
/// devices without the CPU kernels nothing is ever recorded.
#[must_use = "the frame closes when the guard is dropped"]
pub struct KernelScope {
    id: u64,
    /// Frames are per thread: the guard must stay on the thread that opened it.
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for KernelScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelScope").field("id", &self.id).finish()
    }
}

impl KernelScope {
    /// Opens a frame on this thread. An outermost frame starts a new epoch, dropping the
    /// lasting entries that no lookup found during the last [`LASTING_IDLE_EPOCHS`] ones.
    pub(crate) fn open() -> Self {
        let (scope, idle) = REGISTRY.with(|r| {
            let mut r = r.borrow_mut();
            let mut idle = Vec::new();
            if r.frames.is_empty() {
                r.epoch += 1;
                let epoch = r.epoch;
                let (gone, kept) = std::mem::take(&mut r.lasting)
                    .into_iter()
                    .partition(|l| epoch - l.seen > LASTING_IDLE_EPOCHS);
                r.lasting = kept;
                idle = gone;
            }
            let id = r.next_id;
            r.next_id += 1;
            r.frames.push(Frame {
                id,
                entries: Vec::new(),
            });
            let scope = KernelScope {
                id,
                _not_send: PhantomData,
            };
            (scope, idle)
        });
        drop(idle);
        scope
    }

    /// Drops every entry of this guard's frame whose start address is not in `keep`.
    pub(crate) fn retain(&self, keep: &[usize]) {
        let dropped: Vec<Entry> = REGISTRY.with(|r| {
            let mut r = r.borrow_mut();
            match r.frames.iter_mut().find(|f| f.id == self.id) {
                Some(f) => {
                    let (kept, dropped) = std::mem::take(&mut f.entries)
                        .into_iter()
                        .partition(|e| keep.contains(&e.addr));
                    f.entries = kept;
                    dropped
                }
                None => Vec::new(),
            }
        });
        // the owners (and possibly their buffers) go outside the borrow
        drop(dropped);
    }
}

impl Drop for KernelScope {
    fn drop(&mut self) {
        let closed: Vec<Frame> = REGISTRY
            .try_with(|r| {
                let mut r = r.borrow_mut();
                match r.frames.iter().position(|f| f.id == self.id) {
                    Some(i) => r.frames.split_off(i),
                    None => Vec::new(),
                }
            })
            .unwrap_or_default();
        drop(closed);
    }
}

#[cfg(test)]
mod tests {
    //! The registry's logic on plain `Vec` owners (no dfdx), Miri-checkable standalone: a
    //! registered buffer is found by its start address, read through the handle (the whole
    //! buffer, not one element), shared with its owner's other users, pruned and released
    //! with its frame.
    use super::*;
    use std::sync::Arc;

    /// The test double of a dfdx tensor: an `Arc`'d Vec whose clones share the buffer.
    fn shared(n: usize) -> (Arc<Vec<f32>>, HostBuf<f32>) {
        let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let ptr = v.as_ptr();
        let t = Arc::new(v); // moves the header only: the buffer stays where `ptr` points
                             // SAFETY: `ptr` comes from `as_ptr` on the moved Vec; the Arc clone keeps the buffer
                             // alive and nothing mutates an `Arc<Vec>` without exclusive access.
        let buf = unsafe { HostBuf::adopt(ptr, n, Arc::clone(&t)) };
        assert_eq!(t.as_ptr().addr(), buf.addr());
        (t, buf)
    }

    fn addr_of(t: &Arc<Vec<f32>>) -> usize {
        // element 0's address, as the kernels compute it from `&tensor[zero]`
        (&t[0] as *const f32).addr()
    }

    #[test]
    fn registered_buffers_are_found_by_address_and_read_whole() {
        let scope = KernelScope::open();
        let (t, buf) = shared(16);
        assert!(register(&buf));
        drop(buf);
        let hit = find::<f32>(addr_of(&t), 16).expect("registered");
        assert_eq!(hit.iter().sum::<f32>(), (0..16).sum::<i32>() as f32);
        // a prefix is fine, a longer view or another element type is not found
        assert_eq!(find::<f32>(addr_of(&t), 4).unwrap().len(), 4);
        assert!(find::<f32>(addr_of(&t), 17).is_none());
        assert!(find::<f64>(addr_of(&t), 1).is_none());
        // an unregistered buffer misses
        let other = [1.0f32; 16];
        assert!(find::<f32>((&other[0] as *const f32).addr(), 16).is_none());
        drop(scope);
        assert!(find::<f32>(addr_of(&t), 16).is_none());
        // the handle outlives the frame and the owner's other users
        drop(t);
        assert_eq!(hit[15], 15.0);
    }

    #[test]
    fn frames_nest_retain_and_release() {
        assert_eq!(registered(), (0, 0));
        let outer = KernelScope::open();
        let (a, ba) = shared(8);
        register(&ba);
        let inner = KernelScope::open();
        let (b, bb) = shared(8);
        let (c, bc) = shared(8);
        register(&bb);
        register(&bc);
        let weak_c = Arc::downgrade(&c);
        drop((ba, bb, bc, c));
        assert_eq!(registered(), (3, 0));
        inner.retain(&[addr_of(&b)]);
        // c's only remaining owner was the registry: released by the pruning
        assert!(weak_c.upgrade().is_none());
        assert_eq!(registered(), (2, 0));
        assert_eq!(find::<f32>(addr_of(&b), 8).unwrap()[7], 7.0);
        // closing the outer frame first also closes the inner one; the inner guard is a no-op
        drop(outer);
        assert_eq!(registered(), (0, 0));
        drop(inner);
        assert!(find::<f32>(addr_of(&a), 8).is_none());
        // no frame: nothing is recorded
        let (_d, bd) = shared(4);
        assert!(!register(&bd));
    }

    #[test]
    fn lasting_entries_are_consumed_or_age_out() {
        let (t, bt) = shared(8);
        let (u, bu) = shared(8);
        assert!(register_lasting(&bt) && register_lasting(&bu));
        drop((bt, bu));
        assert_eq!(registered(), (0, 2));
        // found without any frame, and consumed by `forget`
        assert_eq!(find::<f32>(addr_of(&t), 8).unwrap()[3], 3.0);
        forget(addr_of(&u));
        assert!(find::<f32>(addr_of(&u), 8).is_none());
        // inner frames do not age it; each outermost frame is one epoch, and a lookup renews it
        for _ in 0..3 * LASTING_IDLE_EPOCHS {
            let _outer = KernelScope::open();
            let _inner = KernelScope::open();
            assert!(find::<f32>(addr_of(&t), 8).is_some());
        }
        for _ in 0..LASTING_IDLE_EPOCHS {
            drop(KernelScope::open());
        }
        assert_eq!(registered(), (0, 1));
        let weak = Arc::downgrade(&t);
        drop(t);
        drop(KernelScope::open());
        assert_eq!(registered(), (0, 0));
        assert!(weak.upgrade().is_none(), "the owner was released");
    }

    #[test]
    fn owned_copies_and_empty_buffers() {
        let h = HostBuf::from_vec(vec![2.0f64; 5]);
        let h2 = h.clone();
        drop(h);
        assert_eq!(h2.iter().sum::<f64>(), 10.0);
        let e = HostBuf::<f64>::from_vec(Vec::new());
        assert!(e.is_empty());
        let _s = KernelScope::open();
        assert!(!register(&e));
    }
}
