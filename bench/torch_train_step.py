#!/usr/bin/python3
"""PyTorch reference for bench/train_step_bench.cc: the same GPT-2 (pre-LN,
GELU tanh, learned positions, LM head tied to wte, causal attention, biases
everywhere but the head), the same batch shape and the same step: forward,
backward and a plain SGD update. Prints `torch tokens/s: <value>`, B*T over
the median step time (as train_step_bench.cc), and the mean.

Run with Debian's PyTorch: /usr/bin/python3 bench/torch_train_step.py
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd)

    def attn(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
        return x


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, block_size, vocab_size):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith("c_proj.weight") or name.endswith("mlp_proj.weight"):
                    std = 0.02 / math.sqrt(2 * n_layer)
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--vocab_size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(1337)
    model = GPT(a.n_layer, a.n_head, a.n_embd, a.block_size, a.vocab_size)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr)
    B, T = a.batch, a.block_size
    data = torch.randint(0, a.vocab_size, (B * T + 1,))
    x = data[:-1].view(B, T)
    y = data[1:].view(B, T)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"torch config: n_layer={a.n_layer} n_head={a.n_head} n_embd={a.n_embd} "
          f"block_size={T} vocab={a.vocab_size} batch={B} "
          f"threads={torch.get_num_threads()} params={nparams} "
          f"torch={torch.__version__}")

    losses, step_seconds = [], []
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            start = time.perf_counter()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step >= a.warmup:
            step_seconds.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    median = sorted(step_seconds)[len(step_seconds) // 2]
    print(f"torch loss: first {losses[0]:.4f} last {losses[-1]:.4f}")
    print(f"torch ms/step: total {1e3 * total / a.steps:.2f}")
    print(f"torch mean tokens/s: {B * T * a.steps / total:.1f}")
    print(f"torch tokens/s: {B * T / median:.1f}")


if __name__ == "__main__":
    main()
