#!/usr/bin/env python3
"""PyTorch (eager, CPU; f32, or bf16 autocast with --precision bf16) reference for the maskdiff
throughput benchmark.

The same `cpu-small` MD4 transformer as network/src/model.rs (spec §7.2): embedding over V+1 ids
into 64 dimensions, then Dense(64 -> dim, with bias) (the official text8 `outside_embed`), sinusoidal time embedding of 1000·t -> Dense(4·d_c) -> swish -> Dense(d_c), per block adaLN-zero
(sigmoid(c) -> Dense(6·dim)), LayerNorm without affine (eps 1e-5), RoPE on adjacent pairs of
bias-free q/k, softmax attention written out (matmul, softmax, matmul), GLU FFN (sigmoid gate,
hidden 704), gated residuals, final LN + modulation + zero-init Dense(V). Same step as
`Trainer::step`: antithetic t, masking with the shifted linear schedule, forward, MD4 loss,
backward, global grad norm, AdamW, EMA. Prints `torch forward_tok_s=... train_tok_s=...
train_peak_rss_mb=... train_rss_growth_mb=...` from the fastest timed iteration (as the Rust side
does); peak resident memory of the train phase is the Linux high-water mark VmHWM, reset through
/proc/self/clear_refs before the phase (growth = peak minus the resident set before it).

`--precision bf16` runs the forward pass and the loss under `torch.autocast("cpu", bfloat16)`
(bf16 matmul inputs, f32 accumulation, f32 master weights and optimizer state: PyTorch's mixed
precision); the printed line then starts `torch-bf16`.

Installs torch from PyPI (plain `pip install torch`) if it is missing.
"""
import argparse
import math
import subprocess
import sys
import time

try:
    import torch
except ImportError:  # install from the default registry only
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "torch"])
    import torch

import torch.nn.functional as F
from torch import nn

EPS = 1e-4  # schedule shift


def time_embedding(t, dc):
    half = dc // 2
    k = torch.arange(half, dtype=torch.float64)
    freqs = torch.exp(-k * math.log(10000.0) / (half - 1))
    x = (1000.0 * t.double())[:, None] * freqs[None, :]
    return torch.cat([torch.sin(x), torch.cos(x)], dim=1).float()


def rope_tables(n, hd, theta=10000.0):
    i = torch.arange(hd) // 2
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    ang = pos * theta ** (-2.0 * i.double() / hd)[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope(x, cos, sin):
    # x: (b, n, h, hd); rotate adjacent pairs (x[2i], x[2i+1])
    x2 = x.view(*x.shape[:-1], -1, 2)
    sw = torch.stack([-x2[..., 1], x2[..., 0]], dim=-1).view_as(x)
    return x * cos[None, :, None, :] + sw * sin[None, :, None, :]


class Block(nn.Module):
    def __init__(self, d, h, dc, hidden):
        super().__init__()
        self.h = h
        self.ada = nn.Linear(dc, 6 * d)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)

    def forward(self, x, c_act, cos, sin):
        b, n, d = x.shape
        hd = d // self.h
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.ada(c_act)[:, None, :].chunk(6, dim=-1)
        a = F.layer_norm(x, (d,), eps=1e-5) * (1 + sc_a) + sh_a
        q = rope(self.wq(a).view(b, n, self.h, hd), cos, sin) / math.sqrt(hd)
        k = rope(self.wk(a).view(b, n, self.h, hd), cos, sin)
        v = self.wv(a).view(b, n, self.h, hd)
        p = torch.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1), dim=-1)
        o = (p @ v.transpose(1, 2)).transpose(1, 2).reshape(b, n, d)
        x = x + g_a * self.wo(o)
        f = F.layer_norm(x, (d,), eps=1e-5) * (1 + sc_m) + sh_m
        f = self.w2(torch.sigmoid(self.w1(f)) * self.w3(f))
        return x + g_m * f


class Md4Transformer(nn.Module):
    def __init__(self, vocab=27, d=256, layers=4, heads=4, dc=64, hidden=704, embed_dim=64):
        super().__init__()
        self.vocab, self.dc, self.d = vocab, dc, d
        self.embed = nn.Embedding(vocab + 1, embed_dim)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(embed_dim))
        self.embed_proj = nn.Linear(embed_dim, d)
        nn.init.zeros_(self.embed_proj.bias)
        self.c1 = nn.Linear(dc, 4 * dc)
        self.c2 = nn.Linear(4 * dc, dc)
        self.blocks = nn.ModuleList([Block(d, heads, dc, hidden) for _ in range(layers)])
        self.head_ada = nn.Linear(dc, 2 * d)
        nn.init.zeros_(self.head_ada.weight)
        nn.init.zeros_(self.head_ada.bias)
        self.out = nn.Linear(d, vocab, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, ids, t):
        b, n = ids.shape
        d = self.d
        cos, sin = rope_tables(n, d // self.blocks[0].h)
        c = self.c2(F.silu(self.c1(time_embedding(t, self.dc))))
        c_act = torch.sigmoid(c)
        x = self.embed_proj(self.embed(ids))
        for blk in self.blocks:
            x = blk(x, c_act, cos, sin)
        sh, sc = self.head_ada(c_act)[:, None, :].chunk(2, dim=-1)
        x = F.layer_norm(x, (d,), eps=1e-5) * (1 + sc) + sh
        return self.out(x)


def md4_step(model, opt, ema, x0, vocab, gen, autocast):
    b, n = x0.shape
    u = torch.rand((), generator=gen, dtype=torch.float64)
    t = (u + torch.arange(b, dtype=torch.float64) / b) % 1.0  # antithetic
    alpha = (1 - 2 * EPS) * (1 - t) + EPS  # shifted linear
    weight = (1 - 2 * EPS) / (1 - alpha)  # -alpha'/(1 - alpha)
    keep = torch.rand((b, n), generator=gen, dtype=torch.float64) < alpha[:, None]
    xt = torch.where(keep, x0, torch.full_like(x0, vocab))
    with autocast():
        logits = model(xt, t)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, x0[..., None])[..., 0]
    masked = (~keep).float() * weight[:, None].float()
    loss = -(logp * masked).sum(dim=1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    opt.step()
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            e.add_(p - e, alpha=1 - 0.9999)
    return loss.item()


def _status_mb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak():
    """Restart the resident-set high-water mark (Linux); returns the current RSS in MB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_mb("VmRSS:")


def time_model(model, vocab, b, n, iters, warmup, autocast, tag):
    """Times the tape-free forward and the MD4 train step (AdamW + EMA) of `model` on one fixed
    random batch of b × n tokens, and prints the line bench/side_by_side.sh parses. Shared by
    this script and torch_unet.py so both peers are timed the same way."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.03)
    ema = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, vocab, (b, n), generator=gen)
    xt = torch.where(torch.rand((b, n), generator=gen) < 0.5, x0, torch.full_like(x0, vocab))
    t = (torch.arange(b, dtype=torch.float64) + 0.5) / b

    rss0 = reset_peak()
    fwd = []
    model.eval()  # dropout off for the forward, as in sampling
    with torch.inference_mode(), autocast():
        for i in range(warmup + iters):
            s = time.perf_counter()
            model(xt, t)
            if i >= warmup:
                fwd.append(time.perf_counter() - s)
    fwd_peak = _status_mb("VmHWM:")
    model.train()
    rss1 = reset_peak()
    step = []
    for i in range(warmup + iters):
        s = time.perf_counter()
        md4_step(model, opt, ema, x0, vocab, gen, autocast)
        if i >= warmup:
            step.append(time.perf_counter() - s)
    peak = _status_mb("VmHWM:")
    # fastest iteration (other processes only ever add time); medians for information
    f, st = min(fwd), min(step)
    print(f"forward: best {f:.4f} s/batch, median {sorted(fwd)[len(fwd) // 2]:.4f}, "
          f"peak RSS {fwd_peak:.1f} MB (+{fwd_peak - rss0:.1f} over the model)")
    print(f"train step: best {st:.4f} s/step, median {sorted(step)[len(step) // 2]:.4f}, "
          f"peak RSS {peak:.1f} MB (+{peak - rss1:.1f})")
    print(f"{tag} forward_tok_s={b * n / f:.1f} train_tok_s={b * n / st:.1f} "
          f"train_peak_rss_mb={peak:.1f} train_rss_growth_mb={peak - rss1:.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()
    if args.precision == "bf16":
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        import contextlib
        autocast = contextlib.nullcontext
    tag = "torch" if args.precision == "f32" else "torch-bf16"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, n, b = 27, args.len, args.batch
    model = Md4Transformer(vocab)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {nparams} parameters")
    time_model(model, vocab, b, n, args.iters, args.warmup, autocast, tag)


if __name__ == "__main__":
    main()
