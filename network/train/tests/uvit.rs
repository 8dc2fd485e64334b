//! The U-ViT (spec §7.4) in the trainer: a fresh network's MD4 loss is exactly
//! weight(t)·#masked·ln V per image, with Monte Carlo mean (α̃_0 − α̃_1)·ln V per dimension —
//! (1 − 2ε)·8 bits/dim for 256 levels; a few training steps on the same batch lower the loss;
//! a checkpoint round trip restores the U-ViT.

mod image_common;

#[test]
fn fresh_uvit_loss_is_eight_bits_per_dim() {
    image_common::fresh_loss_is_eight_bits_per_dim("uvit-tiny");
}

#[test]
fn uvit_trains_and_checkpoints() {
    image_common::trains_and_checkpoints("uvit-tiny", "uvit");
}
