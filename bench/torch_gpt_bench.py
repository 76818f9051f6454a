#!/usr/bin/env python3
"""The GPT-2 training step of gpt_cuda_bench.cc in PyTorch eager mode.

Same model (pre-LayerNorm GPT-2, GELU-tanh MLP, learned positions, LM head
tied to the token embedding), same step (zero_grad, forward with the mean
cross-entropy, backward; no optimiser), same FLOP count and MFU definition,
so the two tokens/s numbers on the same GPU give the ratio lmps/PyTorch:

    python3 bench/torch_gpt_bench.py --batch 8
    bazel run //bench:gpt_cuda_bench -- --batch=8

--precision tf32 (default) matches the lmps CUDA backend (fp32 tensors,
TF32 tensor-core matmuls); fp32 disables TF32; bf16 runs under autocast.
--attention naive (default) materialises the T x T attention matrix like
lmps does; sdpa uses F.scaled_dot_product_attention (flash attention).
Exits 0 with a message when torch or a GPU is missing.
"""

import argparse
import math
import sys
import time


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", choices=["tf32", "fp32", "bf16"], default="tf32")
    p.add_argument("--attention", choices=["naive", "sdpa"], default="naive")
    p.add_argument("--peak_flops", type=float, default=989e12,
                   help="peak FLOP/s for MFU (H100 SXM dense bf16)")
    p.add_argument("--lmps_tokens_per_s", type=float, default=0.0,
                   help="tokens/s printed by gpt_cuda_bench, for the ratio")
    args = p.parse_args()

    try:
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
    except ImportError as e:
        print(f"torch_gpt_bench: PyTorch is not installed ({e}); skipping")
        return 0
    if not torch.cuda.is_available():
        print("torch_gpt_bench: no CUDA device; skipping")
        return 0

    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    dev = torch.device("cuda")
    C, NH, L, V, T, B = (args.embd, args.heads, args.layers, args.vocab,
                         args.seq, args.batch)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = nn.Linear(C, 3 * C)
            self.c_proj = nn.Linear(C, C)
            mask = torch.tril(torch.ones(args.block_size, args.block_size,
                                         dtype=torch.bool))
            self.register_buffer("mask", mask.view(1, 1, args.block_size,
                                                   args.block_size))

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q = q.view(b, t, NH, c // NH).transpose(1, 2)
            k = k.view(b, t, NH, c // NH).transpose(1, 2)
            v = v.view(b, t, NH, c // NH).transpose(1, 2)
            if args.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // NH))
                att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
                att = F.softmax(att, dim=-1)
                y = att @ v
            y = y.transpose(1, 2).contiguous().view(b, t, c)
            return self.c_proj(y)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(C)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(C)
            self.c_fc = nn.Linear(C, 4 * C)
            self.c_proj = nn.Linear(4 * C, C)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            h = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")
            return x + self.c_proj(h)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, C)
            self.wpe = nn.Embedding(args.block_size, C)
            self.h = nn.ModuleList([Block() for _ in range(L)])
            self.ln_f = nn.LayerNorm(C)
            for name, prm in self.named_parameters():
                if prm.dim() >= 2:
                    std = 0.02
                    if name.endswith("c_proj.weight"):
                        std = 0.02 / math.sqrt(2 * L)
                    nn.init.normal_(prm, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(prm)

        def forward(self, idx, targets):
            t = idx.shape[1]
            pos = torch.arange(t, device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
            return F.cross_entropy(logits.view(-1, V).float(), targets.view(-1))

    torch.manual_seed(1337)
    model = GPT().to(dev)
    n_params = sum(prm.numel() for prm in model.parameters())
    idx = torch.randint(0, V, (B, T), device=dev)
    tgt = torch.randint(0, V, (B, T), device=dev)
    tokens = B * T
    flops_per_token = 6.0 * n_params + 12.0 * L * C * T
    flops_per_step = flops_per_token * tokens
    print(f"device: {torch.cuda.get_device_name(dev)}; torch {torch.__version__}; "
          f"precision {args.precision}; attention {args.attention}")
    print(f"model: L={L} C={C} NH={NH} V={V}, {n_params} parameters; B={B} T={T} "
          f"({tokens} tokens per step)")

    def step():
        model.zero_grad(set_to_none=False)
        if args.precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx, tgt)
        else:
            loss = model(idx, tgt)
        loss.backward()
        return loss

    times = []
    loss = None
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if not times:
        return 0
    mean = sum(times) / len(times)
    achieved = flops_per_step / mean
    print(f"loss: {loss.item():.4f} (ln V = {math.log(V):.4f})")
    print(f"step: {mean * 1e3:.2f} ms mean, {min(times) * 1e3:.2f} ms best "
          f"over {len(times)} steps")
    print(f"tokens/s: {tokens / mean:.0f}")
    print(f"achieved: {achieved / 1e12:.1f} TFLOP/s; "
          f"MFU: {100 * achieved / args.peak_flops:.1f}% of {args.peak_flops:.4g} FLOP/s")
    print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.lmps_tokens_per_s > 0:
        print(f"lmps / torch tokens/s: {args.lmps_tokens_per_s / (tokens / mean):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
