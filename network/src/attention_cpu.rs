//! Host kernels for bidirectional multi-head attention on the CPU (spec §7.2): per (sequence,
//! head) S = Q Kᵀ, P = softmax(S), O = P V and the exact backward pass, one task per
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

/// dst (m×n) = lhs (m×k) · rhs (k×n), all with (row, column) element strides.
///
/// # Safety
/// Every pointer must address its whole strided matrix; `dst` must not alias the inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<E: Elem>(
    (m, n, k): (usize, usize, usize),
    dst: *mut E,
    (d_rs, d_cs): (usize, usize),
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
        false,
        lhs,
        l_cs as isize,
        l_rs as isize,
        rhs,
        r_cs as isize,
        r_rs as isize,
        E::zero(),
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

/// Numerically stable softmax of each `d`-long row, in place.
pub(crate) fn softmax_rows<E: Elem>(rows: &mut [E], d: usize) {
    for row in rows.chunks_mut(d) {
        let m = row.iter().fold(E::neg_infinity(), |a, &v| a.max(v));
        let mut s = E::zero();
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        let inv = E::one() / s;
        row.iter_mut().for_each(|v| *v *= inv);
    }
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

/// Forward: q, k, v (b, n, h, hd) → (o (b, n, h, hd), p (b, h, n, n)). With `keep_p = false`
/// (inference) each task uses an n×n scratch instead and `p` comes back empty, so memory does
/// not grow with batch × heads × n².
pub(crate) fn forward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    dims: Dims,
    keep_p: bool,
) -> (Vec<E>, Vec<E>) {
    let Dims { b, n, h, .. } = dims;
    let (d, hd) = (dims.d(), dims.hd);
    let mut p = if keep_p {
        vec![E::zero(); b * h * n * n]
    } else {
        Vec::new()
    };
    let mut o = vec![E::zero(); b * n * d];
    let op = SendPtr(o.as_mut_ptr());
    let pp = SendPtr(p.as_mut_ptr());
    (0..b * h).into_par_iter().for_each(|task| {
        let t = dims.tok(task);
        let mut scratch = Vec::new();
        let pt: &mut [E] = if keep_p {
            // SAFETY: task-private chunk of p
            unsafe { std::slice::from_raw_parts_mut(pp.get().add(task * n * n), n * n) }
        } else {
            scratch.resize(n * n, E::zero());
            &mut scratch
        };
        // SAFETY: offsets stay inside q/k/v/o (t + (n−1)·d + hd ≤ b·n·d); each task writes its
        // own P chunk (or scratch) and its own (bi, ·, hi, ·) block of o.
        unsafe {
            mm(
                (n, n, hd),
                pt.as_mut_ptr(),
                (n, 1),
                q.as_ptr().add(t),
                (d, 1),
                k.as_ptr().add(t),
                (1, d),
            );
            softmax_rows(pt, n);
            mm(
                (n, hd, n),
                op.get().add(t),
                (d, 1),
                pt.as_ptr(),
                (n, 1),
                v.as_ptr().add(t),
                (d, 1),
            );
        }
    });
    (o, p)
}

/// Backward: given dO, returns (dq, dk, dv), each (b, n, h, hd).
pub(crate) fn backward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    p: &[E],
    go: &[E],
    dims: Dims,
) -> (Vec<E>, Vec<E>, Vec<E>) {
    let Dims { b, n, h, .. } = dims;
    let (d, hd) = (dims.d(), dims.hd);
    let mut gq = vec![E::zero(); b * n * d];
    let mut gk = vec![E::zero(); b * n * d];
    let mut gv = vec![E::zero(); b * n * d];
    let (pq, pk, pv) = (
        SendPtr(gq.as_mut_ptr()),
        SendPtr(gk.as_mut_ptr()),
        SendPtr(gv.as_mut_ptr()),
    );
    (0..b * h).into_par_iter().for_each(|task| {
        let t = dims.tok(task);
        let pt = &p[task * n * n..(task + 1) * n * n];
        let mut ds = vec![E::zero(); n * n];
        // SAFETY: as in `forward`; each task writes only its own blocks of gq/gk/gv and its
        // private `ds`.
        unsafe {
            // dP = dO Vᵀ
            mm(
                (n, n, hd),
                ds.as_mut_ptr(),
                (n, 1),
                go.as_ptr().add(t),
                (d, 1),
                v.as_ptr().add(t),
                (1, d),
            );
            // dS = P ⊙ (dP − rowsum(dP ⊙ P))
            for (dr, pr) in ds.chunks_mut(n).zip(pt.chunks(n)) {
                let dot = dr.iter().zip(pr).fold(E::zero(), |a, (&g, &p)| a + g * p);
                dr.iter_mut()
                    .zip(pr)
                    .for_each(|(g, &p)| *g = p * (*g - dot));
            }
            // dV = Pᵀ dO, dQ = dS K, dK = dSᵀ Q
            mm(
                (n, hd, n),
                pv.get().add(t),
                (d, 1),
                pt.as_ptr(),
                (1, n),
                go.as_ptr().add(t),
                (d, 1),
            );
            mm(
                (n, hd, n),
                pq.get().add(t),
                (d, 1),
                ds.as_ptr(),
                (n, 1),
                k.as_ptr().add(t),
                (d, 1),
            );
            mm(
                (n, hd, n),
                pk.get().add(t),
                (d, 1),
                ds.as_ptr(),
                (1, n),
                q.as_ptr().add(t),
                (d, 1),
            );
        }
    });
    (gq, gk, gv)
}
