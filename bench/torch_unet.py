#!/usr/bin/env python3
"""PyTorch (eager, CPU; f32, or bf16 autocast with --precision bf16) reference of maskdiff's
U-Net image denoiser (network/src/unet.rs, spec §7.3) for bench/unet_side_by_side.sh.

The same network as the `unet-small` preset (or `unet-tiny`) built for an H×W×C image with V
levels: per-channel-token Embed(V + 1, e), the C embeddings of a pixel concatenated, Conv3×3 to
`ch` channels; `layers` ResBlocks (GroupNorm → swish → Conv3×3 → + Dense(cond, no bias) →
GroupNorm → swish → dropout → Conv3×3 → + input), each output stored; middle ResBlock →
single-head self-attention (GroupNorm, q/k/v/o with biases, residual) → ResBlock; `layers + 1`
up ResBlocks on the concatenation with the stored activations (Dense skip projection 2ch → ch);
GroupNorm → swish → Conv3×3 to C·V logits. Time conditioning: sinusoidal embedding of 1000·t →
Dense(4·d_c) → swish → Dense(d_c). Dropout 0.1 in training, as in the preset.

The train step is `torch_reference.md4_step` (antithetic t, shifted linear schedule, MD4 loss,
backward, grad norm, AdamW, EMA), the same one the transformer benchmark uses. Prints
`torch forward_tok_s=... train_tok_s=... train_peak_rss_mb=...` (tokens = pixel channels), or
`torch-bf16 ...` under autocast.
"""
import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import time_embedding, time_model  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

PRESETS = {  # ch, layers, embed, d_c, groups, dropout (network/src/config.rs)
    "unet-tiny": (16, 1, 8, 16, 4, 0.0),
    "unet-small": (64, 4, 32, 64, 16, 0.1),
}


class ResBlock(nn.Module):
    def __init__(self, cin, cout, dc, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.cond = nn.Linear(dc, cout, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, c):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.cond(c)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return (self.skip(x) if self.skip is not None else x) + h


class Attention(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(ch, ch) for _ in range(4))

    def forward(self, x):
        b, ch, h, w = x.shape
        z = self.norm(x).flatten(2).transpose(1, 2)  # (b, hw, ch)
        q, k, v = self.q(z), self.k(z), self.v(z)
        p = torch.softmax(q @ k.transpose(1, 2) / ch ** 0.5, dim=-1)
        y = self.o(p @ v).transpose(1, 2).reshape(b, ch, h, w)
        return x + y


class UNet(nn.Module):
    def __init__(self, preset, vocab, h, w, c):
        super().__init__()
        ch, layers, e, dc, groups, dropout = PRESETS[preset]
        self.shape, self.vocab, self.dc = (h, w, c), vocab, dc
        self.embed = nn.Embedding(vocab + 1, e)
        self.cond1 = nn.Linear(dc, 4 * dc)
        self.cond2 = nn.Linear(4 * dc, dc)
        self.conv_in = nn.Conv2d(c * e, ch, 3, padding=1)
        self.down = nn.ModuleList(ResBlock(ch, ch, dc, groups, dropout) for _ in range(layers))
        self.mid0 = ResBlock(ch, ch, dc, groups, dropout)
        self.attn = Attention(ch, groups)
        self.mid1 = ResBlock(ch, ch, dc, groups, dropout)
        self.up = nn.ModuleList(ResBlock(2 * ch, ch, dc, groups, dropout) for _ in range(layers + 1))
        self.out_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.out_conv = nn.Conv2d(ch, c * vocab, 3, padding=1)

    def forward(self, ids, t):
        (h, w, c), b = self.shape, ids.shape[0]
        cond = self.cond2(F.silu(self.cond1(time_embedding(t, self.dc))))
        x = self.embed(ids).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        x = self.conv_in(x)
        skips = [x]
        for blk in self.down:
            x = blk(x, cond)
            skips.append(x)
        x = self.mid1(self.attn(self.mid0(x, cond)), cond)
        for blk in self.up:
            x = blk(torch.cat([x, skips.pop()], dim=1), cond)
        y = self.out_conv(F.silu(self.out_norm(x)))  # (b, c·V, h, w)
        return y.permute(0, 2, 3, 1).reshape(b, h * w * c, self.vocab)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="unet-small")
    ap.add_argument("--image", default="28x28x1", help="HxWxC")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--channels-last", action="store_true",
                    help="NHWC memory format for the convolutions (PyTorch's faster CPU layout)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16))
                if args.precision == "bf16" else contextlib.nullcontext)
    tag = "torch" if args.precision == "f32" else "torch-bf16"
    h, w, c = (int(s) for s in args.image.split("x"))
    torch.manual_seed(0)
    model = UNet(args.preset, args.vocab, h, w, c)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    b, n, vocab = args.batch, h * w * c, args.vocab
    nparams = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.preset} "
          f"{h}x{w}x{c} V={vocab}: {nparams} parameters")
    time_model(model, vocab, b, n, args.iters, args.warmup, autocast, tag)

if __name__ == "__main__":
    main()
