//! The tape plumbing every fused CPU op shares, in one place ([`fused`]): the inputs are made
//! contiguous (a no-op when they are) and untaped and their tapes merged; the op's forward pass
//! runs on the plain tensors and returns its output's shape and data with its backward pass; the
//! output is created through [`storage::output`] (so later kernels read it in place); and when
//! the tape records, the backward pass is registered, handed the output's gradient moved out of
//! the store. Each op then reads as one unit: what it computes, and what it adds to its inputs'
//! gradients.

use super::storage::{self, HostBuf};
use crate::layers::Res;
use crate::Elem;
use dfdx::prelude::*;

/// The CPU gradient store. Its buffers (`get_or_alloc_mut`) deref to `&mut [E]`.
pub(crate) type Grads<E> = Gradients<E, Cpu>;

/// Moves `y`'s accumulated gradient out of the gradient store (no copy) for `y`'s backward op.
/// Only the op that produced `y` reads its gradient, and it runs after every consumer of `y`
/// has added to it, so nothing reads the (now empty) entry afterwards; the memory is freed as
/// soon as the op is done instead of at the end of the backward pass. Consequently the gradients
/// of the fused kernels' outputs are not available to callers after `backward` (parameters and
/// other inputs keep theirs). A macro because dfdx does not export the ghost-tensor type (nor
/// the `Tensorlike` trait that `get_or_alloc_mut` takes). Evaluates to `Vec<E>`; `?` propagates
/// the allocation error.
macro_rules! take_grad {
    ($grads:expr, $y:expr) => {
        std::mem::take(&mut **$grads.get_or_alloc_mut(&$y)?)
    };
}

/// The taped inputs of a fused op: one tensor, or a pair or triple of tensors on one tape type.
pub(crate) trait Inputs<E: Elem>: Sized {
    /// The inputs, contiguous and without tape.
    type Plain;
    type Tape: Tape<E, Cpu>;
    /// Makes each input contiguous, splits its tape off and merges the tapes (in order).
    fn untape(self) -> Res<(Self::Plain, Self::Tape), Cpu>;
    fn device(plain: &Self::Plain) -> Cpu;
}

impl<S: Shape, E: Elem, T: Tape<E, Cpu>> Inputs<E> for Tensor<S, E, Cpu, T> {
    type Plain = Tensor<S, E, Cpu>;
    type Tape = T;
    fn untape(self) -> Res<(Self::Plain, T), Cpu> {
        Ok(self.try_contiguous()?.split_tape())
    }
    fn device(plain: &Self::Plain) -> Cpu {
        plain.device().clone()
    }
}

impl<E: Elem, A: Inputs<E>, B: Inputs<E, Tape = A::Tape>> Inputs<E> for (A, B) {
    type Plain = (A::Plain, B::Plain);
    type Tape = A::Tape;
    fn untape(self) -> Res<(Self::Plain, Self::Tape), Cpu> {
        let (a, ta) = self.0.untape()?;
        let (b, tb) = self.1.untape()?;
        Ok(((a, b), ta.merge(tb)))
    }
    fn device(plain: &Self::Plain) -> Cpu {
        A::device(&plain.0)
    }
}

impl<E: Elem, A: Inputs<E>, B: Inputs<E, Tape = A::Tape>, C: Inputs<E, Tape = A::Tape>> Inputs<E>
    for (A, B, C)
{
    type Plain = (A::Plain, B::Plain, C::Plain);
    type Tape = A::Tape;
    fn untape(self) -> Res<(Self::Plain, Self::Tape), Cpu> {
        let (a, ta) = self.0.untape()?;
        let (b, tb) = self.1.untape()?;
        let (c, tc) = self.2.untape()?;
        Ok(((a, b, c), ta.merge(tb).merge(tc)))
    }
    fn device(plain: &Self::Plain) -> Cpu {
        A::device(&plain.0)
    }
}

/// What an op's forward pass produces.
pub(crate) struct Forward<S, E, B> {
    pub shape: S,
    /// The output's elements, row-major.
    pub data: Vec<E>,
    /// Whether `backward` reads the output ([`Backward::y`]); only then is it kept until then.
    pub keep_output: bool,
    /// The backward pass (dropped unrecorded without a tape).
    pub backward: B,
}

/// What an op's backward pass receives.
pub(crate) struct Backward<'a, E: Elem> {
    /// The output's gradient, moved out of the store (`take_grad!`).
    pub gy: Vec<E>,
    /// The output (with [`Forward::keep_output`]).
    pub y: Option<HostBuf<E>>,
    /// The store the inputs' gradients are added to.
    pub grads: &'a mut Grads<E>,
}

/// A backward pass: what [`fused`] registers (named for functions that return one).
pub(crate) trait BackwardFn<E: Elem>:
    FnOnce(Backward<'_, E>) -> Res<(), Cpu> + 'static
{
}
impl<E: Elem, F: FnOnce(Backward<'_, E>) -> Res<(), Cpu> + 'static> BackwardFn<E> for F {}

/// Types a backward closure (so that its argument's lifetime is higher-ranked).
pub(crate) fn backward<E: Elem, F>(f: F) -> F
where
    F: FnOnce(Backward<'_, E>) -> Res<(), Cpu> + 'static,
{
    f
}

/// Runs a fused op: untapes `inputs`, runs `forward` on them (told whether the tape records),
/// creates the output tensor through the registering constructor, and registers the backward
/// pass on the merged tape.
pub(crate) fn fused<E, I, S, B>(
    inputs: I,
    forward: impl FnOnce(I::Plain, bool) -> Res<Forward<S, E, B>, Cpu>,
) -> Res<Tensor<S, E, Cpu, I::Tape>, Cpu>
where
    E: Elem,
    I: Inputs<E>,
    S: Shape,
    B: FnOnce(Backward<'_, E>) -> Res<(), Cpu> + 'static,
{
    let (plain, mut tape) = inputs.untape()?;
    let dev = I::device(&plain);
    let records = <I::Tape as Tape<E, Cpu>>::OWNS_TAPE;
    let Forward {
        shape,
        data,
        keep_output,
        backward,
    } = forward(plain, records)?;
    let (y, y_buf) = storage::output(&dev, data, shape)?;
    if records {
        let (yg, y_buf) = (y.ghost(), keep_output.then_some(y_buf));
        tape.add_backward_op(move |grads| {
            let gy = take_grad!(grads, yg);
            backward(Backward {
                gy,
                y: y_buf,
                grads,
            })
        });
    }
    Ok(y.put_tape(tape))
}
