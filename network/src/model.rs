//! The MD4 text transformer (spec §7.2, official `transformer.py`): token embedding over V + 1 ids,
//! bidirectional RoPE attention with bias-free q/k/v/o, gated FFN, pre-LN blocks with adaLN-zero
//! conditioning on a sinusoidal time embedding (and optionally a class label), channel-wise
//! residual dropout, and a zero-initialised output layer over the V real tokens — so a fresh
//! model outputs all-zero logits, i.e. the uniform distribution (paper §4.1 / eq. (2)).
//! Without conditioning the blocks are pre-RMSNorm without gates (`time_features = "none"`).

use crate::init::Init;
use crate::layers::*;
use crate::param::{self, Param};
use crate::{Elem, Kernels, NetworkConfig, NetworkError};
use dfdx::prelude::*;
use maskdiff_process::{DenoiseBatch, LogProbs, Vocab};
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use std::path::Path;

#[derive(Clone, Debug)]
struct CondIx {
    w1_t: Option<usize>,
    label: Option<(usize, usize)>, // (embedding table, its Dense weight)
    b1: usize,
    w2: usize,
    b2: usize,
}

#[derive(Clone, Debug)]
enum NormIx {
    /// adaLN-zero projection producing 6 (block) or 2 (final) modulation vectors.
    Ada { w: usize, b: usize },
    /// RMSNorm scales (attention, mlp) — `mlp` unused for the final norm.
    Rms { attn: usize, mlp: usize },
}

#[derive(Clone, Debug)]
struct BlockIx {
    norm: NormIx,
    wq: usize,
    wk: usize,
    wv: usize,
    wo: usize,
    w1: usize,
    w3: usize,
    w2: usize,
}

#[derive(Clone, Debug)]
struct Layout {
    embed: usize,
    embed_proj: Option<(usize, usize)>,
    cond: Option<CondIx>,
    blocks: Vec<BlockIx>,
    head: NormIx,
    out: usize,
}

struct Builder<'a, E: Elem, D: Kernels<E>> {
    dev: &'a D,
    rng: StdRng,
    params: Vec<Param<E, D>>,
}

impl<E: Elem, D: Kernels<E>> Builder<'_, E, D> {
    fn add(&mut self, name: String, shape: &[usize], init: Init) -> Result<usize, NetworkError> {
        let n: usize = shape.iter().product();
        let vals: Vec<E> = init
            .sample(n, &mut self.rng)
            .into_iter()
            .map(E::c)
            .collect();
        let value = self
            .dev
            .try_tensor_from_vec(vals, (n,))
            .map_err(NetworkError::device)?;
        self.params.push(Param {
            name,
            shape: shape.to_vec(),
            value,
        });
        Ok(self.params.len() - 1)
    }
}

/// Per-sequence modulation chunks and the tape holding their projection.
type Modulation<E, D, T> = (Vec<T2<E, D, T>>, T);

/// The MD4 transformer denoiser with run-time shapes, generic over element type and device.
#[derive(Clone, Debug)]
pub struct Md4Transformer<E: Elem, D: Kernels<E>> {
    cfg: NetworkConfig,
    params: Vec<Param<E, D>>,
    ix: Layout,
    dev: D,
}

impl NetworkConfig {
    /// Build a freshly initialised model on `dev` (see [`Md4Transformer::new`]).
    pub fn init<E: Elem, D: Kernels<E>>(
        &self,
        dev: &D,
        seed: u64,
    ) -> Result<Md4Transformer<E, D>, NetworkError> {
        Md4Transformer::new(self.clone(), dev, seed)
    }
}

impl<E: Elem, D: Kernels<E>> Md4Transformer<E, D> {
    /// Initialise every parameter on the host in f64 from `seed` (same values for f32 and f64
    /// up to rounding, and for every device), then upload.
    pub fn new(cfg: NetworkConfig, dev: &D, seed: u64) -> Result<Self, NetworkError> {
        cfg.validate()?;
        let mut b = Builder {
            dev,
            rng: StdRng::seed_from_u64(seed),
            params: Vec::new(),
        };
        let (d, dc, v) = (cfg.dim, cfg.cond_dim, cfg.vocab_size);
        let lecun = |fan_in| Init::TruncatedFanIn { scale: 1.0, fan_in };
        let e = cfg.embed_dim.unwrap_or(d);
        let embed = b.add(
            "embed".into(),
            &[v + 1, e],
            Init::Normal(1.0 / (e as f64).sqrt()),
        )?;
        let embed_proj = match cfg.embed_dim {
            Some(e) => Some((
                b.add("embed_proj.w".into(), &[e, d], lecun(e))?,
                b.add("embed_proj.b".into(), &[d], Init::Zeros)?,
            )),
            None => None,
        };
        let cond = if cfg.is_conditioned() {
            let w1_t = if cfg.time_conditioning {
                Some(b.add("cond.w1_t".into(), &[dc, 4 * dc], lecun(dc))?)
            } else {
                None
            };
            let label = if cfg.num_classes > 0 {
                let fan_in = if cfg.time_conditioning { 2 * dc } else { dc };
                Some((
                    b.add(
                        "cond.label_embed".into(),
                        &[cfg.num_classes, dc],
                        Init::Normal(1.0 / (dc as f64).sqrt()),
                    )?,
                    b.add("cond.w1_label".into(), &[dc, 4 * dc], lecun(fan_in))?,
                ))
            } else {
                None
            };
            Some(CondIx {
                w1_t,
                label,
                b1: b.add("cond.b1".into(), &[4 * dc], Init::Zeros)?,
                w2: b.add("cond.w2".into(), &[4 * dc, dc], lecun(4 * dc))?,
                b2: b.add("cond.b2".into(), &[dc], Init::Zeros)?,
            })
        } else {
            None
        };
        let hidden = cfg.ffn_hidden_dim();
        let ffn_scale = if cfg.depth_scaled_init {
            2.0 / cfg.n_layers as f64
        } else {
            1.0
        };
        let mut blocks = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let p = |s: &str| format!("blocks.{l}.{s}");
            let norm = if cond.is_some() {
                NormIx::Ada {
                    w: b.add(p("ada.w"), &[dc, 6 * d], Init::Zeros)?,
                    b: b.add(p("ada.b"), &[6 * d], Init::Zeros)?,
                }
            } else {
                NormIx::Rms {
                    attn: b.add(p("norm_attn"), &[d], Init::Ones)?,
                    mlp: b.add(p("norm_mlp"), &[d], Init::Ones)?,
                }
            };
            let ffn = |fan_in| Init::TruncatedFanIn {
                scale: ffn_scale,
                fan_in,
            };
            blocks.push(BlockIx {
                norm,
                wq: b.add(p("attn.wq"), &[d, d], lecun(d))?,
                wk: b.add(p("attn.wk"), &[d, d], lecun(d))?,
                wv: b.add(p("attn.wv"), &[d, d], lecun(d))?,
                wo: b.add(p("attn.wo"), &[d, d], lecun(d))?,
                w1: b.add(p("ffn.w1"), &[d, hidden], ffn(d))?,
                w3: b.add(p("ffn.w3"), &[d, hidden], ffn(d))?,
                w2: b.add(p("ffn.w2"), &[hidden, d], ffn(hidden))?,
            });
        }
        let head = if cond.is_some() {
            NormIx::Ada {
                w: b.add("head.ada.w".into(), &[dc, 2 * d], Init::Zeros)?,
                b: b.add("head.ada.b".into(), &[2 * d], Init::Zeros)?,
            }
        } else {
            let s = b.add("head.norm".into(), &[d], Init::Ones)?;
            NormIx::Rms { attn: s, mlp: s }
        };
        let out = b.add("head.out".into(), &[d, v], Init::Zeros)?;
        Ok(Md4Transformer {
            ix: Layout {
                embed,
                embed_proj,
                cond,
                blocks,
                head,
                out,
            },
            params: b.params,
            cfg,
            dev: dev.clone(),
        })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.cfg
    }
    pub fn vocab(&self) -> Vocab {
        Vocab::new(self.cfg.vocab_size).expect("validated config")
    }
    pub fn device(&self) -> &D {
        &self.dev
    }
    /// All parameters in a fixed order (their names are the checkpoint keys).
    pub fn params(&self) -> &[Param<E, D>] {
        &self.params
    }
    /// Mutable access for optimizers and EMA: replace `value`, keep the length and shape.
    pub fn params_mut(&mut self) -> &mut [Param<E, D>] {
        &mut self.params
    }
    pub fn num_params(&self) -> usize {
        self.params.iter().map(Param::numel).sum()
    }

    /// The same model on another device (parameters copied through the host).
    pub fn to_device<D2: Kernels<E>>(
        &self,
        dev: &D2,
    ) -> Result<Md4Transformer<E, D2>, NetworkError> {
        let params = self
            .params
            .iter()
            .map(|p| {
                Ok(Param {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    value: dev
                        .try_tensor_from_vec(p.value.as_vec(), (p.numel(),))
                        .map_err(NetworkError::device)?,
                })
            })
            .collect::<Result<_, NetworkError>>()?;
        Ok(Md4Transformer {
            cfg: self.cfg.clone(),
            params,
            ix: self.ix.clone(),
            dev: dev.clone(),
        })
    }

    /// A fresh gradient tape for a training forward pass. (dfdx keeps tensor ids private, so
    /// the tape cannot be told which gradients are leaves; callers read the parameters'
    /// gradients out and drop the rest right after `backward`.)
    pub fn tape(&self) -> OwnedTape<E, D> {
        OwnedTape::default()
    }

    fn vec(&self, i: usize) -> T1<E, D> {
        self.params[i].value.clone()
    }
    fn mat(&self, i: usize) -> Res<T2<E, D>, D> {
        let s = &self.params[i].shape;
        self.params[i].value.clone().try_reshape_like(&(s[0], s[1]))
    }

    fn check_input(&self, batch: &DenoiseBatch<'_>) -> Result<(), NetworkError> {
        batch.validate(self.vocab())?;
        if batch.batch == 0 || batch.len == 0 {
            return Err(NetworkError::Input("empty batch".into()));
        }
        if batch.len > self.cfg.max_len {
            return Err(NetworkError::Input(format!(
                "sequence length {} exceeds max_len {}",
                batch.len, self.cfg.max_len
            )));
        }
        if self.cfg.time_conditioning {
            if let Some(t) = batch
                .t
                .iter()
                .find(|t| !(t.is_finite() && (0.0..=1.0).contains(*t)))
            {
                return Err(NetworkError::Input(format!("time {t} not in [0, 1]")));
            }
        }
        match (self.cfg.num_classes, batch.labels) {
            (0, None) => Ok(()),
            (0, Some(_)) => Err(NetworkError::Input(
                "labels given to an unconditional model".into(),
            )),
            (k, None) => Err(NetworkError::Input(format!(
                "model needs one of {k} labels per sequence"
            ))),
            (k, Some(l)) => match l.iter().find(|&&c| c as usize >= k) {
                Some(c) => Err(NetworkError::Input(format!("label {c} >= num_classes {k}"))),
                None => Ok(()),
            },
        }
    }

    /// Logits (batch, len, V) over the real tokens. `tape` is `NoneTape` for inference or an
    /// `OwnedTape` to record gradients; `dropout_rng` switches channel-wise dropout on (training).
    pub fn forward<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        dropout_rng: Option<&mut dyn RngCore>,
    ) -> Result<T3<E, D, T>, NetworkError> {
        self.check_input(batch)?;
        let masks = match dropout_rng {
            Some(rng) if self.cfg.dropout > 0.0 => Some(self.dropout_masks(batch.batch, rng)?),
            _ => None,
        };
        self.forward_impl(batch, tape, masks)
            .map_err(NetworkError::device)
    }

    /// Normalised log μ_θ (batch, len, V) without a tape, as host data.
    pub fn log_probs(&self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, NetworkError> {
        let logits = self.forward(batch, NoneTape, None)?;
        let lp = logits
            .try_log_softmax::<Axis<2>>()
            .map_err(NetworkError::device)?;
        Ok(LogProbs {
            data: lp
                .as_vec()
                .into_iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect(),
            batch: batch.batch,
            len: batch.len,
            vocab: self.cfg.vocab_size,
        })
    }

    /// Two keep-masks (attention, FFN) per block, each (batch, dim), values 0 or 1/(1 − p).
    fn dropout_masks(
        &self,
        b: usize,
        rng: &mut dyn RngCore,
    ) -> Result<Vec<T2<E, D>>, NetworkError> {
        let p = self.cfg.dropout;
        let keep = E::c(1.0 / (1.0 - p));
        let d = self.cfg.dim;
        (0..2 * self.cfg.n_layers)
            .map(|_| {
                let m: Vec<E> = (0..b * d)
                    .map(|_| {
                        if rng.gen::<f64>() < p {
                            E::zero()
                        } else {
                            keep
                        }
                    })
                    .collect();
                self.dev
                    .try_tensor_from_vec(m, (b, d))
                    .map_err(NetworkError::device)
            })
            .collect()
    }

    /// The conditioning vector c (batch, d_c) = Dense(swish(Dense([emb(t), emb(label)]))).
    fn cond<T: Tape<E, D>>(&self, ix: &CondIx, batch: &DenoiseBatch<'_>) -> Res<T2<E, D, T>, D> {
        let (b, dc) = (batch.batch, self.cfg.cond_dim);
        let mut h: Option<T2<E, D, T>> = None;
        if let Some(w1_t) = ix.w1_t {
            let emb: Vec<E> = time_embedding(batch.t, dc).into_iter().map(E::c).collect();
            let x = self
                .dev
                .try_tensor_from_vec(emb, (b, dc))?
                .put_tape(T::default());
            h = Some(D::matmul(x, self.mat(w1_t)?)?);
        }
        if let (Some((table, w)), Some(labels)) = (ix.label, batch.labels) {
            let idx = self
                .dev
                .try_tensor_from_vec(labels.iter().map(|&l| l as usize).collect(), (b,))?;
            let e: T2<E, D, T> = self.mat(table)?.put_tape(T::default()).try_gather(idx)?;
            let y = D::matmul(e, self.mat(w)?)?;
            h = Some(match h {
                Some(h) => h.try_add(y)?,
                None => y,
            });
        }
        let h = h.expect("a conditioned model has time or label input");
        let s = *h.shape();
        let h = h.try_add(self.vec(ix.b1).try_broadcast_like::<_, Axis<0>>(&s)?)?;
        dense(swish(h)?, self.mat(ix.w2)?, Some(self.vec(ix.b2)))
    }

    /// Per-sequence modulation vectors: act(c) @ W + b, split into `k` (batch, dim) chunks.
    fn ada<T: Tape<E, D>>(
        &self,
        c_act: &T2<E, D>,
        w: usize,
        bias: usize,
        k: usize,
    ) -> Res<Modulation<E, D, T>, D> {
        let d = self.cfg.dim;
        let m = dense(
            c_act.clone().put_tape(T::default()),
            self.mat(w)?,
            Some(self.vec(bias)),
        )?;
        let (m, tape) = m.split_tape();
        let parts = (0..k)
            .map(|i| {
                m.clone()
                    .put_tape(T::default())
                    .try_slice((.., i * d..(i + 1) * d))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // the slices' tapes only hold their own ops; the projection's ops travel in `tape`
        Ok((parts, tape))
    }

    /// Bidirectional multi-head attention with RoPE, bias-free projections.
    fn attention<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        blk: &BlockIx,
        rope: &Rope<E, D>,
        b: usize,
        n: usize,
    ) -> Res<T2<E, D, T>, D> {
        let (d, h) = (self.cfg.dim, self.cfg.n_heads);
        let hd = d / h;
        let q = D::matmul(x.retaped::<T>(), self.mat(blk.wq)?)?;
        let k = D::matmul(x.retaped::<T>(), self.mat(blk.wk)?)?;
        let v = D::matmul(x, self.mat(blk.wv)?)?;
        // 1/sqrt(hd) is folded into q's rotation
        let q = D::rope(rope, q, b, n, h, 1.0 / (hd as f64).sqrt())?;
        let k = D::rope(rope, k, b, n, h, 1.0)?;
        let v = v.try_reshape_like(&(b, n, h, hd))?;
        let o = D::attention(q, k, v)?;
        D::matmul(o, self.mat(blk.wo)?)
    }

    /// Gated FFN `W2(act(W1 x) ⊙ W3 x)`.
    fn ffn<T: Tape<E, D>>(&self, x: T2<E, D, T>, blk: &BlockIx) -> Res<T2<E, D, T>, D> {
        let a = D::matmul(x.retaped::<T>(), self.mat(blk.w1)?)?;
        let u = D::matmul(x, self.mat(blk.w3)?)?;
        D::matmul(D::glu(self.cfg.mlp, a, u)?, self.mat(blk.w2)?)
    }

    fn forward_impl<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        masks: Option<Vec<T2<E, D>>>,
    ) -> Res<T3<E, D, T>, D> {
        let (b, n, d) = (batch.batch, batch.len, self.cfg.dim);
        // the fused CPU kernels' outputs stay registered (read in place by the next kernels)
        // while this frame is open; it is pruned to the residual stream after every sub-layer
        let scope = D::scope();
        let mut masks = masks.map(|m| m.into_iter());
        let mut next_mask = || masks.as_mut().and_then(|m| m.next());
        let ids = self
            .dev
            .try_tensor_from_vec(batch.ids.iter().map(|&i| i as usize).collect(), (b * n,))?;
        let mut h: T2<E, D, T> = self.mat(self.ix.embed)?.put_tape(tape).try_gather(ids)?;
        if let Some((w, bias)) = self.ix.embed_proj {
            h = dense(h, self.mat(w)?, Some(self.vec(bias)))?;
        }
        // act(c) is shared by every block: compute it once, keep its ops in `cond_tape`, and
        // hand out tape-free copies (gradients meet on its id).
        let (c_act, mut cond_tape) = match &self.ix.cond {
            Some(ix) => {
                let c: T2<E, D, T> = self.cond(ix, batch)?;
                let (c, t) = act(self.cfg.mlp, c)?.split_tape();
                (Some(c), t)
            }
            None => (None, T::default()),
        };
        let rope = Rope::new(&self.dev, n, d / self.cfg.n_heads, self.cfg.rope_theta)?;
        for blk in &self.ix.blocks {
            match (&blk.norm, &c_act) {
                (NormIx::Ada { w, b: bias }, Some(c)) => {
                    let (m, t) = self.ada::<T>(c, *w, *bias, 6)?;
                    cond_tape = cond_tape.merge(t);
                    let mut m = m.into_iter();
                    let mut take = || m.next().expect("6 modulation chunks");
                    let (sh_a, sc_a, g_a) = (take(), take(), take());
                    let (sh_m, sc_m, g_m) = (take(), take(), take());
                    let a = D::modulate(D::layer_norm(h.retaped::<T>())?, sh_a, sc_a, b, n)?;
                    let a =
                        channel_dropout(self.attention(a, blk, &rope, b, n)?, next_mask(), b, n)?;
                    h = D::gated_residual(h, a, g_a, b, n)?;
                    D::retain(&scope, &h);
                    let f = D::modulate(D::layer_norm(h.retaped::<T>())?, sh_m, sc_m, b, n)?;
                    let f = channel_dropout(self.ffn(f, blk)?, next_mask(), b, n)?;
                    h = D::gated_residual(h, f, g_m, b, n)?;
                    D::retain(&scope, &h);
                }
                (NormIx::Rms { attn, mlp }, _) => {
                    let a = D::rms_norm(h.retaped::<T>(), self.vec(*attn))?;
                    let a =
                        channel_dropout(self.attention(a, blk, &rope, b, n)?, next_mask(), b, n)?;
                    h = h.try_add(a)?;
                    D::retain(&scope, &h);
                    let f = D::rms_norm(h.retaped::<T>(), self.vec(*mlp))?;
                    let f = channel_dropout(self.ffn(f, blk)?, next_mask(), b, n)?;
                    h = h.try_add(f)?;
                    D::retain(&scope, &h);
                }
                (NormIx::Ada { .. }, None) => {
                    unreachable!("adaLN blocks exist only with conditioning")
                }
            }
        }
        let h = match (&self.ix.head, &c_act) {
            (NormIx::Ada { w, b: bias }, Some(c)) => {
                let (m, t) = self.ada::<T>(c, *w, *bias, 2)?;
                cond_tape = cond_tape.merge(t);
                let mut m = m.into_iter();
                let (sh, sc) = (m.next().expect("shift"), m.next().expect("scale"));
                D::modulate(D::layer_norm(h)?, sh, sc, b, n)?
            }
            (NormIx::Rms { attn, .. }, _) => D::rms_norm(h, self.vec(*attn))?,
            (NormIx::Ada { .. }, None) => unreachable!("adaLN head exists only with conditioning"),
        };
        let logits = D::matmul(h, self.mat(self.ix.out)?)?;
        let (logits, t) = logits.split_tape();
        logits
            .put_tape(t.merge(cond_tape))
            .try_reshape_like(&(b, n, self.cfg.vocab_size))
    }

    /// Write the parameters to a safetensors file with the project's one atomic writer
    /// (`maskdiff_data::write_atomic`).
    pub fn save_safetensors(&self, path: &Path) -> Result<(), NetworkError> {
        let items: Vec<_> = self
            .params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone(), &p.value))
            .collect();
        let bytes = param::to_safetensors(&items, path)?;
        maskdiff_data::write_atomic(path, &bytes).map_err(|e| match e {
            maskdiff_data::DataError::Write { path, source } => NetworkError::io(path, source),
            other => NetworkError::ckpt(path, other.to_string()),
        })
    }

    /// Load parameters saved by [`Self::save_safetensors`] from a model of the same
    /// configuration; any missing, extra or mis-shaped tensor is an error.
    pub fn load_safetensors(&mut self, path: &Path) -> Result<(), NetworkError> {
        let bytes = std::fs::read(path).map_err(|e| NetworkError::io(path, e))?;
        let map = param::from_safetensors::<E>(&bytes, path)?;
        param::load_into(&mut self.params, map, "", path)
    }
}
