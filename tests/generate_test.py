#!/usr/bin/python3
"""lmps_generate against an independent GPT-2 (tests/hf_gpt2_test.py's
HfGpt2, written to transformers' conventions) on hand-made Hugging Face
checkpoints:

 1. GPT-2's vocabulary padded to 50304 rows, with the 47 padding rows so
    large that an unmasked argmax would pick one: greedy generation equals
    the reference's greedy continuation over the first 50257 logits,
    decoded by GPT-2's byte decoder written here (the prompt's ids come from
    bpe_tool, whose ids are checked against npm's encoder by
    bpe_reference_test);
 2. sampling is a pure function of the seed: the same seed twice gives the
    same text, another seed another text; top_p and top_k are accepted and
    bad values are refused with the option named;
 3. <|endoftext|> ends the text (--stop_at_eot, the default), and is written
    out with --stop_at_eot=false;
 4. a byte-level model (vocabulary 256) is decoded as bytes, greedy equal
    to the reference; a vocabulary that is neither is refused, naming
    --tokenizer.
Usage: generate_test.py --bin_dir=DIR --vocab_dir=DIR
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_gpt2_test import (HfGpt2, hf_config, random_hf_params,  # noqa: E402
                          read_safetensors, write_safetensors)

GPT2_VOCAB = 50257
PADDED = 50304
EOT = 50256


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Gpt2Decoder:
    def __init__(self, vocab_dir):
        with open(os.path.join(vocab_dir, "encoder.json"), encoding="utf-8") as f:
            self.token = {i: s for s, i in json.load(f).items()}
        self.byte = {c: b for b, c in bytes_to_unicode().items()}

    def decode(self, ids):
        return bytes(self.byte[c] for i in ids for c in self.token[i])


def make_model(work, name, vocab, seed, tweak=None):
    cfg = {"vocab_size": vocab, "n_positions": 32, "n_embd": 16, "n_layer": 2,
           "n_head": 2}
    p = random_hf_params(cfg, seed)
    if tweak:
        tweak(p)
    d = os.path.join(work, name)
    os.makedirs(d)
    write_safetensors(os.path.join(d, "model.safetensors"),
                      {"transformer." + k: v for k, v in p.items()}, {"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f)
    return d


def generate(bin_dir, model, *flags, expect_ok=True):
    done = subprocess.run(
        [os.path.join(bin_dir, "worker/lmps_generate"), "--model=" + model] + list(flags),
        capture_output=True, timeout=120)
    if expect_ok:
        check(done.returncode == 0, "lmps_generate %s failed: %s"
              % (" ".join(flags), done.stderr.decode(errors="replace")))
        check(done.stdout.endswith(b"\n"), "no final newline")
        return done.stdout[:-1]
    check(done.returncode != 0, "lmps_generate %s should have failed" % " ".join(flags))
    return done.stderr.decode(errors="replace")


def reference_greedy(model_dir, prompt_ids, n, limit):
    """(ids, smallest top-2 gap, whether an unmasked argmax hit a padding row)."""
    ref = HfGpt2(model_dir)
    ids, gap, padding_won = list(prompt_ids), float("inf"), False
    T = ref.cfg["n_positions"]
    with torch.no_grad():
        for _ in range(n):
            logits = ref.logits(torch.tensor(ids[-T:]))[-1]
            padding_won |= int(logits.argmax()) >= limit
            top2 = logits[:limit].topk(2).values
            gap = min(gap, float(top2[0] - top2[1]))
            ids.append(int(logits[:limit].argmax()))
    return ids[len(prompt_ids):], gap, padding_won


def gpt2_part(bin_dir, vocab_dir, work):
    decoder = Gpt2Decoder(vocab_dir)

    def pad_rows(p):  # large padding rows: they win an unmasked argmax
        g = torch.Generator().manual_seed(5)
        p["wte.weight"][GPT2_VOCAB:] = torch.randn(PADDED - GPT2_VOCAB, 16, generator=g) * 40

    model = make_model(work, "gpt2", PADDED, seed=11, tweak=pad_rows)
    prompt = "And God said, Let there be"
    enc = subprocess.run([os.path.join(bin_dir, "common/text/bpe_tool"), "encode",
                          "--vocab_dir=" + vocab_dir], input=prompt.encode(),
                         capture_output=True, check=True)
    prompt_ids = [int(t) for t in enc.stdout.split()]
    n = 12
    want_ids, gap, padding_won = reference_greedy(model, prompt_ids, n, GPT2_VOCAB)
    check(padding_won, "the padding rows never won the unmasked argmax: the "
          "test would not notice sampling from them")
    check(gap > 1e-3, "reference top-2 gap %g too small for a greedy comparison" % gap)
    check(EOT not in want_ids, "reference greedy text hits <|endoftext|>")
    want = prompt.encode() + decoder.decode(want_ids)
    got = generate(bin_dir, model, "--prompt=" + prompt, "--max_new_tokens=%d" % n,
                   "--temperature=0", "--vocab_dir=" + vocab_dir)
    check(got == want, "greedy text differs:\n lmps %r\n  ref %r" % (got, want))
    print("generate_test: greedy GPT-2 text equals the reference (%d tokens, "
          "smallest top-2 gap %.3g): %r" % (n, gap, got.decode(errors="replace")))

    def sample(seed, *extra):
        return generate(bin_dir, model, "--prompt=" + prompt, "--max_new_tokens=20",
                        "--temperature=1", "--seed=%d" % seed,
                        "--vocab_dir=" + vocab_dir, *extra)

    a, b = sample(1, "--top_p=0.9"), sample(1, "--top_p=0.9")
    check(a == b, "the same seed gave two texts")
    check(a != sample(2, "--top_p=0.9"), "seeds 1 and 2 gave the same text")
    check(sample(1, "--top_k=1") == got + decoder.decode(
        reference_greedy(model, prompt_ids, 20, GPT2_VOCAB)[0][n:]),
        "top_k=1 is not greedy")
    for bad, name in (("--top_p=0", "top_p"), ("--top_p=1.5", "top_p"),
                      ("--temperature=-1", "temperature"), ("--top_k=-2", "top_k")):
        err = generate(bin_dir, model, "--vocab_dir=" + vocab_dir, bad, expect_ok=False)
        check(name in err, "%s: the error does not name %s: %s" % (bad, name, err))

    # <|endoftext|> as the greedy choice (its row: 3x that of the token the
    # model picks first): nothing follows the prompt, or the token's text.
    eot_model = make_model(work, "eot", PADDED, seed=11, tweak=pad_rows)
    path = os.path.join(eot_model, "model.safetensors")
    tensors, _, meta = read_safetensors(path)
    wte = tensors["transformer.wte.weight"]
    wte[EOT] = wte[want_ids[0]] * 3
    write_safetensors(path, tensors, meta)
    check(reference_greedy(eot_model, prompt_ids, 1, GPT2_VOCAB)[0] == [EOT],
          "could not make <|endoftext|> the greedy choice")
    stopped = generate(bin_dir, eot_model, "--prompt=" + prompt, "--temperature=0",
                       "--vocab_dir=" + vocab_dir)
    check(stopped == prompt.encode(), "did not stop at <|endoftext|>: %r" % stopped)
    kept = generate(bin_dir, eot_model, "--prompt=" + prompt, "--temperature=0",
                    "--max_new_tokens=1", "--stop_at_eot=false",
                    "--vocab_dir=" + vocab_dir)
    check(kept == prompt.encode() + b"<|endoftext|>",
          "--stop_at_eot=false: %r" % kept)


def bytes_part(bin_dir, work):
    model = make_model(work, "bytes", 256, seed=3)
    prompt = "In the beginning"
    want_ids, gap, _ = reference_greedy(model, list(prompt.encode()), 16, 256)
    check(gap > 1e-3, "byte model: top-2 gap %g too small" % gap)
    got = generate(bin_dir, model, "--prompt=" + prompt, "--max_new_tokens=16",
                   "--temperature=0")
    check(got == prompt.encode() + bytes(want_ids),
          "byte-level greedy differs: %r vs %r" % (got, bytes(want_ids)))
    odd = make_model(work, "odd", 1000, seed=3)
    err = generate(bin_dir, odd, "--prompt=x", expect_ok=False)
    check("--tokenizer" in err, "vocabulary 1000: the error does not name "
          "--tokenizer: " + err)
    print("generate_test: byte-level greedy equals the reference; vocabulary "
          "1000 refused")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin_dir", required=True)
    parser.add_argument("--vocab_dir", required=True)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.vocab_dir, "encoder.json")):
        print("LMPS_SKIP(installable): no GPT-2 vocabulary in %s "
              "(scripts/install_deps.sh installs it)" % args.vocab_dir)
        return 0
    with tempfile.TemporaryDirectory(dir=os.environ.get("TEST_TMPDIR")) as work:
        try:
            gpt2_part(args.bin_dir, args.vocab_dir, work)
            bytes_part(args.bin_dir, work)
        except TestFailure as e:
            print("generate_test: FAIL: %s" % e)
            return 1
    print("generate_test: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
