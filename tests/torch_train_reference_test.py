#!/usr/bin/python3
"""lmps against an independent training reference in PyTorch.

The reference is written here from the definitions, not from lmps's code:
GPT-2 (pre-LayerNorm blocks, causal attention, GELU tanh, tied head) in
plain PyTorch ops, torch.optim.SGD / torch.optim.AdamW,
torch.nn.utils.clip_grad_norm_, the learning-rate schedule of
docs/configuration.md, and the data order of docs/architecture.md ("Data
order") re-implemented below. Both sides start from the same initial
weights, made here and given to lmps with `lmps_server --init_from`.

For each optimizer (plain SGD without clipping, SGD with momentum, AdamW with
weight decay, clipping, warm-up and cosine) and each layout (dp 1; dp 2 with
2 micro-batches and 2 shards, the data-parallel trainer's 1/M and 1/dp; and
dp 2 x pp 2 x tp 2 with 2 micro-batches and 2 shards, the pipeline
trainer's), lmps trains STEPS
steps through lmps_local and the reference trains the same steps on the
whole global batch in one process. Compared:
  * the training loss of every step (lmps's workers log it with
    train.debug_trace_steps): |lmps - torch| <= LOSS_TOL;
  * every final parameter tensor: ||lmps - torch|| / ||torch|| <= PARAM_TOL.
Both are fp32 with different summation orders, so they agree to ~1e-6
(AdamW: ~3e-5 on the attention's key bias, whose true gradient is zero, so
AdamW divides rounding noise by its own magnitude there); a gradient off by
a factor of 2 changes the SGD runs' parameters by ~0.8 of their norm. The
test prints the measured figures.

  torch_train_reference_test.py --bin_dir=DIR [--keep=DIR] [--only=NAME]
"""

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

STEPS = 20
LOSS_TOL = 2e-5
PARAM_TOL = 1e-4
DATA = "/usr/share/common-licenses/GPL-3"
MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256)
BATCH = 8
VAL_FRACTION = 0.1
SEED = 1337

OPTIMIZERS = {
    # name: (job spec optimizer block, reference settings)
    "sgd": ("type: SGD lr: 0.5 min_lr: 0.05 momentum: -1 weight_decay: -1 "
            "grad_clip: -1",
            dict(kind="sgd", lr=0.5, min_lr=0.05, warmup=0, momentum=0.0,
                 wd=0.0, clip=0.0)),
    "sgd_momentum": ("type: SGD lr: 0.1 min_lr: 0.01 momentum: 0.9 "
                     "weight_decay: -1 grad_clip: -1",
                     dict(kind="sgd", lr=0.1, min_lr=0.01, warmup=0,
                          momentum=0.9, wd=0.0, clip=0.0)),
    "adamw": ("type: ADAMW lr: 0.003 min_lr: 0.0003 warmup_steps: 5 "
              "beta1: 0.9 beta2: 0.95 eps: 1e-8 weight_decay: 0.1 grad_clip: 1.0",
              dict(kind="adamw", lr=0.003, min_lr=0.0003, warmup=5,
                   betas=(0.9, 0.95), eps=1e-8, wd=0.1, clip=1.0)),
}
LAYOUTS = {
    "dp1": dict(dp=1, pp=1, tp=1, micro_batches=1, shards=1),
    "dp2_m2": dict(dp=2, pp=1, tp=1, micro_batches=2, shards=2),
    "dp2_pp2_tp2": dict(dp=2, pp=2, tp=2, micro_batches=2, shards=2),
}


# --- the data order (docs/architecture.md, "Data order") ----------------------
M64 = (1 << 64) - 1


def mix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def stable_key(seed, name):
    h = 0xCBF29CE484222325
    for ch in name.encode():
        h = ((h ^ ch) * 0x100000001B3) & M64
    return mix64(h ^ mix64(seed))


def random_bits(key, index):
    return mix64(key ^ mix64((index * 0xD1B54A32D192ED03 + 1) & M64))


def train_batch(data, step):
    """tokens, targets [BATCH, T] of the global batch of `step`."""
    n = len(data)
    # The split point is computed in fp32 as lmps does (int64 * float).
    split = n - int(np.float32(n) * np.float32(VAL_FRACTION))
    T = MODEL["block_size"]
    positions = split - T
    key = stable_key(SEED, "data.train")
    starts = [random_bits(key, step * BATCH + i) % positions for i in range(BATCH)]
    x = torch.tensor([list(data[s:s + T]) for s in starts], dtype=torch.long)
    y = torch.tensor([list(data[s + 1:s + T + 1]) for s in starts], dtype=torch.long)
    return x, y


# --- the model -------------------------------------------------------------------
def tensor_shapes():
    C, V, T = MODEL["n_embd"], MODEL["vocab_size"], MODEL["block_size"]
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for l in range(MODEL["n_layer"]):
        p = f"h.{l}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (C, 4 * C), p + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    return shapes


def initial_weights():
    """GPT-2's initialisation, drawn by torch (independent of lmps's RNG);
    biases get small random values too so that every tensor's update is
    checked."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, shape in tensor_shapes().items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        elif name.endswith("c_proj.weight"):
            t = torch.randn(shape, generator=g) * (0.02 / math.sqrt(2 * MODEL["n_layer"]))
        else:
            t = 0.02 * torch.randn(shape, generator=g)
        out[name] = t.float()
    return out


def forward_loss(p, x, y):
    B, T = x.shape
    C, H = MODEL["n_embd"], MODEL["n_head"]
    hs = C // H
    h = p["wte.weight"][x] + p["wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(MODEL["n_layer"]):
        pre = f"h.{l}."
        a = F.layer_norm(h, (C,), p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], 1e-5)
        q, k, v = (a @ p[pre + "attn.c_attn.weight"].T + p[pre + "attn.c_attn.bias"]).split(C, -1)
        q = q.view(B, T, H, hs).transpose(1, 2)
        k = k.view(B, T, H, hs).transpose(1, 2)
        v = v.view(B, T, H, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, C)
        h = h + o @ p[pre + "attn.c_proj.weight"].T + p[pre + "attn.c_proj.bias"]
        a = F.layer_norm(h, (C,), p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], 1e-5)
        m = F.gelu(a @ p[pre + "mlp.c_fc.weight"].T + p[pre + "mlp.c_fc.bias"], approximate="tanh")
        h = h + m @ p[pre + "mlp.c_proj.weight"].T + p[pre + "mlp.c_proj.bias"]
    h = F.layer_norm(h, (C,), p["ln_f.weight"], p["ln_f.bias"], 1e-5)
    logits = h @ p["wte.weight"].T
    return F.cross_entropy(logits.reshape(B * T, -1), y.reshape(B * T))


def learning_rate(o, step):
    """docs/configuration.md: linear warm-up over W steps, then a cosine to
    min_lr at step STEPS."""
    lr, min_lr, W = float(np.float32(o["lr"])), float(np.float32(o["min_lr"])), o["warmup"]
    if step < W:
        return lr * (step + 1) / W
    prog = min(max((step - W) / max(1, STEPS - W), 0.0), 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * prog)) * (lr - min_lr)


def reference_run(o, init, data):
    params = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    if o["kind"] == "adamw":
        decay = [t for t in params.values() if t.dim() >= 2]
        no_decay = [t for t in params.values() if t.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(np.float32(o["wd"]))},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=o["lr"], betas=tuple(float(np.float32(b)) for b in o["betas"]),
            eps=float(np.float32(o["eps"])))
    else:
        assert o["wd"] == 0  # torch's SGD decay is coupled (L2); lmps's is decoupled
        opt = torch.optim.SGD(list(params.values()), lr=o["lr"],
                              momentum=float(np.float32(o["momentum"])))
    losses = []
    for step in range(STEPS):
        x, y = train_batch(data, step)
        opt.zero_grad()
        loss = forward_loss(params, x, y)
        loss.backward()
        losses.append(loss.item())
        if o["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), o["clip"])
        for group in opt.param_groups:
            group["lr"] = learning_rate(o, step)
        opt.step()
    return losses, {k: v.detach() for k, v in params.items()}


# --- safetensors -------------------------------------------------------------------
def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = t.contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(blob[8 + n + a:8 + n + b]),
                                     dtype=torch.float32).reshape(info["shape"])
    return out


# --- lmps ---------------------------------------------------------------------------
TRACE = re.compile(r"trace dp_rank=(\d+)(?: pp_rank=(\d+) tp_rank=(\d+))? step=(\d+) .*?loss=(\S+)")


def lmps_run(bin_dir, work, optimizer_block, layout, init_path):
    m = MODEL
    job = os.path.join(work, "job.textproto")
    with open(job, "w") as f:
        f.write(f"""
model {{ n_layer: {m['n_layer']} n_head: {m['n_head']} n_embd: {m['n_embd']}
        block_size: {m['block_size']} vocab_size: {m['vocab_size']} }}
optimizer {{ {optimizer_block} }}
data {{ path: "{DATA}" val_fraction: {VAL_FRACTION} }}
train {{ steps: {STEPS} batch_size: {BATCH} micro_batches: {layout['micro_batches']}
        seed: {SEED} eval_interval: -1 checkpoint_interval: -1 sample_tokens: 0
        debug_trace_steps: true }}
""")
    run_dir = os.path.join(work, "run")
    cmd = [os.path.join(bin_dir, "launcher/lmps_local"), f"--job={job}",
           f"--run_dir={run_dir}", f"--workers={layout['dp']}",
           f"--pp={layout['pp']}", f"--tp={layout['tp']}",
           f"--shards={layout['shards']}", "--quiet", "--timeout_s=240",
           f"--server_args=--init_from={init_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n"
                           f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    # Per step: the mean over dp ranks of the loss logged by the workers
    # that compute it (the last stage; its tp ranks log the same value, take
    # tp rank 0).
    per_step = {}
    logs = os.path.join(run_dir, "logs")
    for name in sorted(os.listdir(logs)):
        for line in open(os.path.join(logs, name), errors="replace"):
            t = TRACE.search(line)
            if not t:
                continue
            dp, pp, tp, step, loss = t.groups()
            if pp is not None and (int(pp) != layout["pp"] - 1 or int(tp) != 0):
                continue
            per_step.setdefault(int(step), {})[int(dp)] = float(loss)
    losses = []
    for step in range(STEPS):
        ranks = per_step.get(step, {})
        if sorted(ranks) != list(range(layout["dp"])):
            raise RuntimeError(f"step {step}: losses logged by dp ranks {sorted(ranks)}, "
                               f"want 0..{layout['dp'] - 1} (logs in {logs})")
        losses.append(sum(ranks.values()) / layout["dp"])
    return losses, read_safetensors(os.path.join(run_dir, "model.safetensors"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin_dir", required=True)
    parser.add_argument("--keep", default="", help="keep the runs here")
    parser.add_argument("--only", default="", help="regex on OPTIMIZER/LAYOUT")
    options = parser.parse_args()
    torch.set_num_threads(1)
    data = open(DATA, "rb").read()
    work_root = options.keep or tempfile.mkdtemp(prefix="torch_ref_")
    os.makedirs(work_root, exist_ok=True)
    init = initial_weights()
    init_path = os.path.join(work_root, "init.safetensors")
    write_safetensors(init_path, init)

    failures = []
    for opt_name, (block, o) in OPTIMIZERS.items():
        ref_losses, ref_params = reference_run(o, init, data)
        moved = max((ref_params[k] - init[k]).norm().item() / init[k].norm().item()
                    for k in init)
        for layout_name, layout in LAYOUTS.items():
            name = f"{opt_name}/{layout_name}"
            if options.only and not re.search(options.only, name):
                continue
            work = os.path.join(work_root, opt_name + "_" + layout_name)
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            losses, params = lmps_run(options.bin_dir, work, block, layout, init_path)
            loss_err = max(abs(a - b) for a, b in zip(losses, ref_losses))
            worst, worst_name = 0.0, ""
            for k, ref in ref_params.items():
                if k not in params or tuple(params[k].shape) != tuple(ref.shape):
                    failures.append(f"{name}: lmps's export lacks {k} {tuple(ref.shape)}")
                    continue
                err = (params[k] - ref).norm().item() / ref.norm().item()
                if err > worst:
                    worst, worst_name = err, k
            print(f"{name}: loss {ref_losses[0]:.4f} -> {ref_losses[-1]:.4f} "
                  f"(torch) / {losses[0]:.4f} -> {losses[-1]:.4f} (lmps); "
                  f"max |loss diff| {loss_err:.2e} (tol {LOSS_TOL:g}); "
                  f"max param rel. diff {worst:.2e} in {worst_name} (tol {PARAM_TOL:g}); "
                  f"parameters moved up to {moved:.2e} of their norm", flush=True)
            if not loss_err <= LOSS_TOL:
                failures.append(f"{name}: per-step loss differs by {loss_err:.3e} > {LOSS_TOL:g}: "
                                f"lmps {losses} torch {ref_losses}")
            if not worst <= PARAM_TOL:
                failures.append(f"{name}: {worst_name} differs by {worst:.3e} of its norm > {PARAM_TOL:g}")
    if not options.keep:
        shutil.rmtree(work_root, ignore_errors=True)
    for f in failures:
        print("FAIL", f)
    if failures:
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
