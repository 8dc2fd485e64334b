//! The VDM-style U-Net image denoiser of MD4's CIFAR-10 model (spec §7.3; paper App. J.4; the
//! official `unet.py`, which adapts VDM's `model_vdm.py`): every channel token of a pixel is
//! embedded (`Embed(V + 1, e)`), the C embeddings of a pixel are concatenated, a 3×3 convolution
//! maps them to `ch` channels; `n_layers` residual blocks at full resolution (no down-sampling),
//! each stored; a middle of ResBlock → single-head self-attention → ResBlock; `n_layers + 1` up
//! blocks, each on the concatenation with the matching stored activation; then GroupNorm →
//! swish → a zero-initialised 3×3 convolution to C·V logits per pixel.
//!
//! ResBlock: GroupNorm → swish → Conv3×3 → + Dense(c) (no bias, zero-init) → GroupNorm → swish →
//! dropout → Conv3×3 (zero-init) → + the input (through a Dense projection when the channel
//! counts differ). The conditioning vector c is the MLP of spec §7.1 over the time (and label)
//! embedding. Since the output convolution is zero-initialised, a fresh model predicts the
//! uniform distribution (paper eq. (2), §11).
//!
//! Checkpoint names (`{i}` a block index; conv weights `[3, 3, in, out]`, Dense `[in, out]`):
//! `embed`, `cond.*` (as the transformer's), `conv_in.{w,b}`, `down.{i}.*`, `mid.0.*`,
//! `mid.attn.{norm.scale,norm.bias,q.w,q.b,k.w,k.b,v.w,v.b,o.w,o.b}`, `mid.1.*`, `up.{i}.*`,
//! `out.norm.{scale,bias}`, `out.conv.{w,b}`; a block `*` is `norm1.{scale,bias}`,
//! `conv1.{w,b}`, `cond.w` (conditioned models), `norm2.{scale,bias}`, `conv2.{w,b}`, and
//! `skip.{w,b}` (up blocks).

use crate::init::{lecun, Init};
use crate::layers::{dense, Res, T2, T3};
use crate::modules::{Builder, Conditioning, Linear, Matrix, Parameters, Vector};
use crate::param::Param;
use crate::unet_layers::conditioning;
use crate::{Arch, Elem, Kernels, NetworkConfig, NetworkError};
use dfdx::prelude::*;
use maskdiff_process::DenoiseBatch;
use rand::RngCore;

/// GroupNorm's affine parameters.
#[derive(Clone, Debug)]
pub struct GroupNormParams<E: Elem, D: Device<E>> {
    pub scale: Vector<E, D>,
    pub bias: Vector<E, D>,
}

/// A 3×3 convolution: weight `[3, 3, in, out]` (read as `(9·in, out)`) and bias.
#[derive(Clone, Debug)]
pub struct Conv<E: Elem, D: Device<E>> {
    pub weight: Matrix<E, D>,
    pub bias: Vector<E, D>,
}

/// One residual block (see the module docs), with GroupNorms `N`: the U-Net's affine ones, or
/// the U-ViT's conditional ones ([`crate::uvit::CondNorm`]).
#[derive(Clone, Debug)]
pub struct ResBlock<E: Elem, D: Device<E>, N = GroupNormParams<E, D>> {
    /// The first GroupNorm (over the input channels).
    pub norm1: N,
    pub conv1: Conv<E, D>,
    /// Dense(c → out), no bias, zero-initialised (conditioned U-Nets only; the U-ViT is
    /// conditioned through its norms).
    pub cond: Option<Matrix<E, D>>,
    /// The second GroupNorm (over the output channels).
    pub norm2: N,
    /// Zero-initialised, so a fresh block is the identity (or its skip projection).
    pub conv2: Conv<E, D>,
    /// Dense(in → out) with bias when the channel counts differ (the up blocks).
    pub skip: Option<Linear<E, D>>,
}

/// Single-head self-attention over all pixels with a GroupNorm in front and a residual
/// (Flax `MultiHeadDotProductAttention`: q/k/v/o projections with biases).
#[derive(Clone, Debug)]
pub struct SelfAttention<E: Elem, D: Device<E>> {
    pub norm: GroupNormParams<E, D>,
    pub q: Linear<E, D>,
    pub k: Linear<E, D>,
    pub v: Linear<E, D>,
    pub o: Linear<E, D>,
}

crate::modules::parameters!(GroupNormParams { scale, bias });
crate::modules::parameters!(Conv { weight, bias });
crate::modules::parameters!([D: Device<E>, N: Parameters<E, D>] ResBlock<E, D, N> {
    norm1, conv1, cond, norm2, conv2, skip
});
crate::modules::parameters!(SelfAttention { norm, q, k, v, o });

/// The U-Net denoiser with run-time shapes, generic over element type and device.
#[derive(Clone, Debug)]
pub struct UNet<E: Elem, D: Kernels<E>> {
    cfg: NetworkConfig,
    /// `embed`: `[V + 1, e]` per channel token.
    pub embed: Matrix<E, D>,
    pub cond: Option<Conditioning<E, D>>,
    pub conv_in: Conv<E, D>,
    pub down: Vec<ResBlock<E, D>>,
    pub mid: (ResBlock<E, D>, SelfAttention<E, D>, ResBlock<E, D>),
    pub up: Vec<ResBlock<E, D>>,
    pub out_norm: GroupNormParams<E, D>,
    /// Zero-initialised: a fresh model outputs all-zero logits.
    pub out_conv: Conv<E, D>,
    dev: D,
}

crate::modules::parameters!([D: Kernels<E>] UNet<E, D> {
    embed, cond, conv_in, down, mid.0, mid.1, mid.2, up, out_norm, out_conv
});

impl<E: Elem, D: Kernels<E>> Builder<'_, '_, E, D> {
    pub(crate) fn group_norm(
        &mut self,
        name: &str,
        c: usize,
    ) -> Result<GroupNormParams<E, D>, NetworkError> {
        Ok(GroupNormParams {
            scale: self.vector(format!("{name}.scale"), c, Init::Ones)?,
            bias: self.vector(format!("{name}.bias"), c, Init::Zeros)?,
        })
    }
    pub(crate) fn conv(
        &mut self,
        name: &str,
        (cin, cout): (usize, usize),
        zero: bool,
    ) -> Result<Conv<E, D>, NetworkError> {
        let init = if zero { Init::Zeros } else { lecun(9 * cin) };
        Ok(Conv {
            weight: self.matrix(format!("{name}.w"), 9 * cin, cout, init)?,
            bias: self.vector(format!("{name}.b"), cout, Init::Zeros)?,
        })
    }
    fn res_block(
        &mut self,
        name: &str,
        dims: (usize, usize),
        cond_dim: Option<usize>,
    ) -> Result<ResBlock<E, D>, NetworkError> {
        self.res_block_with(name, dims, cond_dim, |b, name, c| b.group_norm(name, c))
    }
    /// A residual block (parameters in checkpoint order) whose GroupNorms `norm(self, name, c)`
    /// builds; `cond_dim`: the U-Net's Dense(c → out).
    pub(crate) fn res_block_with<N>(
        &mut self,
        name: &str,
        (cin, cout): (usize, usize),
        cond_dim: Option<usize>,
        mut norm: impl FnMut(&mut Self, &str, usize) -> Result<N, NetworkError>,
    ) -> Result<ResBlock<E, D, N>, NetworkError> {
        Ok(ResBlock {
            norm1: norm(self, &format!("{name}.norm1"), cin)?,
            conv1: self.conv(&format!("{name}.conv1"), (cin, cout), false)?,
            cond: match cond_dim {
                Some(dc) => Some(self.matrix(format!("{name}.cond.w"), dc, cout, Init::Zeros)?),
                None => None,
            },
            norm2: norm(self, &format!("{name}.norm2"), cout)?,
            conv2: self.conv(&format!("{name}.conv2"), (cout, cout), true)?,
            skip: self.res_skip(name, (cin, cout))?,
        })
    }
    /// A residual block's `{name}.skip` Dense(in → out) with bias, when the channel counts
    /// differ.
    pub(crate) fn res_skip(
        &mut self,
        name: &str,
        (cin, cout): (usize, usize),
    ) -> Result<Option<Linear<E, D>>, NetworkError> {
        Ok(if cin != cout {
            Some(self.linear(
                &format!("{name}.skip"),
                (cin, cout),
                lecun(cin),
                Init::Zeros,
            )?)
        } else {
            None
        })
    }
}

/// 3×3 "same" convolution with bias over (b·h·w, in) pixels.
pub(crate) fn conv_bias<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    x: T2<E, D, T>,
    conv: &Conv<E, D>,
    (b, h, w): (usize, usize, usize),
) -> Res<T2<E, D, T>, D> {
    D::conv3x3_bias(x, conv.weight.tensor()?, conv.bias.tensor(), b, h, w)
}

/// An inverted-dropout keep mask of `n` values, 0 (probability p) or 1/(1 − p): one `u64`
/// drawn from `rng` keys a ChaCha stream per chunk of [`MASK_CHUNK`] values (the key is the
/// draw and the chunk's index), each value dropped when its stream's next `u32`, read as u/2³²,
/// is below p. The chunks are filled in parallel; the mask depends on the draw alone, not on the
/// thread count.
pub(crate) fn keep_mask<E: Elem>(p: f64, rng: &mut dyn RngCore, n: usize) -> Vec<E> {
    use rand::{Rng, SeedableRng};
    use rayon::prelude::*;
    let seed = rng.next_u64();
    let keep = E::c(1.0 / (1.0 - p));
    // u·2⁻³² ≥ p ⟺ u ≥ ⌈p·2³²⌉ for an integer u (p·2³² exact in f64)
    let least = (p * (1u64 << 32) as f64).ceil() as u64;
    let mut mask: Vec<E> = Vec::with_capacity(n);
    mask.spare_capacity_mut()[..n]
        .par_chunks_mut(MASK_CHUNK)
        .enumerate()
        .for_each(|(k, chunk)| {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&seed.to_le_bytes());
            key[8..16].copy_from_slice(&(k as u64).to_le_bytes());
            let mut stream = rand::rngs::StdRng::from_seed(key);
            // the stream's u32s in order, a block at a time (the words next_u32 would return);
            // a select per value, no branch to mispredict
            let mut u = [0u32; 1024];
            for part in chunk.chunks_mut(u.len()) {
                let u = &mut u[..part.len()];
                stream.fill(u);
                for (v, &u) in part.iter_mut().zip(u.iter()) {
                    v.write(if u64::from(u) >= least {
                        keep
                    } else {
                        E::zero()
                    });
                }
            }
        });
    // SAFETY: the chunks tile the n spare slots and every slot of each was written above.
    unsafe { mask.set_len(n) };
    mask
}

/// Values per dropout-mask stream (see [`keep_mask`]).
const MASK_CHUNK: usize = 1 << 14;

/// A residual block's output: the input (through the skip projection when present) + y.
pub(crate) fn skip_add<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    x: T2<E, D, T>,
    skip: &Option<Linear<E, D>>,
    y: T2<E, D, T>,
) -> Res<T2<E, D, T>, D> {
    let x = match skip {
        Some(lin) => dense(x, lin.weight.tensor()?, Some(lin.bias.tensor()))?,
        None => x,
    };
    D::residual(x, y)
}

/// The pixel embedding: every channel token embedded, the C embeddings of a pixel concatenated
/// into one `(pixels, C·e)` row.
pub(crate) fn embed_pixels<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    dev: &D,
    embed: &Matrix<E, D>,
    batch: &DenoiseBatch<'_>,
    tape: T,
    (pixels, channels): (usize, usize),
) -> Res<T2<E, D, T>, D> {
    let ids = dev.try_tensor_from_vec(
        batch.ids.iter().map(|&i| i as usize).collect(),
        (pixels * channels,),
    )?;
    let x: T2<E, D, T> = embed.tensor()?.put_tape(tape).try_gather(ids)?;
    x.try_reshape_like(&(pixels, channels * embed.cols()))
}

/// The conditioning vector c tape-free (its uses' gradients meet on its id) and the tape of
/// its ops; `None` and an empty tape without conditioning.
pub(crate) fn split_conditioning<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    dev: &D,
    cond: &Option<Conditioning<E, D>>,
    batch: &DenoiseBatch<'_>,
    dc: usize,
) -> Res<(Option<T2<E, D>>, T), D> {
    Ok(match cond {
        Some(cond) => {
            let c: T2<E, D, T> = conditioning(dev, cond, batch, dc)?;
            let (c, t) = c.split_tape();
            (Some(c), t)
        }
        None => (None, T::default()),
    })
}

/// The U-shaped trunk shared by the U-Net and the U-ViT: the `down` blocks from x, each output
/// stored (after x itself); `mid` (which must not prune `scope`: a middle that prunes opens a
/// frame of its own); the `up` blocks, each on the concatenation of the activation with the
/// last stored one (`retain_up`: prune the frame to the up blocks' outputs and the stored
/// activations after each). The stored activations stay registered in `scope`, so the
/// concatenations read them in place.
pub(crate) fn u_trunk<E: Elem, D: Kernels<E>, T: Tape<E, D>, B, C>(
    x: T2<E, D, T>,
    (down, up): (&[B], &[B]),
    ctx: &mut C,
    (scope, retain_up): (&crate::KernelScope, bool),
    mut block: impl FnMut(T2<E, D, T>, &B, &mut C) -> Res<T2<E, D, T>, D>,
    mid: impl FnOnce(T2<E, D, T>, &mut C) -> Res<T2<E, D, T>, D>,
) -> Res<T2<E, D, T>, D> {
    let mut hcur = x;
    let mut skips = vec![hcur.retaped::<T>()];
    for blk in down {
        hcur = block(hcur, blk, ctx)?;
        skips.push(hcur.retaped::<T>());
        // the stored activations stay registered: the up blocks read them in place
        D::retain_all(scope, &skips);
    }
    hcur = mid(hcur, ctx)?;
    for blk in up {
        let s = skips.pop().expect("one stored activation per up block");
        let cat = D::concat_cols(hcur, s)?;
        hcur = block(cat, blk, ctx)?;
        if retain_up {
            skips.push(hcur.retaped::<T>());
            D::retain_all(scope, &skips);
            skips.pop();
        }
    }
    Ok(hcur)
}

/// What the forward pass needs besides the parameters.
struct Ctx<'a, E: Elem, D: Kernels<E>> {
    b: usize,
    h: usize,
    w: usize,
    groups: usize,
    /// The conditioning vector, tape-free (its ops travel separately).
    c: Option<T2<E, D>>,
    dropout: Option<(f64, &'a mut dyn RngCore)>,
}

impl<E: Elem, D: Kernels<E>> UNet<E, D> {
    /// Initialise every parameter on the host in f64 from `seed`, then upload.
    pub fn new(cfg: NetworkConfig, dev: &D, seed: u64) -> Result<Self, NetworkError> {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Self::build(cfg, dev, &mut |_, shape, init| {
            let n: usize = shape.iter().product();
            Ok(init.sample(n, &mut rng).into_iter().map(E::c).collect())
        })
    }

    pub(crate) fn build(
        cfg: NetworkConfig,
        dev: &D,
        values: &mut crate::modules::Values<'_, E>,
    ) -> Result<Self, NetworkError> {
        cfg.validate()?;
        let Some((_, _, channels)) = cfg.image() else {
            return Err(NetworkError::Config("not a U-Net configuration".into()));
        };
        let mut b = Builder { dev, values };
        let (ch, dc, v) = (cfg.dim, cfg.cond_dim, cfg.vocab_size);
        let e = cfg.embed_dim.expect("validated: the U-Net has embed_dim");
        // N(0, 1/e), as the transformer's embedding
        let embed = b.matrix("embed", v + 1, e, Init::Normal(1.0 / (e as f64).sqrt()))?;
        let cond = if cfg.is_conditioned() {
            Some(b.cond_mlp(&cfg)?)
        } else {
            None
        };
        let cdim = cond.is_some().then_some(dc);
        let conv_in = b.conv("conv_in", (channels * e, ch), false)?;
        let down = (0..cfg.n_layers)
            .map(|i| b.res_block(&format!("down.{i}"), (ch, ch), cdim))
            .collect::<Result<Vec<_>, _>>()?;
        let mid0 = b.res_block("mid.0", (ch, ch), cdim)?;
        let attn = SelfAttention {
            norm: b.group_norm("mid.attn.norm", ch)?,
            q: b.linear("mid.attn.q", (ch, ch), lecun(ch), Init::Zeros)?,
            k: b.linear("mid.attn.k", (ch, ch), lecun(ch), Init::Zeros)?,
            v: b.linear("mid.attn.v", (ch, ch), lecun(ch), Init::Zeros)?,
            o: b.linear("mid.attn.o", (ch, ch), lecun(ch), Init::Zeros)?,
        };
        let mid1 = b.res_block("mid.1", (ch, ch), cdim)?;
        let up = (0..=cfg.n_layers)
            .map(|i| b.res_block(&format!("up.{i}"), (2 * ch, ch), cdim))
            .collect::<Result<Vec<_>, _>>()?;
        let out_norm = b.group_norm("out.norm", ch)?;
        let out_conv = b.conv("out.conv", (ch, channels * v), true)?;
        Ok(UNet {
            cfg,
            embed,
            cond,
            conv_in,
            down,
            mid: (mid0, attn, mid1),
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

    fn groups(&self) -> usize {
        match self.cfg.arch {
            Arch::Unet { groups, .. } => groups,
            _ => unreachable!("a U-Net has a U-Net configuration"),
        }
    }

    /// Logits (batch, h·w·C, V); `dropout_rng` switches dropout on (training). The input is
    /// checked by the caller ([`crate::Network::forward`]).
    pub(crate) fn forward_impl<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        dropout_rng: Option<&mut dyn RngCore>,
    ) -> Res<T3<E, D, T>, D> {
        let (h, w, channels) = self.cfg.image().expect("a U-Net configuration");
        let b = batch.batch;
        let v = self.cfg.vocab_size;
        let scope = D::scope();
        let (c, cond_tape) =
            split_conditioning::<E, D, T>(&self.dev, &self.cond, batch, self.cfg.cond_dim)?;
        let p = self.cfg.dropout;
        let mut ctx = Ctx {
            b,
            h,
            w,
            groups: self.groups(),
            c,
            dropout: dropout_rng.filter(|_| p > 0.0).map(|r| (p, r)),
        };
        let x = embed_pixels(&self.dev, &self.embed, batch, tape, (b * h * w, channels))?;
        let x = self.conv(x, &self.conv_in, &ctx)?;
        let hcur = u_trunk(
            x,
            (&self.down, &self.up),
            &mut ctx,
            (&scope, false),
            |x, blk, ctx| self.res_block(x, blk, ctx),
            |x, ctx| {
                let x = self.res_block(x, &self.mid.0, ctx)?;
                let x = self.attention(x, &self.mid.1, ctx)?;
                self.res_block(x, &self.mid.2, ctx)
            },
        )?;
        let y = self.norm_swish(hcur, &self.out_norm, None, &ctx)?;
        let logits = self.conv(y, &self.out_conv, &ctx)?;
        let (logits, t) = logits.split_tape();
        logits
            .put_tape(t.merge(cond_tape))
            .try_reshape_like(&(b, h * w * channels, v))
    }

    fn norm<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        p: &GroupNormParams<E, D>,
        ctx: &Ctx<'_, E, D>,
    ) -> Res<T2<E, D, T>, D> {
        D::group_norm(x, p.scale.tensor(), p.bias.tensor(), ctx.b, ctx.groups)
    }

    /// swish(GroupNorm(x)) [⊙ the dropout mask `keep`], one fused op.
    fn norm_swish<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        p: &GroupNormParams<E, D>,
        keep: Option<Vec<E>>,
        ctx: &Ctx<'_, E, D>,
    ) -> Res<T2<E, D, T>, D> {
        D::group_norm_swish(
            x,
            p.scale.tensor(),
            p.bias.tensor(),
            ctx.b,
            ctx.groups,
            keep,
        )
    }

    fn conv<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        conv: &Conv<E, D>,
        ctx: &Ctx<'_, E, D>,
    ) -> Res<T2<E, D, T>, D> {
        conv_bias(x, conv, (ctx.b, ctx.h, ctx.w))
    }

    fn res_block<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        blk: &ResBlock<E, D>,
        ctx: &mut Ctx<'_, E, D>,
    ) -> Res<T2<E, D, T>, D> {
        let (b, n) = (ctx.b, ctx.h * ctx.w);
        let y = self.norm_swish(x.retaped::<T>(), &blk.norm1, None, ctx)?;
        let mut y = self.conv(y, &blk.conv1, ctx)?;
        if let (Some(wc), Some(c)) = (&blk.cond, &ctx.c) {
            let cw = D::matmul(c.clone().put_tape(T::default()), wc.tensor()?)?;
            y = D::shift(y, cw, b, n)?;
        }
        // dropout's mask drawn here, applied inside the fused norm → swish
        let n_keep = y.shape().0 * y.shape().1;
        let keep = ctx
            .dropout
            .as_mut()
            .map(|(p, rng)| keep_mask(*p, &mut **rng, n_keep));
        let y = self.norm_swish(y, &blk.norm2, keep, ctx)?;
        let y = self.conv(y, &blk.conv2, ctx)?;
        skip_add(x, &blk.skip, y)
    }

    fn attention<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        a: &SelfAttention<E, D>,
        ctx: &Ctx<'_, E, D>,
    ) -> Res<T2<E, D, T>, D> {
        let (b, n) = (ctx.b, ctx.h * ctx.w);
        let c = x.shape().1;
        let z = self.norm(x.retaped::<T>(), &a.norm, ctx)?;
        let proj = |z: T2<E, D, T>, l: &Linear<E, D>| -> Res<T2<E, D, T>, D> {
            dense(z, l.weight.tensor()?, Some(l.bias.tensor()))
        };
        let q = proj(z.retaped::<T>(), &a.q)?
            .try_mul(E::c(1.0 / (c as f64).sqrt()))?
            .try_reshape_like(&(b, n, 1, c))?;
        let k = proj(z.retaped::<T>(), &a.k)?.try_reshape_like(&(b, n, 1, c))?;
        let v = proj(z, &a.v)?.try_reshape_like(&(b, n, 1, c))?;
        let o = D::attention(q, k, v)?;
        D::residual(x, proj(o, &a.o)?)
    }
}

#[cfg(test)]
mod tests {
    use super::{keep_mask, MASK_CHUNK};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The mask: values 0 or 1/(1 − p) only; the same for the same RNG state at 1 and 3 threads;
    /// one draw from the RNG whatever n; drop fractions near p overall and in every chunk
    /// (independent streams: no chunk repeats another); p = 0 keeps everything; every value the
    /// definition's (one `next_u32` per value, compared as u/2³² ≥ p in f64).
    #[test]
    fn keep_mask_is_seeded_by_one_draw_and_independent_of_threads() {
        let in_pool = |threads: usize, f: &(dyn Fn() -> Vec<f64> + Sync)| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(f)
        };
        for (p, n) in [
            (0.1, 1),
            (0.1, 3 * MASK_CHUNK + 5),
            (0.3, 2 * MASK_CHUNK),
            (0.0, 17),
        ] {
            let keep = 1.0 / (1.0 - p);
            let draw = || {
                let mut rng = StdRng::seed_from_u64(7);
                let m: Vec<f64> = keep_mask(p, &mut rng, n);
                (m, rng.gen::<u64>())
            };
            let one = in_pool(1, &|| draw().0);
            let three = in_pool(3, &|| draw().0);
            assert_eq!(one, three, "p {p}, n {n}: thread count changed the mask");
            // the definition, value by value: chunk k's stream keyed by (draw, k), its values
            // kept where their u32s / 2³² ≥ p
            let seed = StdRng::seed_from_u64(7).gen::<u64>();
            let mut defined = Vec::with_capacity(n);
            for k in 0..n.div_ceil(MASK_CHUNK) {
                let mut key = [0u8; 32];
                key[..8].copy_from_slice(&seed.to_le_bytes());
                key[8..16].copy_from_slice(&(k as u64).to_le_bytes());
                let mut stream = StdRng::from_seed(key);
                for _ in 0..MASK_CHUNK.min(n - k * MASK_CHUNK) {
                    let u = f64::from(rand::RngCore::next_u32(&mut stream));
                    defined.push(if u / 2f64.powi(32) >= p { keep } else { 0.0 });
                }
            }
            assert_eq!(one, defined, "p {p}, n {n}: not the defined mask");
            let mut after = StdRng::seed_from_u64(7);
            after.gen::<u64>();
            assert_eq!(draw().1, after.gen::<u64>(), "one draw from the RNG");
            assert!(one.iter().all(|&v| v == 0.0 || v == keep));
            if p == 0.0 {
                assert!(one.iter().all(|&v| v == keep));
            }
            for chunk in one.chunks(MASK_CHUNK).filter(|c| c.len() > 4000) {
                let dropped = chunk.iter().filter(|&&v| v == 0.0).count() as f64;
                let frac = dropped / chunk.len() as f64;
                assert!((frac - p).abs() < 0.02, "dropped {frac} at p {p}");
            }
            let chunks: Vec<&[f64]> = one.chunks_exact(MASK_CHUNK).collect();
            for (i, a) in chunks.iter().enumerate() {
                for b in &chunks[i + 1..] {
                    assert_ne!(a, b, "two chunks drew the same stream");
                }
            }
        }
        // another RNG state, another mask
        let mut r1 = StdRng::seed_from_u64(8);
        let mut r2 = StdRng::seed_from_u64(9);
        let (a, b): (Vec<f64>, Vec<f64>) =
            (keep_mask(0.5, &mut r1, 4096), keep_mask(0.5, &mut r2, 4096));
        assert_ne!(a, b);
    }
}
