//! Bidirectional multi-head attention on the CPU (spec §7.2): per (sequence, head) S = Q Kᵀ,
//! P = softmax(S), O = P V and the exact backward pass (P kept where it takes at most
//! [`KEEP_P_BYTES`], else recomputed from the kept row log-sum-exp as FlashAttention does), one
//! task per (sequence, head) on rayon with single-threaded `gemm` calls on strided views, so Q,
//! K, V and O stay in their (batch, len, heads, head_dim) layout (no permute copies) and dfdx's
//! loop of per-matrix multi-threaded gemm calls is avoided. Q arrives already scaled by 1/√hd.
//! Also the row softmax (used by `softmax_last`).
//!
//! At [`Precision::Bf16`] (f32 models; issue 13, "bf16 mixed precision") the six products —
//! S = Q Kᵀ and O = P V, and dP = dO Vᵀ, dV += Pᵀ dO, dQ += dS K, dK += dSᵀ Q — take
//! bf16-rounded inputs (P and dS rounded where they are a product's input) with f32
//! accumulation ([`super::bf16::gemm_bf16_serial`], on the task's own thread), as PyTorch's CPU
//! autocast runs attention's batched products; the masking, the softmax, its log-sum-exp and
//! its backward, and every output and gradient stay f32. The precision is read once per call
//! on the calling thread (rayon's workers do not see a scoped override) and the backward pass
//! uses the forward's.

use super::bf16::{gemm_bf16_serial, Mat};
use super::disjoint::Out;
use super::isa::{multiversion, Level};
use super::reduce;
use super::storage::input;
use super::tape::{backward as backward_op, fused, Backward, BackwardFn, Forward};
use crate::layers::{Res, T2, T4};
use crate::precision::{self, Precision};
use crate::{BlockMask, Elem};
use dfdx::prelude::*;
use rayon::prelude::*;

/// The attention op: q (scaled), k, v (b, n, h, hd) → o (b·n, h·hd). Without a tape the row
/// log-sum-exps are not kept. With `mask` (n = 2N), each query sees only its block-diffusion
/// keys ([`BlockMask`]); the scores of the others are −∞, so their probabilities are exactly 0.
pub(crate) fn attention<E: Elem, T: Tape<E, Cpu>>(
    q: T4<E, Cpu, T>,
    k: T4<E, Cpu, T>,
    v: T4<E, Cpu, T>,
    mask: Option<BlockMask>,
) -> Res<T2<E, Cpu, T>, Cpu> {
    fused((q, k, v), |(q, k, v), records| {
        let (b, n, h, hd) = *q.shape();
        assert!(
            *k.shape() == (b, n, h, hd) && *v.shape() == (b, n, h, hd),
            "attention: q, k, v shapes differ"
        );
        if let Some(m) = mask {
            assert_eq!(m.positions(), n, "block mask for another length");
        }
        let starts: Vec<usize> = (0..=b).map(|i| i * n).collect();
        Ok(recorded(&q, &k, &v, ((b, n, h, hd), mask), starts, records))
    })
}

/// Attention for ragged query rows: q (scaled) (R, h·hd) holds the queries of sequence s in
/// its rows `starts[s]..starts[s + 1]` (`starts`: b + 1 non-decreasing offsets from 0 to R),
/// each attending to every key and value of its sequence, k, v (b, n, h, hd) → o (R, h·hd),
/// with the tape: per (sequence, head) S = Q Kᵀ (r × n), so the products, the softmax and their
/// backward passes cost r/n of the full op's (the training loss's last block, whose outputs
/// are read at the masked positions only). Row for row what [`attention`] gives at those queries.
pub(crate) fn attention_ragged<E: Elem, T: Tape<E, Cpu>>(
    q: T2<E, Cpu, T>,
    k: T4<E, Cpu, T>,
    v: T4<E, Cpu, T>,
    starts: &[usize],
) -> Res<T2<E, Cpu, T>, Cpu> {
    let starts = starts.to_vec();
    fused((q, k, v), move |(q, k, v), records| {
        let (b, n, h, hd) = *k.shape();
        assert!(
            *v.shape() == (b, n, h, hd) && q.shape().1 == h * hd,
            "ragged attention: q, k, v shapes differ"
        );
        // `recorded` checks `starts` against q's rows (`check_starts`)
        Ok(recorded(&q, &k, &v, ((b, n, h, hd), None), starts, records))
    })
}

/// The forward pass of [`attention`] and [`attention_ragged`] on q (R, h, hd) and k, v
/// (b, n, h, hd), with the query rows' per-sequence offsets `starts` and the block mask if
/// any, and its backward pass.
fn recorded<E: Elem, Q: Shape, K: Shape>(
    q: &Tensor<Q, E, Cpu>,
    k: &Tensor<K, E, Cpu>,
    v: &Tensor<K, E, Cpu>,
    ((b, n, h, hd), mask): ((usize, usize, usize, usize), Option<BlockMask>),
    starts: Vec<usize>,
    records: bool,
) -> Forward<(usize, usize), E, impl BackwardFn<E>> {
    let dims = Dims {
        b,
        n,
        h,
        hd,
        mask,
        bf16: bf16_products::<E>(),
    };
    let (qv, kv, vv) = (input(q), input(k), input(v));
    let keep = keep_for::<E>(records, starts[b], h, n);
    let (o, saved) = forward(&qv, &kv, &vv, dims, &starts, keep);
    let full = starts.iter().enumerate().all(|(i, &s)| s == i * dims.n);
    let (qg, kg, vg) = (q.ghost(), k.ghost(), v.ghost());
    Forward {
        shape: (starts[dims.b], dims.d()),
        data: o,
        keep_output: false,
        backward: backward_op(move |Backward { gy: go, grads, .. }| {
            // accumulated straight into the three gradient buffers; raw pointers because q, k,
            // v may be one tensor (then each task still updates its own blocks one after
            // another). `as_mut_ptr` creates no reference to the elements, so each pointer
            // stays valid while the store inserts the other entries (that moves Vec headers
            // inside the map, never their heap buffers).
            let gq = grads.get_or_alloc_mut(&qg)?.as_mut_ptr();
            let gk = grads.get_or_alloc_mut(&kg)?.as_mut_ptr();
            let gv = grads.get_or_alloc_mut(&vg)?.as_mut_ptr();
            assert!(
                full || (gq != gk && gq != gv),
                "attention: ragged queries share the keys' or values' gradient"
            );
            // SAFETY: gq has R·h·hd and gk, gv b·n·h·hd initialised elements (the shapes of
            // q, k, v), stay allocated during the call (the store is not touched meanwhile),
            // and nothing else accesses them during the call; gq coincides with gk or gv only
            // where every position's query is given (asserted), as `backward` allows.
            unsafe { backward(&qv, &kv, &vv, &saved, &go, dims, &starts, (gq, gk, gv)) };
            Ok(())
        }),
    }
}

/// Where attention's products take bf16 inputs: `Some(level)` (the calling thread's
/// instruction-set level, whose AVX512-BF16 proof picks the microkernel) when this thread's
/// precision is [`Precision::Bf16`] and E is f32; `None` (f32 or f64 products) otherwise.
fn bf16_products<E: Elem>() -> Option<Level> {
    (precision::precision() == Precision::Bf16
        && std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>())
    .then(super::isa::level)
}

/// The most bytes one attention call's probabilities P (R·h·n elements) may take for the
/// forward pass to keep them for the backward pass; above it only each row's log Σ exp is kept
/// and P is recomputed from Q, K and it. Keeping P saves the backward pass the product S = Q Kᵀ
/// and an exp per score (≈ 1/7 of attention's training FLOPs, and as many exps as the
/// forward's): `cpu-small` at 16 × 256 keeps 16 MiB per layer (f32 train step +2 % held to AVX2,
/// +3 % at AVX-512 without AMX, unchanged with AMX; `bench/NOTES.md`), while `md4-s` at
/// 8 × 1024 (384 MiB per layer) recomputes, so memory stays linear in n there.
/// A function of the shape only, never of the threads: a run's bits do not depend on them.
pub(crate) const KEEP_P_BYTES: usize = 32 << 20;

#[cfg(not(test))]
fn keep_p_bytes() -> usize {
    KEEP_P_BYTES
}

#[cfg(test)]
thread_local! {
    static KEEP_P_LIMIT: std::cell::Cell<usize> = const { std::cell::Cell::new(KEEP_P_BYTES) };
}

/// Tests run both backward passes by lowering the limit on the calling thread.
#[cfg(test)]
fn keep_p_bytes() -> usize {
    KEEP_P_LIMIT.with(|c| c.get())
}

/// Runs `f` with [`KEEP_P_BYTES`] replaced by `bytes` on this thread (0: always recompute P).
#[cfg(test)]
pub(crate) fn with_keep_p_bytes<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    let old = KEEP_P_LIMIT.with(|c| c.replace(bytes));
    let r = f();
    KEEP_P_LIMIT.with(|c| c.set(old));
    r
}

/// What the forward pass of a call with R query rows, h heads and n keys keeps: nothing
/// without a tape, P where it takes at most [`KEEP_P_BYTES`], else the log-sum-exps.
fn keep_for<E>(records: bool, rows: usize, h: usize, n: usize) -> Keep {
    let bytes = rows
        .saturating_mul(h)
        .saturating_mul(n)
        .saturating_mul(std::mem::size_of::<E>());
    match records {
        false => Keep::Nothing,
        true if bytes <= keep_p_bytes() => Keep::Probabilities,
        true => Keep::LogSumExp,
    }
}

/// What the forward pass keeps for the backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Keep {
    /// Nothing (inference).
    Nothing,
    /// Each query row's log Σ exp per head (R·h); P is recomputed.
    LogSumExp,
    /// P itself (R·h·n).
    Probabilities,
}

/// What [`forward`] kept (by [`Keep`]): each task's r·n block of P, or its r log-sum-exps,
/// from offset l0·n or l0 (see [`Dims::queries`]).
pub(crate) enum Saved<E> {
    Nothing,
    LogSumExp(Vec<E>),
    Probabilities(Vec<E>),
}

/// dst (m×n) = [dst +] lhs (m×k) · rhs (k×n), all with (row, column) element strides,
/// single-threaded (the callers parallelise over (sequence, head)); with `bf16` (and E f32)
/// the inputs are rounded to bf16 and accumulated in f32 ([`gemm_bf16_serial`]). Without
/// `acc` dst is written without being read (for k > 0), so it may be uninitialised.
///
/// # Safety
/// Every pointer must be valid for its whole strided matrix (reads for `lhs` and `rhs`; writes,
/// and with `acc` reads of initialised elements, for `dst`); `dst` must not overlap the inputs,
/// and no other thread may access dst's elements during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<E: Elem>(
    bf16: Option<Level>,
    (m, n, k): (usize, usize, usize),
    dst: *mut E,
    (d_rs, d_cs): (usize, usize),
    acc: bool,
    lhs: *const E,
    (l_rs, l_cs): (usize, usize),
    rhs: *const E,
    (r_rs, r_cs): (usize, usize),
) {
    if let Some(level) = bf16 {
        if std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>() && k > 0 {
            let (a, b) = (
                Mat {
                    ptr: lhs.cast::<f32>(),
                    rs: l_rs,
                    cs: l_cs,
                },
                Mat {
                    ptr: rhs.cast::<f32>(),
                    rs: r_rs,
                    cs: r_cs,
                },
            );
            // SAFETY: E is f32 (checked above), so the pointers address f32 elements; their
            // validity, the output's exclusivity and the non-overlap are the caller's, as
            // `gemm_bf16_serial` requires; (i, j) ↦ i·d_rs + j·d_cs is injective for every
            // destination here (row-major scratch or a (sequence, head) block with d_rs ≥ n·d_cs).
            unsafe {
                gemm_bf16_serial(level, (m, n, k), dst.cast::<f32>(), (d_rs, d_cs), acc, a, b)
            };
            return;
        }
    }
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

/// Numerically stable softmax of each `d`-long row, in place: separate max / exp / sum / scale
/// passes, each a loop that vectorises ([`Elem::fast_exp`], [`reduce`]). With `lse`, each row's
/// log Σ exp (one per row) is written there.
#[inline(always)]
fn softmax_rows_body<E: Elem>(rows: &mut [E], d: usize, mut lse: Option<&mut [E]>) {
    for (i, row) in rows.chunks_mut(d).enumerate() {
        let m = reduce::max(row);
        row.iter_mut().for_each(|v| *v = (*v - m).fast_exp());
        let sum = reduce::sum(row);
        let inv = E::one() / sum;
        row.iter_mut().for_each(|v| *v *= inv);
        if let Some(l) = lse.as_deref_mut() {
            l[i] = m + sum.ln();
        }
    }
}
multiversion!(
    /// [`softmax_rows_body`] for the given [`Level`](super::isa::Level).
    pub(crate) fn softmax_rows<E: Elem>(rows: &mut [E], d: usize, lse: Option<&mut [E]>)
        => softmax_rows_body
);

/// The softmax's backward pass on a task's rows given P: dS = P ⊙ (dP − rowsum(dP ⊙ P)) in
/// place of dP in `ds`.
#[inline(always)]
fn probabilities_grad_body<E: Elem>(p: &[E], ds: &mut [E], n: usize) {
    for (dr, pr) in ds.chunks_mut(n).zip(p.chunks(n)) {
        let dot = reduce::dot(dr, pr);
        dr.iter_mut()
            .zip(pr)
            .for_each(|(g, &p)| *g = p * (*g - dot));
    }
}
multiversion!(
    fn probabilities_grad<E: Elem>(p: &[E], ds: &mut [E], n: usize) => probabilities_grad_body
);

/// The same given S and each row's log Σ exp instead of P: P = exp(S − lse) row by row in
/// place of S in `p`, then [`probabilities_grad_body`].
#[inline(always)]
fn softmax_grad_rows_body<E: Elem>(p: &mut [E], ds: &mut [E], lse: &[E], n: usize) {
    for (row, &li) in p.chunks_mut(n).zip(lse) {
        row.iter_mut().for_each(|s| *s = (*s - li).fast_exp());
    }
    probabilities_grad_body(p, ds, n);
}
multiversion!(
    fn softmax_grad_rows<E: Elem>(p: &mut [E], ds: &mut [E], lse: &[E], n: usize)
        => softmax_grad_rows_body
);

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub b: usize,
    pub n: usize,
    pub h: usize,
    pub hd: usize,
    /// The block-diffusion structure, if any (None: every query sees every key).
    pub mask: Option<BlockMask>,
    /// Products with bf16 inputs at this level (see [`bf16_products`]), or f32/f64 ones.
    pub bf16: Option<Level>,
}

impl Dims {
    fn d(&self) -> usize {
        self.h * self.hd
    }
    /// Offset of block (bi, hi) in a (b, n, h, hd) tensor (the task's keys and values).
    fn tok(&self, task: usize) -> usize {
        let (bi, hi) = (task / self.h, task % self.h);
        (bi * self.n * self.h + hi) * self.hd
    }
    /// The task's queries given the query rows' per-sequence offsets `starts` (b + 1): the
    /// offset of its first (row, head) element in q (R, h·hd), its row count r, and the start
    /// of its r log-sum-exps in the (R·h) lse buffer (each sequence's rows head after head).
    fn queries(&self, task: usize, starts: &[usize]) -> (usize, usize, usize) {
        let (bi, hi) = (task / self.h, task % self.h);
        let (q0, r) = (starts[bi], starts[bi + 1] - starts[bi]);
        ((q0 * self.h + hi) * self.hd, r, q0 * self.h + hi * r)
    }
}

/// Checks `starts` (b + 1 non-decreasing offsets from 0) against q's and the keys' lengths and
/// returns the number of query rows R; a block mask requires every position's query (R = b·n,
/// row i of a task is position i).
fn check_starts(dims: &Dims, starts: &[usize], q_len: usize, kv_len: usize) -> usize {
    let (b, n, d) = (dims.b, dims.n, dims.d());
    assert!(
        starts.len() == b + 1 && starts[0] == 0 && starts.windows(2).all(|w| w[0] <= w[1]),
        "attention query offsets are not b + 1 non-decreasing offsets from 0"
    );
    let rows = starts[b];
    assert!(
        q_len == rows * d && kv_len == b * n * d,
        "attention inputs are not (R, h·hd) queries and (b, n, h, hd) keys"
    );
    assert!(n > 0 || rows == 0, "attention queries without keys");
    assert!(
        dims.mask.is_none() || starts.iter().enumerate().all(|(i, &s)| s == i * n),
        "block-masked attention needs every position's query"
    );
    rows
}

/// Sets the scores of the keys each query may not see to −∞ (row i keeps `mask.key_ranges(i)`).
fn apply_mask<E: Elem>(s: &mut [E], n: usize, mask: &BlockMask) {
    for (i, row) in s.chunks_mut(n).enumerate() {
        let [a, b] = mask.key_ranges(i);
        for (j, x) in row.iter_mut().enumerate() {
            if !(a.contains(&j) || b.contains(&j)) {
                *x = E::neg_infinity();
            }
        }
    }
}

/// A task's scores S = Q Kᵀ (r × n, row-major; q already scaled): its r query rows from offset
/// `qt` of q, its keys from offset `kt` of k, masked when `dims.mask` is set (then r = n).
fn scores<E: Elem>(q: &[E], k: &[E], (qt, r): (usize, usize), kt: usize, dims: Dims) -> Vec<E> {
    let mut s: Vec<E> = Vec::with_capacity(r * dims.n);
    // SAFETY: the fresh scratch holds r·n elements; `scores_into` writes all of them.
    unsafe {
        scores_into(s.as_mut_ptr(), q, k, (qt, r), kt, dims);
        s.set_len(r * dims.n);
    }
    s
}

/// [`scores`] written to the r·n (row-major) elements at `s`, which may be uninitialised.
///
/// # Safety
/// `s` must be valid for writes of r·n elements that nothing else accesses during the call.
unsafe fn scores_into<E: Elem>(
    s: *mut E,
    q: &[E],
    k: &[E],
    (qt, r): (usize, usize),
    kt: usize,
    dims: Dims,
) {
    let (n, d, hd) = (dims.n, dims.d(), dims.hd);
    if n == 0 || r == 0 {
        return;
    }
    assert!(
        qt + (r - 1) * d + hd <= q.len() && kt + (n - 1) * d + hd <= k.len(),
        "attention block out of range"
    );
    // SAFETY: the blocks are inside q and k (checked above); gemm writes all r·n outputs at s
    // (the caller's) without reading them; afterwards they are initialised and exclusively ours.
    unsafe {
        mm(
            dims.bf16,
            (r, n, hd),
            s,
            (n, 1),
            false,
            q.as_ptr().add(qt),
            (d, 1),
            k.as_ptr().add(kt),
            (1, d),
        );
        if let Some(m) = &dims.mask {
            apply_mask(std::slice::from_raw_parts_mut(s, r * n), n, m);
        }
    }
}

/// Forward: q (R, h, hd) — sequence s's queries in rows `starts[s]..starts[s + 1]`; every
/// position's (R = b·n) in the full op — and k, v (b, n, h, hd) → (o (R, h, hd), what `keep`
/// asks the backward pass to be given). Without P kept, the probabilities live only in a
/// per-task r×n scratch: for [`Keep::LogSumExp`] each row's log Σ exp is kept and the backward
/// pass recomputes P from Q, K and it (as FlashAttention does), so the memory held per layer is
/// linear in n instead of b·h·n².
pub(crate) fn forward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    dims: Dims,
    starts: &[usize],
    keep: Keep,
) -> (Vec<E>, Saved<E>) {
    assert_eq!(
        k.len(),
        v.len(),
        "attention keys and values differ in length"
    );
    let rows = check_starts(&dims, starts, q.len(), k.len());
    let (d, n, tasks) = (dims.d(), dims.n, dims.b * dims.h);
    if rows * d == 0 {
        // no products, forward or backward (which returns at once); with head_dim 0 no task
        // would write P, so the zeroed log-sum-exps stand in for it
        let saved = match keep {
            Keep::Nothing => Saved::Nothing,
            _ => Saved::LogSumExp(vec![E::zero(); rows * dims.h]),
        };
        return (Vec::new(), saved);
    }
    // kept: the log-sum-exps (zeroed: a task with no rows writes none) or P (every task writes
    // its whole r·n block and the blocks tile R·h·n: no zeroing)
    let mut lse = match keep {
        Keep::LogSumExp => vec![E::zero(); rows * dims.h],
        _ => Vec::new(),
    };
    let mut kept_p: Vec<E> = match keep {
        Keep::Probabilities => Vec::with_capacity(rows * dims.h * n),
        _ => Vec::new(),
    };
    // every task overwrites its (sequence's rows, head) block of o, and the blocks tile o: no
    // zeroing
    let mut o: Vec<E> = Vec::with_capacity(rows * d);
    let op = Out(o.as_mut_ptr());
    let lp = Out(lse.as_mut_ptr());
    let pp = Out(kept_p.as_mut_ptr());
    let level = super::isa::level();
    (0..tasks).into_par_iter().for_each(|task| {
        let (qt, r, l0) = dims.queries(task, starts);
        if r == 0 {
            return;
        }
        let kt = dims.tok(task);
        // SAFETY: the task's query block ends at qt + (r−1)·d + hd ≤ R·d (inside q and o's
        // capacity) and its key block at kt + (n−1)·d + hd ≤ b·n·d (inside v, as long as k);
        // each task writes only its own r entries of lse (initialised, disjoint across tasks:
        // sequence s's rows head after head), its own r·n block of kept P (from l0·n, inside
        // its R·h·n capacity, disjoint likewise; written in full by `scores_into` before it is
        // read) and its own block of o (gemm without `read_dst` writes it without reading it),
        // and `o`, `lse` and `kept_p` are not otherwise accessed until all tasks have finished.
        unsafe {
            let mut scratch;
            let p: &mut [E] = if keep == Keep::Probabilities {
                let p = pp.get().add(l0 * n);
                scores_into(p, q, k, (qt, r), kt, dims);
                std::slice::from_raw_parts_mut(p, r * n)
            } else {
                scratch = scores(q, k, (qt, r), kt, dims);
                &mut scratch
            };
            let l = (keep == Keep::LogSumExp)
                .then(|| std::slice::from_raw_parts_mut(lp.get().add(l0), r));
            softmax_rows(level, p, n, l);
            mm(
                dims.bf16,
                (r, dims.hd, n),
                op.get().add(qt),
                (d, 1),
                false,
                p.as_ptr(),
                (n, 1),
                v.as_ptr().add(kt),
                (d, 1),
            );
        }
    });
    // SAFETY: the tasks' (sequence's rows, head) blocks tile the R·d elements of o, and each
    // task wrote all of its block.
    unsafe { o.set_len(rows * d) };
    let saved = match keep {
        Keep::Nothing => Saved::Nothing,
        Keep::LogSumExp => Saved::LogSumExp(lse),
        Keep::Probabilities => {
            // SAFETY: the tasks' r·n blocks of P tile its R·h·n elements (sequence s's rows
            // head after head: task (s, head) from l0·n), and each task with rows wrote all of
            // its block.
            unsafe { kept_p.set_len(rows * dims.h * n) };
            Saved::Probabilities(kept_p)
        }
    };
    (o, saved)
}

/// Backward: given dO (R, h, hd) and what the forward kept (P, or each row's log Σ exp, from
/// which P = exp(Q Kᵀ − lse) is recomputed per task), adds dQ (R, h, hd) and dK, dV
/// (b, n, h, hd) into `gq`, `gk`, `gv`.
///
/// # Safety
/// `gq` must address R·h·hd and `gk`, `gv` b·n·h·hd initialised elements that nothing else
/// accesses during the call; they may coincide only where the queries are every position's
/// (R = b·n, as in [`attention`]: each task then updates its own blocks serially).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn backward<E: Elem>(
    q: &[E],
    k: &[E],
    v: &[E],
    saved: &Saved<E>,
    go: &[E],
    dims: Dims,
    starts: &[usize],
    (gq, gk, gv): (*mut E, *mut E, *mut E),
) {
    assert!(
        k.len() == v.len() && go.len() == q.len(),
        "attention backward shapes"
    );
    let rows = check_starts(&dims, starts, q.len(), k.len());
    let (d, hd, n) = (dims.d(), dims.hd, dims.n);
    match saved {
        Saved::LogSumExp(l) => assert_eq!(l.len(), rows * dims.h, "attention backward lse length"),
        Saved::Probabilities(p) => assert_eq!(p.len(), rows * dims.h * n, "attention backward P"),
        Saved::Nothing => panic!("attention backward without the forward's P or log-sum-exps"),
    }
    if rows * d == 0 {
        return;
    }
    let (pq, pk, pv) = (Out(gq), Out(gk), Out(gv));
    let level = super::isa::level();
    (0..dims.b * dims.h).into_par_iter().for_each(|task| {
        let (qt, r, l0) = dims.queries(task, starts);
        if r == 0 {
            return;
        }
        let kt = dims.tok(task);
        let mut ds: Vec<E> = Vec::with_capacity(r * n);
        // SAFETY: offsets stay inside q, dO and gq (R·h·hd elements) and k, v, gk, gv
        // (b·n·h·hd; bounds as in `forward`); each task reads and writes only its own
        // (sequence's rows, head) block of gq and (sequence, head) blocks of gk/gv (when the
        // pointers coincide, R = b·n and these are one block, which its three products touch
        // one after another, never concurrently) and its private scratch, and `ds` is written
        // in full by the first product before it is read.
        unsafe {
            // dP = dO Vᵀ
            mm(
                dims.bf16,
                (r, n, hd),
                ds.as_mut_ptr(),
                (n, 1),
                false,
                go.as_ptr().add(qt),
                (d, 1),
                v.as_ptr().add(kt),
                (1, d),
            );
            ds.set_len(r * n);
            // dS = P ⊙ (dP − rowsum(dP ⊙ P)), P kept or recomputed as exp(S − lse), S = Q Kᵀ
            let recomputed;
            let p: &[E] = match saved {
                Saved::Probabilities(all) => {
                    let p = &all[l0 * n..(l0 + r) * n];
                    probabilities_grad(level, p, &mut ds, n);
                    p
                }
                Saved::LogSumExp(lse) => {
                    let mut s = scores(q, k, (qt, r), kt, dims);
                    softmax_grad_rows(level, &mut s, &mut ds, &lse[l0..l0 + r], n);
                    recomputed = s;
                    &recomputed
                }
                Saved::Nothing => unreachable!("checked above"),
            };
            // dV += Pᵀ dO, dQ += dS K, dK += dSᵀ Q
            mm(
                dims.bf16,
                (n, hd, r),
                pv.get().add(kt),
                (d, 1),
                true,
                p.as_ptr(),
                (1, n),
                go.as_ptr().add(qt),
                (d, 1),
            );
            mm(
                dims.bf16,
                (r, hd, n),
                pq.get().add(qt),
                (d, 1),
                true,
                ds.as_ptr(),
                (n, 1),
                k.as_ptr().add(kt),
                (d, 1),
            );
            mm(
                dims.bf16,
                (n, hd, r),
                pk.get().add(kt),
                (d, 1),
                true,
                ds.as_ptr(),
                (1, n),
                q.as_ptr().add(qt),
                (d, 1),
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::Kernels;
    use super::{keep_for, with_keep_p_bytes, Keep, KEEP_P_BYTES};
    use crate::layers::{T2, T4};
    use dfdx::prelude::*;
    use rand::{rngs::StdRng, Rng};

    /// [`each_path`] twice: with each call's P kept for the backward pass, and recomputed from
    /// the kept log-sum-exps ([`KEEP_P_BYTES`] 0).
    fn each_path_and_saving(f: impl Fn(&Cpu, &mut StdRng)) {
        for bytes in [KEEP_P_BYTES, 0] {
            with_keep_p_bytes(bytes, || each_path(&f));
        }
    }

    /// Keeping P changes no output bit (the forward pass is the same computation) and the
    /// gradients only by rounding (the kept P is the forward's normalised one; the recomputed
    /// one is exp(S − lse)), for full, block-masked and ragged queries; and the choice follows
    /// the limit: `cpu-small`'s 16 × 256 (16 MiB per layer) keeps P, `md4-s`'s 8 × 1024
    /// (12 heads, 384 MiB) does not, and inference keeps nothing.
    #[test]
    fn kept_probabilities_give_the_recomputed_gradients() {
        let mib = 1 << 20;
        assert_eq!(keep_for::<f32>(true, 16 * 256, 4, 256), Keep::Probabilities);
        assert_eq!(keep_for::<f32>(true, 8 * 1024, 12, 1024), Keep::LogSumExp);
        assert_eq!(keep_for::<f32>(false, 16, 1, 16), Keep::Nothing);
        assert_eq!(
            keep_for::<f32>(true, KEEP_P_BYTES / 4, 1, 1),
            Keep::Probabilities
        );
        assert_eq!(
            keep_for::<f32>(true, KEEP_P_BYTES / 4 + 1, 1, 1),
            Keep::LogSumExp
        );
        assert_eq!(keep_for::<f64>(true, 16 * 256, 4, 256), Keep::Probabilities);
        assert!(16 * 256 * 4 * 256 * 4 == 16 * mib && 8 * 1024 * 12 * 1024 * 4 == 384 * mib);
        assert_eq!(
            with_keep_p_bytes(0, || keep_for::<f32>(true, 1, 1, 1)),
            Keep::LogSumExp
        );
        each_path(|dev, rng| {
            let (b, half, h, hd) = (2, 6, 3, 4);
            let n = 2 * half;
            let len = b * n * h * hd;
            let mk4 = |rng: &mut StdRng| -> T4<f64, Cpu> {
                tensor(dev, rand_vec(rng, len), (b, n, h, hd))
            };
            let (q4, k4, v4) = (mk4(rng), mk4(rng), mk4(rng));
            let r = rand_vec(rng, len);
            let qr: T2<f64, Cpu> = tensor(dev, rand_vec(rng, 4 * h * hd), (4, h * hd));
            let rr = rand_vec(rng, 4 * h * hd);
            let mask = crate::BlockMask::new(half, 4).unwrap();
            type Run = (Vec<f64>, [Vec<f64>; 3]);
            let run = |bytes: usize| -> [Run; 3] {
                with_keep_p_bytes(bytes, || {
                    let full = |mask: Option<crate::BlockMask>| {
                        let o = match mask {
                            None => <Cpu as Kernels<f64>>::attention(
                                q4.leaky_trace(),
                                k4.leaky_trace(),
                                v4.leaky_trace(),
                            ),
                            Some(m) => <Cpu as Kernels<f64>>::block_attention(
                                q4.leaky_trace(),
                                k4.leaky_trace(),
                                v4.leaky_trace(),
                                m,
                            ),
                        };
                        let (f, g) = grads(o.unwrap(), &r);
                        (f, [&q4, &k4, &v4].map(|t| g.get(t).as_vec()))
                    };
                    let o = <Cpu as Kernels<f64>>::attention_ragged(
                        qr.leaky_trace(),
                        k4.leaky_trace(),
                        v4.leaky_trace(),
                        &[0, 1, 4],
                    )
                    .unwrap();
                    let (f, g) = grads(o, &rr);
                    let ragged = (
                        f,
                        [
                            g.get(&qr).as_vec(),
                            g.get(&k4).as_vec(),
                            g.get(&v4).as_vec(),
                        ],
                    );
                    [full(None), full(Some(mask)), ragged]
                })
            };
            let (kept, recomputed) = (run(KEEP_P_BYTES), run(0));
            for ((fa, ga), (fb, gb)) in kept.iter().zip(&recomputed) {
                assert!(fa.iter().zip(fb).all(|(x, y)| x.to_bits() == y.to_bits()));
                for (x, y) in ga.iter().zip(gb) {
                    for (a, b) in x.iter().zip(y) {
                        assert!((a - b).abs() <= 1e-13 * (1.0 + b.abs()), "{a} vs {b}");
                    }
                }
            }
        });
    }

    /// The trait's default attention, spelled out with dfdx's ops.
    fn generic_attention<E: crate::Elem>(
        q: T4<E, Cpu, OwnedTape<E, Cpu>>,
        k: T4<E, Cpu, OwnedTape<E, Cpu>>,
        v: T4<E, Cpu, OwnedTape<E, Cpu>>,
    ) -> T2<E, Cpu, OwnedTape<E, Cpu>>
    where
        Cpu: Device<E>,
    {
        let (b, n, h, hd) = *q.shape();
        let q = q.permute::<_, Axes4<0, 2, 1, 3>>();
        let k = k.permute::<_, Axes4<0, 2, 3, 1>>();
        let v = v.permute::<_, Axes4<0, 2, 1, 3>>();
        let o: T4<E, Cpu, _> = q.matmul(k).softmax::<Axis<3>>().matmul(v);
        o.permute::<_, Axes4<0, 2, 1, 3>>()
            .reshape_like(&(b * n, h * hd))
    }

    #[test]
    fn attention_matches_dfdx() {
        each_path_and_saving(|dev, rng| {
            let (b, n, h, hd) = (2, 5, 2, 4);
            let mk4 = |rng: &mut StdRng| -> T4<f64, Cpu> {
                tensor(
                    dev,
                    (0..b * n * h * hd)
                        .map(|_| rng.gen_range(-1.0..1.0))
                        .collect(),
                    (b, n, h, hd),
                )
            };
            let (q4, k4, v4) = (mk4(rng), mk4(rng), mk4(rng));
            let r = rand_vec(rng, b * n * h * hd);
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::attention(
                    q4.leaky_trace(),
                    k4.leaky_trace(),
                    v4.leaky_trace(),
                )
                .unwrap(),
                &r,
            );
            let (fb, gb) = grads(
                generic_attention(q4.leaky_trace(), k4.leaky_trace(), v4.leaky_trace()),
                &r,
            );
            close(&fa, &fb, "attention");
            // the tape-free (inference) path uses per-task scratch instead of keeping P
            let plain =
                <Cpu as Kernels<f64>>::attention(q4.clone(), k4.clone(), v4.clone()).unwrap();
            close(&plain.as_vec(), &fb, "attention without tape");
            for (t, name) in [(&q4, "dq"), (&k4, "dk"), (&v4, "dv")] {
                close(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
            }
            // one tensor as q, k and v (the gradient pointers coincide): its gradient is the
            // sum of the three roles' (dfdx's own ops refuse one tensor in two roles, so the
            // reference uses three copies)
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::attention(
                    q4.leaky_trace(),
                    q4.leaky_trace(),
                    q4.leaky_trace(),
                )
                .unwrap(),
                &r,
            );
            let copy = || dev.tensor_from_vec(q4.as_vec(), (b, n, h, hd));
            let (c1, c2, c3) = (copy(), copy(), copy());
            let (fb, gb) = grads(
                generic_attention(c1.leaky_trace(), c2.leaky_trace(), c3.leaky_trace()),
                &r,
            );
            close(&fa, &fb, "self-attention");
            let sum: Vec<f64> = [&c1, &c2, &c3]
                .iter()
                .map(|c| gb.get(*c).as_vec())
                .reduce(|a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect())
                .unwrap();
            close(&ga.get(&q4).as_vec(), &sum, "d(q = k = v)");
        });
    }

    /// Block-diffusion attention: the fused kernel against (a) a naive masked softmax written
    /// loop by loop over the allowed keys only (values) and (b) the trait's generic default,
    /// dfdx's ops with a −∞ bias (values and the gradients of q, k, v), for several block sizes
    /// including a ragged last block and B = N.
    #[test]
    fn block_attention_matches_naive_masked_softmax() {
        each_path_and_saving(|dev, rng| {
            let (b, half, h, hd) = (2, 5, 2, 4);
            let n = 2 * half;
            let len = b * n * h * hd;
            for bs in [1, 2, 3, 5] {
                let mask = crate::BlockMask::new(half, bs).unwrap();
                let mk4 = |rng: &mut StdRng| -> T4<f64, Cpu> {
                    tensor(dev, rand_vec(rng, len), (b, n, h, hd))
                };
                let (q4, k4, v4) = (mk4(rng), mk4(rng), mk4(rng));
                let r = rand_vec(rng, len);
                let (fa, ga) = grads(
                    <Cpu as Kernels<f64>>::block_attention(
                        q4.leaky_trace(),
                        k4.leaky_trace(),
                        v4.leaky_trace(),
                        mask,
                    )
                    .unwrap(),
                    &r,
                );
                // (a) naive: o_i = Σ_{j allowed} softmax_j(q_i·k_j) v_j
                let (qv, kv, vv) = (q4.as_vec(), k4.as_vec(), v4.as_vec());
                let at = |x: &[f64], bi: usize, i: usize, hi: usize| {
                    let o = ((bi * n + i) * h + hi) * hd;
                    x[o..o + hd].to_vec()
                };
                let mut naive = vec![0.0; len];
                for bi in 0..b {
                    for hi in 0..h {
                        for i in 0..n {
                            let qi = at(&qv, bi, i, hi);
                            let keys: Vec<usize> = (0..n).filter(|&j| mask.allowed(i, j)).collect();
                            let s: Vec<f64> = keys
                                .iter()
                                .map(|&j| {
                                    let kj = at(&kv, bi, j, hi);
                                    qi.iter().zip(&kj).map(|(a, b)| a * b).sum()
                                })
                                .collect();
                            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                            for (&j, sj) in keys.iter().zip(&s) {
                                let p = (sj - m).exp() / z;
                                let vj = at(&vv, bi, j, hi);
                                let o = ((bi * n + i) * h + hi) * hd;
                                for c in 0..hd {
                                    naive[o + c] += p * vj[c];
                                }
                            }
                        }
                    }
                }
                close(&fa, &naive, "block attention vs naive");
                // (b) the generic default (dfdx ops, −∞ bias), values and gradients
                let generic = |q: T4<f64, Cpu, OwnedTape<f64, Cpu>>, k, v| {
                    let (b, n, h, hd) = *q.shape();
                    let bias: Vec<f64> = (0..n * n)
                        .map(|ij| {
                            if mask.allowed(ij / n, ij % n) {
                                0.0
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let bias = dev
                        .tensor_from_vec(bias, (n, n))
                        .broadcast_like::<_, Axes2<0, 1>>(&(b, h, n, n));
                    let q = q.permute::<_, Axes4<0, 2, 1, 3>>();
                    let k: T4<f64, Cpu, _> = k;
                    let v: T4<f64, Cpu, _> = v;
                    let k = k.permute::<_, Axes4<0, 2, 3, 1>>();
                    let v = v.permute::<_, Axes4<0, 2, 1, 3>>();
                    let o: T4<f64, Cpu, _> = (q.matmul(k) + bias).softmax::<Axis<3>>().matmul(v);
                    o.permute::<_, Axes4<0, 2, 1, 3>>()
                        .reshape_like(&(b * n, h * hd))
                };
                let (fb, gb) = grads(
                    generic(q4.leaky_trace(), k4.leaky_trace(), v4.leaky_trace()),
                    &r,
                );
                close(&fa, &fb, "block attention vs dfdx");
                for (t, name) in [(&q4, "dq"), (&k4, "dk"), (&v4, "dv")] {
                    close(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
                }
                // the trait default is the same computation
                let (fc, _) = grads(
                    <Cpu as Kernels<f64>>::attention(
                        q4.leaky_trace(),
                        k4.leaky_trace(),
                        v4.leaky_trace(),
                    )
                    .unwrap(),
                    &r,
                );
                // and the mask matters (unmasked attention differs)
                assert!(fc.iter().zip(&fa).any(|(x, y)| (x - y).abs() > 1e-3));
                // inference path (no tape)
                let plain = <Cpu as Kernels<f64>>::block_attention(
                    q4.clone(),
                    k4.clone(),
                    v4.clone(),
                    mask,
                )
                .unwrap();
                close(&plain.as_vec(), &naive, "block attention without tape");
            }
        });
    }

    /// f32 (fast exp, lane sums, uninitialised outputs) against dfdx's f32 ops, with scores of
    /// a few units so the softmax is far from uniform.
    #[test]
    fn f32_attention_within_tolerance() {
        each_path_and_saving(|dev, rng| {
            let (b, n, h, hd) = (2, 33, 2, 8);
            let s4 = (b, n, h, hd);
            let len = b * n * h * hd;
            let r = rand32(rng, len, 1.0);
            let q: T4<f32, Cpu> = tensor(dev, rand32(rng, len, 2.0), s4);
            let k: T4<f32, Cpu> = tensor(dev, rand32(rng, len, 2.0), s4);
            let v: T4<f32, Cpu> = tensor(dev, rand32(rng, len, 1.0), s4);
            let fused =
                <Cpu as Kernels<f32>>::attention(q.leaky_trace(), k.leaky_trace(), v.leaky_trace())
                    .unwrap()
                    .reshape_like(&s4);
            let (fa, ga) = grads(fused, &r);
            let generic = generic_attention(q.leaky_trace(), k.leaky_trace(), v.leaky_trace())
                .reshape_like(&s4);
            let (fb, gb) = grads(generic, &r);
            close32(&fa, &fb, "attention f32");
            for (t, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
                close32(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
            }
        });
    }

    /// bf16 rounding (nearest even) of an f64 taken to f32 first, as the kernels' f32 inputs are.
    fn rb(x: f64) -> f64 {
        use super::super::bf16::{from_bf16, to_bf16};
        f64::from(from_bf16(to_bf16(x as f32)))
    }

    /// How far the bf16 rounding of a value known only to within ±δ of `x` can land from
    /// `rb(x)` (rounding is monotone, so the ends of the interval bound it).
    fn spread(x: f64, dl: f64) -> f64 {
        let c = rb(x);
        (rb(x - dl) - c).abs().max((rb(x + dl) - c).abs())
    }

    /// f32's unit roundoff (2⁻²⁴), rounded up: the accumulation bound per term.
    const U: f64 = 6e-8;

    /// The f64 reference of bf16 attention on (b, n, h, hd) inputs with dO = `go`: every
    /// product's inputs rounded to bf16 (Q, K, V, dO, and P and dS where they enter a product),
    /// everything else exact. Returns (value, tolerance) per element of o, dq, dk, dv. The
    /// tolerance is f32 accumulation (k·U·Σ|terms| per product) plus, for P and dS, the reach of
    /// their rounding given a worst-case bound on the kernel's f32 error in them (from S's and
    /// dP's accumulation, the f32 softmax at ≤ 1e-5 relative, and the row dot product).
    #[allow(clippy::type_complexity)]
    fn bf16_reference(
        (q, k, v, go): (&[f32], &[f32], &[f32], &[f32]),
        (b, n, h, hd): (usize, usize, usize, usize),
        mask: Option<crate::BlockMask>,
    ) -> [(Vec<f64>, Vec<f64>); 4] {
        let len = b * n * h * hd;
        let mut out: [(Vec<f64>, Vec<f64>); 4] =
            std::array::from_fn(|_| (vec![0.0; len], vec![0.0; len]));
        let allowed = |i: usize, j: usize| mask.is_none_or(|m| m.allowed(i, j));
        for bi in 0..b {
            for hi in 0..h {
                let ix = |i: usize, c: usize| ((bi * n + i) * h + hi) * hd + c;
                let r = |x: &[f32], i: usize, c: usize| rb(f64::from(x[ix(i, c)]));
                // S and its row error bound; P with its elementwise error bound
                let (mut p, mut dp) = (vec![0.0; n * n], vec![0.0; n * n]);
                for i in 0..n {
                    let mut es = 0.0f64;
                    for j in 0..n {
                        let (mut sv, mut abs) = (0.0, 0.0);
                        for c in 0..hd {
                            let t = r(q, i, c) * r(k, j, c);
                            sv += t;
                            abs += t.abs();
                        }
                        es = es.max(abs * hd as f64 * U);
                        p[i * n + j] = if allowed(i, j) { sv } else { f64::NEG_INFINITY };
                    }
                    let row = &mut p[i * n..(i + 1) * n];
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    row.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let z: f64 = row.iter().sum();
                    row.iter_mut().for_each(|x| *x /= z);
                    dp[i * n..(i + 1) * n].fill(2.2 * es + 1e-5);
                }
                let dpk: Vec<f64> = p.iter().zip(&dp).map(|(p, e)| p * e).collect();
                // dP = dO Vᵀ (error bound per element), the row dots and dS (bounds too)
                let (mut gp, mut egp) = (vec![0.0; n * n], vec![0.0; n * n]);
                for i in 0..n {
                    for j in 0..n {
                        let (mut sv, mut abs) = (0.0, 0.0);
                        for c in 0..hd {
                            let t = r(go, i, c) * r(v, j, c);
                            sv += t;
                            abs += t.abs();
                        }
                        gp[i * n + j] = sv;
                        egp[i * n + j] = abs * hd as f64 * U;
                    }
                }
                let (mut dsv, mut eds) = (vec![0.0; n * n], vec![0.0; n * n]);
                for i in 0..n {
                    let ri = i * n..(i + 1) * n;
                    let dot: f64 = ri.clone().map(|e| p[e] * gp[e]).sum();
                    let edot: f64 = ri
                        .clone()
                        .map(|e| {
                            dpk[e] * gp[e].abs()
                                + p[e] * egp[e]
                                + n as f64 * U * (p[e] * gp[e]).abs()
                        })
                        .sum();
                    for e in ri {
                        dsv[e] = p[e] * (gp[e] - dot);
                        eds[e] = dpk[e] * (gp[e] - dot).abs()
                            + p[e] * (egp[e] + edot)
                            + 4.0 * U * dsv[e].abs();
                    }
                }
                // the four products, each Σ_l rb(x_l)·other_l with x's bound
                let prod = |terms: &mut dyn Iterator<Item = (f64, f64, f64)>| {
                    let (mut val, mut abs, mut reach, mut cnt) = (0.0, 0.0, 0.0, 0.0);
                    for (x, ex, other) in terms {
                        let t = rb(x) * other;
                        val += t;
                        abs += t.abs();
                        reach += other.abs() * spread(x, ex);
                        cnt += 1.0;
                    }
                    (val, abs * cnt * U + reach)
                };
                for i in 0..n {
                    for c in 0..hd {
                        let mut put = |w: usize, (val, tol): (f64, f64)| {
                            out[w].0[ix(i, c)] = val;
                            out[w].1[ix(i, c)] = tol;
                        };
                        // o_i = Σ_j P_ij v_j
                        put(
                            0,
                            prod(&mut (0..n).map(|j| (p[i * n + j], dpk[i * n + j], r(v, j, c)))),
                        );
                        // dq_i = Σ_j dS_ij k_j
                        put(
                            1,
                            prod(&mut (0..n).map(|j| (dsv[i * n + j], eds[i * n + j], r(k, j, c)))),
                        );
                        // dk_i = Σ_j dS_ji q_j (row i of dSᵀ Q)
                        put(
                            2,
                            prod(&mut (0..n).map(|j| (dsv[j * n + i], eds[j * n + i], r(q, j, c)))),
                        );
                        // dv_i = Σ_j P_ji dO_j
                        put(
                            3,
                            prod(&mut (0..n).map(|j| (p[j * n + i], dpk[j * n + i], r(go, j, c)))),
                        );
                    }
                }
            }
        }
        out
    }

    /// At bf16, attention's forward output and its three input gradients — unmasked and with
    /// a block-diffusion mask, at every level (the AVX512-BF16 microkernel and the portable
    /// one) — are those of the f64 reference on bf16-rounded product inputs (P and dS rounded
    /// where they are a product's input) within f32 accumulation tolerance, while most
    /// elements of the f32 op's results lie outside that tolerance (so the bf16 path ran, and
    /// the tolerance tells the two precisions apart). At F32 nothing changed: the f32 results
    /// are compared with dfdx in `f32_attention_within_tolerance`, and the levels bit for bit in
    /// `isa_equality`.
    #[test]
    fn bf16_attention_is_the_product_of_rounded_operands() {
        use crate::precision::{with_precision, Precision};
        each_path_and_saving(|dev, rng| {
            let (b, half, h, hd) = (2, 19, 2, 20);
            let n = 2 * half;
            let s4 = (b, n, h, hd);
            let len = b * n * h * hd;
            for mask in [None, Some(crate::BlockMask::new(half, 5).unwrap())] {
                let (qs, ks, vs, r) = (
                    rand32(rng, len, 1.5),
                    rand32(rng, len, 1.5),
                    rand32(rng, len, 1.0),
                    rand32(rng, len, 1.0),
                );
                let (q, k, v): (T4<f32, Cpu>, T4<f32, Cpu>, T4<f32, Cpu>) = (
                    tensor(dev, qs.clone(), s4),
                    tensor(dev, ks.clone(), s4),
                    tensor(dev, vs.clone(), s4),
                );
                let run = |p| {
                    with_precision(p, || {
                        let (lq, lk, lv) = (q.leaky_trace(), k.leaky_trace(), v.leaky_trace());
                        let o = match mask {
                            None => <Cpu as Kernels<f32>>::attention(lq, lk, lv),
                            Some(m) => <Cpu as Kernels<f32>>::block_attention(lq, lk, lv, m),
                        };
                        let (f, g) = grads(o.unwrap(), &r);
                        let plain = match mask {
                            None => {
                                <Cpu as Kernels<f32>>::attention(q.clone(), k.clone(), v.clone())
                            }
                            Some(m) => <Cpu as Kernels<f32>>::block_attention(
                                q.clone(),
                                k.clone(),
                                v.clone(),
                                m,
                            ),
                        };
                        // the tape-free path computes the same products
                        assert_eq!(plain.unwrap().as_vec(), f, "{p} without tape");
                        [
                            f,
                            g.get(&q).as_vec(),
                            g.get(&k).as_vec(),
                            g.get(&v).as_vec(),
                        ]
                    })
                };
                let (got, f32s) = (run(Precision::Bf16), run(Precision::F32));
                let want = bf16_reference((&qs, &ks, &vs, &r), (b, n, h, hd), mask);
                for (w, name) in ["o", "dq", "dk", "dv"].iter().enumerate() {
                    let (val, tol) = &want[w];
                    let mut outside = 0;
                    for e in 0..len {
                        let g = f64::from(got[w][e]);
                        assert!(
                            (g - val[e]).abs() <= tol[e] + 1e-30,
                            "bf16 {name}[{e}] (mask {}): {g} vs {} ± {}",
                            mask.is_some(),
                            val[e],
                            tol[e]
                        );
                        outside += usize::from((f64::from(f32s[w][e]) - val[e]).abs() > tol[e]);
                    }
                    assert!(
                        2 * outside > len,
                        "{name} (mask {}): only {outside} of {len} f32 values outside the bf16 tolerance",
                        mask.is_some()
                    );
                }
            }
        });
    }

    /// Ragged attention — the CPU kernel and the trait's generic default (queries padded to
    /// the longest sequence, dfdx's products) — against the full op's rows: sequences with
    /// several, one and no queries, queries out of position order and repeated. Values are the
    /// full op's rows; the key and value gradients of Σ R ⊙ o equal the full op's with R
    /// scattered to the picked rows (a repeated row's weights summed) and 0 elsewhere, and so
    /// do the query gradients summed per position. f64 to 1e-12, with and without the tape.
    #[test]
    fn ragged_attention_is_the_full_rows_with_their_gradients() {
        each_path_and_saving(|dev, rng| {
            let (b, n, h, hd) = (3, 9, 2, 4);
            let d = h * hd;
            let picks: [&[usize]; 3] = [&[7, 0, 4, 4], &[], &[8]];
            let starts: Vec<usize> = std::iter::once(0)
                .chain(picks.iter().scan(0, |acc, p| {
                    *acc += p.len();
                    Some(*acc)
                }))
                .collect();
            let flat: Vec<usize> = (picks.iter().enumerate())
                .flat_map(|(bi, p)| p.iter().map(move |&i| bi * n + i))
                .collect();
            let rows = flat.len();
            let s4 = (b, n, h, hd);
            let (qs, ks, vs) = (
                rand_vec(rng, b * n * d),
                rand_vec(rng, b * n * d),
                rand_vec(rng, b * n * d),
            );
            let q4: T4<f64, Cpu> = tensor(dev, qs.clone(), s4);
            let (k4, v4): (T4<f64, Cpu>, T4<f64, Cpu>) = (tensor(dev, ks, s4), tensor(dev, vs, s4));
            let qr: T2<f64, Cpu> = tensor(
                dev,
                flat.iter()
                    .flat_map(|&f| qs[f * d..(f + 1) * d].to_vec())
                    .collect(),
                (rows, d),
            );
            let r = rand_vec(rng, rows * d);
            let mut r_full = vec![0.0; b * n * d];
            for (i, &f) in flat.iter().enumerate() {
                for c in 0..d {
                    r_full[f * d + c] += r[i * d + c];
                }
            }
            let (full, gf) = grads(
                <Cpu as Kernels<f64>>::attention(
                    q4.leaky_trace(),
                    k4.leaky_trace(),
                    v4.leaky_trace(),
                )
                .unwrap(),
                &r_full,
            );
            let (gfq, gfk, gfv) = (
                gf.get(&q4).as_vec(),
                gf.get(&k4).as_vec(),
                gf.get(&v4).as_vec(),
            );
            let ragged = |generic: bool| {
                let (q, k, v) = (qr.leaky_trace(), k4.leaky_trace(), v4.leaky_trace());
                let o = if generic {
                    super::super::padded_ragged_attention(q, k, v, &starts)
                } else {
                    <Cpu as Kernels<f64>>::attention_ragged(q, k, v, &starts)
                };
                let plain = <Cpu as Kernels<f64>>::attention_ragged(
                    qr.clone(),
                    k4.clone(),
                    v4.clone(),
                    &starts,
                );
                (grads(o.unwrap(), &r), plain.unwrap().as_vec())
            };
            for generic in [false, true] {
                let ((o, g), plain) = ragged(generic);
                let what = if generic { "generic" } else { "cpu" };
                close(&plain, &o, "ragged attention without tape");
                let gq = g.get(&qr).as_vec();
                // a position picked twice: the full op's dq there is the sum of both rows'
                let mut gq_full = vec![0.0; b * n * d];
                for (i, &f) in flat.iter().enumerate() {
                    close(&o[i * d..(i + 1) * d], &full[f * d..(f + 1) * d], what);
                    for c in 0..d {
                        gq_full[f * d + c] += gq[i * d + c];
                    }
                }
                close(&gq_full, &gfq, "dq");
                close(&g.get(&k4).as_vec(), &gfk, "dk");
                close(&g.get(&v4).as_vec(), &gfv, "dv");
            }
        });
    }

    /// The ragged kernel's products at bf16 precision are the full op's bit for bit at the
    /// picked rows (each element of the bf16 products depends on its own row and column only),
    /// and differ from the f32 ones.
    #[test]
    fn ragged_attention_rows_are_the_full_rows_at_bf16() {
        use crate::precision::{with_precision, Precision};
        each_path_and_saving(|dev, rng| {
            let (b, n, h, hd) = (2, 37, 2, 20);
            let d = h * hd;
            let picks = [0, 5, 17, 36];
            let rn = picks.len();
            let (qs, ks, vs) = (
                rand32(rng, b * n * d, 1.5),
                rand32(rng, b * n * d, 1.5),
                rand32(rng, b * n * d, 1.0),
            );
            let qr: Vec<f32> = (0..b)
                .flat_map(|bi| picks.iter().map(move |&i| bi * n + i))
                .flat_map(|row| qs[row * d..(row + 1) * d].to_vec())
                .collect();
            let s4 = (b, n, h, hd);
            let (q, k, v): (T4<f32, Cpu>, T4<f32, Cpu>, T4<f32, Cpu>) = (
                tensor(dev, qs, s4),
                tensor(dev, ks, s4),
                tensor(dev, vs, s4),
            );
            let q_rows: T2<f32, Cpu> = tensor(dev, qr, (b * rn, d));
            let starts: Vec<usize> = (0..=b).map(|i| i * rn).collect();
            let mut per_precision = Vec::new();
            for p in Precision::ALL {
                let (full, rows) = with_precision(p, || {
                    let full = <Cpu as Kernels<f32>>::attention(q.clone(), k.clone(), v.clone());
                    let rows = <Cpu as Kernels<f32>>::attention_ragged(
                        q_rows.clone(),
                        k.clone(),
                        v.clone(),
                        &starts,
                    );
                    (full.unwrap().as_vec(), rows.unwrap().as_vec())
                });
                for bi in 0..b {
                    for (ri, &i) in picks.iter().enumerate() {
                        let a = &rows[(bi * rn + ri) * d..][..d];
                        let f = &full[(bi * n + i) * d..][..d];
                        match p {
                            Precision::Bf16 => assert_eq!(a, f, "bf16 row {bi},{i}"),
                            Precision::F32 => close32(a, f, "f32 rows"),
                        }
                    }
                }
                per_precision.push(rows);
            }
            assert_ne!(per_precision[0], per_precision[1]);
        });
    }
}
