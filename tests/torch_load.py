#!/usr/bin/python3
"""Loads an lmps-exported safetensors file into an independent PyTorch GPT-2
(written here, not shared with lmps) and prints the mean next-token loss of a
text, for comparison with lmps_eval. Parses safetensors by hand (8-byte
little-endian header length, JSON header, raw little-endian data), so it
needs only PyTorch.

Usage: /usr/bin/python3 torch_load.py MODEL.safetensors TEXT_FILE
"""
import json
import math
import struct
import sys

import torch
import torch.nn.functional as F


def load_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        assert info["dtype"] == "F32", info
        a, b = info["data_offsets"]
        t = torch.frombuffer(bytearray(blob[base + a:base + b]), dtype=torch.float32)
        tensors[name] = t.reshape(info["shape"])
    return tensors, meta


def parse_model(meta):
    cfg = {}
    for tok in meta["lmps.model"].split():
        if tok.endswith(":"):
            key = tok[:-1]
        else:
            cfg[key] = int(tok)
    return cfg


def layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def forward(p, cfg, idx):
    T = idx.shape[0]
    C, H = cfg["n_embd"], cfg["n_head"]
    x = p["wte.weight"][idx] + p["wpe.weight"][:T]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for l in range(cfg["n_layer"]):
        pre = f"h.{l}."
        h = layer_norm(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"])
        qkv = h @ p[pre + "attn.c_attn.weight"].T + p[pre + "attn.c_attn.bias"]
        q, k, v = qkv.split(C, dim=-1)
        hs = C // H
        q = q.view(T, H, hs).transpose(0, 1)
        k = k.view(T, H, hs).transpose(0, 1)
        v = v.view(T, H, hs).transpose(0, 1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(0, 1).reshape(T, C)
        x = x + y @ p[pre + "attn.c_proj.weight"].T + p[pre + "attn.c_proj.bias"]
        h = layer_norm(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"])
        h = F.gelu(h @ p[pre + "mlp.c_fc.weight"].T + p[pre + "mlp.c_fc.bias"],
                   approximate="tanh")
        x = x + h @ p[pre + "mlp.c_proj.weight"].T + p[pre + "mlp.c_proj.bias"]
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"])
    return x @ p["wte.weight"].T  # tied head


def main():
    params, meta = load_safetensors(sys.argv[1])
    cfg = parse_model(meta)
    with open(sys.argv[2], "rb") as f:
        tokens = torch.tensor(list(f.read()), dtype=torch.long)
    T = cfg["block_size"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, T):
            n = min(T, len(tokens) - 1 - start)
            logits = forward(params, cfg, tokens[start:start + n])
            loss = F.cross_entropy(logits, tokens[start + 1:start + 1 + n])
            total += loss.item() * n
            count += n
    print(f"loss: {total / count:.6f}")


if __name__ == "__main__":
    main()
