#!/usr/bin/env python3
"""
Writes the fuzz targets' seed corpus (tests/fuzz/corpus/TARGET/), committed:
tiny model files in every weight type (a 13-piece tokenizer, dimensions of 32),
texts, conversations and command lines. Run again after a file-format change.

    python3 tests/fuzz/make_seeds.py
    python3 tests/fuzz/make_seeds.py --tokenizer-model OUT.bin   (the model make fuzz tokenizes with)
    python3 tests/fuzz/make_seeds.py --session-seeds              (only the session target's)
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
import hf_checkpoint as hf  # noqa: E402


def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 5:
        return key + payload
    return key + varint(len(payload)) + payload


def sentencepiece_model(pieces):
    """A sentencepiece ModelProto: BPE, byte fallback, dummy prefix, identity normalizer."""
    out = b""
    for text, score, ptype in pieces:
        out += field(1, 2, field(1, 2, text.encode()) + field(2, 5, struct.pack("<f", score)) + field(3, 0, ptype))
    out += field(2, 2, field(3, 0, 2) + field(35, 0, 1) + field(40, 0, 0))
    out += field(3, 2, field(1, 2, b"identity") + field(3, 0, 1) + field(4, 0, 0))
    return out


PIECES = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("<0x61>", 0.0, 6), ("<0xC3>", 0.0, 6),
          ("<0xA9>", 0.0, 6), ("\u2581", -1.0, 1), ("a", -2.0, 1), ("b", -3.0, 1), ("\u2581a", -4.0, 1),
          ("ab", -5.0, 1), ("[INST]", 0.0, 4), ("\u00e9", -6.0, 1)]


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def tokenizer_model(out):
    """A tiny model file carrying Mistral's v1 tokenizer: what the tokenizer and chat targets tokenize with."""
    tmp = tempfile.mkdtemp()
    try:
        d = os.path.join(tmp, "hf")
        hf.write_checkpoint(d, hf.make_config(dim=8, hidden_dim=8, layers=1, heads=2, kv_heads=1, experts=2, top_k=1),
                            seed=1)
        subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), d, out, "--type", "f32"], check=True,
                       capture_output=True)
    finally:
        shutil.rmtree(tmp)


def session_seeds():
    """Session files (session.c's format) for the tokenizer model (dim 8, 1 layer, 1 kv head of 4) with a
    q8 KV cache of 64 positions, as the session target reads them: whole, cut, and of another KV type."""
    def fnv(data):
        h = 0xCBF29CE484222325
        for b in data:
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        return h
    for name, kv_type, tokens in (("three", 2, [1, 5, 7]), ("six", 2, [1, 5, 7, 9, 11, 13]), ("f32", 0, [1, 5])):
        row = 4 + 2 if kv_type == 2 else 16
        body = struct.pack("<8sQ6I", b"MXSESSN1", 0, kv_type, 64, 1, 1, row, len(tokens))
        body += struct.pack(f"<{len(tokens)}i", *tokens)
        body += bytes((i * 37) & 255 for i in range(2 * len(tokens) * row))
        data = body + struct.pack("<Q", fnv(body))
        write("session", name, data)
        write("session", name + "-cut", data[:-11])


def main():
    if sys.argv[1:2] == ["--session-seeds"]:
        return session_seeds()
    if sys.argv[1:2] == ["--tokenizer-model"]:
        return tokenizer_model(sys.argv[2])
    shutil.rmtree(os.path.join(HERE, "corpus"), ignore_errors=True)
    tmp = tempfile.mkdtemp()
    try:
        cfg = hf.make_config(dim=32, hidden_dim=32, layers=1, heads=2, kv_heads=1, experts=2, top_k=1,
                             vocab=len(PIECES), max_pos=64)
        d = os.path.join(tmp, "hf")
        hf.write_checkpoint(d, cfg, seed=1)
        with open(os.path.join(d, "tokenizer.model"), "wb") as f:
            f.write(sentencepiece_model(PIECES))
        for t in ("f32", "bf16", "q8", "q4"):
            out = os.path.join(tmp, t + ".bin")
            subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), d, out, "--type", t], check=True,
                           capture_output=True)
            write("model", t + ".model", open(out, "rb").read())
    finally:
        shutil.rmtree(tmp)
    for i, text in enumerate(["Hello world", "caf\u00e9 na\u00efve \u00fcber", "[INST] hi [/INST]", "  two  spaces\n\ttab",
                              "\u2581literal", "emoji \U0001F600 and CJK \u4e2d\u6587"]):
        write("tokenizer", f"text{i}", b"\0" + text.encode())
    write("tokenizer", "invalid", b"\0" + b"\xff\xfe bad \xc3 utf8 \xe2\x82")
    write("tokenizer", "ids", b"\1" + bytes(range(64)))
    convs = [{"messages": [{"role": "user", "content": "hi"}]},
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "caf\u00e9?"},
                           {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "\u00e9\\n"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "unfinished"}]}]
    for i, c in enumerate(convs):
        write("chat", f"conv{i}.json", json.dumps(c).encode())
    write("chat", "escapes.json", b'{"messages": [{"role": "user", "content": "\\u00e9\\ud83d\\ude00\\t\\"x\\""}]}')
    for i, args in enumerate([["model.bin", "-i", "Hello", "-n", "5", "-t", "0.7", "--top-k", "40"],
                              ["model.bin", "-m", "chat", "-y", "system", "--stop", "User:"],
                              ["model.bin", "--ids", "1,2,3", "--dump-logits", "out.f32"],
                              ["model.bin", "--perplexity", "t.txt", "-c", "128", "--kl-base", "b"],
                              ["-h"], ["model.bin", "--bench-depth", "--threads", "2", "--no-mmap"]]):
        write("options", f"args{i}", b"\0".join(a.encode() for a in args))
    session_seeds()


if __name__ == "__main__":
    main()
