//! The transformer's parameters as named, typed per-layer structs (spec §7.2): a [`Vector`] or a
//! [`Matrix`] per learnable tensor, grouped into [`Linear`], [`Attention`], [`Ffn`], [`Block`],
//! [`Conditioning`] and the [`Trunk`] that holds either adaLN-zero or RMSNorm blocks — so a
//! model without conditioning cannot have adaLN blocks, and a layer's weights are found by field,
//! not by index. Shapes are run-time (presets are chosen at run time) and fixed at construction.
//!
//! Every tensor stays one flat dfdx tensor ([`Param`]) with its logical shape, so the optimizer,
//! the EMA and checkpoints treat all of them alike through [`Parameters`], which visits them in
//! one fixed order (the order of initialisation, which the seeded initialisation and the f64 sum
//! of the gradient norm depend on).
//!
//! # Checkpoint names
//! Stable and hierarchical; a model has exactly the rows its configuration selects
//! (`{l}` = block index `0..n_layers`; `d` width, `d_c` conditioning width, `e` embedding width,
//! `h` FFN hidden width, `V` vocabulary, `K` classes). Weights are stored `[in, out]` (used as
//! `x @ W`), row-major:
//!
//! | name | shape | present when |
//! |---|---|---|
//! | `embed` | `[V + 1, e]` (mask id = V) | always (`e = d` without `embed_dim`) |
//! | `embed_proj.w`, `embed_proj.b` | `[e, d]`, `[d]` | `embed_dim` set (the official "outside embedding") |
//! | `cond.w1_t` | `[d_c, 4 d_c]` | time conditioning |
//! | `cond.label_embed`, `cond.w1_label` | `[K, d_c]`, `[d_c, 4 d_c]` | `num_classes > 0` |
//! | `cond.b1`, `cond.w2`, `cond.b2` | `[4 d_c]`, `[4 d_c, d_c]`, `[d_c]` | conditioned |
//! | `blocks.{l}.ada.w`, `blocks.{l}.ada.b` | `[d_c, 6 d]`, `[6 d]` | conditioned (adaLN-zero) |
//! | `blocks.{l}.norm_attn`, `blocks.{l}.norm_mlp` | `[d]`, `[d]` | not conditioned (RMSNorm) |
//! | `blocks.{l}.attn.wq` … `.wo` | `[d, d]` each | always |
//! | `blocks.{l}.ffn.w1`, `.w3`, `.w2` | `[d, h]`, `[d, h]`, `[h, d]` | always |
//! | `head.ada.w`, `head.ada.b` | `[d_c, 2 d]`, `[2 d]` | conditioned |
//! | `head.norm` | `[d]` | not conditioned |
//! | `head.out` | `[d, V]` (zero-initialised) | always |
//!
//! The test `checkpoint_names_are_the_documented_table` pins this table.

use crate::init::Init;
use crate::layers::{Res, T1, T2};
use crate::param::Param;
use crate::{Elem, Kernels, NetworkError};
use dfdx::prelude::*;

/// Visits a module's parameters in their one fixed order.
pub trait Parameters<E: Elem, D: Device<E>> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param<E, D>));
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(&'a mut Param<E, D>));
}

impl<E: Elem, D: Device<E>, M: Parameters<E, D>> Parameters<E, D> for Option<M> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param<E, D>)) {
        if let Some(m) = self {
            m.visit(f)
        }
    }
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(&'a mut Param<E, D>)) {
        if let Some(m) = self {
            m.visit_mut(f)
        }
    }
}

impl<E: Elem, D: Device<E>, M: Parameters<E, D>> Parameters<E, D> for Vec<M> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param<E, D>)) {
        self.iter().for_each(|m| m.visit(f))
    }
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(&'a mut Param<E, D>)) {
        self.iter_mut().for_each(|m| m.visit_mut(f))
    }
}

/// `Parameters` for a struct: its fields (or fields of fields, `mid.0`) visited in the order
/// listed. `parameters!(Ty { .. })` is for `Ty<E, D>` with `D: Device<E>`; other bounds and
/// type parameters go in brackets: `parameters!([D: Kernels<E>] Ty<E, D> { .. })`.
macro_rules! parameters {
    ($ty:ident { $($($field:tt).+),+ $(,)? }) => {
        crate::modules::parameters!([D: Device<E>] $ty<E, D> { $($($field).+),+ });
    };
    ([$($bounds:tt)*] $ty:ty { $($($field:tt).+),+ $(,)? }) => {
        impl<E: Elem, $($bounds)*> Parameters<E, D> for $ty {
            fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param<E, D>)) {
                $(self$(.$field)+.visit(f);)+
            }
            fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(&'a mut Param<E, D>)) {
                $(self$(.$field)+.visit_mut(f);)+
            }
        }
    };
}
pub(crate) use parameters;

/// `Parameters` for an enum `$ty<E, D>` of one-field variants: those of the variant present
/// (bounds in brackets as for [`parameters!`]).
macro_rules! enum_parameters {
    ($ty:ident { $($variant:ident),+ }) => {
        crate::modules::enum_parameters!([D: Device<E>] $ty { $($variant),+ });
    };
    ([$($bounds:tt)*] $ty:ident { $($variant:ident),+ }) => {
        impl<E: Elem, $($bounds)*> Parameters<E, D> for $ty<E, D> {
            fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param<E, D>)) {
                match self {
                    $($ty::$variant(x) => x.visit(f),)+
                }
            }
            fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(&'a mut Param<E, D>)) {
                match self {
                    $($ty::$variant(x) => x.visit_mut(f),)+
                }
            }
        }
    };
}
pub(crate) use enum_parameters;

/// A learnable vector `[n]` (a bias or a norm scale).
#[derive(Clone, Debug)]
pub struct Vector<E: Elem, D: Device<E>>(Param<E, D>);

/// A learnable matrix `[rows, cols]` (a Dense weight used as `x @ W`, or an embedding table).
#[derive(Clone, Debug)]
pub struct Matrix<E: Elem, D: Device<E>> {
    param: Param<E, D>,
    rows: usize,
    cols: usize,
}

impl<E: Elem, D: Device<E>> Vector<E, D> {
    pub fn param(&self) -> &Param<E, D> {
        &self.0
    }
    pub(crate) fn tensor(&self) -> T1<E, D> {
        self.0.value.clone()
    }
}

impl<E: Elem, D: Device<E>> Matrix<E, D> {
    pub fn param(&self) -> &Param<E, D> {
        &self.param
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The flat tensor viewed as `(rows, cols)` (same id: gradients land on the flat tensor).
    pub(crate) fn tensor(&self) -> Res<T2<E, D>, D> {
        self.param
            .value
            .clone()
            .try_reshape_like(&(self.rows, self.cols))
    }
}

impl<E: Elem, D: Device<E>> Parameters<E, D> for Vector<E, D> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param<E, D>)) {
        f(&self.0)
    }
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(&'a mut Param<E, D>)) {
        f(&mut self.0)
    }
}

impl<E: Elem, D: Device<E>> Parameters<E, D> for Matrix<E, D> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param<E, D>)) {
        f(&self.param)
    }
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(&'a mut Param<E, D>)) {
        f(&mut self.param)
    }
}

/// A Dense layer with bias, `x @ weight + bias` (also the adaLN-zero projections).
#[derive(Clone, Debug)]
pub struct Linear<E: Elem, D: Device<E>> {
    pub weight: Matrix<E, D>,
    pub bias: Vector<E, D>,
}
parameters!(Linear { weight, bias });

/// The class-label input of the conditioning MLP.
#[derive(Clone, Debug)]
pub struct LabelInput<E: Elem, D: Device<E>> {
    /// `cond.label_embed`, `[K, d_c]`.
    pub table: Matrix<E, D>,
    /// `cond.w1_label`, `[d_c, 4 d_c]`.
    pub proj: Matrix<E, D>,
}
parameters!(LabelInput { table, proj });

/// c = Dense(act(emb(t) W_t + emb(label) W_label + b1)) (spec §7.1).
#[derive(Clone, Debug)]
pub struct Conditioning<E: Elem, D: Device<E>> {
    /// `cond.w1_t`: the sinusoidal time embedding's first projection.
    pub time_in: Option<Matrix<E, D>>,
    pub label: Option<LabelInput<E, D>>,
    /// `cond.b1`: the first layer's bias, shared by the time and label inputs.
    pub hidden_bias: Vector<E, D>,
    /// `cond.w2`, `cond.b2`.
    pub out: Linear<E, D>,
}

parameters!(Conditioning {
    time_in,
    label,
    hidden_bias,
    out
});

/// Bias-free q/k/v/o projections of multi-head RoPE attention.
#[derive(Clone, Debug)]
pub struct Attention<E: Elem, D: Device<E>> {
    pub wq: Matrix<E, D>,
    pub wk: Matrix<E, D>,
    pub wv: Matrix<E, D>,
    pub wo: Matrix<E, D>,
}
parameters!(Attention { wq, wk, wv, wo });

/// The gated FFN `W2(act(x W1) ⊙ x W3)`.
#[derive(Clone, Debug)]
pub struct Ffn<E: Elem, D: Device<E>> {
    pub w1: Matrix<E, D>,
    pub w3: Matrix<E, D>,
    pub w2: Matrix<E, D>,
}
parameters!(Ffn { w1, w3, w2 });

/// The two RMSNorm scales of an unconditioned block.
#[derive(Clone, Debug)]
pub struct RmsScales<E: Elem, D: Device<E>> {
    pub attn: Vector<E, D>,
    pub mlp: Vector<E, D>,
}
parameters!(RmsScales { attn, mlp });

/// One pre-norm block; `N` is its normalisation: [`Linear`] (adaLN-zero, 6 modulation vectors)
/// or [`RmsScales`].
#[derive(Clone, Debug)]
pub struct Block<E: Elem, D: Device<E>, N> {
    pub norm: N,
    pub attn: Attention<E, D>,
    pub ffn: Ffn<E, D>,
}

parameters!([D: Device<E>, N: Parameters<E, D>] Block<E, D, N> { norm, attn, ffn });

/// The blocks and the final norm: adaLN-zero throughout when the model is conditioned (on time
/// and/or a class label), RMSNorm throughout otherwise.
#[derive(Clone, Debug)]
pub enum Trunk<E: Elem, D: Device<E>> {
    Conditioned {
        cond: Box<Conditioning<E, D>>,
        blocks: Vec<Block<E, D, Linear<E, D>>>,
        /// `head.ada`: shift and scale of the final LayerNorm.
        head: Linear<E, D>,
    },
    Plain {
        blocks: Vec<Block<E, D, RmsScales<E, D>>>,
        /// `head.norm`.
        head: Vector<E, D>,
    },
}

impl<E: Elem, D: Device<E>> Parameters<E, D> for Trunk<E, D> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(&'a Param<E, D>)) {
        match self {
            Trunk::Conditioned { cond, blocks, head } => {
                cond.visit(f);
                blocks.visit(f);
                head.visit(f);
            }
            Trunk::Plain { blocks, head } => {
                blocks.visit(f);
                head.visit(f);
            }
        }
    }
    fn visit_mut<'a>(&'a mut self, f: &mut dyn FnMut(&'a mut Param<E, D>)) {
        match self {
            Trunk::Conditioned { cond, blocks, head } => {
                cond.visit_mut(f);
                blocks.visit_mut(f);
                head.visit_mut(f);
            }
            Trunk::Plain { blocks, head } => {
                blocks.visit_mut(f);
                head.visit_mut(f);
            }
        }
    }
}

/// Where a new parameter's values come from: `(name, shape, init) → values`, e.g. the seeded
/// initialiser, another model's parameter (a device copy) or a checkpoint's tensor.
pub(crate) type Values<'v, E> =
    dyn FnMut(&str, &[usize], Init) -> Result<Vec<E>, NetworkError> + 'v;

/// Creates a model's parameters in their fixed order, each uploaded once into the kernels'
/// lasting storage ([`Kernels::lasting_tensor`]), so the CPU kernels read it in place.
pub(crate) struct Builder<'a, 'v, E: Elem, D: Kernels<E>> {
    pub(crate) dev: &'a D,
    pub(crate) values: &'a mut Values<'v, E>,
}

impl<E: Elem, D: Kernels<E>> Builder<'_, '_, E, D> {
    fn param(
        &mut self,
        name: String,
        shape: Vec<usize>,
        init: Init,
    ) -> Result<Param<E, D>, NetworkError> {
        let vals = (self.values)(&name, &shape, init)?;
        let value = D::lasting_tensor(self.dev, vals).map_err(NetworkError::device)?;
        Ok(Param { name, shape, value })
    }
    pub(crate) fn vector(
        &mut self,
        name: impl Into<String>,
        n: usize,
        init: Init,
    ) -> Result<Vector<E, D>, NetworkError> {
        Ok(Vector(self.param(name.into(), vec![n], init)?))
    }
    pub(crate) fn matrix(
        &mut self,
        name: impl Into<String>,
        rows: usize,
        cols: usize,
        init: Init,
    ) -> Result<Matrix<E, D>, NetworkError> {
        Ok(Matrix {
            param: self.param(name.into(), vec![rows, cols], init)?,
            rows,
            cols,
        })
    }
    /// The conditioning MLP of spec §7.1, `cond.*` (shared by the transformer, the U-Net and
    /// the U-ViT: one set of tensor names, one construction order).
    pub(crate) fn cond_mlp(
        &mut self,
        cfg: &crate::NetworkConfig,
    ) -> Result<Conditioning<E, D>, NetworkError> {
        let dc = cfg.cond_dim;
        let time_in = if cfg.time_conditioning {
            Some(self.matrix("cond.w1_t", dc, 4 * dc, crate::init::lecun(dc))?)
        } else {
            None
        };
        let label = if cfg.num_classes > 0 {
            let fan_in = if cfg.time_conditioning { 2 * dc } else { dc };
            Some(LabelInput {
                table: self.matrix(
                    "cond.label_embed",
                    cfg.num_classes,
                    dc,
                    Init::Normal(1.0 / (dc as f64).sqrt()),
                )?,
                proj: self.matrix("cond.w1_label", dc, 4 * dc, crate::init::lecun(fan_in))?,
            })
        } else {
            None
        };
        Ok(Conditioning {
            time_in,
            label,
            hidden_bias: self.vector("cond.b1", 4 * dc, Init::Zeros)?,
            out: Linear {
                weight: self.matrix("cond.w2", 4 * dc, dc, crate::init::lecun(4 * dc))?,
                bias: self.vector("cond.b2", dc, Init::Zeros)?,
            },
        })
    }

    pub(crate) fn linear(
        &mut self,
        name: &str,
        (rows, cols): (usize, usize),
        w_init: Init,
        b_init: Init,
    ) -> Result<Linear<E, D>, NetworkError> {
        Ok(Linear {
            weight: self.matrix(format!("{name}.w"), rows, cols, w_init)?,
            bias: self.vector(format!("{name}.b"), cols, b_init)?,
        })
    }
}
