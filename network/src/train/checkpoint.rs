//! Checkpoints: a directory holding `params-S.safetensors`, `optimizer-S.safetensors` (AdamW
//! moments `m.<name>`, `v.<name>`), `ema-S.safetensors` (S = step) and `manifest.json`
//! ([`Manifest`]); GenMD4 runs add `genmd4-S.safetensors` (θ, its EMA and AdamW moments).
//! Tensor files are written first, each atomically (temp + rename); the manifest
//! is written last, atomically, and names the files with their sizes and FNV-1a checksums — so a
//! crash at any point leaves the previous complete checkpoint in force. Stale tensor files of
//! other steps are removed afterwards.

use super::{TrainConfig, Trainer};
use crate::param::{from_safetensors, load_into, to_safetensors, NamedTensor};
use crate::{atomic, Kernels, Md4Transformer, NetworkConfig, NetworkError};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FORMAT: &str = "maskdiff-checkpoint";
pub const FORMAT_VERSION: u32 = 1;
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
    /// `maskdiff-network` crate version that wrote it.
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

fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl Manifest {
    /// Read and check `dir/manifest.json` (format and version).
    pub fn read(dir: &Path) -> Result<Self, NetworkError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| NetworkError::io(&path, e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| NetworkError::ckpt(&path, format!("bad manifest: {e}")))?;
        if m.format != FORMAT || m.format_version != FORMAT_VERSION {
            return Err(NetworkError::ckpt(
                &path,
                format!(
                    "format {} v{}, expected {FORMAT} v{FORMAT_VERSION}",
                    m.format, m.format_version
                ),
            ));
        }
        if m.vocab_size != m.network.vocab_size {
            return Err(NetworkError::ckpt(
                &path,
                "vocab_size disagrees with the network config",
            ));
        }
        Ok(m)
    }

    fn file(&self, dir: &Path, role: &str) -> Result<Vec<u8>, NetworkError> {
        let e = self
            .files
            .iter()
            .find(|f| f.role == role)
            .ok_or_else(|| NetworkError::ckpt(dir, format!("manifest lists no {role} file")))?;
        let path = dir.join(&e.file);
        let bytes = std::fs::read(&path).map_err(|err| NetworkError::io(&path, err))?;
        if bytes.len() as u64 != e.bytes || fnv1a64(&bytes) != e.fnv1a64 {
            return Err(NetworkError::ckpt(
                &path,
                "size or checksum differs from the manifest (corrupt file)",
            ));
        }
        Ok(bytes)
    }
}

fn model_items<D: Kernels<f32>>(m: &Md4Transformer<f32, D>) -> Vec<NamedTensor<'_, f32, D>> {
    m.params()
        .iter()
        .map(|p| (p.name.clone(), p.shape.clone(), &p.value))
        .collect()
}

impl<D: Kernels<f32>> Trainer<D> {
    /// Write a checkpoint of the current state into `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<Manifest, NetworkError> {
        std::fs::create_dir_all(dir).map_err(|e| NetworkError::io(dir, e))?;
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
        if let Some(items) = self.genmd4_items() {
            parts.push(("genmd4", items));
        }
        let mut files = Vec::new();
        for (role, items) in &parts {
            let file = format!("{role}-{:09}.safetensors", self.step);
            let path = dir.join(&file);
            let bytes = to_safetensors(items, &path)?;
            atomic::write(&path, &bytes)?;
            files.push(FileEntry {
                role: role.to_string(),
                file,
                bytes: bytes.len() as u64,
                fnv1a64: fnv1a64(&bytes),
            });
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
            .map_err(|e| NetworkError::ckpt(&mpath, e.to_string()))?;
        atomic::write(&mpath, &json)?;
        // the new manifest is in force: drop tensor files of other steps
        if let Ok(rd) = std::fs::read_dir(dir) {
            for entry in rd.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let ours = ["params-", "optimizer-", "ema-", "genmd4-"]
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
    pub fn load(dir: &Path, dev: &D) -> Result<Self, NetworkError> {
        let man = Manifest::read(dir)?;
        if man.rng.scheme != RNG_SCHEME {
            return Err(NetworkError::ckpt(
                dir,
                format!("unknown RNG scheme {}", man.rng.scheme),
            ));
        }
        let mut t = Trainer::new(man.network.clone(), man.train.clone(), man.rng.seed, dev)?;
        let p = dir.join(MANIFEST);
        load_into(
            t.model.params_mut(),
            from_safetensors(&man.file(dir, "params")?, &p)?,
            "",
            &p,
        )?;
        load_into(
            t.ema.params_mut(),
            from_safetensors(&man.file(dir, "ema")?, &p)?,
            "",
            &p,
        )?;
        let mut opt_map = from_safetensors::<f32>(&man.file(dir, "optimizer")?, &p)?;
        for (prefix, moments) in [("m.", &mut t.opt.m), ("v.", &mut t.opt.v)] {
            let mut shadow = t.model.params().to_vec();
            let sub = opt_map
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            load_into(&mut shadow, sub, prefix, &p)?;
            opt_map.retain(|k, _| !k.starts_with(prefix));
            *moments = shadow.into_iter().map(|s| s.value).collect();
        }
        if !opt_map.is_empty() {
            return Err(NetworkError::CheckpointMismatch {
                path: p,
                msg: format!(
                    "unexpected optimizer tensors {:?}",
                    opt_map.keys().collect::<Vec<_>>()
                ),
            });
        }
        t.opt.count = man.optimizer_count;
        if t.genmd4.is_some() {
            let map = from_safetensors::<f32>(&man.file(dir, "genmd4")?, &p)?;
            t.load_genmd4(map, man.optimizer_count, &p)?;
        }
        t.step = man.step;
        t.extra = man.extra;
        Ok(t)
    }

    /// Like [`Trainer::load`], but first checks that the checkpoint was written with exactly
    /// `net_cfg` and `train_cfg`; any difference (e.g. another vocabulary) is a
    /// [`NetworkError::CheckpointMismatch`] naming it.
    pub fn resume(
        dir: &Path,
        net_cfg: &NetworkConfig,
        train_cfg: &TrainConfig,
        dev: &D,
    ) -> Result<Self, NetworkError> {
        let man = Manifest::read(dir)?;
        let mismatch = |msg: String| NetworkError::CheckpointMismatch {
            path: dir.to_path_buf(),
            msg,
        };
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
        if &man.train != train_cfg {
            return Err(mismatch(format!(
                "training config differs: checkpoint {}, requested {}",
                serde_json::to_string(&man.train).unwrap_or_default(),
                serde_json::to_string(train_cfg).unwrap_or_default()
            )));
        }
        Self::load(dir, dev)
    }
}
