#!/usr/bin/env python3
"""Writes a deterministic, varied UTF-8 text for GPT-2 tokenizer checks.

  bpe_corpus.py --out FILE [--min_bytes N] [--seed S] SOURCE...

The text is, in order, a few hundred kilobytes of each kind:
  * English prose: the SOURCE files that are not code (e.g. Debian's
    /usr/share/common-licenses/*), as they are;
  * code: the SOURCE files ending in .cc, .h, .py, .sh, .js, .bzl;
  * Unicode, generated from a seeded random.Random: CJK, kana, Hangul,
    Cyrillic, Greek, Thai, Devanagari with vowel signs, Hebrew and Arabic
    (right to left, with harakat and Arabic-Indic digits), Latin letters
    with combining marks, emoji (with skin tones, ZWJ sequences and flags),
    mixed with ASCII words;
  * whitespace runs of every JavaScript whitespace character (and U+0085,
    which is not one) before letters, digits, punctuation and the end of a
    line; digit runs; apostrophes and contractions ('s 't 're 've 'm 'll 'd
    in any case, doubled, curly, at word ends).
It repeats the generated kinds until the text has --min_bytes bytes. Only
code points assigned before Unicode 14 are generated, so RE2's and
JavaScript's \\p{L}/\\p{N} tables agree on every one of them.
"""

import argparse
import random
import sys

CODE_SUFFIXES = (".cc", ".h", ".py", ".sh", ".js", ".bzl")

JS_SPACES = ["\t", "\n", "\x0b", "\x0c", "\r", " ", "\u00a0", "\u1680",
             "\u2000", "\u2005", "\u200a", "\u2028", "\u2029", "\u202f",
             "\u205f", "\u3000", "\ufeff"]


def chars(lo, hi):
    return [chr(c) for c in range(lo, hi + 1)]


SCRIPTS = {
    "cjk": chars(0x4E00, 0x9FA5),
    "kana": chars(0x3041, 0x3096) + chars(0x30A1, 0x30FA),
    "hangul": chars(0xAC00, 0xD7A3),
    "cyrillic": chars(0x0410, 0x044F),
    "greek": chars(0x0391, 0x03A9) + chars(0x03B1, 0x03C9),
    "thai": chars(0x0E01, 0x0E30) + chars(0x0E31, 0x0E3A),
    "devanagari": chars(0x0905, 0x0939) + chars(0x093E, 0x094D),
    "hebrew": chars(0x05D0, 0x05EA) + chars(0x05B0, 0x05BC),
    "arabic": chars(0x0627, 0x064A) + chars(0x064B, 0x0652),
}
ARABIC_DIGITS = chars(0x0660, 0x0669)
COMBINING = chars(0x0300, 0x036F)
EMOJI = chars(0x1F600, 0x1F64F) + chars(0x1F300, 0x1F37F)
SKIN = chars(0x1F3FB, 0x1F3FF)
ZWJ = "\u200d"
REGIONAL = chars(0x1F1E6, 0x1F1FF)
PUNCT = list("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~") + ["\u00bf", "\u2014",
                                                   "\u201c", "\u201d",
                                                   "\u00ab", "\u00bb"]
WORDS = ("the of and to in is you that it he was for on are as with his they "
         "I at be this have from or one had by word but not what all were we "
         "when your can said there use an each which she do how their if will "
         "up other about out many then them these so some her would make like "
         "him into time has look two more write go see number no way could "
         "people my than first water been call who oil its now find long down "
         "day did get come made may part").split()


def unicode_text(rng, n):
    out = []
    size = 0
    while size < n:
        kind = rng.random()
        if kind < 0.45:
            name = rng.choice(sorted(SCRIPTS))
            alphabet = SCRIPTS[name]
            word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9)))
            if name == "arabic" and rng.random() < 0.2:
                word += " " + "".join(rng.choice(ARABIC_DIGITS)
                                      for _ in range(rng.randint(1, 6)))
        elif kind < 0.6:
            word = "".join(rng.choice("aeiouxyzAEQ") +
                           "".join(rng.choice(COMBINING)
                                   for _ in range(rng.randint(0, 3)))
                           for _ in range(rng.randint(1, 6)))
        elif kind < 0.75:
            r = rng.random()
            if r < 0.4:
                word = "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 3)))
            elif r < 0.6:
                word = rng.choice(EMOJI) + rng.choice(SKIN)
            elif r < 0.8:
                word = ZWJ.join(rng.choice(EMOJI) for _ in range(rng.randint(2, 4)))
            else:
                word = rng.choice(REGIONAL) + rng.choice(REGIONAL)
        elif kind < 0.9:
            word = rng.choice(WORDS)
            if rng.random() < 0.3:
                word = word.capitalize()
        else:
            word = "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 3)))
        sep = rng.choice([" ", " ", " ", "", "\n", "  ", "\u3000", ", "])
        piece = word + sep
        out.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(out)


def whitespace_text(rng, n):
    out = []
    size = 0
    followers = WORDS + ["123", "4", "!", "?!", "'s", "\u00e9t\u00e9",
                         "\u4e2d\u6587", "\U0001F600", "\u05e9\u05dc\u05d5\u05dd"]
    while size < n:
        run = "".join(rng.choice(JS_SPACES + [" "] * 6 + ["\u0085"])
                      for _ in range(rng.choice([1, 1, 2, 2, 3, 4, 7, 16])))
        tail = rng.choice(followers) if rng.random() < 0.9 else "\n"
        piece = run + tail
        out.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(out)


def digits_text(rng, n):
    out = []
    size = 0
    while size < n:
        r = rng.random()
        if r < 0.4:
            piece = str(rng.randint(0, 10 ** rng.randint(1, 30)))
        elif r < 0.6:
            piece = "%d.%0*d" % (rng.randint(0, 9999), rng.randint(1, 6),
                                 rng.randint(0, 999999) % (10 ** 6))
        elif r < 0.8:
            piece = "%d,%03d,%03d" % (rng.randint(1, 999), rng.randint(0, 999),
                                      rng.randint(0, 999))
        else:
            piece = "".join(rng.choice("0123456789") for _ in range(rng.randint(30, 300)))
        piece += rng.choice([" ", " ", "\n", "x", "-", "th ", "% "])
        out.append(piece)
        size += len(piece)
    return "".join(out)


def apostrophes_text(rng, n):
    out = []
    size = 0
    suffixes = ["s", "t", "re", "ve", "m", "ll", "d", "S", "T", "RE", "Ve",
                "LL", "D", "x", "", "ss", "dd", "lll"]
    quotes = ["'", "'", "'", "''", "\u2019", "`"]
    while size < n:
        word = rng.choice(WORDS + ["don", "won", "I", "they", "we", "it"])
        r = rng.random()
        if r < 0.7:
            piece = word + rng.choice(quotes) + rng.choice(suffixes)
        elif r < 0.85:
            piece = rng.choice(quotes) + word + rng.choice(quotes)
        else:
            piece = rng.choice(quotes) + rng.choice(suffixes)
        piece += rng.choice([" ", " ", "  ", "\n", ".", "'", ""])
        out.append(piece)
        size += len(piece.encode("utf-8"))
    return "".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--min_bytes", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("sources", nargs="*")
    a = p.parse_args()
    rng = random.Random(a.seed)
    prose, code = [], []
    for path in sorted(a.sources):
        with open(path, encoding="utf-8", errors="strict") as f:
            (code if path.endswith(CODE_SUFFIXES) else prose).append(f.read())
    parts = ["".join(prose)[:400000], "".join(code)[:400000]]
    size = sum(len(x.encode("utf-8")) for x in parts)
    while size < a.min_bytes:
        for make in (unicode_text, whitespace_text, digits_text, apostrophes_text):
            parts.append(make(rng, 60000))
            size += len(parts[-1].encode("utf-8"))
    text = "".join(parts)
    with open(a.out, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    print("bpe_corpus: %d bytes, %d characters (prose %d, code %d)" %
          (len(text.encode("utf-8")), len(text), len(parts[0]), len(parts[1])),
          file=sys.stderr)


if __name__ == "__main__":
    main()
