//! The U-ViT image denoiser of MD4's ImageNet 64×64 model (spec §7.4; paper App. J.4; the
//! official `uvit.py` with the DiT of `dit.py`): every channel token of a pixel is embedded
//! (`Embed(V + 1, e)`), the C embeddings of a pixel are concatenated, a 3×3 convolution maps them
//! to `ch` channels; `n_layers` residual blocks at full resolution, each stored; a DiT in the
//! middle; `n_layers + 1` up blocks, each on the concatenation with the matching stored
//! activation; then conditional GroupNorm → swish → a zero-initialised 3×3 convolution to C·V
//! logits per pixel. A fresh model therefore predicts the uniform distribution (paper eq. (2)).
//!
//! * Conditional GroupNorm (`CondGroupNorm`): GroupNorm without affine parameters, then
//!   `·(1 + scale) + shift` with `[scale, shift] = Dense(c)` (zero-initialised weight and bias)
//!   per image, c the conditioning vector of spec §7.1.
//! * ResBlock: CondGroupNorm → swish → Conv3×3 → CondGroupNorm → swish → dropout → Conv3×3
//!   (zero-init) → + the input (through a Dense projection when the channel counts differ).
//! * DiT (Peebles & Xie 2023, as in `dit.py`): patchify with a p×p stride-p convolution (with
//!   bias) into `dit_dim` channels, plus a 2-D sin-cos positional table that is a learnable
//!   parameter initialised with sin-cos; blocks `x += g_a ⊙ Attn(LN(x)·(1 + sc_a) + sh_a)`,
//!   `x += g_m ⊙ MLP(LN(x)·(1 + sc_m) + sh_m)` with `[sh_a, sc_a, g_a, sh_m, sc_m, g_m] =
//!   Dense(swish(c))` zero-initialised (adaLN-Zero), attention with q/k/v biases and a bias-free
//!   output, MLP `fc2(GELU(fc1 x))` of hidden width 4·`dit_dim` with biases; a final adaLN layer
//!   (zero-init shift/scale) and a zero-initialised Dense to p²·ch; unpatchify. Its output
//!   replaces the activation (the DiT is not residual in `uvit.py`).
//!
//! Differences from the official code, each for a stated reason: the DiT LayerNorms use the
//! transformer's fused kernel with ε = 1e-5 (Flax's default there is 1e-6); dropout covers the
//! residual blocks, the attention output (channel-wise, the official `Dropout1d`) and both MLP
//! dropouts, but not the attention probabilities (the fused attention kernel has none, as for the
//! transformer); non-square images get a gh × gw position grid (the official code assumes a
//! square one).
//!
//! Without conditioning (`time_conditioning = false` and no classes: the time-free
//! parameterisation of spec §4.1), as in the official code with `cond = None`: every
//! CondGroupNorm is a plain GroupNorm with learnable scale and bias, and the DiT blocks are
//! pre-RMSNorm (learnable scale; the fused kernel's ε = 1e-5, Flax's default 1e-6) without
//! gates: `x += Attn(RMS(x))`, `x += MLP(RMS(x))`, with a final RMSNorm before the
//! zero-initialised output Dense.
//!
//! Checkpoint names (`{i}` a block index; conv weights `[k, k, in, out]`, Dense `[in, out]`):
//! `embed`, `cond.*` (as the transformer's; conditioned models), `conv_in.{w,b}`, `down.{i}.*`,
//! `dit.patch.{w,b}` (`[p, p, ch, dit_dim]`), `dit.pos` (`[gh·gw, dit_dim]`), per block
//! `dit.blocks.{l}.ada.{w,b}` (conditioned) or `dit.blocks.{l}.{norm_attn,norm_mlp}` (RMSNorm
//! scales, unconditioned), `dit.blocks.{l}.{q,k,v}.{w,b}`, `dit.blocks.{l}.o.w`,
//! `dit.blocks.{l}.{fc1,fc2}.{w,b}`; `dit.final.ada.{w,b}` (conditioned) or `dit.final.norm`,
//! `dit.final.out.{w,b}`, `up.{i}.*`, `out.norm.*`, `out.conv.{w,b}`; a residual block `*` is
//! `norm1.*`, `conv1.{w,b}`, `norm2.*`, `conv2.{w,b}`, and `skip.{w,b}` (up blocks), where a
//! norm `*` is `{w,b}` (the CondGroupNorm Dense, conditioned) or `{scale,bias}` (GroupNorm).

use crate::init::{lecun, Init};
use crate::layers::{channel_dropout, dense, swish, Res, T2, T3};
use crate::modules::{Builder, Conditioning, Linear, Matrix, Parameters, RmsScales, Vector};
use crate::param::Param;
use crate::unet::{
    conv_bias, embed_pixels, keep_mask, skip_add, split_conditioning, u_trunk, Conv,
    GroupNormParams, ResBlock,
};
use crate::{Arch, Elem, Kernels, NetworkConfig, NetworkError};
use dfdx::prelude::*;
use maskdiff_process::DenoiseBatch;
use rand::RngCore;

/// A `CondGroupNorm`: adaptive with conditioning, a plain affine GroupNorm without.
#[derive(Clone, Debug)]
pub enum CondNorm<E: Elem, D: Device<E>> {
    /// Dense(c → 2·channels) giving `[scale, shift]`; zero-initialised.
    Ada(Linear<E, D>),
    /// GroupNorm's own scale (ones) and bias (zeros).
    Affine(GroupNormParams<E, D>),
}

crate::modules::enum_parameters!(CondNorm { Ada, Affine });

/// A DiT block's normalisation: adaLN-Zero, or two RMSNorm scales without conditioning.
#[derive(Clone, Debug)]
pub enum DitNorm<E: Elem, D: Device<E>> {
    /// Dense(swish(c) → 6·dit_dim), zero-initialised: shift/scale/gate of attention and MLP.
    Ada(Linear<E, D>),
    Rms(RmsScales<E, D>),
}

/// The DiT's final normalisation: adaLN (zero-init shift/scale) or an RMSNorm scale.
#[derive(Clone, Debug)]
pub enum FinalNorm<E: Elem, D: Device<E>> {
    /// Dense(swish(c) → 2·dit_dim), zero-initialised.
    Ada(Linear<E, D>),
    Rms(Vector<E, D>),
}

crate::modules::enum_parameters!(DitNorm { Ada, Rms });
crate::modules::enum_parameters!(FinalNorm { Ada, Rms });

/// A residual block with conditional GroupNorms (see the module docs; `cond` is always
/// `None`).
pub type UvitResBlock<E, D> = ResBlock<E, D, CondNorm<E, D>>;

/// One DiT block with adaLN-Zero conditioning.
#[derive(Clone, Debug)]
pub struct DitBlock<E: Elem, D: Device<E>> {
    pub norm: DitNorm<E, D>,
    pub q: Linear<E, D>,
    pub k: Linear<E, D>,
    pub v: Linear<E, D>,
    /// The attention's output projection (no bias, as `dit.py`).
    pub o: Matrix<E, D>,
    pub fc1: Linear<E, D>,
    pub fc2: Linear<E, D>,
}

/// The DiT middle of the U-ViT.
#[derive(Clone, Debug)]
pub struct Dit<E: Elem, D: Device<E>> {
    /// The p×p stride-p patch convolution, `[p, p, ch, dit_dim]` read as `(p²·ch, dit_dim)`.
    pub patch: Linear<E, D>,
    /// `[gh·gw, dit_dim]`, initialised with the 2-D sin-cos table ([`sincos_2d`]), learnable.
    pub pos: Matrix<E, D>,
    pub blocks: Vec<DitBlock<E, D>>,
    pub final_norm: FinalNorm<E, D>,
    /// Dense(dit_dim → p²·ch), zero-initialised.
    pub final_out: Linear<E, D>,
}

crate::modules::parameters!(DitBlock {
    norm,
    q,
    k,
    v,
    o,
    fc1,
    fc2
});
crate::modules::parameters!(Dit {
    patch,
    pos,
    blocks,
    final_norm,
    final_out
});

/// The U-ViT denoiser with run-time shapes, generic over element type and device.
#[derive(Clone, Debug)]
pub struct Uvit<E: Elem, D: Kernels<E>> {
    cfg: NetworkConfig,
    /// `embed`: `[V + 1, e]` per channel token.
    pub embed: Matrix<E, D>,
    /// The conditioning MLP of spec §7.1 (absent without time and label conditioning).
    pub cond: Option<Conditioning<E, D>>,
    pub conv_in: Conv<E, D>,
    pub down: Vec<UvitResBlock<E, D>>,
    pub dit: Dit<E, D>,
    pub up: Vec<UvitResBlock<E, D>>,
    pub out_norm: CondNorm<E, D>,
    /// Zero-initialised: a fresh model outputs all-zero logits.
    pub out_conv: Conv<E, D>,
    dev: D,
}

crate::modules::parameters!([D: Kernels<E>] Uvit<E, D> {
    embed, cond, conv_in, down, dit, up, out_norm, out_conv
});

/// The U-ViT's shape parameters, read from [`Arch::Uvit`].
#[derive(Clone, Copy, Debug)]
struct Shape {
    h: usize,
    w: usize,
    channels: usize,
    groups: usize,
    patch: usize,
    dit_layers: usize,
    dit_heads: usize,
    dit_dim: usize,
}

fn shape(cfg: &NetworkConfig) -> Result<Shape, NetworkError> {
    match cfg.arch {
        Arch::Uvit {
            height,
            width,
            channels,
            groups,
            patch,
            dit_layers,
            dit_heads,
            dit_dim,
        } => Ok(Shape {
            h: height,
            w: width,
            channels,
            groups,
            patch,
            dit_layers,
            dit_heads,
            dit_dim,
        }),
        _ => Err(NetworkError::Config("not a U-ViT configuration".into())),
    }
}

/// The 2-D sin-cos positional table of `dit.py` (MAE's `get_2d_sincos_pos_embed`), row-major
/// `[gh·gw, d]`: for the token at grid row i and column j, `[sin(j·ω), cos(j·ω), sin(i·ω),
/// cos(i·ω)]`, each block d/4 wide, ω_k = 10000^(−k/(d/4)). (The official code meshes
/// `(grid_w, grid_h)` and puts the column coordinate first.) `d` must be a multiple of 4.
pub fn sincos_2d(gh: usize, gw: usize, d: usize) -> Vec<f64> {
    let q = d / 4;
    let mut out = Vec::with_capacity(gh * gw * d);
    for i in 0..gh {
        for j in 0..gw {
            for pos in [j as f64, i as f64] {
                let ang = |k: usize| pos / 10_000f64.powf(k as f64 / q as f64);
                out.extend((0..q).map(|k| ang(k).sin()));
                out.extend((0..q).map(|k| ang(k).cos()));
            }
        }
    }
    out
}

/// Row permutation from image pixels (b·h·w rows) to patch order: row `(token·p + py)·p + px`
/// of the result is pixel `(gy·p + py, gx·p + px)` of the token's image, tokens `(n, gy, gx)`
/// row-major — so reshaping to `(b·N, p²·C)` gives each token its `[p, p, C]` patch.
fn patch_rows(b: usize, h: usize, w: usize, p: usize) -> Vec<usize> {
    let (gh, gw) = (h / p, w / p);
    let mut rows = Vec::with_capacity(b * h * w);
    for n in 0..b {
        for gy in 0..gh {
            for gx in 0..gw {
                for py in 0..p {
                    for px in 0..p {
                        rows.push((n * h + gy * p + py) * w + gx * p + px);
                    }
                }
            }
        }
    }
    rows
}

/// The inverse of [`patch_rows`]: for each pixel (row-major), its row in patch order.
fn unpatch_rows(b: usize, h: usize, w: usize, p: usize) -> Vec<usize> {
    let fwd = patch_rows(b, h, w, p);
    let mut inv = vec![0; fwd.len()];
    for (r, &px) in fwd.iter().enumerate() {
        inv[px] = r;
    }
    inv
}

impl<E: Elem, D: Kernels<E>> Builder<'_, '_, E, D> {
    /// A CondGroupNorm over `c` channels: zero-initialised Dense(d_c → 2c) when conditioned
    /// (`dc` given), GroupNorm scale and bias otherwise.
    fn cond_norm(
        &mut self,
        name: &str,
        c: usize,
        dc: Option<usize>,
    ) -> Result<CondNorm<E, D>, NetworkError> {
        Ok(match dc {
            Some(dc) => CondNorm::Ada(self.linear(name, (dc, 2 * c), Init::Zeros, Init::Zeros)?),
            None => CondNorm::Affine(self.group_norm(name, c)?),
        })
    }

    fn uvit_block(
        &mut self,
        name: &str,
        dims: (usize, usize),
        dc: Option<usize>,
    ) -> Result<UvitResBlock<E, D>, NetworkError> {
        self.res_block_with(name, dims, None, |b, name, c| b.cond_norm(name, c, dc))
    }

    fn dit(&mut self, s: &Shape, ch: usize, dc: Option<usize>) -> Result<Dit<E, D>, NetworkError> {
        let (p, d) = (s.patch, s.dit_dim);
        let hidden = 4 * d;
        let patch = self.linear("dit.patch", (p * p * ch, d), lecun(p * p * ch), Init::Zeros)?;
        // `Uvit::new` fills this tensor with `sincos_2d` (by name); Zeros is only nominal.
        let pos = self.matrix("dit.pos", (s.h / p) * (s.w / p), d, Init::Zeros)?;
        let blocks = (0..s.dit_layers)
            .map(|l| {
                let n = |x: &str| format!("dit.blocks.{l}.{x}");
                let norm = match dc {
                    Some(dc) => DitNorm::Ada(self.linear(
                        &n("ada"),
                        (dc, 6 * d),
                        Init::Zeros,
                        Init::Zeros,
                    )?),
                    None => DitNorm::Rms(RmsScales {
                        attn: self.vector(n("norm_attn"), d, Init::Ones)?,
                        mlp: self.vector(n("norm_mlp"), d, Init::Ones)?,
                    }),
                };
                Ok(DitBlock {
                    norm,
                    q: self.linear(&n("q"), (d, d), lecun(d), Init::Zeros)?,
                    k: self.linear(&n("k"), (d, d), lecun(d), Init::Zeros)?,
                    v: self.linear(&n("v"), (d, d), lecun(d), Init::Zeros)?,
                    o: self.matrix(n("o.w"), d, d, lecun(d))?,
                    fc1: self.linear(&n("fc1"), (d, hidden), lecun(d), Init::Zeros)?,
                    fc2: self.linear(&n("fc2"), (hidden, d), lecun(hidden), Init::Zeros)?,
                })
            })
            .collect::<Result<Vec<_>, NetworkError>>()?;
        let final_norm = match dc {
            Some(dc) => FinalNorm::Ada(self.linear(
                "dit.final.ada",
                (dc, 2 * d),
                Init::Zeros,
                Init::Zeros,
            )?),
            None => FinalNorm::Rms(self.vector("dit.final.norm", d, Init::Ones)?),
        };
        Ok(Dit {
            patch,
            pos,
            blocks,
            final_norm,
            final_out: self.linear("dit.final.out", (d, p * p * ch), Init::Zeros, Init::Zeros)?,
        })
    }
}

/// A per-image (shift, scale) pair of adaLN modulation vectors.
type ShiftScale<E, D, T> = (T2<E, D, T>, T2<E, D, T>);

/// What the forward pass needs besides the parameters.
struct Ctx<'a, E: Elem, D: Kernels<E>> {
    b: usize,
    s: Shape,
    /// The conditioning vector c and swish(c), tape-free (their ops travel separately; the
    /// gradients of every use meet on their ids); `None` without conditioning.
    c: Option<(T2<E, D>, T2<E, D>)>,
    dropout: Option<(f64, &'a mut dyn RngCore)>,
}

impl<E: Elem, D: Kernels<E>> Ctx<'_, E, D> {
    /// An inverted-dropout keep mask of `shape`, values 0 or 1/(1 − p), if dropout is on.
    fn mask(&mut self, dev: &D, shape: (usize, usize)) -> Res<Option<T2<E, D>>, D> {
        let Some((p, rng)) = self.dropout.as_mut() else {
            return Ok(None);
        };
        let m = keep_mask(*p, &mut **rng, shape.0 * shape.1);
        Ok(Some(dev.try_tensor_from_vec(m, shape)?))
    }

    /// Element-wise inverted dropout (Flax `nn.Dropout`).
    fn dropout<T: Tape<E, D>>(&mut self, dev: &D, y: T2<E, D, T>) -> Res<T2<E, D, T>, D> {
        let s = *y.shape();
        match self.mask(dev, s)? {
            Some(m) => y.try_mul(m),
            None => Ok(y),
        }
    }
}

impl<E: Elem, D: Kernels<E>> Uvit<E, D> {
    /// Initialise every parameter on the host in f64 from `seed` (the positional table with
    /// its sin-cos values), then upload.
    pub fn new(cfg: NetworkConfig, dev: &D, seed: u64) -> Result<Self, NetworkError> {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let s = shape(&cfg)?;
        Self::build(cfg, dev, &mut |name, shape, init| {
            if name == "dit.pos" {
                let table = sincos_2d(s.h / s.patch, s.w / s.patch, s.dit_dim);
                debug_assert_eq!(table.len(), shape.iter().product::<usize>());
                return Ok(table.into_iter().map(E::c).collect());
            }
            let n: usize = shape.iter().product();
            Ok(init.sample(n, &mut rng).into_iter().map(E::c).collect())
        })
    }

    /// The model of `cfg` with each parameter's values from `values`, called once per tensor
    /// in the fixed order of the checkpoint names.
    pub(crate) fn build(
        cfg: NetworkConfig,
        dev: &D,
        values: &mut crate::modules::Values<'_, E>,
    ) -> Result<Self, NetworkError> {
        cfg.validate()?;
        let s = shape(&cfg)?;
        let mut b = Builder { dev, values };
        let (ch, dc, v) = (cfg.dim, cfg.cond_dim, cfg.vocab_size);
        let e = cfg.embed_dim.expect("validated: the U-ViT has embed_dim");
        // N(0, 1/e), as the transformer's and the U-Net's embedding
        let embed = b.matrix("embed", v + 1, e, Init::Normal(1.0 / (e as f64).sqrt()))?;
        let cond = if cfg.is_conditioned() {
            Some(b.cond_mlp(&cfg)?)
        } else {
            None
        };
        let dc = cond.is_some().then_some(dc);
        let conv_in = b.conv("conv_in", (s.channels * e, ch), false)?;
        let down = (0..cfg.n_layers)
            .map(|i| b.uvit_block(&format!("down.{i}"), (ch, ch), dc))
            .collect::<Result<Vec<_>, _>>()?;
        let dit = b.dit(&s, ch, dc)?;
        let up = (0..=cfg.n_layers)
            .map(|i| b.uvit_block(&format!("up.{i}"), (2 * ch, ch), dc))
            .collect::<Result<Vec<_>, _>>()?;
        let out_norm = b.cond_norm("out.norm", ch, dc)?;
        let out_conv = b.conv("out.conv", (ch, s.channels * v), true)?;
        Ok(Uvit {
            cfg,
            embed,
            cond,
            conv_in,
            down,
            dit,
            up,
            out_norm,
            out_conv,
            dev: dev.clone(),
        })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// All parameters in their fixed order (their names are the checkpoint keys).
    pub fn params(&self) -> Vec<&Param<E, D>> {
        let mut out = Vec::new();
        self.visit(&mut |p| out.push(p));
        out
    }

    pub fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }

    /// Logits (batch, h·w·C, V); `dropout_rng` switches dropout on (training). The input is
    /// checked by the caller ([`crate::Network::forward`]).
    pub(crate) fn forward_impl<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        dropout_rng: Option<&mut dyn RngCore>,
    ) -> Res<T3<E, D, T>, D> {
        let s = shape(&self.cfg).expect("a U-ViT configuration");
        let b = batch.batch;
        let v = self.cfg.vocab_size;
        let scope = D::scope();
        let (c, cond_tape) =
            split_conditioning::<E, D, T>(&self.dev, &self.cond, batch, self.cfg.cond_dim)?;
        let (c, cond_tape) = match c {
            Some(c) => {
                let (c_act, t2) = swish(c.clone().put_tape(T::default()))?.split_tape();
                (Some((c, c_act)), cond_tape.merge(t2))
            }
            None => (None, cond_tape),
        };
        let p = self.cfg.dropout;
        let mut ctx = Ctx {
            b,
            s,
            c,
            dropout: dropout_rng.filter(|_| p > 0.0).map(|r| (p, r)),
        };
        let pixels = b * s.h * s.w;
        let x = embed_pixels(&self.dev, &self.embed, batch, tape, (pixels, s.channels))?;
        let x = self.conv(x, &self.conv_in, &ctx)?;
        let hcur = u_trunk(
            x,
            (&self.down, &self.up),
            &mut ctx,
            (&scope, true),
            |x, blk, ctx| self.res_block(x, blk, ctx),
            // the DiT prunes a frame of its own, so `scope` keeps the stored activations
            |x, ctx| self.dit_forward(x, ctx, &D::scope()),
        )?;
        let y = swish(self.cond_norm(hcur, &self.out_norm, &ctx)?)?;
        let logits = self.conv(y, &self.out_conv, &ctx)?;
        let (logits, t) = logits.split_tape();
        logits
            .put_tape(t.merge(cond_tape))
            .try_reshape_like(&(b, s.h * s.w * s.channels, v))
    }

    /// 3×3 "same" convolution with bias over (b·h·w, in) pixels.
    fn conv<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        conv: &Conv<E, D>,
        ctx: &Ctx<'_, E, D>,
    ) -> Res<T2<E, D, T>, D> {
        conv_bias(x, conv, (ctx.b, ctx.s.h, ctx.s.w))
    }

    /// `CondGroupNorm`: GroupNorm without affine parameters, then `·(1 + scale) + shift` per
    /// image with `[scale, shift] = Dense(c)` (scale first, as `jnp.split` in `uvit.py`); a
    /// plain GroupNorm without conditioning.
    fn cond_norm<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        norm: &CondNorm<E, D>,
        ctx: &Ctx<'_, E, D>,
    ) -> Res<T2<E, D, T>, D> {
        let (proj, (c, _)) = match (norm, &ctx.c) {
            (CondNorm::Ada(proj), Some(c)) => (proj, c),
            (CondNorm::Affine(g), _) => {
                return D::group_norm(x, g.scale.tensor(), g.bias.tensor(), ctx.b, ctx.s.groups)
            }
            (CondNorm::Ada(_), None) => unreachable!("adaptive norms exist with conditioning"),
        };
        let ch = x.shape().1;
        let m = dense(
            c.clone().put_tape(T::default()),
            proj.weight.tensor()?,
            Some(proj.bias.tensor()),
        )?;
        // one copy carries the projection's ops, the other an empty tape (gradients meet on
        // the shared id)
        let scale = m.retaped::<T>().try_slice((.., 0..ch))?;
        let shift = m.try_slice((.., ch..2 * ch))?;
        let ones = self.dev.try_ones_like(&(ch,))?;
        let zeros = self.dev.try_zeros_like(&(ch,))?;
        let y = D::group_norm(x, ones, zeros, ctx.b, ctx.s.groups)?;
        D::modulate(y, shift, scale, ctx.b, ctx.s.h * ctx.s.w)
    }

    fn res_block<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        blk: &UvitResBlock<E, D>,
        ctx: &mut Ctx<'_, E, D>,
    ) -> Res<T2<E, D, T>, D> {
        let y = swish(self.cond_norm(x.retaped::<T>(), &blk.norm1, ctx)?)?;
        let y = self.conv(y, &blk.conv1, ctx)?;
        let y = swish(self.cond_norm(y, &blk.norm2, ctx)?)?;
        let y = ctx.dropout(&self.dev, y)?;
        let y = self.conv(y, &blk.conv2, ctx)?;
        skip_add(x, &blk.skip, y)
    }

    /// `k` per-image modulation vectors `Dense(swish(c))` split into (b, width) chunks; the
    /// first carries the projection's ops, the others empty tapes.
    fn ada<T: Tape<E, D>>(
        &self,
        proj: &Linear<E, D>,
        k: usize,
        ctx: &Ctx<'_, E, D>,
    ) -> Res<Vec<T2<E, D, T>>, D> {
        let d = ctx.s.dit_dim;
        let (_, c_act) = ctx.c.as_ref().expect("adaLN exists with conditioning");
        let m = dense(
            c_act.clone().put_tape(T::default()),
            proj.weight.tensor()?,
            Some(proj.bias.tensor()),
        )?;
        let mut out = Vec::with_capacity(k);
        for i in 1..k {
            out.push(m.retaped::<T>().try_slice((.., i * d..(i + 1) * d))?);
        }
        out.insert(0, m.try_slice((.., 0..d))?);
        Ok(out)
    }

    /// The DiT middle: (b·h·w, ch) pixels → tokens → blocks → (b·h·w, ch) pixels.
    fn dit_forward<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        ctx: &mut Ctx<'_, E, D>,
        scope: &crate::KernelScope,
    ) -> Res<T2<E, D, T>, D> {
        let (b, s) = (ctx.b, ctx.s);
        let (p, d, heads) = (s.patch, s.dit_dim, s.dit_heads);
        let ch = x.shape().1;
        let n = (s.h / p) * (s.w / p);
        let hd = d / heads;
        let dit = &self.dit;
        let idx = self
            .dev
            .try_tensor_from_vec(patch_rows(b, s.h, s.w, p), (b * s.h * s.w,))?;
        let patches: T2<E, D, T> = x.try_gather(idx)?;
        let patches = patches.try_reshape_like(&(b * n, p * p * ch))?;
        let tok = dense(
            patches,
            dit.patch.weight.tensor()?,
            Some(dit.patch.bias.tensor()),
        )?;
        let s3 = (b, n, d);
        let pos = dit.pos.tensor()?.try_broadcast_like::<_, Axis<0>>(&s3)?;
        let mut h = tok
            .try_reshape_like(&s3)?
            .try_add(pos)?
            .try_reshape_like(&(b * n, d))?;
        let scale = E::c(1.0 / (hd as f64).sqrt());
        let proj = |z: T2<E, D, T>, l: &Linear<E, D>| -> Res<T2<E, D, T>, D> {
            dense(z, l.weight.tensor()?, Some(l.bias.tensor()))
        };
        // adaLN: LN then modulation; unconditioned: RMSNorm with its scale
        let pre_norm = |x: T2<E, D, T>,
                        m: Option<ShiftScale<E, D, T>>,
                        rms: Option<&Vector<E, D>>|
         -> Res<T2<E, D, T>, D> {
            match (m, rms) {
                (Some((shift, scale)), _) => D::norm_modulate(x, shift, scale, b, n),
                (None, Some(r)) => D::rms_norm(x, r.tensor()),
                (None, None) => unreachable!("a DiT block has adaLN or RMSNorm scales"),
            }
        };
        let residual =
            |h: T2<E, D, T>, y: T2<E, D, T>, gate: Option<T2<E, D, T>>| -> Res<T2<E, D, T>, D> {
                match gate {
                    Some(g) => D::gated_residual(h, y, g, b, n),
                    None => D::residual(h, y),
                }
            };
        for blk in &dit.blocks {
            // [sh_a, sc_a, g_a, sh_m, sc_m, g_m] with adaLN-Zero; RMSNorm scales otherwise
            let (ada, rms) = match &blk.norm {
                DitNorm::Ada(l) => {
                    let mut m = self.ada::<T>(l, 6, ctx)?.into_iter();
                    let mut take = || m.next().expect("6 modulation chunks");
                    let (sh_a, sc_a, g_a) = (take(), take(), take());
                    let (sh_m, sc_m, g_m) = (take(), take(), take());
                    (Some(((sh_a, sc_a), g_a, (sh_m, sc_m), g_m)), None)
                }
                DitNorm::Rms(r) => (None, Some(r)),
            };
            let (mod_a, g_a, mod_m, g_m) = match ada {
                Some((ma, ga, mm, gm)) => (Some(ma), Some(ga), Some(mm), Some(gm)),
                None => (None, None, None, None),
            };
            // attention
            let a = pre_norm(h.retaped::<T>(), mod_a, rms.map(|r| &r.attn))?;
            let q = proj(a.retaped::<T>(), &blk.q)?
                .try_mul(scale)?
                .try_reshape_like(&(b, n, heads, hd))?;
            let k = proj(a.retaped::<T>(), &blk.k)?.try_reshape_like(&(b, n, heads, hd))?;
            let v = proj(a, &blk.v)?.try_reshape_like(&(b, n, heads, hd))?;
            let o = D::matmul(D::attention(q, k, v)?, blk.o.tensor()?)?;
            let mask = ctx.mask(&self.dev, (b, d))?;
            let o = channel_dropout(o, mask, b, n)?;
            h = residual(h, o, g_a)?;
            D::retain(scope, &h);
            // MLP
            let f = pre_norm(h.retaped::<T>(), mod_m, rms.map(|r| &r.mlp))?;
            let f = proj(f, &blk.fc1)?.try_fast_gelu()?;
            let f = ctx.dropout(&self.dev, f)?;
            let f = proj(f, &blk.fc2)?;
            let f = ctx.dropout(&self.dev, f)?;
            h = residual(h, f, g_m)?;
            D::retain(scope, &h);
        }
        let y = match &dit.final_norm {
            FinalNorm::Ada(l) => {
                let mut m = self.ada::<T>(l, 2, ctx)?.into_iter();
                let (sh, sc) = (m.next().expect("shift"), m.next().expect("scale"));
                pre_norm(h, Some((sh, sc)), None)?
            }
            FinalNorm::Rms(r) => pre_norm(h, None, Some(r))?,
        };
        let out = dense(
            y,
            dit.final_out.weight.tensor()?,
            Some(dit.final_out.bias.tensor()),
        )?
        .try_reshape_like(&(b * s.h * s.w, ch))?;
        let idx = self
            .dev
            .try_tensor_from_vec(unpatch_rows(b, s.h, s.w, p), (b * s.h * s.w,))?;
        out.try_gather(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_rows_invert_and_group_patches() {
        let (b, h, w, p) = (2, 4, 6, 2);
        let fwd = patch_rows(b, h, w, p);
        let inv = unpatch_rows(b, h, w, p);
        for (pix, &r) in inv.iter().enumerate() {
            assert_eq!(fwd[r], pix);
        }
        // a 2 × 3 token grid: token (n = 1, gy = 1, gx = 2), tap (py = 1, px = 0) is pixel
        // (n = 1, y = 3, x = 4)
        let token = (2 + 1) * 3 + 2;
        assert_eq!(fwd[(token * p + 1) * p], (4 + 3) * w + 4);
    }

    #[test]
    fn sincos_table_matches_the_formula() {
        // d = 8: q = 2, ω = [1, 1/100]; token at row 1, column 2 of a 2 × 3 grid
        let t = sincos_2d(2, 3, 8);
        assert_eq!(t.len(), 6 * 8);
        let row = &t[(3 + 2) * 8..(3 + 3) * 8];
        let want = [
            2f64.sin(),
            0.02f64.sin(),
            2f64.cos(),
            0.02f64.cos(),
            1f64.sin(),
            0.01f64.sin(),
            1f64.cos(),
            0.01f64.cos(),
        ];
        for (a, e) in row.iter().zip(want) {
            assert!((a - e).abs() < 1e-15, "{a} vs {e}");
        }
    }
}
