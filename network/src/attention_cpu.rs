//! Host kernels for bidirectional multi-head attention on the CPU (spec §7.2): per (sequence,
//! head) S = Q Kᵀ, P = softmax(S), O = P V and the exact backward pass (P recomputed from the
//! kept row log-sum-exp instead of stored), one task per
//! (sequence, head) on rayon with single-threaded `gemm` calls on strided views, so Q, K, V and O
//! stay in their (batch, len, heads, head_dim) layout (no permute copies) and dfdx's loop of
//! per-matrix multi-threaded gemm calls is avoided. Q arrives already scaled by 1/√hd.
//! Also the plain multi-threaded matrix product [`mm_par`] used by the CPU `matmul` kernel.

use crate::Elem;
use rayon::prelude::*;

/// A raw pointer that may cross threads: tasks write disjoint (sequence, head) blocks.
#[derive(Clone, Copy)]
struct SendPtr<E>(*mut E);
unsafe impl<E> Send for SendPtr<E> {}
unsafe impl<E> Sync for SendPtr<E> {}
impl<E> SendPtr<E> {
    fn get(self) -> *mut E {
        self.0
    }
}

/// dst (m×n) = [dst +] lhs (m×k) · rhs (k×n), all with (row, column) element strides,
/// single-threaded (the callers parallelise over (sequence, head)). Without `acc` dst is
/// written without being read, so it may be uninitialised.
///
/// # Safety
/// Every pointer must address its whole strided matrix; `dst` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<E: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: *mut E,
    (d_rs, d_cs): (usize, usize),
    acc: bool,
    lhs: *const E,
    (l_rs, l_cs): (usize, usize),
    rhs: *const E,
    (r_rs, r_cs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        d_cs as isize,
        d_rs as isize,
        acc,
        lhs,
        l_cs as isize,
        l_rs as isize,
        rhs,
        r_cs as isize,
        r_rs as isize,
        if acc { E::one() } else { E::zero() },
        E::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// C (m×n) = [C +] A (m×k) · B (k×n) with (row, column) element strides, multi-threaded.
///
/// # Safety
/// Every pointer must address its whole strided matrix; `c` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm_par<E: Elem>(
    (m, n, k): (usize, usize, usize),
    c: *mut E,
    (c_rs, c_cs): (usize, usize),
    accumulate: bool,
    a: *const E,
    (a_rs, a_cs): (usize, usize),
    b: *const E,
    (b_rs, b_cs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        c_cs as isize,
        c_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        if accumulate { E::one() } else { E::zero() },
        E::one(),
        false,
        false,
        false,
        gemm::Parallelism::Rayon(rayon::current_num_threads()),
    )
}

/// Numerically stable softmax of each `d`-long row, in place. Separate max / exp / sum / scale
/// passes with 8 independent partial sums so each loop vectorises ([`Elem::fast_exp`]). With
/// `lse`, each row's log Σ exp (one per row) is written there.
pub(crate) fn softmax_rows<E: Elem>(rows: &mut [E], d: usize, mut lse: Option<&mut [E]>) {
    for (i, row) in rows.chunks_mut(d).enumerate() {
        let m = row.iter().fold(E::neg_infinity(), |a, &v| a.max(v));
        row.iter_mut().for_each(|v| *v = (*v - m).fast_exp());
        let sum = lane_sum(row);
        let inv = E::one() / sum;
        row.iter_mut().for_each(|v| *v *= inv);
        if let Some(l) = lse.as_deref_mut() {
            l[i] = m + sum.ln();
        }
    }
}

/// Σ xs with 8 interleaved partial sums (vectorisable; a different but equally accurate
/// summation order than left to right).
pub(crate) fn lane_sum<E: Elem>(xs: &[E]) -> E {
    let mut acc = [E::zero(); 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let tail = chunks.remainder().iter().fold(E::zero(), |a, &x| a + x);
    acc.iter().fold(tail, |a, &x| a + x)
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub hd: usize,
}

impl Dims {
    fn d(&self) -> usize {
        self.h * self.hd
    }
    /// Offset of block (bi, hi) in a (b, n, h, hd) tensor.
    fn tok(&self, task: usize) -> usize {
        let (bi, hi) = (task / self.h, task % self.h);
        (bi * self.n * self.h + hi) * self.hd
    }
}

/// The (sequence, head) task's scores S = Q Kᵀ (n × n, row-major; q already scaled) for the
/// task whose first element is at offset `t` of q and k.
fn scores<E: Elem>(q: &[E], k: &[E], t: usize, dims: Dims) -> Vec<E> {
    let (n, d, hd) = (dims.n, dims.d(), dims.hd);
    if n == 0 {
        return Vec::new();
    }
    assert!(
        t + (n - 1) * d + hd <= q.len().min(k.len()),
        "attention block out of range"
    );
    let mut s: Vec<E> = Vec::with_capacity(n * n);
    // SAFETY: the block is inside q and k (checked above); gemm writes all n·n outputs of the
    // fresh scratch without reading it.
    unsafe {
        mm(
            (n, n, hd),
            s.as_mut_ptr(),
            (n, 1),
            false,
            q.as_ptr().add(t),
            (d, 1),
            k.as_ptr().add(t),
            (1, d),
        );
        s.set_len(n * n);
    }
    s
}

/// Forward: q, k, v (b, n, h, hd) → (o (b, n, h, hd), lse (b, h, n)). The probabilities P live
/// only in a per-task n×n scratch; for the backward pass (`keep_lse`) only each row's
/// log Σ exp is kept and P is recomputed from Q, K and it (as FlashAttention does), so the
/// memory held per layer is linear in n instead of b·h·n² (and no buffer of that size is
/// allocated, page-faulted and freed every step). Without `keep_lse` (inference) `lse` is empty.
pub(crate) fn forward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    dims: Dims,
    keep_lse: bool,
) -> (Vec<E>, Vec<E>) {
    let Dims { b, n, h, .. } = dims;
    let (d, hd) = (dims.d(), dims.hd);
    let tasks = b * h;
    let mut lse = if keep_lse {
        vec![E::zero(); tasks * n]
    } else {
        Vec::new()
    };
    // every task overwrites its (bi, ·, hi, ·) block of o, and the blocks tile o: no zeroing
    let mut o: Vec<E> = Vec::with_capacity(b * n * d);
    let op = SendPtr(o.as_mut_ptr());
    let lp = SendPtr(lse.as_mut_ptr());
    (0..tasks).into_par_iter().for_each(|task| {
        let t = dims.tok(task);
        let mut p = scores(q, k, t, dims);
        // SAFETY: offsets stay inside v/o (t + (n−1)·d + hd ≤ b·n·d); each task writes its own
        // scratch, its own n entries of lse and its own block of o.
        unsafe {
            let l = keep_lse.then(|| std::slice::from_raw_parts_mut(lp.get().add(task * n), n));
            softmax_rows(&mut p, n, l);
            mm(
                (n, hd, n),
                op.get().add(t),
                (d, 1),
                false,
                p.as_ptr(),
                (n, 1),
                v.as_ptr().add(t),
                (d, 1),
            );
        }
    });
    // SAFETY: all elements were written by the tasks above.
    unsafe { o.set_len(b * n * d) };
    (o, lse)
}

/// Backward: given dO and the forward's log Σ exp per row, adds dQ, dK, dV (each
/// (b, n, h, hd)) into `gq`, `gk`, `gv`. P = exp(Q Kᵀ − lse) is recomputed per task.
///
/// # Safety
/// Each gradient pointer must address b·n·h·hd initialised elements that nothing else
/// accesses during the call; they may coincide (each task updates its own blocks serially).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn backward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    lse: &[E],
    go: &[E],
    dims: Dims,
    (gq, gk, gv): (*mut E, *mut E, *mut E),
) {
    let Dims { b, n, h, .. } = dims;
    let (d, hd) = (dims.d(), dims.hd);
    let (pq, pk, pv) = (SendPtr(gq), SendPtr(gk), SendPtr(gv));
    (0..b * h).into_par_iter().for_each(|task| {
        let t = dims.tok(task);
        let l = &lse[task * n..(task + 1) * n];
        // P = exp(Q Kᵀ − lse)
        let mut p = scores(q, k, t, dims);
        let mut ds: Vec<E> = Vec::with_capacity(n * n);
        // SAFETY: as in `forward`; each task touches only its own blocks of gq/gk/gv and its
        // private scratch (each written in full by a product before it is read).
        unsafe {
            for (row, &li) in p.chunks_mut(n).zip(l) {
                row.iter_mut().for_each(|s| *s = (*s - li).fast_exp());
            }
            // dP = dO Vᵀ
            mm(
                (n, n, hd),
                ds.as_mut_ptr(),
                (n, 1),
                false,
                go.as_ptr().add(t),
                (d, 1),
                v.as_ptr().add(t),
                (1, d),
            );
            ds.set_len(n * n);
            // dS = P ⊙ (dP − rowsum(dP ⊙ P))
            for (dr, pr) in ds.chunks_mut(n).zip(p.chunks(n)) {
                let dot = dr.iter().zip(pr).fold(E::zero(), |a, (&g, &p)| a + g * p);
                dr.iter_mut()
                    .zip(pr)
                    .for_each(|(g, &p)| *g = p * (*g - dot));
            }
            // dV += Pᵀ dO, dQ += dS K, dK += dSᵀ Q
            mm(
                (n, hd, n),
                pv.get().add(t),
                (d, 1),
                true,
                p.as_ptr(),
                (1, n),
                go.as_ptr().add(t),
                (d, 1),
            );
            mm(
                (n, hd, n),
                pq.get().add(t),
                (d, 1),
                true,
                ds.as_ptr(),
                (n, 1),
                k.as_ptr().add(t),
                (d, 1),
            );
            mm(
                (n, hd, n),
                pk.get().add(t),
                (d, 1),
                true,
                ds.as_ptr(),
                (1, n),
                q.as_ptr().add(t),
                (d, 1),
            );
        }
    });
}
