//! Sound, zero-copy read access to the CPU kernels' inputs, and their outputs' allocation.
//!
//! dfdx 0.13 keeps a tensor's storage private (`CachableVec::data` is `pub(crate)`); its public
//! routes to the data are copies (`copy_into`, `as_vec`) and the element indexing, which yields a
//! reference to *one* element. (The previous `view()` widened such a reference to the whole
//! buffer with `slice::from_raw_parts`: undefined behaviour under Stacked Borrows, where a
//! pointer derived from `&t[0]` may read only that element; Miri flags the pattern.)
//!
//! The route taken here: every tensor a fused CPU kernel creates goes through [`output`], which
//! takes the pointer with `Vec::as_ptr` (provenance for the whole buffer, no reference
//! materialised) *before* `Cpu::try_tensor_from_vec` moves the Vec into the tensor (dfdx 0.13
//! moves it into its `CachableVec` and `Arc` without reallocating, so the buffer stays put;
//! checked on every call by comparing element 0's address), and keeps a clone of the tensor
//! beside the pointer in a [`HostBuf`]. The clone keeps the buffer allocated, and since the
//! `Arc` is then shared, dfdx never writes to it in place (it mutates storage only through
//! `Arc::get_mut`/`Arc::make_mut`, which copy a shared buffer first). The handle is registered in
//! the current [`KernelScope`] frame of this thread (the optimizer's outputs — parameters,
//! moments, EMA — in the thread's lasting tier instead, until the next optimizer pass consumes
//! them or no lookup has found them for a few forward passes). A kernel reading an input ([`input`])
//! computes the address of the input's element 0 (an integer, never dereferenced beyond that
//! element), checks row-major contiguity from element addresses, and looks the address up: a hit
//! is that same allocation (the entry keeps it alive, and live allocations do not overlap), read
//! through the entry's pointer; a miss — a tensor made by a dfdx op (gather, add, slice, the
//! gradients `Gradients::get` returns), a parameter not (yet) produced by the optimizer, or a
//! kernel output whose frame has closed — is copied once with `copy_into`.
//! Gradient buffers are reached through `Gradients::get_or_alloc_mut`, a `&mut Vec`, and need
//! none of this.
//!
//! The registry's core (handles, frames, lookup) is dfdx-free in `buf.rs`; its tests run under
//! Miri on their own (Miri cannot build dfdx 0.13 on nightly: its build script switches on an
//! unstable `nightly` feature that no longer compiles).

mod buf;

pub(crate) use buf::HostBuf;
pub use buf::KernelScope;

use crate::layers::Res;
use crate::Elem;
use dfdx::prelude::*;
use rayon::prelude::*;

/// Address of element 0 of a non-empty tensor whose elements lie row-major and contiguous from
/// there (`None` when it is empty). Panics on any other layout: callers pass the result of
/// `try_contiguous`, which copies broadcast and permuted tensors. Only addresses are compared;
/// no pointer is dereferenced.
fn start<S: Shape, E: Elem, T>(t: &Tensor<S, E, Cpu, T>) -> Option<usize> {
    let shape = *t.shape();
    if shape.num_elements() == 0 {
        return None;
    }
    let zero = S::Concrete::default();
    let addr = |ix| (&t[ix] as *const E).addr();
    let first = addr(zero);
    let dims = shape.concrete();
    let mut stride = 1;
    for axis in (0..S::NUM_DIMS).rev() {
        if dims[axis] > 1 {
            let mut ix = zero;
            ix[axis] = 1;
            assert!(
                addr(ix) == first + stride * std::mem::size_of::<E>(),
                "kernel input is not row-major contiguous"
            );
        }
        stride *= dims[axis];
    }
    Some(first)
}

/// Read access to a contiguous tensor's elements in row-major order: the registered buffer of a
/// fused kernel's output (no copy), or else a copy.
pub(crate) fn input<S: Shape, E: Elem, T>(t: &Tensor<S, E, Cpu, T>) -> HostBuf<E> {
    let n = t.shape().num_elements();
    match start(t) {
        None => HostBuf::from_vec(Vec::new()),
        Some(addr) => buf::find(addr, n).unwrap_or_else(|| HostBuf::from_vec(host(t))),
    }
}

/// A contiguous tensor's elements copied into a fresh Vec (for kernels that build their output
/// in place from a copy of an input).
pub(crate) fn host<S: Shape, E: Elem, T>(t: &Tensor<S, E, Cpu, T>) -> Vec<E> {
    let mut v = vec![E::zero(); t.shape().num_elements()];
    // copies the physical buffer, which for a contiguous tensor is its elements in order
    t.copy_into(&mut v);
    v
}

/// A kernel output: the tensor and a handle on its buffer.
pub(crate) type Made<S, E> = (Tensor<S, E, Cpu>, HostBuf<E>);

/// The one constructor of the fused kernels' output tensors: `data` becomes a tensor of `shape`,
/// registered in this thread's innermost [`KernelScope`] frame (if one is open), and returned
/// with a handle on its buffer (for backward passes that read the output).
pub(crate) fn output<S: Shape, E: Elem>(dev: &Cpu, data: Vec<E>, shape: S) -> Res<Made<S, E>, Cpu> {
    let made = adopt(dev, data, shape)?;
    buf::register(&made.1);
    Ok(made)
}

/// [`output`] for the optimizer's results (parameters, moments, EMA), which outlive any frame:
/// registered in the lasting tier until the next optimizer pass consumes them ([`consume`]).
pub(crate) fn output_lasting<S: Shape, E: Elem>(
    dev: &Cpu,
    data: Vec<E>,
    shape: S,
) -> Res<Tensor<S, E, Cpu>, Cpu> {
    let (t, handle) = adopt(dev, data, shape)?;
    buf::register_lasting(&handle);
    Ok(t)
}

/// Drops the lasting-tier entry of `t`'s buffer (an optimizer pass is replacing `t`).
pub(crate) fn consume<S: Shape, E: Elem, T>(t: &Tensor<S, E, Cpu, T>) {
    if let Some(first) = first_addr(t) {
        buf::forget(first);
    }
}

/// Element 0's address, whatever the layout (`None` when empty).
fn first_addr<S: Shape, E: Elem, T>(t: &Tensor<S, E, Cpu, T>) -> Option<usize> {
    (t.shape().num_elements() > 0).then(|| (&t[S::Concrete::default()] as *const E).addr())
}

/// `data` moved into a tensor, with a handle on its buffer.
fn adopt<S: Shape, E: Elem>(dev: &Cpu, data: Vec<E>, shape: S) -> Res<Made<S, E>, Cpu> {
    let (ptr, len) = (data.as_ptr(), data.len());
    let t = dev.try_tensor_from_vec(data, shape)?;
    if len == 0 {
        return Ok((t, HostBuf::from_vec(Vec::new())));
    }
    assert_eq!(
        start(&t),
        Some(ptr.addr()),
        "dfdx moved a kernel output's buffer"
    );
    // SAFETY: `ptr` was taken with `Vec::as_ptr` (provenance for the whole buffer, no reference
    // created) from the Vec that `try_tensor_from_vec` moved, without reallocating, into the
    // tensor's storage (dfdx 0.13: `CachableVec { data: src, .. }` in a fresh `Arc`; the address
    // check above confirms the buffer did not move). The `len` elements are initialised. The
    // owner is a clone of the tensor: it keeps the buffer allocated, and while it lives the
    // storage `Arc` is shared, so dfdx never writes to it (in-place paths require
    // `Arc::get_mut`, and `Arc::make_mut` copies a shared buffer first); nothing else can reach
    // the Vec (its field is private to dfdx).
    let handle = unsafe { HostBuf::adopt(ptr, len, t.clone()) };
    Ok((t, handle))
}

/// A `len`-element Vec whose elements are all written by `fill` through the pointer it is given
/// (for gemm outputs, which `gemm` overwrites without reading), skipping the zeroing pass.
///
/// # Safety
/// `fill` must initialise all `len` elements at the pointer (it has write provenance for
/// `len` elements and may not read them before writing).
pub(crate) unsafe fn alloc_filled<E: Elem>(len: usize, fill: impl FnOnce(*mut E)) -> Vec<E> {
    let mut v = Vec::with_capacity(len);
    fill(v.as_mut_ptr());
    // SAFETY: capacity ≥ len, and the caller guarantees `fill` initialised all `len` elements.
    unsafe { v.set_len(len) };
    v
}

/// A `len`-element output written in parallel: its chunks of `chunk` elements (the last may be
/// shorter) are paired in order with the items of `inputs` (one per chunk, else a panic before
/// any chunk runs) and handed to `fill`. Each chunk is zeroed by the thread that fills it, just
/// before, while it sits in that core's cache: `vec![0; len]` would zero the whole buffer first,
/// on the calling thread alone (glibc's calloc clears reused heap memory with `memset`), while
/// the other threads wait, and the kernel's writes would then miss the cache again.
pub(crate) fn par_filled<E: Elem, I: IndexedParallelIterator>(
    len: usize,
    chunk: usize,
    inputs: I,
    fill: impl Fn(&mut [E], I::Item) + Sync + Send,
) -> Vec<E> {
    let zeroed_then_filled = |ys: &mut [std::mem::MaybeUninit<E>], item| {
        ys.iter_mut().for_each(|y| {
            y.write(E::zero());
        });
        // SAFETY: every element of `ys` was initialised just above, and `MaybeUninit<E>` has
        // the layout of `E`, so this is the same memory as a `&mut [E]` of the same length,
        // borrowed for this closure only.
        let ys = unsafe { &mut *(ys as *mut [std::mem::MaybeUninit<E>] as *mut [E]) };
        fill(ys, item);
    };
    // SAFETY: the closure writes every element of its chunk (zeros) before `fill`, which,
    // holding a `&mut [E]`, can only leave initialised values.
    unsafe { par_written(len, chunk, inputs, zeroed_then_filled) }
}

/// [`par_filled`] without the zeroing, for kernels that write every output element: each chunk
/// is handed to `fill` uninitialised.
///
/// # Safety
/// `fill` must initialise every element of the chunk it is given.
pub(crate) unsafe fn par_written<E: Elem, I: IndexedParallelIterator>(
    len: usize,
    chunk: usize,
    inputs: I,
    fill: impl Fn(&mut [std::mem::MaybeUninit<E>], I::Item) + Sync + Send,
) -> Vec<E> {
    let mut v: Vec<E> = Vec::with_capacity(len);
    if len > 0 {
        v.spare_capacity_mut()[..len]
            .par_chunks_mut(chunk.max(1))
            .zip_eq(inputs)
            .for_each(|(ys, item)| fill(ys, item));
    }
    // SAFETY: `par_chunks_mut` tiles the first `len` spare slots, `zip_eq` pairs every chunk
    // with an item (or panics before running anything), `for_each` ran `fill` on every pair, and
    // `fill` initialised its whole chunk (the caller's contract). So all `len` are initialised.
    unsafe { v.set_len(len) };
    v
}

/// A `len`-element zeroed output for a kernel that then overwrites it through a `&mut [E]`
/// (gemm without `read_dst`, say): zeroed in parallel, chunk by chunk ([`par_filled`]), not on
/// the calling thread alone while the others wait.
pub(crate) fn par_zeroed<E: Elem>(len: usize) -> Vec<E> {
    const CHUNK: usize = 1 << 14;
    let chunks = len.div_ceil(CHUNK);
    par_filled(len, CHUNK, (0..chunks).into_par_iter(), |_, _| {})
}

/// [`crate::Kernels::retain`] on the CPU: prunes `scope`'s frame to the buffer `keep` starts
/// at (if it is registered there).
pub(crate) fn retain<S: Shape, E: Elem, T>(scope: &KernelScope, keep: &Tensor<S, E, Cpu, T>) {
    scope.retain(first_addr(keep).as_slice());
}

/// [`crate::Kernels::retain_all`] on the CPU: [`retain`] keeping the buffer of every tensor of
/// `keep`.
pub(crate) fn retain_all<S: Shape, E: Elem, T>(scope: &KernelScope, keep: &[Tensor<S, E, Cpu, T>]) {
    let addrs: Vec<usize> = keep.iter().filter_map(first_addr).collect();
    scope.retain(&addrs);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kernel outputs are read in place while their frame holds them (also through a reshape,
    /// which shares the buffer); anything else — a dfdx op's output, a tensor made outside any
    /// frame, or one whose frame dropped it — is copied, with the same values.
    #[test]
    fn kernel_outputs_are_read_in_place_within_their_frame() {
        let dev = Cpu::default();
        let data: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let first = |t: &Tensor<(usize, usize), f32, Cpu>| (&t[[0, 0]] as *const f32).addr();
        let outside = output(&dev, data.clone(), (3, 4)).unwrap().0;
        assert_ne!(input(&outside).addr(), first(&outside), "no frame: copied");
        let scope = KernelScope::open();
        let (a, _) = output(&dev, data.clone(), (3, 4)).unwrap();
        let (b, _) = output(&dev, data.clone(), (4, 3)).unwrap();
        assert_eq!(buf::registered(), (2, 0));
        let ra = input(&a);
        assert_eq!((ra.addr(), &ra[..]), (first(&a), &data[..]), "in place");
        let a6: Tensor<(usize, usize), f32, Cpu> = a.clone().reshape_like(&(2, 6));
        assert_eq!(input(&a6).addr(), first(&a), "a reshape shares the buffer");
        let sum = a.clone() + a.clone(); // a dfdx op
        let rs = input(&sum);
        assert_ne!(rs.addr(), first(&sum));
        assert_eq!(rs[11], 22.0);
        // the frame keeps only a; b's entry (and, once nothing else holds it, its buffer) goes
        retain(&scope, &a);
        assert_eq!(buf::registered(), (1, 0));
        assert_ne!(input(&b).addr(), first(&b));
        assert_eq!(input(&a).addr(), first(&a));
        drop(scope);
        assert_eq!(buf::registered(), (0, 0));
        // a handle stays valid after its frame closed
        assert_eq!(ra[5], 5.0);
    }

    /// The optimizer's outputs are read in place with no frame open, until consumed.
    #[test]
    fn optimizer_outputs_last_until_consumed() {
        let dev = Cpu::default();
        let first = |t: &Tensor<(usize,), f32, Cpu>| (&t[[0]] as *const f32).addr();
        let p = <Cpu as crate::Kernels<f32>>::lasting_tensor(&dev, vec![1.0f32; 8]).unwrap();
        let w: Tensor<(usize, usize), f32, Cpu> = p.clone().reshape_like(&(2, 4));
        assert_eq!(
            input(&w).addr(),
            first(&p),
            "a parameter's matrix view, in place"
        );
        assert_eq!(buf::registered(), (0, 1));
        consume(&p);
        assert_eq!(buf::registered(), (0, 0));
        assert_ne!(input(&p).addr(), first(&p));
    }

    /// Chunk i (the last one short) gets item i and starts zeroed (`+=` reads it).
    #[test]
    fn par_filled_pairs_chunks_with_items() {
        let v: Vec<f32> = par_filled(10, 3, (0..4usize).into_par_iter(), |ys, i| {
            ys.iter_mut().for_each(|y| *y += i as f32 + 1.0)
        });
        assert_eq!(v, [1., 1., 1., 2., 2., 2., 3., 3., 3., 4.]);
        let empty: Vec<f64> = par_filled(0, 3, (0..0usize).into_par_iter(), |_, _| {});
        assert!(empty.is_empty());
    }

    #[test]
    #[should_panic]
    fn par_filled_refuses_a_missing_item() {
        let _: Vec<f32> = par_filled(10, 3, (0..3usize).into_par_iter(), |_, _| {});
    }

    /// Every element zero, at lengths around the chunk size (an empty, a partial last chunk).
    #[test]
    fn par_zeroed_is_all_zeros() {
        for len in [0, 1, (1 << 14) - 1, 1 << 14, (1 << 14) + 1, 3 << 14] {
            let v: Vec<f32> = par_zeroed(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x.to_bits() == 0), "len {len}");
        }
    }

    #[test]
    #[should_panic(expected = "not row-major contiguous")]
    fn permuted_inputs_are_refused() {
        let dev = Cpu::default();
        let t: Tensor<(usize, usize), f32, Cpu> = dev.tensor_from_vec(vec![0.0; 6], (2, 3));
        let p = t.permute::<_, Axes2<1, 0>>();
        let _ = input(&p);
    }
}
