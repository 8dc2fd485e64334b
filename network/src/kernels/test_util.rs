//! Shared helpers of the kernel tests: random inputs, the Σ R ⊙ y loss and tolerances, and
//! [`each_path`], which runs a test once with unregistered inputs (every kernel input is copied)
//! and once inside a [`KernelScope`] with inputs made by the kernels' registering constructor
//! (read in place), at every supported instruction-set level.

use super::isa;
use super::storage;
use super::KernelScope;
use crate::Elem;
use dfdx::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::cell::Cell;

pub(crate) type T32 = OwnedTape<f32, Cpu>;

thread_local! {
    static REGISTERED_INPUTS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with plain inputs and with the inputs registered in an open frame, at every
/// instruction-set level this CPU supports.
pub(crate) fn each_path(f: impl Fn(&Cpu, &mut StdRng)) {
    let dev = Cpu::default();
    for level in isa::supported() {
        for registered in [false, true] {
            let _scope = registered.then(KernelScope::open);
            REGISTERED_INPUTS.with(|c| c.set(registered));
            isa::with_level(level, || f(&dev, &mut StdRng::seed_from_u64(0)));
            REGISTERED_INPUTS.with(|c| c.set(false));
        }
    }
}

/// A test input: registered (as a kernel output is) when [`each_path`] says so.
pub(crate) fn tensor<S: Shape, E: crate::Elem>(dev: &Cpu, v: Vec<E>, s: S) -> Tensor<S, E, Cpu> {
    if REGISTERED_INPUTS.with(|c| c.get()) {
        let t = storage::output(dev, v, s).unwrap().0;
        // the kernels will read it in place
        assert_eq!(
            storage::input(&t).as_ptr(),
            &t[S::Concrete::default()] as *const E
        );
        t
    } else {
        dev.tensor_from_vec(v, s)
    }
}

pub(crate) fn rand_vec(rng: &mut StdRng, len: usize) -> Vec<f64> {
    (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

pub(crate) fn rand2(
    dev: &Cpu,
    rng: &mut StdRng,
    s: (usize, usize),
) -> Tensor<(usize, usize), f64, Cpu> {
    tensor(
        dev,
        (0..s.0 * s.1).map(|_| rng.gen_range(-1.5..1.5)).collect(),
        s,
    )
}

pub(crate) fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

pub(crate) fn close32(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 2e-5 * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

/// Σ R ⊙ y → (y, gradients), at either precision.
pub(crate) fn grads<E: Elem, S: Shape>(
    y: Tensor<S, E, Cpu, OwnedTape<E, Cpu>>,
    r: &[E],
) -> (Vec<E>, Gradients<E, Cpu>)
where
    Cpu: Device<E>,
{
    let out = y.retaped::<NoneTape>().as_vec();
    let rt = y.device().tensor_from_vec(r.to_vec(), *y.shape());
    (out, (y * rt).sum::<Rank0, _>().backward())
}

pub(crate) fn rand32(rng: &mut StdRng, len: usize, s: f32) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-s..s)).collect()
}

/// The best of `runs` timed calls of `f` in seconds, after one untimed call (the kernels'
/// ignored timing benches).
pub(crate) fn best_of(runs: usize, f: &mut dyn FnMut()) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
