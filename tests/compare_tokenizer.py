#!/usr/bin/env python3
"""
Compares tokenizer.c with the sentencepiece library on a generated corpus:
encoding of every string, decoding of random id sequences, and round trips.

    python3 tests/compare_tokenizer.py MODEL.bin TOKENIZER.model [--seed N] [--n N]

MODEL.bin is any exported model whose tokenizer section came from
TOKENIZER.model. Exits non-zero and prints the first differences on a mismatch.
"""
import argparse
import os
import random
import struct
import subprocess
import sys
import tempfile

import sentencepiece

HERE = os.path.dirname(os.path.abspath(__file__))
TOK_BATCH = os.path.join(HERE, "tok_batch")

FIXED = [
    "", " ", "  ", "   ", "\t", "\n", "\r", "\r\n", "a  b", " leading", "trailing ", "  both  ",
    "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[INST] hi [/INST]", "<s>[INST] x [/INST]</s>",
    "[TOOL_CALLS]", "[control_8]", "<0x41>", "\x00", "a\x00b", "\u2581", "\u2581\u2581x", "x\u2581",
    "héllo wörld", "Ça va? Déjà vu, naïve façade", "日本語のテキストです。", "中文分词测试", "한국어 문장",
    "😀👍🏽 👨‍👩‍👧‍👦", "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; i++) { s += a[i]; }",
    "1234567890", "3.14159 2.71828", " 5", "  5", "$1,000,000.00", "\x7f\x01\x1b[31m", "\ufeffBOM",
    "\ufffd", "\U0010ffff", "\ue000", " " * 40, "\t" * 10, "\n\n\n", "a" * 300, "ab" * 150,
    "The quick brown fox jumps over the lazy dog.", "Mixtral is a sparse mixture-of-experts model.",
]

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "     \t\n\r",
    "0123456789",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßÀÉÎÕÜÇŒœ",
    "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔ",
    "абвгдежзийклмнопрстуфхцчшщъыьэюяАБВ",
    "的一是不了人我在有他这为之大来以个中上们日本語中文字テキスト",
    "가나다라마바사아자차카타파하",
    "😀😃😄😁😆😅🤣😂🙂🙃😉😊👍🏽👨‍👩‍👧🎉🔥💯",
    "".join(chr(c) for c in range(0, 32)) + "\x7f",
    "\u2581\ufffd\u200b\u200d\ufeff\u00a0\u2028",
]


def random_text(rng, words):
    kind = rng.random()
    n = rng.choice([1, 2, 3, 5, 8, 13, 30, 60, 120, 250])
    if kind < 0.3:  # words from the vocabulary, with spacing variations: realistic merges
        out = []
        for _ in range(n):
            out.append(rng.choice(words))
            out.append(rng.choice([" ", " ", " ", "", "  ", "\n", "\t", ", ", ". "]))
        return "".join(out)[: n * 8]
    if kind < 0.8:  # characters from a mix of alphabets
        alphas = rng.sample(ALPHABETS, rng.randint(1, 4))
        return "".join(rng.choice(rng.choice(alphas)) for _ in range(n))
    if kind < 0.9:  # random code points anywhere in Unicode
        out = []
        for _ in range(n):
            c = rng.randint(0, 0x10FFFF)
            out.append(chr(c) if not 0xD800 <= c < 0xE000 else "x")
        return "".join(out)
    return None  # random bytes, below


def corpus(seed, n, words):
    rng = random.Random(seed)
    items = [s.encode() for s in FIXED]
    while len(items) < n:
        t = random_text(rng, words)
        if t is None:
            items.append(bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 40))))
        else:
            items.append(t.encode("utf-8"))
    return items


def run_batch(model, records):
    """records: list of bytes (encode) or list of int lists (decode)."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        with open(inp, "wb") as f:
            for r in records:
                if isinstance(r, bytes):
                    f.write(struct.pack("<BI", 0, len(r)) + r)
                else:
                    f.write(struct.pack("<BI", 1, len(r)) + struct.pack(f"<{len(r)}i", *r))
        p = subprocess.run([TOK_BATCH, model, inp, outp], capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"tok_batch failed: {p.stderr}")
        data = open(outp, "rb").read()
    out, at = [], 0
    for r in records:
        (n,) = struct.unpack_from("<I", data, at)
        at += 4
        if isinstance(r, bytes):
            out.append(list(struct.unpack_from(f"<{n}i", data, at)))
            at += 4 * n
        else:
            out.append(data[at:at + n])
            at += n
    return out


def compare(model, tokenizer_model, seed=0, n=3000, quiet=False):
    """Returns (number of checks, list of failure descriptions)."""
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    V = sp.get_piece_size()
    words = [sp.id_to_piece(i).replace("\u2581", "") for i in range(V) if not (sp.is_control(i) or sp.is_byte(i)
             or sp.is_unknown(i))]
    texts = corpus(seed, n, [w for w in words if w])
    rng = random.Random(seed + 1)
    special = [i for i in range(V) if sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)]
    id_lists = []
    for _ in range(n // 2):
        k = rng.randint(0, 30)
        id_lists.append([rng.choice(special) if rng.random() < 0.4 else rng.randrange(V) for _ in range(k)])

    got_enc = run_batch(model, texts)
    want_enc = [sp.encode(t) for t in texts]
    got_dec = run_batch(model, id_lists + want_enc)
    want_dec = [sp.decode(ids) for ids in id_lists + want_enc]

    fails = []
    for t, g, w in zip(texts, got_enc, want_enc):
        if g != w:
            first = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            fails.append(f"encode {t[:80]!r}: first difference at id {first}: tokenizer.c {g[first:first + 6]} "
                         f"sentencepiece {w[first:first + 6]}")
    for ids, g, w in zip(id_lists + want_enc, got_dec, want_dec):
        try:
            g_text = g.decode("utf-8")
        except UnicodeDecodeError:
            fails.append(f"decode {ids[:20]}: tokenizer.c output is not valid UTF-8: {g[:60]!r}")
            continue
        if g_text != w:
            fails.append(f"decode {ids[:20]}: tokenizer.c {g_text[:60]!r} sentencepiece {w[:60]!r}")
    return len(texts) + len(id_lists) + len(want_enc), fails


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokenizer_model")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--n", type=int, default=5000)
    a = ap.parse_args()
    total, fails = compare(a.model, a.tokenizer_model, a.seed, a.n)
    for f in fails[:20]:
        print(f)
    print(f"{total - len(fails)}/{total} agree with sentencepiece")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
