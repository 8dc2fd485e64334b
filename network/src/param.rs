//! Parameter storage: every parameter is a named, flat, run-time-sized dfdx tensor with a logical
//! shape. Layers reshape it at use; reshaping a contiguous tensor keeps its id, so gradients land
//! on the flat tensor. One uniform representation serves the optimizer, EMA and checkpoints.

use crate::{Elem, NetworkError};
use dfdx::prelude::*;
use std::collections::HashMap;

/// A named tensor to serialise: (name, logical shape, flat values).
pub type NamedTensor<'a, E, D> = (String, Vec<usize>, &'a Tensor<(usize,), E, D>);
/// Parsed safetensors contents: name → (shape, values).
pub type TensorMap<E> = HashMap<String, (Vec<usize>, Vec<E>)>;

/// One named parameter.
#[derive(Clone, Debug)]
pub struct Param<E: Elem, D: Device<E>> {
    pub name: String,
    /// Logical shape (row-major), e.g. `[in, out]` for a Dense weight used as `x @ W`.
    pub shape: Vec<usize>,
    pub value: Tensor<(usize,), E, D>,
}

impl<E: Elem, D: Device<E>> Param<E, D> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Serialise named flat tensors to safetensors bytes.
pub fn to_safetensors<E: Elem, D: Device<E>>(
    items: &[NamedTensor<'_, E, D>],
    path: &std::path::Path,
) -> Result<Vec<u8>, NetworkError> {
    let bytes: Vec<Vec<u8>> = items
        .iter()
        .map(|(_, _, t)| E::to_le(&t.as_vec()))
        .collect();
    let views = items
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            ::safetensors::tensor::TensorView::new(E::SAFETENSORS, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| NetworkError::ckpt(path, format!("tensor {n}: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    ::safetensors::tensor::serialize(views, &None)
        .map_err(|e| NetworkError::ckpt(path, format!("serialise: {e:?}")))
}

/// Parse safetensors bytes into name → (shape, values), checking the element type.
pub fn from_safetensors<E: Elem>(
    bytes: &[u8],
    path: &std::path::Path,
) -> Result<TensorMap<E>, NetworkError> {
    let st = ::safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| NetworkError::ckpt(path, format!("not a safetensors file: {e:?}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != E::SAFETENSORS {
            return Err(NetworkError::CheckpointMismatch {
                path: path.into(),
                msg: format!(
                    "tensor {name} has dtype {:?}, expected {:?}",
                    view.dtype(),
                    E::SAFETENSORS
                ),
            });
        }
        let vals = E::from_le(view.data())
            .ok_or_else(|| NetworkError::ckpt(path, format!("tensor {name}: ragged data")))?;
        out.insert(name, (view.shape().to_vec(), vals));
    }
    Ok(out)
}

/// Write `params` to a safetensors file with the project's one atomic writer
/// (`maskdiff_data::write_atomic`); the networks' `save_safetensors`.
pub(crate) fn save_file<E: Elem, D: Device<E>>(
    params: Vec<&Param<E, D>>,
    path: &std::path::Path,
) -> Result<(), NetworkError> {
    let items: Vec<_> = params
        .into_iter()
        .map(|p| (p.name.clone(), p.shape.clone(), &p.value))
        .collect();
    let bytes = to_safetensors(&items, path)?;
    maskdiff_data::write_atomic(path, &bytes).map_err(|e| match e {
        maskdiff_data::DataError::Write { path, source } => NetworkError::io(path, source),
        other => NetworkError::ckpt(path, other.to_string()),
    })
}

/// Load a safetensors file written by [`save_file`] into `params` ([`load_into`] without a
/// prefix); the networks' `load_safetensors`.
pub(crate) fn load_file<E: Elem, D: crate::Kernels<E>>(
    params: Vec<&mut Param<E, D>>,
    path: &std::path::Path,
) -> Result<(), NetworkError> {
    let bytes = std::fs::read(path).map_err(|e| NetworkError::io(path, e))?;
    let map = from_safetensors::<E>(&bytes, path)?;
    load_into(params, map, "", path)
}

/// Replace the values of `params` from a parsed safetensors map; names and shapes must match
/// exactly (no missing, no extra tensors).
pub(crate) fn load_into<E: Elem, D: crate::Kernels<E>>(
    params: Vec<&mut Param<E, D>>,
    mut map: TensorMap<E>,
    prefix: &str,
    path: &std::path::Path,
) -> Result<(), NetworkError> {
    let mismatch = |msg: String| NetworkError::CheckpointMismatch {
        path: path.into(),
        msg,
    };
    for p in params {
        let key = format!("{prefix}{}", p.name);
        let (shape, vals) = map
            .remove(&key)
            .ok_or_else(|| mismatch(format!("tensor {key} missing")))?;
        if shape != p.shape {
            return Err(mismatch(format!(
                "tensor {key} has shape {shape:?}, the model expects {:?}",
                p.shape
            )));
        }
        p.value = D::lasting_tensor(p.value.device(), vals).map_err(NetworkError::device)?;
    }
    let extra: Vec<_> = map
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    if !extra.is_empty() {
        return Err(mismatch(format!("unexpected tensors {extra:?}")));
    }
    Ok(())
}
