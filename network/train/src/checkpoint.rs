//! Checkpoints: a directory holding `params-S.safetensors`, `optimizer-S.safetensors` (AdamW
//! moments `m.<name>`, `v.<name>`), `ema-S.safetensors` (S = step) and `manifest.json`
//! ([`Manifest`]); an objective with parameters of its own (GenMD4's `theta`) adds
//! `objective-S.safetensors` holding `<name>`, `ema.<name>`, `m.<name>` and `v.<name>`.
//! Tensor files are written first, each atomically (temp + rename); the manifest
//! is written last, atomically, and names the files with their sizes and FNV-1a checksums — so a
//! crash at any point leaves the previous complete checkpoint in force. Stale tensor files of
//! other steps are removed afterwards; a save that fails (disk full, ...) removes the tensor files
//! it wrote.
//!
//! Tensor names are the model's hierarchical parameter names (`embed`, `blocks.3.attn.wq`, …,
//! documented in `maskdiff_network`'s model module). Format history: v1 called the objective
//! file's role `genmd4`; v2 calls it `objective`. Both are read.
//!
//! [`load_model`] reads the parameters (or their EMA) and the objective only — no optimizer
//! moments — for evaluation and sampling.

use crate::trainer::settings;
use crate::{TrainConfig, TrainError, Trainer};
use maskdiff_data::{fnv1a64, write_atomic};
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::tensor_io::{from_safetensors, to_safetensors, NamedTensor, TensorMap};
use maskdiff_network::{Kernels, Network, NetworkConfig};
use maskdiff_objective::{Flat, Objective};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FORMAT: &str = "maskdiff-checkpoint";
pub const FORMAT_VERSION: u32 = 2;
/// Oldest format version this code reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";

/// How step RNGs are derived: `StdRng::seed_from_u64(splitmix(seed, step, stream))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub scheme: String,
    pub seed: u64,
    /// Next step whose RNG will be drawn.
    pub step: u64,
}

/// One tensor file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub role: String,
    pub file: String,
    pub bytes: u64,
    pub fnv1a64: String,
}

/// The JSON manifest of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// `maskdiff-train` crate version that wrote it.
    pub code_version: String,
    pub network: NetworkConfig,
    pub train: TrainConfig,
    pub vocab_size: usize,
    /// Steps completed.
    pub step: u64,
    pub rng: RngState,
    /// AdamW update count.
    pub optimizer_count: u64,
    pub files: Vec<FileEntry>,
    /// Caller state (data position, ...), stored verbatim.
    pub extra: serde_json::Value,
}

const RNG_SCHEME: &str = "stdrng-splitmix(seed,step,stream)";

fn checksum(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a64(bytes))
}

/// The role of the objective's tensor file (v1 wrote `genmd4`).
const OBJECTIVE_ROLES: [&str; 2] = ["objective", "genmd4"];

impl Manifest {
    /// Read and check `dir/manifest.json` (format and version).
    pub fn read(dir: &Path) -> Result<Self, TrainError> {
        let path = dir.join(MANIFEST);
        let text =
            std::fs::read_to_string(&path).map_err(|e| TrainError::ckpt(&path, e.to_string()))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| TrainError::ckpt(&path, format!("bad manifest: {e}")))?;
        if m.format != FORMAT || !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&m.format_version)
        {
            return Err(TrainError::ckpt(
                &path,
                format!(
                    "format {} v{}, expected {FORMAT} v{MIN_FORMAT_VERSION}..=v{FORMAT_VERSION}",
                    m.format, m.format_version
                ),
            ));
        }
        if m.vocab_size != m.network.vocab_size {
            return Err(TrainError::ckpt(
                &path,
                "vocab_size disagrees with the network config",
            ));
        }
        if m.rng.scheme != RNG_SCHEME {
            return Err(TrainError::ckpt(
                &path,
                format!("unknown RNG scheme {}", m.rng.scheme),
            ));
        }
        Ok(m)
    }

    fn entry(&self, dir: &Path, roles: &[&str]) -> Result<&FileEntry, TrainError> {
        self.files
            .iter()
            .find(|f| roles.contains(&f.role.as_str()))
            .ok_or_else(|| TrainError::ckpt(dir, format!("manifest lists no {} file", roles[0])))
    }

    fn file(&self, dir: &Path, roles: &[&str]) -> Result<TensorMap<f32>, TrainError> {
        let e = self.entry(dir, roles)?;
        let path = dir.join(&e.file);
        let bytes = std::fs::read(&path).map_err(|err| TrainError::ckpt(&path, err.to_string()))?;
        if bytes.len() as u64 != e.bytes || checksum(&bytes) != e.fnv1a64 {
            return Err(TrainError::ckpt(
                &path,
                "size or checksum differs from the manifest (corrupt file)",
            ));
        }
        Ok(from_safetensors::<f32>(&bytes, &path)?)
    }
}

/// Remove `name` from `map` as a flat tensor of `numel` values.
fn take<D: Kernels<f32>>(
    map: &mut TensorMap<f32>,
    name: &str,
    numel: usize,
    dev: &D,
    path: &Path,
) -> Result<Flat<D>, TrainError> {
    let (shape, vals) = map
        .remove(name)
        .ok_or_else(|| TrainError::mismatch(path, format!("tensor {name} missing")))?;
    if vals.len() != numel {
        return Err(TrainError::mismatch(
            path,
            format!("tensor {name} has shape {shape:?}, expected {numel} values"),
        ));
    }
    dev.try_tensor_from_vec(vals, (numel,))
        .map_err(TrainError::device)
}

fn no_extra(map: &TensorMap<f32>, path: &Path) -> Result<(), TrainError> {
    if map.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<_> = map.keys().collect();
    keys.sort();
    Err(TrainError::mismatch(
        path,
        format!("unexpected tensors {keys:?}"),
    ))
}

/// Load a model's parameters from a parsed tensor file (names as keys).
fn load_model_params<D: Kernels<f32>>(
    model: &mut Network<f32, D>,
    mut map: TensorMap<f32>,
    prefix: &str,
    path: &Path,
) -> Result<(), TrainError> {
    let dev = model.device().clone();
    for p in model.params_mut() {
        let key = format!("{prefix}{}", p.name);
        if let Some((shape, _)) = map.get(&key) {
            if *shape != p.shape {
                return Err(TrainError::mismatch(
                    path,
                    format!(
                        "tensor {key} has shape {shape:?}, the model expects {:?}",
                        p.shape
                    ),
                ));
            }
        }
        p.value = take(&mut map, &key, p.numel(), &dev, path)?;
    }
    if prefix.is_empty() {
        no_extra(&map, path)?;
    }
    Ok(())
}

fn model_items<D: Kernels<f32>>(m: &Network<f32, D>) -> Vec<NamedTensor<'_, f32, D>> {
    m.params()
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone(), &p.value))
        .collect()
}

/// Which weights [`load_model`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    Live,
    Ema,
}

/// A model and its objective read from a checkpoint for evaluation or sampling.
#[derive(Debug, Clone)]
pub struct LoadedModel<D: Kernels<f32>, O: Objective<D>> {
    pub manifest: Manifest,
    pub model: Network<f32, D>,
    pub objective: O,
}

/// Read the parameters (or the EMA) of the checkpoint in `dir` and its objective — nothing of
/// the optimizer. `O` must be the run's objective (see `Manifest::read(dir)?.train.objective`).
pub fn load_model<D: Kernels<f32>, O: Objective<D>>(
    dir: &Path,
    weights: Weights,
    dev: &D,
) -> Result<LoadedModel<D, O>, TrainError> {
    let man = Manifest::read(dir)?;
    let p = dir.join(MANIFEST);
    let mut objective = O::from_settings(&settings(&man.train, man.network.vocab_size), dev)?;
    // Parameters are initialised only to be overwritten; seed 0 is as good as any.
    let mut model = Network::new(man.network.clone(), dev, 0)?;
    let role = match weights {
        Weights::Live => "params",
        Weights::Ema => "ema",
    };
    load_model_params(&mut model, man.file(dir, &[role])?, "", &p)?;
    if !objective.params().is_empty() {
        let mut map = man.file(dir, &OBJECTIVE_ROLES)?;
        let prefix = match weights {
            Weights::Live => "",
            Weights::Ema => "ema.",
        };
        let names: Vec<&str> = objective.params().into_iter().map(|(n, _)| n).collect();
        for (name, t) in names.into_iter().zip(objective.params_mut()) {
            let n = t.shape().0;
            *t = take(&mut map, &format!("{prefix}{name}"), n, dev, &p)?;
        }
    }
    Ok(LoadedModel {
        manifest: man,
        model,
        objective,
    })
}

/// After a failed save: remove the tensor files it wrote (`new`) unless the manifest in force
/// names them, so a failed save leaves the directory as it was.
fn remove_unlisted(dir: &Path, new: &[FileEntry]) {
    let in_force: Vec<String> = Manifest::read(dir)
        .map(|m| m.files.into_iter().map(|f| f.file).collect())
        .unwrap_or_default();
    for f in new {
        if !in_force.contains(&f.file) {
            let _ = std::fs::remove_file(dir.join(&f.file));
        }
    }
}

impl<D: Kernels<f32>, O: Objective<D>> Trainer<D, O> {
    /// Write a checkpoint of the current state into `dir` (created if needed). If any file
    /// fails to write, the files this save wrote are removed again and the previous checkpoint
    /// (if any) stays in force.
    pub fn save(&self, dir: &Path) -> Result<Manifest, TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::ckpt(dir, e.to_string()))?;
        let mut opt_items = Vec::new();
        for (p, (m, v)) in self
            .model
            .params()
            .iter()
            .zip(self.opt.m.iter().zip(&self.opt.v))
        {
            opt_items.push((format!("m.{}", p.name), p.shape.clone(), m));
            opt_items.push((format!("v.{}", p.name), p.shape.clone(), v));
        }
        let mut parts = vec![
            ("params", model_items(&self.model)),
            ("optimizer", opt_items),
            ("ema", model_items(&self.ema)),
        ];
        let own = self.objective.params();
        if !own.is_empty() {
            let ema_own = self.ema_objective.params();
            let mut items = Vec::new();
            for (i, (name, t)) in own.into_iter().enumerate() {
                let s = vec![t.shape().0];
                items.push((name.to_string(), s.clone(), t));
                items.push((format!("ema.{name}"), s.clone(), ema_own[i].1));
                items.push((format!("m.{name}"), s.clone(), &self.objective_opt.m[i]));
                items.push((format!("v.{name}"), s, &self.objective_opt.v[i]));
            }
            parts.push(("objective", items));
        }
        let mut files = Vec::new();
        let written = (|| {
            for (role, items) in &parts {
                let file = format!("{role}-{:09}.safetensors", self.step);
                let path = dir.join(&file);
                let bytes = to_safetensors(items, &path)?;
                write_atomic(&path, &bytes)?;
                files.push(FileEntry {
                    role: role.to_string(),
                    file,
                    bytes: bytes.len() as u64,
                    fnv1a64: checksum(&bytes),
                });
            }
            Ok(())
        })();
        if let Err(e) = written {
            remove_unlisted(dir, &files);
            return Err(e);
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            code_version: env!("CARGO_PKG_VERSION").into(),
            network: self.net_cfg.clone(),
            train: self.train_cfg.clone(),
            vocab_size: self.net_cfg.vocab_size,
            step: self.step,
            rng: RngState {
                scheme: RNG_SCHEME.into(),
                seed: self.seed,
                step: self.step,
            },
            optimizer_count: self.opt.count,
            files: files.clone(),
            extra: self.extra.clone(),
        };
        let mpath = dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| TrainError::ckpt(&mpath, e.to_string()));
        if let Err(e) = json.and_then(|json| Ok(write_atomic(&mpath, &json)?)) {
            remove_unlisted(dir, &files);
            return Err(e);
        }
        // the new manifest is in force: drop tensor files of other steps
        if let Ok(rd) = std::fs::read_dir(dir) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let ours = ["params-", "optimizer-", "ema-", "objective-", "genmd4-"]
                    .iter()
                    .any(|p| name.starts_with(p))
                    && name.ends_with(".safetensors");
                if ours && !files.iter().any(|f| f.file == name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(manifest)
    }

    /// Restore a run from `dir` with the configuration stored in its manifest.
    pub fn load(dir: &Path, dev: &D) -> Result<Self, TrainError> {
        let man = Manifest::read(dir)?;
        let mut t = Self::new(man.network.clone(), man.train.clone(), man.rng.seed, dev)?;
        let p = dir.join(MANIFEST);
        load_model_params(&mut t.model, man.file(dir, &["params"])?, "", &p)?;
        load_model_params(&mut t.ema, man.file(dir, &["ema"])?, "", &p)?;
        let mut opt_map = man.file(dir, &["optimizer"])?;
        let shapes: Vec<(String, usize)> = t
            .model
            .params()
            .iter()
            .map(|q| (q.name.clone(), q.numel()))
            .collect();
        for (i, (name, n)) in shapes.iter().enumerate() {
            t.opt.m[i] = take(&mut opt_map, &format!("m.{name}"), *n, dev, &p)?;
            t.opt.v[i] = take(&mut opt_map, &format!("v.{name}"), *n, dev, &p)?;
        }
        no_extra(&opt_map, &p)?;
        t.opt.count = man.optimizer_count;
        t.objective_opt.count = man.optimizer_count;
        let names: Vec<(&'static str, usize)> = t
            .objective
            .params()
            .into_iter()
            .map(|(n, x)| (n, x.shape().0))
            .collect();
        if !names.is_empty() {
            let mut map = man.file(dir, &OBJECTIVE_ROLES)?;
            let mut live = Vec::new();
            let mut ema = Vec::new();
            for (i, (name, n)) in names.iter().enumerate() {
                live.push(take(&mut map, name, *n, dev, &p)?);
                ema.push(take(&mut map, &format!("ema.{name}"), *n, dev, &p)?);
                t.objective_opt.m[i] = take(&mut map, &format!("m.{name}"), *n, dev, &p)?;
                t.objective_opt.v[i] = take(&mut map, &format!("v.{name}"), *n, dev, &p)?;
            }
            no_extra(&map, &p)?;
            for (dst, src) in t.objective.params_mut().into_iter().zip(live) {
                *dst = src;
            }
            for (dst, src) in t.ema_objective.params_mut().into_iter().zip(ema) {
                *dst = src;
            }
        } else if man
            .files
            .iter()
            .any(|f| OBJECTIVE_ROLES.contains(&f.role.as_str()))
        {
            return Err(TrainError::mismatch(
                &p,
                "objective parameters in a checkpoint whose objective has none",
            ));
        }
        t.step = man.step;
        t.extra = man.extra;
        Ok(t)
    }

    /// Like [`Trainer::load`], but first checks that the checkpoint was written with exactly
    /// `net_cfg` and `train_cfg`; any difference (e.g. another vocabulary) is a
    /// [`TrainError::CheckpointMismatch`] naming it. A checkpoint from before the clip unit was
    /// recorded (gradient clipping on the nats-per-sequence scale) is refused with a message
    /// saying so when `train_cfg` clips on the bits-per-token scale, unless clipping is off in
    /// both; [`Trainer::load`] keeps the saved meaning.
    pub fn resume(
        dir: &Path,
        net_cfg: &NetworkConfig,
        train_cfg: &TrainConfig,
        dev: &D,
    ) -> Result<Self, TrainError> {
        let man = Manifest::read(dir)?;
        let mismatch = |msg: String| TrainError::mismatch(dir, msg);
        if man.network.vocab_size != net_cfg.vocab_size {
            return Err(mismatch(format!(
                "vocabulary size {} in the checkpoint, {} requested",
                man.network.vocab_size, net_cfg.vocab_size
            )));
        }
        if &man.network != net_cfg {
            return Err(mismatch(format!(
                "network config differs: checkpoint {}, requested {}",
                serde_json::to_string(&man.network).unwrap_or_default(),
                serde_json::to_string(net_cfg).unwrap_or_default()
            )));
        }
        if let Some(why) = man.train.clip_meaning_conflict(train_cfg) {
            return Err(mismatch(why));
        }
        let mut saved = man.train.clone();
        if saved.grad_clip == 0.0 {
            // Without clipping the unit of the (unused) threshold does not matter.
            saved.clip_loss = train_cfg.clip_loss;
        }
        if &saved != train_cfg {
            return Err(mismatch(format!(
                "training config differs: checkpoint {}, requested {}",
                serde_json::to_string(&man.train).unwrap_or_default(),
                serde_json::to_string(train_cfg).unwrap_or_default()
            )));
        }
        Self::load(dir, dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maskdiff_objective::Md4;

    fn tensor_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors"))
            .collect();
        v.sort();
        v
    }

    /// A save that fails after writing some tensor files removes them; the checkpoint in force
    /// is untouched and still loads. With no checkpoint in force, nothing is left behind.
    #[test]
    fn a_failed_save_leaves_no_orphan_files() {
        let dev = Cpu::default();
        let net = NetworkConfig::preset("tiny", 5).unwrap();
        let mut t = Trainer::<_, Md4>::new(net, TrainConfig::default(), 0, &dev).unwrap();
        let dir = std::env::temp_dir().join(format!("maskdiff-ckpt-fail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        t.save(&dir).unwrap();
        let before = tensor_files(&dir);
        assert_eq!(before.len(), 3, "{before:?}");
        // The third file of step 5 cannot be written: a non-empty directory holds its name.
        t.step = 5;
        let blocker = dir.join("ema-000000005.safetensors");
        std::fs::create_dir_all(blocker.join("x")).unwrap();
        assert!(t.save(&dir).is_err());
        std::fs::remove_dir_all(&blocker).unwrap();
        assert_eq!(
            tensor_files(&dir),
            before,
            "files of the failed save remain"
        );
        assert_eq!(Trainer::<Cpu, Md4>::load(&dir, &dev).unwrap().step, 0);
        // The manifest cannot be written: no checkpoint in force, so every tensor file goes.
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(dir.join(MANIFEST).join("x")).unwrap();
        assert!(t.save(&dir).is_err());
        assert_eq!(tensor_files(&dir), Vec::<String>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
