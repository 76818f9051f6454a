#!/usr/bin/python3
"""lmps against an independent GPT-2 written here to Hugging Face's
conventions (transformers' GPT2LMHeadModel: Conv1D layers computing
x @ W + b with W of shape (in, out), "transformer."-prefixed names, gelu_new,
the LM head tied to wte, the model in config.json). Nothing here is shared
with lmps; safetensors is read and written by hand (8-byte little-endian
header length, JSON header, raw data), so only PyTorch is needed.

(a) lmps -> Hugging Face: a short lmps_local job (3 shards, small chunks)
    is exported with `lmps_export --format=hf`; the directory must hold
    exactly GPT2LMHeadModel's tensors in Conv1D shapes and a config.json of
    the same model, and the reference's loss of a text under it must equal
    lmps_eval's loss under the job's lmps-format export within 1e-5.
(b) Hugging Face -> lmps: the reference writes random GPT-2 weights as
    Hugging Face checkpoints in two variants (prefixed names with BOOL
    attn.bias buffers, masked_bias and lm_head.weight, as transformers'
    save_pretrained of older versions wrote; unprefixed names with F32
    attn.bias buffers, as the Hub's original gpt2 file), each a directory
    with model.safetensors and config.json. For each: lmps_eval reads the
    directory and must give the reference's loss within 1e-5; and an
    lmps_local job started from it with `lmps_server --init_from` (3 shards,
    chunks cutting the transposed matrices, one SGD step with lr 1e-30,
    which changes no parameter) must export exactly the reference's
    parameters (transposed where Conv1D), whose lmps_eval loss again equals
    the reference's. A job whose model differs from config.json (n_head)
    must fail with an error naming it.

Usage: hf_gpt2_test.py --bin_dir=DIR [--keep=DIR]
"""
import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import torch

TOL = 1e-5
TEXT = "/usr/share/common-licenses/GPL-3"


# --- safetensors, by hand ----------------------------------------------------
DTYPES = {"F32": (torch.float32, 4), "BOOL": (torch.bool, 1)}


def read_safetensors(path):
    """{name: tensor} of the F32 tensors, the names of the others, metadata."""
    blob = open(path, "rb").read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {})
    f32, others = {}, {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        if info["dtype"] != "F32":
            others[name] = info["dtype"]
            continue
        f32[name] = torch.frombuffer(bytearray(blob[8 + n + a:8 + n + b]),
                                     dtype=torch.float32).reshape(info["shape"])
    return f32, others, meta


def write_safetensors(path, tensors, metadata):
    """tensors: {name: tensor (float32, bfloat16, float16 or bool)}, written in
    name order."""
    header, chunks, offset = {"__metadata__": metadata}, [], 0
    names = {torch.bool: "BOOL", torch.float32: "F32", torch.bfloat16: "BF16",
             torch.float16: "F16"}
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        dtype = names[t.dtype]
        if dtype == "BOOL":
            raw = t.to(torch.uint8).numpy().tobytes()
        elif dtype in ("BF16", "F16"):
            raw = t.view(torch.int16).numpy().tobytes()
        else:
            raw = t.numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


# --- GPT-2 as transformers computes it ----------------------------------------
class HfGpt2:
    """GPT2LMHeadModel's forward pass (eval mode), from a checkpoint directory
    (model.safetensors + config.json) in Hugging Face's layout."""

    def __init__(self, directory, dtype=torch.float64):
        cfg = json.load(open(os.path.join(directory, "config.json")))
        assert cfg["model_type"] == "gpt2", cfg
        assert cfg.get("activation_function", "gelu_new") == "gelu_new", cfg
        assert cfg.get("tie_word_embeddings", True), cfg
        assert cfg.get("scale_attn_weights", True), cfg
        assert not cfg.get("scale_attn_by_inverse_layer_idx", False), cfg
        assert cfg.get("n_inner") in (None, 4 * cfg["n_embd"]), cfg
        self.cfg = cfg
        self.eps = cfg.get("layer_norm_epsilon", 1e-5)
        f32, others, _ = read_safetensors(os.path.join(directory, "model.safetensors"))
        p = {}
        for name, t in f32.items():
            short = name[len("transformer."):] if name.startswith("transformer.") else name
            if short.endswith(".attn.bias") or short.endswith(".attn.masked_bias"):
                continue  # buffers, not parameters
            assert short not in p, f"{name} twice"
            p[short] = t.to(dtype)
        for name in others:
            assert name.endswith(".attn.bias"), f"unexpected non-F32 tensor {name}"
        if "lm_head.weight" in p:  # tied: from_pretrained ties it to wte
            assert torch.equal(p.pop("lm_head.weight"), p["wte.weight"])
        self.p = p

    def layer_norm(self, x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as nn.LayerNorm
        return (x - mean) / torch.sqrt(var + self.eps) * self.p[name + ".weight"] \
            + self.p[name + ".bias"]

    def conv1d(self, x, name):  # transformers' Conv1D: x @ W + b, W (in, out)
        return x @ self.p[name + ".weight"] + self.p[name + ".bias"]

    @staticmethod
    def gelu_new(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) *
                                           (x + 0.044715 * torch.pow(x, 3.0))))

    def logits(self, idx):
        T = idx.shape[0]
        C, H = self.cfg["n_embd"], self.cfg["n_head"]
        hs = C // H
        x = self.p["wte.weight"][idx] + self.p["wpe.weight"][torch.arange(T)]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for l in range(self.cfg["n_layer"]):
            h = self.layer_norm(x, f"h.{l}.ln_1")
            q, k, v = self.conv1d(h, f"h.{l}.attn.c_attn").split(C, dim=-1)
            q, k, v = (t.view(T, H, hs).permute(1, 0, 2) for t in (q, k, v))
            w = (q @ k.transpose(-1, -2)) / (hs ** 0.5)
            w = torch.where(causal, w, torch.finfo(w.dtype).min).softmax(-1)
            a = (w @ v).permute(1, 0, 2).reshape(T, C)
            x = x + self.conv1d(a, f"h.{l}.attn.c_proj")
            h = self.layer_norm(x, f"h.{l}.ln_2")
            x = x + self.conv1d(self.gelu_new(self.conv1d(h, f"h.{l}.mlp.c_fc")),
                                f"h.{l}.mlp.c_proj")
        x = self.layer_norm(x, "ln_f")
        return x @ self.p["wte.weight"].T  # tied head

    def loss(self, tokens):
        """Mean next-token loss over windows of n_positions, as lmps_eval."""
        T = self.cfg["n_positions"]
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(tokens) - 1, T):
                n = min(T, len(tokens) - 1 - start)
                logits = self.logits(tokens[start:start + n])
                loss = torch.nn.functional.cross_entropy(
                    logits, tokens[start + 1:start + 1 + n])
                total += loss.item() * n
                count += n
        return total / count


def conv1d_names(n_layer):
    return {f"h.{l}.{m}.weight" for l in range(n_layer)
            for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def random_hf_params(cfg, seed):
    """Random GPT-2 parameters in Hugging Face's layout (short names), large
    enough that the loss depends on every tensor and on its orientation."""
    g = torch.Generator().manual_seed(seed)
    C, V, T, L = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"]

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    p = {"wte.weight": normal(V, C, std=0.5), "wpe.weight": normal(T, C, std=0.3),
         "ln_f.weight": 1 + normal(C, std=0.2), "ln_f.bias": normal(C, std=0.2)}
    for l in range(L):
        pre = f"h.{l}."
        for ln in ("ln_1", "ln_2"):
            p[pre + ln + ".weight"] = 1 + normal(C, std=0.2)
            p[pre + ln + ".bias"] = normal(C, std=0.2)
        for name, n_in, n_out in (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C),
                                  ("mlp.c_fc", C, 4 * C), ("mlp.c_proj", 4 * C, C)):
            p[pre + name + ".weight"] = normal(n_in, n_out, std=1.0 / math.sqrt(n_in))
            p[pre + name + ".bias"] = normal(n_out, std=0.1)
    return p


def hf_config(cfg):
    return dict(cfg, model_type="gpt2", architectures=["GPT2LMHeadModel"],
                activation_function="gelu_new", layer_norm_epsilon=1e-05,
                n_ctx=cfg["n_positions"], n_inner=None, attn_pdrop=0.1,
                embd_pdrop=0.1, resid_pdrop=0.1, initializer_range=0.02,
                scale_attn_weights=True, tie_word_embeddings=True)


# --- lmps --------------------------------------------------------------------
def run(cmd, what, expect_ok=True):
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                          timeout=240)
    if (done.returncode == 0) != expect_ok:
        raise AssertionError(f"{what}: {' '.join(cmd)} exited {done.returncode}:\n"
                             f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def lmps_eval(bin_dir, model, text):
    out = run([os.path.join(bin_dir, "worker/lmps_eval"), f"--model={model}",
               f"--text_file={text}"], f"lmps_eval {model}")
    lines = [l for l in out.splitlines() if l.startswith("loss: ")]
    assert len(lines) == 1, out
    return float(lines[0][len("loss: "):])


def job_file(work, name, cfg, steps, optimizer=""):
    path = os.path.join(work, name + ".textproto")
    with open(path, "w") as f:
        f.write(f"""
model {{ n_layer: {cfg['n_layer']} n_head: {cfg['n_head']} n_embd: {cfg['n_embd']}
        block_size: {cfg['n_positions']} vocab_size: {cfg['vocab_size']} }}
{optimizer}
train {{ steps: {steps} batch_size: 4 eval_interval: -1 checkpoint_interval: -1
        sample_tokens: 8 }}
layout {{ num_shards: 3 }}
max_chunk_bytes: 1000
""")
    return path


def lmps_local(bin_dir, work, name, job, extra=(), expect_ok=True):
    run_dir = os.path.join(work, name)
    out = run([os.path.join(bin_dir, "launcher/lmps_local"), f"--job={job}",
               f"--run_dir={run_dir}", "--quiet", "--timeout_s=200", *extra],
              f"lmps_local {name}", expect_ok)
    return run_dir, out


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def part_a(bin_dir, work, text, tokens):
    cfg = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32, "vocab_size": 256}
    run_dir, _ = lmps_local(bin_dir, work, "a", job_file(work, "a", cfg, steps=20))
    hf = os.path.join(work, "a_hf")
    run([os.path.join(bin_dir, "server/lmps_export"),
         f"--checkpoint_dir={run_dir}/ckpt", "--format=hf", f"--out={hf}"],
        "lmps_export --format=hf")
    check(sorted(os.listdir(hf)) == ["config.json", "model.safetensors"], os.listdir(hf))
    config = json.load(open(os.path.join(hf, "config.json")))
    want = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 32,
            "n_ctx": 32, "vocab_size": 256, "tie_word_embeddings": True,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "n_inner": None}
    for key, value in want.items():
        check(config.get(key) == value, f"config.json {key}={config.get(key)!r}, want {value!r}")
    f32, others, meta = read_safetensors(os.path.join(hf, "model.safetensors"))
    check(meta.get("format") == "pt", meta)
    check(not others, others)
    lmps_file, _, _ = read_safetensors(os.path.join(run_dir, "model.safetensors"))
    C = cfg["n_embd"]
    check(set(f32) == {"transformer." + n for n in lmps_file},
          f"names {sorted(f32)} vs lmps {sorted(lmps_file)}")
    check(tuple(f32["transformer.h.0.attn.c_attn.weight"].shape) == (C, 3 * C),
          f32["transformer.h.0.attn.c_attn.weight"].shape)
    check(tuple(f32["transformer.h.1.mlp.c_proj.weight"].shape) == (4 * C, C),
          f32["transformer.h.1.mlp.c_proj.weight"].shape)
    ours = lmps_eval(bin_dir, os.path.join(run_dir, "model.safetensors"), text)
    ours_hf = lmps_eval(bin_dir, hf, text)  # lmps reading its own hf export
    ref = HfGpt2(hf).loss(tokens)
    ref32 = HfGpt2(hf, torch.float32).loss(tokens)
    print(f"(a) lmps -> hf: lmps_eval {ours:.8f} (on the hf export {ours_hf:.8f}); "
          f"reference {ref:.8f} (fp64), {ref32:.8f} (fp32); "
          f"|diff| {abs(ours - ref):.2e}, {abs(ours - ref32):.2e}", flush=True)
    check(1.0 < ours < 6.0, ours)
    check(abs(ours - ref) <= TOL, f"lmps {ours} vs reference {ref}")
    check(abs(ours - ref32) <= TOL, f"lmps {ours} vs fp32 reference {ref32}")
    check(ours == ours_hf, f"lmps_eval on its lmps export {ours}, on its hf export {ours_hf}")


def part_b(bin_dir, work, text, tokens):
    cfg = {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_positions": 32, "vocab_size": 256}
    T, L = cfg["n_positions"], cfg["n_layer"]
    params = random_hf_params(cfg, seed=7)
    variants = {
        # transformers' save_pretrained (older versions kept the buffers).
        "prefixed": dict({"transformer." + n: t for n, t in params.items()},
                         **{f"transformer.h.{l}.attn.bias":
                            torch.ones(1, 1, T, T, dtype=torch.bool).tril() for l in range(L)},
                         **{f"transformer.h.{l}.attn.masked_bias": torch.tensor(-1e4)
                            for l in range(L)},
                         **{"lm_head.weight": params["wte.weight"]}),
        # The Hub's original gpt2 file: GPT2Model's names, F32 masks.
        "unprefixed": dict(params, **{f"h.{l}.attn.bias":
                                      torch.ones(1, 1, T, T).tril() for l in range(L)}),
    }
    optimizer = ("optimizer { type: SGD lr: 1e-30 min_lr: 1e-31 momentum: -1 "
                 "weight_decay: -1 grad_clip: -1 }")
    conv = conv1d_names(L)
    for name, tensors in variants.items():
        hf = os.path.join(work, "b_" + name)
        os.makedirs(hf)
        write_safetensors(os.path.join(hf, "model.safetensors"), tensors, {"format": "pt"})
        json.dump(hf_config(cfg), open(os.path.join(hf, "config.json"), "w"), indent=2)
        ref = HfGpt2(hf).loss(tokens)
        ref32 = HfGpt2(hf, torch.float32).loss(tokens)
        direct = lmps_eval(bin_dir, hf, text)
        print(f"(b) hf -> lmps, {name}: reference {ref:.8f} (fp64), {ref32:.8f} (fp32); "
              f"lmps_eval on the directory {direct:.8f} |diff| {abs(direct - ref):.2e}",
              flush=True)
        check(abs(direct - ref) <= TOL, f"lmps_eval {direct} vs reference {ref}")
        check(abs(direct - ref32) <= TOL, f"lmps_eval {direct} vs fp32 reference {ref32}")
        check(2.0 < ref < 30.0 and abs(ref - math.log(256)) > 0.5,
              f"reference loss {ref}: too close to uniform to tell layouts apart")
        run_dir, out = lmps_local(bin_dir, work, "b_run_" + name,
                                  job_file(work, "b_" + name, cfg, 1, optimizer),
                                  [f"--server_args=--init_from={hf}"])
        exported, _, _ = read_safetensors(os.path.join(run_dir, "model.safetensors"))
        check(set(exported) == set(params), sorted(set(exported) ^ set(params)))
        for n, t in params.items():
            want = t.T if n in conv else t
            check(tuple(exported[n].shape) == tuple(want.shape),
                  f"{n}: {tuple(exported[n].shape)} vs {tuple(want.shape)}")
            check(torch.equal(exported[n], want),
                  f"{n}: max |diff| {(exported[n] - want).abs().max().item()}")
        trained = lmps_eval(bin_dir, os.path.join(run_dir, "model.safetensors"), text)
        print(f"(b) hf -> lmps, {name}: after --init_from over 3 shards the parameters "
              f"are bit-identical; lmps_eval {trained:.8f} |diff| {abs(trained - ref):.2e}",
              flush=True)
        check(trained == direct, (trained, direct))
    # Half precision, a shorter context and a padded vocabulary: the
    # checkpoint in BF16 and F16 (n_positions 32, 256 tokens) into a job with
    # block_size 16 and vocab_size 320 over 3 shards. The parameters are
    # the widened values, wpe's first 16 rows and wte's 256 rows then 64
    # zero rows.
    for half in (torch.bfloat16, torch.float16):
        hf = os.path.join(work, f"b_{half}".replace("torch.", ""))
        os.makedirs(hf)
        write_safetensors(os.path.join(hf, "model.safetensors"),
                          {"transformer." + n: t.to(half) for n, t in params.items()},
                          {"format": "pt"})
        json.dump(hf_config(cfg), open(os.path.join(hf, "config.json"), "w"), indent=2)
        job = dict(cfg, n_positions=16, vocab_size=320)
        run_dir, _ = lmps_local(bin_dir, work, os.path.basename(hf) + "_run",
                                job_file(work, os.path.basename(hf), job, 1, optimizer),
                                [f"--server_args=--init_from={hf}"])
        exported, _, _ = read_safetensors(os.path.join(run_dir, "model.safetensors"))
        for n, t in params.items():
            want = t.to(half).to(torch.float32)
            want = want.T if n in conv else want
            if n == "wpe.weight":
                want = want[:16]
            got = exported[n]
            if n == "wte.weight":
                # The padding rows start at 0; the job's one step (lr 1e-30)
                # moves them to ~1e-32, which fp32 holds, unlike the others.
                pad = got[256:].abs().max().item()
                check(got.shape[0] == 320 and pad < 1e-20, f"{half} wte padding: {pad}")
                got = got[:256]
            check(torch.equal(got, want),
                  f"{half} {n}: {tuple(got.shape)} vs {tuple(want.shape)}")
        logs = open(os.path.join(run_dir, "logs", "server-0.log"), errors="replace").read()
        check("the first 16 of its 32 positions" in logs and "then 64 zero rows" in logs,
              f"the shard's log does not say how the file was fitted:\n{logs[-2000:]}")
        print(f"(b) hf -> lmps, {half}: widened exactly, wpe cropped to 16 positions, "
              f"wte padded to 320 tokens", flush=True)
    # A job whose model is not the checkpoint's: n_head 2, config.json says 4.
    wrong = dict(cfg, n_head=2)
    _, out = lmps_local(bin_dir, work, "b_wrong", job_file(work, "b_wrong", wrong, 1, optimizer),
                        [f"--server_args=--init_from={os.path.join(work, 'b_prefixed')}"],
                        expect_ok=False)
    logs = out
    logs_dir = os.path.join(work, "b_wrong", "logs")
    for log in sorted(os.listdir(logs_dir)) if os.path.isdir(logs_dir) else []:
        logs += open(os.path.join(logs_dir, log), errors="replace").read()
    check("n_head 4 vs 2" in logs and "config.json" in logs,
          f"no error naming n_head in the failed job's output:\n{logs[-3000:]}")
    print("(b) a job with n_head 2 from a checkpoint of n_head 4 fails naming n_head")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin_dir", required=True)
    parser.add_argument("--keep", default="", help="keep the runs here")
    options = parser.parse_args()
    torch.set_num_threads(1)
    work = options.keep or tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
    if options.keep:
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
    text = os.path.join(work, "text.txt")
    with open(TEXT, "rb") as f:
        data = f.read()[2000:3000]
    with open(text, "wb") as f:
        f.write(data)
    tokens = torch.tensor(list(data), dtype=torch.long)
    part_a(options.bin_dir, work, text, tokens)
    part_b(options.bin_dir, work, text, tokens)
    print("PASS")


if __name__ == "__main__":
    sys.exit(main())
