#!/usr/bin/python3
"""PyTorch DistributedDataParallel baseline for bench/dp_vs_ddp.sh: the GPT
of bench/torch_train_step.py trained by `--world` processes (gloo backend on
loopback, `--threads` intra-op threads each, OPENBLAS_NUM_THREADS should be
set by the caller) with AdamW, `--batch` sequences per process per step.
Prints `ddp tokens/s: <value>`: world * batch * block_size * steps over the
wall time of the timed steps (after `--warmup`), measured on rank 0 between
barriers (a mean, like lmps's "done: ... tokens/s").

Run with Debian's PyTorch: /usr/bin/python3 bench/torch_ddp.py
"""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_train_step import GPT  # noqa: E402


def worker(rank, a):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(a.port)
    dist.init_process_group("gloo", rank=rank, world_size=a.world)
    torch.set_num_threads(a.threads)
    torch.manual_seed(1337)
    model = DDP(GPT(a.n_layer, a.n_head, a.n_embd, a.block_size, a.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    B, T = a.batch, a.block_size
    g = torch.Generator().manual_seed(rank)
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            dist.barrier()
            start = time.perf_counter()
        data = torch.randint(0, a.vocab_size, (B * T + 1,), generator=g)
        x, y = data[:-1].view(B, T), data[1:].view(B, T)
        opt.zero_grad(set_to_none=False)
        loss = model(x, y)
        loss.backward()
        opt.step()
    dist.barrier()
    total = time.perf_counter() - start
    if rank == 0:
        print(f"ddp config: world={a.world} n_layer={a.n_layer} n_embd={a.n_embd} "
              f"block_size={T} batch/process={B} threads={torch.get_num_threads()} "
              f"torch={torch.__version__}")
        print(f"ddp loss: last {loss.item():.4f}")
        print(f"ddp tokens/s: {a.world * B * T * a.steps / total:.1f}")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n_layer", type=int, default=4)
    ap.add_argument("--n_head", type=int, default=4)
    ap.add_argument("--n_embd", type=int, default=256)
    ap.add_argument("--block_size", type=int, default=128)
    ap.add_argument("--vocab_size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--port", type=int, default=29517)
    a = ap.parse_args()
    mp.spawn(worker, args=(a,), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
