//! Block-by-block inference for block diffusion (BD3-LM, Arriola et al., ICLR 2025, §3.3 and
//! Alg. 2) with a key/value cache of the clean prefix: a committed clean block is encoded once
//! (conditioned on t = 0, as the training forward conditions the clean copy, see
//! [`crate::BlockMask`]) and its per-layer keys (after RoPE) and values are kept; each denoising
//! step of the next block then runs the network on that block only, its queries attending to the
//! cached prefix and to the block itself — exactly the keys the training mask gives a noised
//! block. [`BlockDenoiser`] puts a model and its cache behind `maskdiff_process::PrefixDenoiser`;
//! [`CacheMode::Recompute`] re-encodes the whole prefix at every call instead (same operations,
//! so the same bits: the reference of the cache, and the baseline of its speed).

use crate::layers::*;
use crate::modules::{Attention, Trunk};
use crate::{Elem, Kernels, Md4Transformer, NetworkError};
use dfdx::prelude::*;
use maskdiff_process::{BackendError, DenoiseBatch, LogProbs, PrefixDenoiser, ProcessError, Vocab};

/// Per-layer keys (after RoPE) and values of a clean prefix of one sequence, each `(len, dim)`.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache<E> {
    k: Vec<Vec<E>>,
    v: Vec<Vec<E>>,
    len: usize,
}

impl<E: Elem> KvCache<E> {
    /// An empty prefix for a model of `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            k: vec![Vec::new(); n_layers],
            v: vec![Vec::new(); n_layers],
            len: 0,
        }
    }
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<E: Elem, D: Kernels<E>> Md4Transformer<E, D> {
    /// Logits `(len, V)` of one block of `ids` at positions `cache.len()..` given the cached
    /// prefix, at time `t` (and class `label`); with `commit`, the block's keys and values are
    /// appended to the cache (pass t = 0 for a clean block). Inference only (no tape, no dropout).
    pub fn forward_cached(
        &self,
        ids: &[u32],
        t: f64,
        label: Option<u32>,
        cache: &mut KvCache<E>,
        commit: bool,
    ) -> Result<T2<E, D>, NetworkError> {
        let cfg = self.config();
        let l = ids.len();
        if l == 0 {
            return Err(NetworkError::Input("empty block".into()));
        }
        if cache.k.len() != cfg.n_layers {
            return Err(NetworkError::Input(format!(
                "cache of {} layers for a model of {}",
                cache.k.len(),
                cfg.n_layers
            )));
        }
        if cache.len + l > cfg.max_len {
            return Err(NetworkError::Input(format!(
                "prefix {} + block {l} exceeds max_len {}",
                cache.len, cfg.max_len
            )));
        }
        let labels = label.map(|c| [c]);
        let batch = DenoiseBatch {
            ids,
            batch: 1,
            len: l,
            t: &[t],
            labels: labels.as_ref().map(|a| &a[..]),
        };
        // the plain model's checks (ids, t, labels) on the block alone
        batch.validate(self.vocab())?;
        if cfg.time_conditioning && !(t.is_finite() && (0.0..=1.0).contains(&t)) {
            return Err(NetworkError::Input(format!("time {t} not in [0, 1]")));
        }
        match (cfg.num_classes, label) {
            (0, None) => {}
            (k, Some(c)) if (c as usize) < k => {}
            (k, _) => {
                return Err(NetworkError::Input(format!(
                    "label {label:?} for a model with {k} classes"
                )))
            }
        }
        let mut new_kv = Vec::with_capacity(cfg.n_layers);
        let logits = self
            .cached_impl(&batch, cache, &mut new_kv)
            .map_err(NetworkError::device)?;
        if commit {
            for (layer, (k, v)) in new_kv.into_iter().enumerate() {
                cache.k[layer].extend(k);
                cache.v[layer].extend(v);
            }
            cache.len += l;
        }
        Ok(logits)
    }

    fn cached_impl(
        &self,
        batch: &DenoiseBatch<'_>,
        cache: &KvCache<E>,
        new_kv: &mut Vec<(Vec<E>, Vec<E>)>,
    ) -> Res<T2<E, D>, D> {
        let cfg = self.config();
        let (l, d) = (batch.len, cfg.dim);
        let dev = self.device();
        let scope = D::scope();
        let ids = dev.try_tensor_from_vec(batch.ids.iter().map(|&i| i as usize).collect(), (l,))?;
        let mut h: T2<E, D> = self.embed.tensor()?.try_gather(ids)?;
        if let Some(proj) = &self.embed_proj {
            h = dense(h, proj.weight.tensor()?, Some(proj.bias.tensor()))?;
        }
        let hd = d / cfg.n_heads;
        let rope = Rope::at_positions(dev, cache.len..cache.len + l, hd, cfg.rope_theta)?;
        let h = match &self.trunk {
            Trunk::Conditioned { cond, blocks, head } => {
                let c = act(cfg.mlp, self.cond::<NoneTape>(cond, batch)?)?;
                for (layer, blk) in blocks.iter().enumerate() {
                    let (m, _) = self.ada::<NoneTape>(&c, &blk.norm, 6)?;
                    let mut m = m.into_iter();
                    let mut take = || m.next().expect("6 modulation chunks");
                    let (sh_a, sc_a, g_a) = (take(), take(), take());
                    let (sh_m, sc_m, g_m) = (take(), take(), take());
                    let a = D::norm_modulate(h.clone(), sh_a, sc_a, 1, l)?;
                    let a = self.cached_attention(a, &blk.attn, &rope, cache, layer, new_kv)?;
                    h = D::gated_residual(h, a, g_a, 1, l)?;
                    D::retain(&scope, &h);
                    let f = D::norm_modulate(h.clone(), sh_m, sc_m, 1, l)?;
                    h = D::gated_residual(h, self.ffn(f, &blk.ffn)?, g_m, 1, l)?;
                    D::retain(&scope, &h);
                }
                let (m, _) = self.ada::<NoneTape>(&c, head, 2)?;
                let mut m = m.into_iter();
                let (sh, sc) = (m.next().expect("shift"), m.next().expect("scale"));
                D::norm_modulate(h, sh, sc, 1, l)?
            }
            Trunk::Plain { blocks, head } => {
                for (layer, blk) in blocks.iter().enumerate() {
                    let a = D::rms_norm(h.clone(), blk.norm.attn.tensor())?;
                    let a = self.cached_attention(a, &blk.attn, &rope, cache, layer, new_kv)?;
                    h = D::residual(h, a)?;
                    D::retain(&scope, &h);
                    let f = D::rms_norm(h.clone(), blk.norm.mlp.tensor())?;
                    h = D::residual(h, self.ffn(f, &blk.ffn)?)?;
                    D::retain(&scope, &h);
                }
                D::rms_norm(h, head.tensor())?
            }
        };
        D::matmul(h, self.out.tensor()?)
    }

    /// Attention of the block's l queries over [cached prefix ; block] (every key allowed):
    /// the keys a noised block sees under the training mask. The block's own keys and values
    /// are pushed to `new_kv` for a commit.
    fn cached_attention(
        &self,
        x: T2<E, D>,
        attn: &Attention<E, D>,
        rope: &Rope<E, D>,
        cache: &KvCache<E>,
        layer: usize,
        new_kv: &mut Vec<(Vec<E>, Vec<E>)>,
    ) -> Res<T2<E, D>, D> {
        let cfg = self.config();
        let (d, h) = (cfg.dim, cfg.n_heads);
        let hd = d / h;
        let l = x.shape().0;
        let n = cache.len + l;
        let q = D::matmul(x.clone(), attn.wq.tensor()?)?;
        let k = D::matmul(x.clone(), attn.wk.tensor()?)?;
        let v = D::matmul(x, attn.wv.tensor()?)?;
        let q = D::rope(rope, q, 1, l, h, 1.0 / (hd as f64).sqrt())?;
        let k = D::rope(rope, k, 1, l, h, 1.0)?.as_vec();
        let v = v.as_vec();
        let dev = self.device();
        let mut ks = Vec::with_capacity(n * d);
        ks.extend_from_slice(&cache.k[layer]);
        ks.extend_from_slice(&k);
        let mut vs = Vec::with_capacity(n * d);
        vs.extend_from_slice(&cache.v[layer]);
        vs.extend_from_slice(&v);
        new_kv.push((k, v));
        let kt = dev
            .try_tensor_from_vec(ks, (1, n, h, hd))?
            .try_permute::<_, Axes4<0, 2, 3, 1>>()?;
        let vt = dev
            .try_tensor_from_vec(vs, (1, n, h, hd))?
            .try_permute::<_, Axes4<0, 2, 1, 3>>()?;
        let p = D::softmax_last(q.try_permute::<_, Axes4<0, 2, 1, 3>>()?.try_matmul(kt)?)?;
        let o: T4<E, D> = p.try_matmul(vt)?;
        let o = o
            .try_permute::<_, Axes4<0, 2, 1, 3>>()?
            .try_reshape_like(&(l, d))?;
        D::matmul(o, attn.wo.tensor()?)
    }
}

/// Whether [`BlockDenoiser`] keeps the prefix's keys and values or re-encodes the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Encode each committed block once.
    Cached,
    /// Re-encode every committed block (block by block, as the cache was built) at every call.
    Recompute,
}

/// A block-diffusion model and the prefix of the sequence being generated.
#[derive(Debug, Clone)]
pub struct BlockDenoiser<E: Elem, D: Kernels<E>> {
    model: Md4Transformer<E, D>,
    mode: CacheMode,
    cache: KvCache<E>,
    /// The committed blocks (kept for [`CacheMode::Recompute`]).
    blocks: Vec<Vec<u32>>,
    label: Option<u32>,
    prefix: usize,
}

impl<E: Elem, D: Kernels<E>> BlockDenoiser<E, D> {
    /// A denoiser over `model` (a block-diffusion network) with an empty prefix.
    pub fn new(model: Md4Transformer<E, D>, mode: CacheMode) -> Result<Self, NetworkError> {
        if model.config().block_size.is_none() {
            return Err(NetworkError::Input(
                "a block denoiser needs a block-diffusion network (block_size set)".into(),
            ));
        }
        let cache = KvCache::new(model.config().n_layers);
        Ok(Self {
            model,
            mode,
            cache,
            blocks: Vec::new(),
            label: None,
            prefix: 0,
        })
    }
    pub fn model(&self) -> &Md4Transformer<E, D> {
        &self.model
    }
    pub fn mode(&self) -> CacheMode {
        self.mode
    }
}

fn process_err(e: NetworkError) -> ProcessError {
    match e {
        NetworkError::Process(p) => p,
        other => ProcessError::Backend(BackendError::new(other)),
    }
}

impl<E: Elem, D: Kernels<E>> PrefixDenoiser for BlockDenoiser<E, D> {
    fn vocab(&self) -> Vocab {
        self.model.vocab()
    }
    fn is_time_conditioned(&self) -> bool {
        self.model.config().time_conditioning
    }
    fn num_classes(&self) -> usize {
        self.model.config().num_classes
    }
    fn block_size(&self) -> usize {
        self.model.config().block_size.unwrap_or(1)
    }
    fn max_len(&self) -> usize {
        self.model.config().max_len
    }
    fn prefix_len(&self) -> usize {
        self.prefix
    }
    fn reset(&mut self, label: Option<u32>) {
        self.cache = KvCache::new(self.model.config().n_layers);
        self.blocks.clear();
        self.label = label;
        self.prefix = 0;
    }
    fn block_log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        if b.batch != 1 {
            return Err(ProcessError::Shape(format!(
                "a block denoiser continues one prefix, got {} rows",
                b.batch
            )));
        }
        b.validate(self.vocab())?;
        let t = b.t[0];
        let logits = match self.mode {
            CacheMode::Cached => {
                self.model
                    .forward_cached(b.ids, t, self.label, &mut self.cache, false)
            }
            CacheMode::Recompute => {
                let mut cache = KvCache::new(self.model.config().n_layers);
                for blk in &self.blocks {
                    self.model
                        .forward_cached(blk, 0.0, self.label, &mut cache, true)
                        .map_err(process_err)?;
                }
                self.model
                    .forward_cached(b.ids, t, self.label, &mut cache, false)
            }
        }
        .map_err(process_err)?;
        let lp = logits
            .try_log_softmax::<Axis<1>>()
            .map_err(|e| process_err(NetworkError::device(e)))?;
        Ok(LogProbs {
            data: lp
                .as_vec()
                .into_iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect(),
            batch: 1,
            len: b.len,
            vocab: self.model.config().vocab_size,
        })
    }
    fn commit(&mut self, block: &[u32]) -> Result<(), ProcessError> {
        let v = self.vocab();
        if let Some(&bad) = block.iter().find(|&&x| x >= v.mask_id()) {
            return Err(ProcessError::Shape(format!(
                "a committed block holds the non-token id {bad}"
            )));
        }
        if self.mode == CacheMode::Cached {
            self.model
                .forward_cached(block, 0.0, self.label, &mut self.cache, true)
                .map_err(process_err)?;
        } else if self.prefix + block.len() > self.model.config().max_len {
            return Err(ProcessError::Shape(format!(
                "prefix {} + block {} exceeds max_len {}",
                self.prefix,
                block.len(),
                self.model.config().max_len
            )));
        }
        self.blocks.push(block.to_vec());
        self.prefix += block.len();
        Ok(())
    }
}
