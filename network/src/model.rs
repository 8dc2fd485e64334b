//! The MD4 text transformer (spec §7.2, official `transformer.py`): token embedding over V + 1 ids,
//! bidirectional RoPE attention with bias-free q/k/v/o, gated FFN, pre-LN blocks with adaLN-zero
//! conditioning on a sinusoidal time embedding (and optionally a class label), channel-wise
//! residual dropout, and a zero-initialised output layer over the V real tokens — so a fresh
//! model outputs all-zero logits, i.e. the uniform distribution (paper §4.1 / eq. (2)).
//! Without conditioning the blocks are pre-RMSNorm without gates (`time_features = "none"`).

use crate::init::{lecun, Init};
use crate::layers::*;
use crate::modules::{
    Attention, Block, Builder, Conditioning, Ffn, Linear, Matrix, Parameters, RmsScales, Trunk,
    Values,
};
use crate::param::{self, Param};
use crate::{BlockMask, Elem, Kernels, NetworkConfig, NetworkError};
use dfdx::prelude::*;
use maskdiff_process::{DenoiseBatch, LogProbs, RowLogProbs, Vocab};
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use std::path::Path;

/// Per-sequence modulation chunks and the tape holding their projection.
type Modulation<E, D, T> = (Vec<T2<E, D, T>>, T);

/// Attention's q, k, v projections, (b·n, d) each.
type Qkv<E, D, T> = (T2<E, D, T>, T2<E, D, T>, T2<E, D, T>);

/// The rows a row-restricted forward ([`Md4Transformer::forward_at`],
/// [`Md4Transformer::log_probs_rows`]) carries past the last block's keys and values, sequence
/// after sequence (any number per sequence, in the caller's order within one).
struct RowSel {
    /// Flat row `b·n + pos` of each carried row.
    flat: Vec<usize>,
    /// The sequence of each carried row.
    seq: Vec<usize>,
    /// The position of each carried row.
    pos: Vec<usize>,
}

impl RowSel {
    /// The selection of the flat rows `flat` (`b·n + pos`, grouped by sequence in increasing
    /// order, checked by the caller).
    fn new(flat: Vec<usize>, n: usize) -> Self {
        RowSel {
            seq: flat.iter().map(|r| r / n).collect(),
            pos: flat.iter().map(|r| r % n).collect(),
            flat,
        }
    }

    /// Offsets of each of the `b` sequences' rows (b + 1).
    fn starts(&self, b: usize) -> Vec<usize> {
        let mut starts = vec![0; b + 1];
        for &s in &self.seq {
            starts[s + 1] += 1;
        }
        for s in 0..b {
            starts[s + 1] += starts[s];
        }
        starts
    }
}

/// The MD4 transformer denoiser with run-time shapes, generic over element type and device.
/// Its parameters are typed fields (see [`crate::modules`] for the checkpoint name table).
#[derive(Clone, Debug)]
pub struct Md4Transformer<E: Elem, D: Kernels<E>> {
    cfg: NetworkConfig,
    /// `embed`: `[V + 1, e]` over the V real ids and the mask id V.
    pub embed: Matrix<E, D>,
    /// `embed_proj`: the official "outside embedding" projection `e → d`, when `embed_dim` is set.
    pub embed_proj: Option<Linear<E, D>>,
    pub trunk: Trunk<E, D>,
    /// `head.out`: `[d, V]`, zero-initialised.
    pub out: Matrix<E, D>,
    dev: D,
}

crate::modules::parameters!([D: Kernels<E>] Md4Transformer<E, D> { embed, embed_proj, trunk, out });

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
        let mut rng = StdRng::seed_from_u64(seed);
        Self::build(cfg, dev, &mut |_, shape, init| {
            let n: usize = shape.iter().product();
            Ok(init.sample(n, &mut rng).into_iter().map(E::c).collect())
        })
    }

    /// The model of `cfg` with each parameter's values from `values`, called once per tensor
    /// in the fixed order (the order of the checkpoint name table).
    fn build(
        cfg: NetworkConfig,
        dev: &D,
        values: &mut Values<'_, E>,
    ) -> Result<Self, NetworkError> {
        cfg.validate()?;
        let mut b = Builder { dev, values };
        let (d, dc, v) = (cfg.dim, cfg.cond_dim, cfg.vocab_size);
        let e = cfg.embed_dim.unwrap_or(d);
        let embed = b.matrix("embed", v + 1, e, Init::Normal(1.0 / (e as f64).sqrt()))?;
        let embed_proj = match cfg.embed_dim {
            Some(e) => Some(b.linear("embed_proj", (e, d), lecun(e), Init::Zeros)?),
            None => None,
        };
        let cond = if cfg.is_conditioned() {
            Some(b.cond_mlp(&cfg)?)
        } else {
            None
        };
        let hidden = cfg.ffn_hidden_dim();
        let ffn_scale = if cfg.depth_scaled_init {
            2.0 / cfg.n_layers as f64
        } else {
            1.0
        };
        let ffn_init = |fan_in| Init::TruncatedFanIn {
            scale: ffn_scale,
            fan_in,
        };
        // the norm parameters of block l come first, then attention, then the FFN
        let layer = |b: &mut Builder<'_, '_, E, D>, l: usize| -> Result<_, NetworkError> {
            let p = |s: &str| format!("blocks.{l}.{s}");
            Ok((
                Attention {
                    wq: b.matrix(p("attn.wq"), d, d, lecun(d))?,
                    wk: b.matrix(p("attn.wk"), d, d, lecun(d))?,
                    wv: b.matrix(p("attn.wv"), d, d, lecun(d))?,
                    wo: b.matrix(p("attn.wo"), d, d, lecun(d))?,
                },
                Ffn {
                    w1: b.matrix(p("ffn.w1"), d, hidden, ffn_init(d))?,
                    w3: b.matrix(p("ffn.w3"), d, hidden, ffn_init(d))?,
                    w2: b.matrix(p("ffn.w2"), hidden, d, ffn_init(hidden))?,
                },
            ))
        };
        let trunk = match cond {
            Some(cond) => {
                let mut blocks = Vec::with_capacity(cfg.n_layers);
                for l in 0..cfg.n_layers {
                    let norm = b.linear(
                        &format!("blocks.{l}.ada"),
                        (dc, 6 * d),
                        Init::Zeros,
                        Init::Zeros,
                    )?;
                    let (attn, ffn) = layer(&mut b, l)?;
                    blocks.push(Block { norm, attn, ffn });
                }
                let head = b.linear("head.ada", (dc, 2 * d), Init::Zeros, Init::Zeros)?;
                Trunk::Conditioned {
                    cond: Box::new(cond),
                    blocks,
                    head,
                }
            }
            None => {
                let mut blocks = Vec::with_capacity(cfg.n_layers);
                for l in 0..cfg.n_layers {
                    let norm = RmsScales {
                        attn: b.vector(format!("blocks.{l}.norm_attn"), d, Init::Ones)?,
                        mlp: b.vector(format!("blocks.{l}.norm_mlp"), d, Init::Ones)?,
                    };
                    let (attn, ffn) = layer(&mut b, l)?;
                    blocks.push(Block { norm, attn, ffn });
                }
                let head = b.vector("head.norm", d, Init::Ones)?;
                Trunk::Plain { blocks, head }
            }
        };
        let out = b.matrix("head.out", d, v, Init::Zeros)?;
        Ok(Md4Transformer {
            cfg,
            embed,
            embed_proj,
            trunk,
            out,
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
    /// All parameters in their fixed order (their names are the checkpoint keys).
    pub fn params(&self) -> Vec<&Param<E, D>> {
        let mut out = Vec::new();
        self.visit(&mut |p| out.push(p));
        out
    }
    /// Mutable access for optimizers and EMA: replace `value`, keep the length and shape.
    pub fn params_mut(&mut self) -> Vec<&mut Param<E, D>> {
        let mut out = Vec::new();
        self.visit_mut(&mut |p| out.push(p));
        out
    }
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }

    /// The same model on another device (parameters copied through the host).
    pub fn to_device<D2: Kernels<E>>(
        &self,
        dev: &D2,
    ) -> Result<Md4Transformer<E, D2>, NetworkError> {
        let mut src = self.params().into_iter();
        Md4Transformer::build(self.cfg.clone(), dev, &mut |name, _, _| {
            // one configuration always builds the same tensors in the same order
            match src.next() {
                Some(p) if p.name == name => Ok(p.value.as_vec()),
                _ => Err(NetworkError::Config(format!(
                    "to_device: no source tensor {name}"
                ))),
            }
        })
    }

    /// A fresh gradient tape for a training forward pass. (dfdx keeps tensor ids private, so
    /// the tape cannot be told which gradients are leaves; callers read the parameters'
    /// gradients out and drop the rest right after `backward`.)
    pub fn tape(&self) -> OwnedTape<E, D> {
        OwnedTape::default()
    }

    fn check_input(&self, batch: &DenoiseBatch<'_>) -> Result<(), NetworkError> {
        batch.validate(self.vocab())?;
        if batch.batch == 0 || batch.len == 0 {
            return Err(NetworkError::Input("empty batch".into()));
        }
        let positions = match self.cfg.block_size {
            None => batch.len,
            Some(_) => {
                // block diffusion: [x_t ; x_0], and x_0 holds no mask id
                if !batch.len.is_multiple_of(2) {
                    return Err(NetworkError::Input(format!(
                        "a block-diffusion input is x_t followed by x_0: odd length {}",
                        batch.len
                    )));
                }
                let half = batch.len / 2;
                let mask = self.vocab().mask_id();
                if batch
                    .ids
                    .chunks(batch.len)
                    .any(|row| row[half..].contains(&mask))
                {
                    return Err(NetworkError::Input(
                        "the clean half of a block-diffusion input holds a mask id".into(),
                    ));
                }
                half
            }
        };
        if positions > self.cfg.max_len {
            return Err(NetworkError::Input(format!(
                "sequence length {} exceeds max_len {}",
                positions, self.cfg.max_len
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
    /// A block-diffusion model (`block_size` set) takes `len = 2N` ids, x_t then x_0, and
    /// returns the logits of the N noised positions, (batch, N, V).
    pub fn forward<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        dropout_rng: Option<&mut dyn RngCore>,
    ) -> Result<T3<E, D, T>, NetworkError> {
        self.forward_tabled(batch, tape, dropout_rng, true)
    }

    /// [`Self::forward`] computing every row at its position: no token tables for the
    /// embedding and block 0's attention input (what `forward` computes once per token id, or
    /// per sequence and token id, and gathers). The reference the tabled forward is tested
    /// against; the same function to float rounding.
    pub fn forward_per_position<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        dropout_rng: Option<&mut dyn RngCore>,
    ) -> Result<T3<E, D, T>, NetworkError> {
        self.forward_tabled(batch, tape, dropout_rng, false)
    }

    fn forward_tabled<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        dropout_rng: Option<&mut dyn RngCore>,
        tables: bool,
    ) -> Result<T3<E, D, T>, NetworkError> {
        self.check_input(batch)?;
        let masks = match dropout_rng {
            Some(rng) if self.cfg.dropout > 0.0 => Some(self.dropout_masks(batch.batch, rng)?),
            _ => None,
        };
        let b = batch.batch;
        self.forward_impl(batch, tape, masks, None, tables)
            .and_then(|l| {
                let n_out = l.shape().0 / b;
                l.try_reshape_like(&(b, n_out, self.cfg.vocab_size))
            })
            .map_err(NetworkError::device)
    }

    /// Logits (rows.len(), V) at only the output rows `rows` (flat indices `b·n_out + pos`,
    /// strictly increasing, at least one), with the tape: the same rows of [`Self::forward`]
    /// (same dropout draws) up to float rounding. The last block's attention runs for every
    /// query — every position's keys and values feed the rows, and the fused kernel keeps its
    /// backward whole — and its output projection, FFN, the final norm and the output layer
    /// only at `rows`. MD4's loss reads the logits at masked positions only (carry-over, spec
    /// §4.1): on average half of them, so a training step skips that share of the last
    /// block's output projection and FFN, forward and backward. Block-diffusion models run the
    /// full forward and select.
    pub fn forward_at<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        dropout_rng: Option<&mut dyn RngCore>,
        rows: &[usize],
    ) -> Result<T2<E, D, T>, NetworkError> {
        self.check_input(batch)?;
        let b = batch.batch;
        let n_out = match self.cfg.block_size {
            None => batch.len,
            Some(_) => batch.len / 2,
        };
        check_rows(rows, b * n_out)?;
        if self.cfg.block_size.is_some() {
            return select_rows(self.forward(batch, tape, dropout_rng)?, rows);
        }
        let masks = match dropout_rng {
            Some(rng) if self.cfg.dropout > 0.0 => Some(self.dropout_masks(b, rng)?),
            _ => None,
        };
        let sel = RowSel::new(rows.to_vec(), batch.len);
        self.forward_impl(batch, tape, masks, Some(&sel), true)
            .map_err(NetworkError::device)
    }

    /// Normalised log μ_θ (batch, len, V) without a tape, as host data: the logits are copied
    /// to the host once and normalised there in place, row by row in parallel (x − max −
    /// ln Σ exp(x − max), in the model's precision), then narrowed to f32 — instead of dfdx's
    /// log-softmax op chain (a max, a broadcast subtraction, exp, sum, log and a second
    /// subtraction, each allocating a tensor) followed by the host copy.
    pub fn log_probs(&self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, NetworkError> {
        use rayon::prelude::*;
        let v = self.cfg.vocab_size;
        // block models read 2N ids and return the N noised positions: the length is the logits'
        self.check_input(batch)?;
        let logits = self
            .forward_impl(batch, NoneTape, None, None, true)
            .map_err(NetworkError::device)?;
        let len = logits.shape().0 / batch.batch;
        let mut x = logits.as_vec();
        x.par_chunks_mut(v * 64)
            .for_each(|rows| rows.chunks_mut(v).for_each(log_softmax_row));
        Ok(LogProbs {
            // f32 models: an in-place map, no new allocation
            data: x
                .into_iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect(),
            batch: batch.batch,
            len,
            vocab: v,
        })
    }

    /// Normalised log μ_θ at only the positions `rows[b]` (strictly increasing) of each
    /// sequence b: the matching rows of [`Self::log_probs`] up to float rounding, with the last
    /// block computing its keys and values at every position but its queries, attention, FFN,
    /// the final norm and the output layer only at those rows (the rest of the network runs in
    /// full: every position feeds the last block's keys). A sampler asks for the positions it
    /// reveals — about 1.7 of 256 per sequence and call for the cached sampler at T = N = 256.
    /// Block-diffusion models run the full forward and select.
    pub fn log_probs_rows(
        &self,
        batch: &DenoiseBatch<'_>,
        rows: &[Vec<usize>],
    ) -> Result<RowLogProbs, NetworkError> {
        self.check_input(batch)?;
        let (offsets, positions) = RowLogProbs::layout(rows, batch.batch, batch.len)?;
        if self.cfg.block_size.is_some() {
            return Ok(RowLogProbs::select(&self.log_probs(batch)?, rows)?);
        }
        use rayon::prelude::*;
        let v = self.cfg.vocab_size;
        let mut data = Vec::new();
        if !positions.is_empty() {
            let n = batch.len;
            let flat = (rows.iter().enumerate())
                .flat_map(|(b, r)| r.iter().map(move |&p| b * n + p))
                .collect();
            let sel = RowSel::new(flat, n);
            let mut x = self
                .forward_impl(batch, NoneTape, None, Some(&sel), true)
                .map_err(NetworkError::device)?
                .as_vec();
            // normalised as `log_probs` does (the same function per row, in parallel)
            x.par_chunks_mut(v * 64)
                .for_each(|rows| rows.chunks_mut(v).for_each(log_softmax_row));
            data = x
                .into_iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect();
        }
        Ok(RowLogProbs {
            data,
            offsets,
            positions,
            vocab: v,
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
    pub(crate) fn cond<T: Tape<E, D>>(
        &self,
        cond: &Conditioning<E, D>,
        batch: &DenoiseBatch<'_>,
    ) -> Res<T2<E, D, T>, D> {
        crate::unet_layers::conditioning(&self.dev, cond, batch, self.cfg.cond_dim)
    }

    /// Per-sequence modulation vectors: act(c) @ W + b, split into `k` (batch, dim) chunks.
    pub(crate) fn ada<T: Tape<E, D>>(
        &self,
        c_act: &T2<E, D>,
        proj: &Linear<E, D>,
        k: usize,
    ) -> Res<Modulation<E, D, T>, D> {
        let d = self.cfg.dim;
        let m = dense(
            c_act.clone().put_tape(T::default()),
            proj.weight.tensor()?,
            Some(proj.bias.tensor()),
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

    /// Bidirectional multi-head attention with RoPE, bias-free projections; with `mask`, the
    /// block-diffusion structure over 2N positions.
    fn attention<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        attn: &Attention<E, D>,
        (rope, mask): (&Rope<E, D>, Option<BlockMask>),
        b: usize,
        n: usize,
    ) -> Res<T2<E, D, T>, D> {
        let q = D::matmul(x.retaped::<T>(), attn.wq.tensor()?)?;
        let k = D::matmul(x.retaped::<T>(), attn.wk.tensor()?)?;
        let v = D::matmul(x, attn.wv.tensor()?)?;
        self.attend((q, k, v), attn, (rope, mask), b, n)
    }

    /// [`Self::attention`] (no block mask) at the ragged rows of `sel` only: keys and values
    /// from every row of x (b·n, d), queries from the selected rows, rotated at their own
    /// positions, each attending over its sequence → (sel rows, d), with the tape.
    fn attention_at<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        attn: &Attention<E, D>,
        rope: &Rope<E, D>,
        sel: &RowSel,
        (b, n): (usize, usize),
    ) -> Res<T2<E, D, T>, D> {
        let (d, h) = (self.cfg.dim, self.cfg.n_heads);
        let (hd, m) = (d / h, sel.flat.len());
        let q = D::matmul(
            D::gather_rows(x.retaped::<T>(), &sel.flat)?,
            attn.wq.tensor()?,
        )?;
        let k = D::matmul(x.retaped::<T>(), attn.wk.tensor()?)?;
        let v = D::matmul(x, attn.wv.tensor()?)?;
        // the full table's rows at the queries' positions (copied, not recomputed)
        let rope_q = rope.select(&self.dev, &sel.pos)?;
        // one "sequence" of m rows, each rotated at its own position
        let q =
            D::rope(&rope_q, q, 1, m, h, 1.0 / (hd as f64).sqrt())?.try_reshape_like(&(m, d))?;
        let k = D::rope(rope, k, b, n, h, 1.0)?;
        let v = v.try_reshape_like(&(b, n, h, hd))?;
        let o = D::attention_ragged(q, k, v, &sel.starts(b))?;
        D::matmul(o, attn.wo.tensor()?)
    }

    /// [`Self::attention`] of an input whose rows depend only on their token: `x_tab` holds
    /// the V + 1 distinct rows (one per id), so the q/k/v projections run on those and are
    /// gathered by `ids` (b·n) — row for row the same products (block 0 of a time-free model).
    fn attention_lookup<T: Tape<E, D>>(
        &self,
        x_tab: T2<E, D, T>,
        ids: &[usize],
        attn: &Attention<E, D>,
        rope: (&Rope<E, D>, Option<BlockMask>),
        b: usize,
        n: usize,
    ) -> Res<T2<E, D, T>, D> {
        let q = D::gather_rows(D::matmul(x_tab.retaped::<T>(), attn.wq.tensor()?)?, ids)?;
        let k = D::gather_rows(D::matmul(x_tab.retaped::<T>(), attn.wk.tensor()?)?, ids)?;
        let v = D::gather_rows(D::matmul(x_tab, attn.wv.tensor()?)?, ids)?;
        self.attend((q, k, v), attn, rope, b, n)
    }

    /// The rest of [`Self::attention`] after the q/k/v projections (b·n, d) each.
    fn attend<T: Tape<E, D>>(
        &self,
        (q, k, v): Qkv<E, D, T>,
        attn: &Attention<E, D>,
        (rope, mask): (&Rope<E, D>, Option<BlockMask>),
        b: usize,
        n: usize,
    ) -> Res<T2<E, D, T>, D> {
        let (d, h) = (self.cfg.dim, self.cfg.n_heads);
        let hd = d / h;
        // 1/sqrt(hd) is folded into q's rotation
        let q = D::rope(rope, q, b, n, h, 1.0 / (hd as f64).sqrt())?;
        let k = D::rope(rope, k, b, n, h, 1.0)?;
        let v = v.try_reshape_like(&(b, n, h, hd))?;
        let o = match mask {
            None => D::attention(q, k, v)?,
            Some(m) => D::block_attention(q, k, v, m)?,
        };
        D::matmul(o, attn.wo.tensor()?)
    }

    /// Gated FFN `W2(act(W1 x) ⊙ W3 x)`.
    pub(crate) fn ffn<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        ffn: &Ffn<E, D>,
    ) -> Res<T2<E, D, T>, D> {
        let w = (ffn.w1.tensor()?, ffn.w3.tensor()?, ffn.w2.tensor()?);
        D::ffn(self.cfg.mlp, x, w)
    }

    /// Logits as (rows, V): every position (b·n_out rows) or, with `sel` (no block mask), the
    /// rows of `sel`, the last block running past its keys and values at those rows only
    /// (queries, attention, the FFN; with the tape and dropout). With `lookup` the embedding
    /// is computed once per token id (V + 1 rows) and gathered instead of once per position,
    /// and so is block 0's attention input and q/k/v projections: per token id for a
    /// time-free model, per (sequence, token id) for a conditioned one (its modulation is per
    /// sequence) when sequences are longer than V + 1.
    fn forward_impl<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        masks: Option<Vec<T2<E, D>>>,
        sel: Option<&RowSel>,
        lookup: bool,
    ) -> Res<T2<E, D, T>, D> {
        let (b, n, d) = (batch.batch, batch.len, self.cfg.dim);
        // the fused CPU kernels' outputs stay registered (read in place by the next kernels)
        // while this frame is open; it is pruned to the residual stream after every sub-layer
        let scope = D::scope();
        let mut masks = masks.map(|m| m.into_iter());
        let mut next_mask = || masks.as_mut().and_then(|m| m.next());
        let ids: Vec<usize> = batch.ids.iter().map(|&i| i as usize).collect();
        let lookup = lookup && b * n > self.cfg.vocab_size + 1;
        let plain = matches!(self.trunk, Trunk::Plain { .. });
        // block 0 from the table: a time-free model, or a conditioned one (one table per
        // sequence: its modulation differs) whose sequences are longer than the table, when
        // block 0 is not the row-restricted one
        let per_seq_table = self.cfg.block_size.is_none() && n > self.cfg.vocab_size + 1;
        let table0 =
            lookup && (plain || per_seq_table) && !(sel.is_some() && self.cfg.n_layers == 1);
        let (mut h, mut table): (T2<E, D, T>, _) = if lookup {
            let mut e = self.embed.tensor()?.put_tape(tape);
            if let Some(proj) = &self.embed_proj {
                e = dense(e, proj.weight.tensor()?, Some(proj.bias.tensor()))?;
            }
            if table0 {
                (D::gather_rows(e.retaped::<T>(), &ids)?, Some(e))
            } else {
                (D::gather_rows(e, &ids)?, None)
            }
        } else {
            let mut h = D::gather_rows(self.embed.tensor()?.put_tape(tape), &ids)?;
            if let Some(proj) = &self.embed_proj {
                h = dense(h, proj.weight.tensor()?, Some(proj.bias.tensor()))?;
            }
            (h, None)
        };
        let hd = d / self.cfg.n_heads;
        let mask = self.cfg.block_size.and_then(|bs| BlockMask::new(n / 2, bs));
        let rope = match &mask {
            None => Rope::new(&self.dev, n, hd, self.cfg.rope_theta)?,
            Some(m) => Rope::at_positions(
                &self.dev,
                m.rope_positions().into_iter(),
                hd,
                self.cfg.rope_theta,
            )?,
        };
        let rope = (&rope, mask);
        // the head reads only the noised half of a block-diffusion input
        let n_out = mask.map_or(n, |m| m.len);
        let (b_mod, n_mod) = mask.map_or((b, n), |m| (2 * b, m.len));
        let noised = |h: T2<E, D, T>| -> Res<T2<E, D, T>, D> {
            if n_out == n {
                return Ok(h);
            }
            h.try_reshape_like(&(b, n, d))?
                .try_slice((.., 0..n_out, ..))?
                .try_reshape_like(&(b * n_out, d))
        };
        let (h, cond_tape) = match &self.trunk {
            Trunk::Conditioned { cond, blocks, head } => {
                // act(c) is shared by every block: compute it once, keep its ops in
                // `cond_tape`, and hand out tape-free copies (gradients meet on its id).
                // block diffusion: the clean copy is conditioned on t = 0 (it is clean), so its
                // keys and values do not depend on the noise level and a sampler can cache them;
                // modulation then groups rows as 2b half-sequences of N: (x_t at t, x_0 at 0).
                let (t2, l2): (Vec<f64>, Option<Vec<u32>>) = match mask {
                    None => (batch.t.to_vec(), batch.labels.map(|l| l.to_vec())),
                    Some(_) => (
                        batch.t.iter().flat_map(|&t| [t, 0.0]).collect(),
                        batch
                            .labels
                            .map(|l| l.iter().flat_map(|&c| [c, c]).collect()),
                    ),
                };
                let cb = DenoiseBatch {
                    ids: batch.ids,
                    batch: t2.len(),
                    len: n_mod,
                    t: &t2,
                    labels: l2.as_deref(),
                };
                let c: T2<E, D, T> = self.cond(cond, &cb)?;
                let (c, mut cond_tape) = act(self.cfg.mlp, c)?.split_tape();
                // row-restricted: each carried row's sequence picks its modulation vector
                let per_row = |x: T2<E, D, T>| match sel {
                    Some(s) => D::gather_rows(x, &s.seq),
                    None => Ok(x),
                };
                let last = blocks.len().saturating_sub(1);
                for (l, blk) in blocks.iter().enumerate() {
                    let (m, t) = self.ada::<T>(&c, &blk.norm, 6)?;
                    cond_tape = cond_tape.merge(t);
                    let mut m = m.into_iter();
                    let mut take = || m.next().expect("6 modulation chunks");
                    let (sh_a, sc_a, g_a) = (take(), take(), take());
                    let (sh_m, sc_m, g_m) = (take(), take(), take());
                    let a = match table.take() {
                        // block 0: its attention input LN(h)·(1 + scale) + shift depends only
                        // on the sequence and the token: norm, modulation and q/k/v projections
                        // of b·(V + 1) rows, gathered by (sequence, id), instead of b·n
                        Some(e) => {
                            let vt = e.shape().0;
                            let rep: Vec<usize> = (0..b).flat_map(|_| 0..vt).collect();
                            let e = D::gather_rows(e, &rep)?;
                            let a_tab = D::norm_modulate(e, sh_a, sc_a, b, vt)?;
                            let at: Vec<usize> = (batch.ids.iter().enumerate())
                                .map(|(i, &id)| (i / n) * vt + id as usize)
                                .collect();
                            self.attention_lookup(a_tab, &at, &blk.attn, rope, b, n)?
                        }
                        None => {
                            let a = D::norm_modulate(h.retaped::<T>(), sh_a, sc_a, b_mod, n_mod)?;
                            match sel.filter(|_| l == last) {
                                None => self.attention(a, &blk.attn, rope, b, n)?,
                                // the last block at the selected rows only
                                Some(s) => {
                                    let rows = s.flat.len();
                                    let a = self.attention_at(a, &blk.attn, rope.0, s, (b, n))?;
                                    let a = dropout_at(a, next_mask(), &s.seq)?;
                                    let g_a = per_row(g_a)?;
                                    h = D::gated_residual(
                                        D::gather_rows(h, &s.flat)?,
                                        a,
                                        g_a,
                                        rows,
                                        1,
                                    )?;
                                    let (sh_m, sc_m) = (per_row(sh_m)?, per_row(sc_m)?);
                                    let f =
                                        D::norm_modulate(h.retaped::<T>(), sh_m, sc_m, rows, 1)?;
                                    let f =
                                        dropout_at(self.ffn(f, &blk.ffn)?, next_mask(), &s.seq)?;
                                    h = D::gated_residual(h, f, per_row(g_m)?, rows, 1)?;
                                    break;
                                }
                            }
                        }
                    };
                    let a = channel_dropout(a, next_mask(), b, n)?;
                    h = D::gated_residual(h, a, g_a, b_mod, n_mod)?;
                    D::retain(&scope, &h);
                    let f = D::norm_modulate(h.retaped::<T>(), sh_m, sc_m, b_mod, n_mod)?;
                    let f = channel_dropout(self.ffn(f, &blk.ffn)?, next_mask(), b, n)?;
                    h = D::gated_residual(h, f, g_m, b_mod, n_mod)?;
                    D::retain(&scope, &h);
                }
                let (m, t) = self.ada::<T>(&c, head, 2)?;
                let mut m = m.into_iter();
                let (sh, sc) = (m.next().expect("shift"), m.next().expect("scale"));
                let out = match sel {
                    Some(s) => {
                        let rows = s.flat.len();
                        D::norm_modulate(h, per_row(sh)?, per_row(sc)?, rows, 1)?
                    }
                    None => noised(D::norm_modulate(h, sh, sc, b_mod, n_mod)?)?,
                };
                (out, cond_tape.merge(t))
            }
            Trunk::Plain { blocks, head } => {
                let last = blocks.len().saturating_sub(1);
                for (l, blk) in blocks.iter().enumerate() {
                    if let Some(e) = table.take() {
                        // block 0: RMSNorm and the projections of the V + 1 ids' rows
                        let a_tab = D::rms_norm(e, blk.norm.attn.tensor())?;
                        let a = self.attention_lookup(a_tab, &ids, &blk.attn, rope, b, n)?;
                        h = D::residual(h, channel_dropout(a, next_mask(), b, n)?)?;
                        D::retain(&scope, &h);
                        let f = D::rms_norm(h.retaped::<T>(), blk.norm.mlp.tensor())?;
                        let f = channel_dropout(self.ffn(f, &blk.ffn)?, next_mask(), b, n)?;
                        h = D::residual(h, f)?;
                        D::retain(&scope, &h);
                        continue;
                    }
                    let a = D::rms_norm(h.retaped::<T>(), blk.norm.attn.tensor())?;
                    if let (Some(s), true) = (sel, l == last) {
                        let a = self.attention_at(a, &blk.attn, rope.0, s, (b, n))?;
                        let a = dropout_at(a, next_mask(), &s.seq)?;
                        h = D::residual(D::gather_rows(h, &s.flat)?, a)?;
                        let f = D::rms_norm(h.retaped::<T>(), blk.norm.mlp.tensor())?;
                        let f = dropout_at(self.ffn(f, &blk.ffn)?, next_mask(), &s.seq)?;
                        h = D::residual(h, f)?;
                        break;
                    }
                    let a = self.attention(a, &blk.attn, rope, b, n)?;
                    h = D::residual(h, channel_dropout(a, next_mask(), b, n)?)?;
                    D::retain(&scope, &h);
                    let f = D::rms_norm(h.retaped::<T>(), blk.norm.mlp.tensor())?;
                    let f = channel_dropout(self.ffn(f, &blk.ffn)?, next_mask(), b, n)?;
                    h = D::residual(h, f)?;
                    D::retain(&scope, &h);
                }
                let h = if sel.is_some() { h } else { noised(h)? };
                (D::rms_norm(h, head.tensor())?, T::default())
            }
        };
        let logits = D::matmul(h, self.out.tensor()?)?;
        let (logits, t) = logits.split_tape();
        Ok(logits.put_tape(t.merge(cond_tape)))
    }

    /// Write the parameters to a safetensors file with the project's one atomic writer
    /// (`maskdiff_data::write_atomic`).
    pub fn save_safetensors(&self, path: &Path) -> Result<(), NetworkError> {
        param::save_file(self.params(), path)
    }

    /// Load parameters saved by [`Self::save_safetensors`] from a model of the same
    /// configuration; any missing, extra or mis-shaped tensor is an error.
    pub fn load_safetensors(&mut self, path: &Path) -> Result<(), NetworkError> {
        param::load_file(self.params_mut(), path)
    }
}

/// [`channel_dropout`] of ragged rows (b·n, d) → (rows, d): each row times its sequence's
/// keep-mask (`seq`: the rows' sequences).
fn dropout_at<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    y: T2<E, D, T>,
    mask: Option<T2<E, D>>,
    seq: &[usize],
) -> Res<T2<E, D, T>, D> {
    match mask {
        None => Ok(y),
        Some(m) => y.try_mul(D::gather_rows(m, seq)?),
    }
}

/// The flat rows `rows` (checked by [`check_rows`]) of logits (b, n, V) → (rows, V).
pub(crate) fn select_rows<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    logits: T3<E, D, T>,
    rows: &[usize],
) -> Result<T2<E, D, T>, NetworkError> {
    let (b, n, v) = *logits.shape();
    logits
        .try_reshape_like(&(b * n, v))
        .and_then(|l| D::gather_rows(l, rows))
        .map_err(NetworkError::device)
}

/// `rows` selects output rows of `total`: at least one, strictly increasing, in range.
pub(crate) fn check_rows(rows: &[usize], total: usize) -> Result<(), NetworkError> {
    if rows.is_empty() {
        return Err(NetworkError::Input("no output rows selected".into()));
    }
    if let Some(w) = rows.windows(2).find(|w| w[0] >= w[1]) {
        return Err(NetworkError::Input(format!(
            "output rows must be strictly increasing: {} then {}",
            w[0], w[1]
        )));
    }
    match rows.last() {
        Some(&r) if r >= total => Err(NetworkError::Input(format!(
            "output row {r} out of range for {total} rows"
        ))),
        _ => Ok(()),
    }
}

/// `row − log Σ exp(row)` in place, shifted by the row's maximum (NaN or infinite logits give
/// NaN).
fn log_softmax_row<E: Elem>(row: &mut [E]) {
    let m = row.iter().copied().fold(E::neg_infinity(), E::max);
    let sum = row.iter().fold(E::zero(), |s, &x| s + (x - m).exp());
    let lse = m + sum.ln();
    row.iter_mut().for_each(|x| *x -= lse);
}
