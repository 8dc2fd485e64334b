//! Named flat tensors to and from safetensors bytes (the checkpoint tensor format): the model's
//! parameters, and the trainer's optimizer moments and objective parameters under their names.

pub use crate::param::{from_safetensors, to_safetensors, NamedTensor, TensorMap};
