#!/usr/bin/env python3
"""
The test suite (make test). Every check compares mixtral.c against something
independent: tests/reference.py (a numpy forward pass from the math) for
logits and expert choices, and expectations about errors for bad input.
Prints the first differences on a mismatch; ends with 'N passed, N failed,
N skipped' and exits non-zero if anything failed. A test that needs a tool
this machine lacks is skipped with its reason, never failed for it. Tests of
other architectures under emulation (cross tests) run with --cross, which
`make test-cross` gives after installing their toolchain.

    python3 tests/run_tests.py [-k SUBSTRING] [--cross]
"""
import argparse
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import hf_checkpoint as hf  # noqa: E402
import reference  # noqa: E402

ENGINE = os.path.join(ROOT, "mixtral")
DEBUG_ENGINE = os.path.join(ROOT, "mixtral-debug")
PYTHON = sys.executable
TOL = 1e-4
CC = os.environ.get("CC", "cc")

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def cross_test(fn):
    """A test that runs another architecture's build under emulation: make test-cross."""
    fn.cross = True
    return test(fn)


class Failure(Exception):
    pass


class Skip(Exception):
    """The test cannot run on this machine; the message says why."""


def stable_seed(name):
    """A seed from a name, the same in every run (Python's hash() is randomised per process)."""
    return zlib.crc32(name.encode()) % 1000


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def run(cmd, **kw):
    kw.setdefault("timeout", 600)
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", **kw)


def export(hf_dir, out, wtype="f32"):
    r = run([PYTHON, os.path.join(ROOT, "export.py"), hf_dir, out, "--type", wtype])
    check(r.returncode == 0, f"export.py failed:\n{r.stderr}")
    return out


def engine_logits(model, ids, engine=ENGINE, threads=2, context=None, vocab=None, layers=None, top_k=None,
                  chunk=None, extra=()):
    out = model + ".logits"
    cmd = [engine, model, "--ids", ",".join(map(str, ids)), "--dump-logits", out, "--dump-experts",
           model + ".experts", "--threads", str(threads), *extra]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    if context:
        cmd += ["-c", str(context)]
    r = run(cmd)
    check(r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    logits = np.fromfile(out, "<f4").reshape(len(ids), vocab)
    experts = np.fromfile(model + ".experts", "<i4").reshape(len(ids), layers, top_k)
    return logits, np.sort(experts, -1)


def compare_logits(got, want, what):
    err = np.abs(got.astype(np.float64) - want)
    worst = float(err.max())
    if not worst <= TOL:
        bad = np.argwhere(err > TOL)[:5]
        lines = [f"  position {p} token {v}: engine {got[p, v]:.6f} reference {want[p, v]:.6f}" for p, v in bad]
        raise Failure(f"{what}: max abs error {worst:.3g} > {TOL}; first differences:\n" + "\n".join(lines))
    return worst


def compare_experts(got, want, what):
    if not np.array_equal(got, want):
        bad = np.argwhere((got != want).any(-1))[:5]
        lines = [f"  position {p} layer {l}: engine {got[p, l].tolist()} reference {want[p, l].tolist()}"
                 for p, l in bad]
        raise Failure(f"{what}: different experts chosen; first differences:\n" + "\n".join(lines))


def random_ids(n, vocab, seed):
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, vocab, n - 1).tolist()


def random_model(tmp, seed, n_ids, ids_seed, name="hf", **kw):
    """A random bf16 checkpoint in tmp/name, some token ids for it, and the shape of the
    engine's dumps: (folder, config, ids, shape keywords for engine_logits)."""
    cfg = hf.make_config(**kw)
    d = os.path.join(tmp, name)
    hf.write_checkpoint(d, cfg, dtype="bf16", seed=seed)
    shape = dict(vocab=cfg["vocab_size"], layers=cfg["num_hidden_layers"], top_k=cfg["num_experts_per_tok"])
    return d, cfg, random_ids(n_ids, cfg["vocab_size"], ids_seed), shape


# ----------------------------------------------------------------------------
# equivalence with the numpy reference

CASES = [
    # name, config kwargs, checkpoint dtype, shards, export type, positions, context
    ("mha_bf16", dict(heads=4, kv_heads=4, experts=4, top_k=2), "bf16", 1, "f32", 20, None),
    ("gqa4_f16_sharded", dict(dim=64, heads=8, kv_heads=2, experts=8, top_k=2), "f16", 3, "f32", 20, None),
    ("mqa_top1_f32", dict(heads=4, kv_heads=1, experts=8, top_k=1), "f32", 1, "f32", 20, None),
    ("odd_dims", dict(dim=67, hidden_dim=97, heads=4, kv_heads=2, head_dim=16, experts=5, top_k=3,
                      vocab=32001), "bf16", 2, "f32", 17, None),
    ("window_ring", dict(heads=4, kv_heads=2, experts=4, top_k=2, window=5), "bf16", 1, "f32", 23, 64),
    ("window_bf16_export", dict(heads=8, kv_heads=2, experts=8, top_k=2, window=7), "bf16", 2, "bf16", 30, None),
    ("window_at_context", dict(heads=4, kv_heads=2, experts=4, top_k=2, window=6), "bf16", 1, "f32", 6, 6),
    ("head_dim_128", dict(dim=256, hidden_dim=128, heads=2, kv_heads=1, experts=4, top_k=2), "bf16", 1, "f32", 12, None),
    ("f32_to_bf16_export", dict(heads=4, kv_heads=2, experts=4, top_k=2), "f32", 1, "bf16", 12, None),
    ("tied_embeddings", dict(heads=4, kv_heads=2, experts=4, top_k=2, tie=True), "bf16", 1, "f32", 10, None),
    ("v3_tokenizer_vocab", dict(heads=4, kv_heads=2, experts=8, top_k=2, vocab=32768, layers=3), "bf16", 1, "f32", 12, None),
]


def make_case_test(name, kw, dtype, shards, wtype, n, context):
    def t(tmp):
        cfg = hf.make_config(**kw)
        d = os.path.join(tmp, "hf")
        tok = "mistral-v3.model" if cfg["vocab_size"] == 32768 else "mistral-v1.model"
        hf.write_checkpoint(d, cfg, dtype=dtype, shards=shards, seed=stable_seed(name), tokenizer=tok)
        model = export(d, os.path.join(tmp, "model.bin"), wtype)
        ids = random_ids(n, cfg["vocab_size"], 7)
        # an f32 source exported as bf16 is rounded: the reference rounds the same way
        want, want_e = reference.forward(reference.load_safetensors(d), cfg, ids,
                                         bf16=(wtype == "bf16" and dtype != "bf16"))
        got, got_e = engine_logits(model, ids, context=context, vocab=cfg["vocab_size"],
                                   layers=cfg["num_hidden_layers"], top_k=cfg["num_experts_per_tok"])
        err = compare_logits(got, want, name)
        compare_experts(got_e, want_e, name)
        return f"max abs error {err:.2g} over {n} positions"
    t.__name__ = "reference_" + name
    return t


for case in CASES:
    test(make_case_test(*case))


@test
def threads_identical(tmp):
    """Results are bit-identical for any thread count, and under the sanitizer build."""
    d, cfg, ids, shape = random_model(tmp, 3, 14, 1, dim=64, hidden_dim=128, heads=8, kv_heads=2, experts=8, top_k=2, window=4)
    # the SIMD build and the portable build (the sanitizer one) each agree with themselves
    for wtype in ("f32", "bf16", "q8", "q4"):
        model = export(d, os.path.join(tmp, f"model_{wtype}.bin"), wtype)
        # a chunk of all the ids (batched products), and one token at a time (the rows shared out
        # with stealing, as when decoding)
        for engine, counts in ((ENGINE, (2, 3, 7)), (DEBUG_ENGINE, (2, 3))):
            for chunk in (None, 1):
                base, _ = engine_logits(model, ids, engine=engine, threads=1, chunk=chunk, **shape)
                for threads in counts:
                    got, _ = engine_logits(model, ids, engine=engine, threads=threads, chunk=chunk, **shape)
                    if not np.array_equal(got, base):
                        raise Failure(f"{wtype}: {os.path.basename(engine)} --threads {threads} --chunk {chunk} differs "
                                      f"from --threads 1 by up to {np.abs(got - base).max():.3g}")
        # the file mapped, or read into memory: the same numbers
        for flag in ("--mmap", "--no-mmap"):
            got, _ = engine_logits(model, ids, threads=2, extra=(flag,), **shape)
            base, _ = engine_logits(model, ids, threads=2, **shape)
            check(np.array_equal(got, base), f"{wtype}: {flag} differs from the default load")
    return "f32, bf16, q8, q4; 1/2/3/7 threads, whole prompt and token by token, SIMD and portable (ASan) builds; mapped or read in"


@test
def chunked_prompt_equals_token_by_token(tmp):
    """Prompts go through in chunks, each chosen expert once per chunk: chunk sizes that do
    and do not divide the 24-token prompt, with and without a window (5, shorter than some
    chunks), in every weight format. Every (row, token) product is computed the same way
    whatever other tokens share its call (f32/bf16: the same dot product; q8/q4: each output's
    own accumulator, block by block, kernels.h) and each token's expert outputs are added in
    the same order, so the logits must be identical, not just close."""
    ids = random_ids(24, 32000, 9)
    n = 0
    for window in (None, 5):
        d, cfg, _, shape = random_model(tmp, 12, 1, 0, name=f"hf{window}", dim=128, hidden_dim=128, heads=4,
                                        kv_heads=2, experts=8, top_k=2, window=window)
        for wtype in ("f32", "bf16", "q8", "q4"):
            model = export(d, os.path.join(tmp, f"m{window}{wtype}.bin"), wtype)
            base, base_e = engine_logits(model, ids, chunk=1, **shape)
            for chunk in (5, 8, 24, 64):
                got, got_e = engine_logits(model, ids, chunk=chunk, **shape)
                compare_experts(got_e, base_e, f"window {window} {wtype} chunk {chunk}")
                if not np.array_equal(got, base):
                    at = np.unravel_index(np.argmax(np.abs(got - base)), got.shape)
                    raise Failure(f"window {window} {wtype}: --chunk {chunk} differs from --chunk 1 by up to "
                                  f"{np.abs(got - base).max():.3g}, at token {at[0]}, id {at[1]}")
                n += 1
    return f"{n} combinations, all bit-identical to token by token"


@test
def generate_runs(tmp):
    """The generator streams text, is reproducible for a seed, and is greedy at -t 0."""
    cfg = hf.make_config()
    d = os.path.join(tmp, "hf")
    hf.write_checkpoint(d, cfg, seed=5)
    model = export(d, os.path.join(tmp, "model.bin"), "bf16")
    outs = []
    for _ in range(2):
        r = run([ENGINE, model, "-i", "Hello world", "-n", "12", "-s", "42", "--threads", "2"])
        check(r.returncode == 0, r.stderr)
        check("tok/s" in r.stderr, f"no speed report on stderr: {r.stderr!r}")
        outs.append(r.stdout)
    check(outs[0] == outs[1], f"same seed, different text: {outs!r}")
    check(outs[0].startswith("Hello world"), f"prompt not echoed: {outs[0]!r}")
    # greedy: the generated tokens are the reference's argmax, decoded as sentencepiece does
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    ids = [1] + sp.encode("Hello world")
    W = reference.load_safetensors(d)
    for _ in range(3):
        logits, _ = reference.forward(W, cfg, ids)
        ids.append(int(np.argmax(logits[-1])))
    r = run([ENGINE, model, "-i", "Hello world", "-n", "3", "-t", "0"])
    check(r.returncode == 0, r.stderr)
    want = sp.decode(ids) + "\n"
    check(r.stdout == want, f"greedy output {r.stdout!r}, reference {want!r} (ids {ids})")
    # the printed text is the whole sequence decoded as one stream: a reply whose first piece
    # starts with a space ("▁in") keeps it ("came to pass in", never "came to passin")
    for prompt in ("And it came to pass", "Hello", "The cat", "One two three", "x", "Once upon a time"):
        ids = [1] + sp.encode(prompt)
        logits, _ = reference.forward(W, cfg, ids)
        first = int(np.argmax(logits[-1]))
        if sp.id_to_piece(first).startswith("\u2581") and not sp.is_control(first):
            break
    else:
        raise Failure("no prompt found whose greedy continuation starts with a space")
    r = run([ENGINE, model, "-i", prompt, "-n", "1", "-t", "0"])
    want = sp.decode(ids + [first]) + "\n"
    check(r.returncode == 0 and r.stdout == want,
          f"prompt and reply are not one stream: printed {r.stdout!r}, the sequence decodes to {want!r}")
    return "seeded sampling repeats; greedy text equals the reference's argmax; prompt and reply one stream"


# ----------------------------------------------------------------------------
# the shipped demo model against the training script's own forward pass

@test
def demo_model_matches_training(tmp):
    """demo/train.py saved its forward pass's logits for a prompt, with the bf16 weights it
    shipped; the engine must reproduce them from the exported file."""
    ref = json.load(open(os.path.join(ROOT, "demo", "reference.json")))
    want = np.fromfile(os.path.join(ROOT, "demo", "reference_logits.f32"), "<f4").reshape(len(ref["ids"]), -1)
    cfg = json.load(open(os.path.join(ROOT, "demo", "model", "config.json")))
    model = export(os.path.join(ROOT, "demo", "model"), os.path.join(tmp, "demo.bin"), "f32")
    got, _ = engine_logits(model, ref["ids"], vocab=cfg["vocab_size"], layers=cfg["num_hidden_layers"],
                           top_k=cfg["num_experts_per_tok"])
    # torch and mixtral.c both compute in f32, with sums in different orders; the trained
    # logits reach magnitudes of tens, so allow 1e-4 relative to the largest
    tol = TOL * max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    check(err <= tol, f"max abs error {err:.3g} > {tol:.3g}; first position differing: "
                      f"{int(np.argmax(np.abs(got - want).max(-1)))}")
    check((got.argmax(-1) == want.argmax(-1)).all(), "a different top token")
    return f"{len(ref['ids'])} positions of {ref['prompt']!r}: max abs error {err:.2g} (logits up to {np.abs(want).max():.0f})"


@test
def expert_stats_and_trace(tmp):
    """--expert-stats counts add up (top_k choices per token per layer, over prompt and generated
    tokens) and --trace-experts has one row per generated token with top_k experts per layer."""
    d, cfg, _, _ = random_model(tmp, 17, 1, 0, layers=3, experts=8, top_k=2)
    model = export(d, os.path.join(tmp, "m.bin"), "bf16")
    r = run([ENGINE, model, "-i", "Hello world", "-n", "10", "-t", "0", "--expert-stats", "--trace-experts"])
    check(r.returncode == 0, r.stderr)
    lines = r.stdout.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("expert usage over"))
    tokens = int(lines[head].split()[3])
    rows = [l for l in lines[head + 2:] if l.strip()[:1].isdigit()]
    check(len(rows) == 3, f"expected 3 layer rows:\n{r.stdout}")
    for row in rows:
        counts = [int(x) for x in row.split("|")[1].split()]
        check(len(counts) == 8 and sum(counts) == 2 * tokens, f"counts {counts} for {tokens} tokens")
    t0 = next(i for i, l in enumerate(lines) if l.startswith("token"))
    trace = [l for l in lines[t0 + 1:head] if l.strip()]
    check(tokens == 1 + len(sp_ids(d, "Hello world")) + 10, f"{tokens} tokens routed: BOS, prompt and 10 generated?")
    check(len(trace) == 10, f"{len(trace)} trace rows for 10 generated tokens")
    for l in trace:
        cells = l[14:].split()
        check(len(cells) == 6 and all("+" in c for c in cells[::2]), f"trace row {l!r}")
    # many layers: blocks of 8 columns, each under a header naming its layers
    d, cfg, _, _ = random_model(tmp, 18, 1, 0, name="deep", layers=10, experts=4, top_k=2)
    r = run([ENGINE, export(d, os.path.join(tmp, "deep.bin"), "bf16"), "-i", "Hi", "-n", "3", "-t", "0",
             "--trace-experts"])
    heads = [l.split()[1:] for l in r.stdout.splitlines() if l.startswith("token")]
    check(heads == [[f"L{i}" for i in range(8)], ["L8", "L9"]], f"trace headers for 10 layers: {heads}\n{r.stdout}")
    return f"{tokens} tokens routed, {len(trace)} traced; 10 layers in two blocks"


def sp_ids(d, text):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model")).encode(text)


# ----------------------------------------------------------------------------
# quantized and SIMD kernels

# Bounds for q8/q4 against f32, from what block quantization costs: one matrix-vector
# product with 64-weight blocks and int8 activations errs by 0.8% (q8) and 9% (q4) of its
# output norm (measured in numpy on random matrices). Compounded over the ~11 products a
# token goes through here, the logits' RMS error should be a few percent of their spread
# for q8 and roughly 10-25% for q4; the bounds allow about twice the measured values.
# A routing flip (two experts nearly tied) changes a token's output by O(1), so the
# largest single error is reported, and bounded only where the routing agrees.
QUANT_BOUNDS = {  # rms error / logit std, top-1 agreement, max error where routing agrees
    "q8": (0.06, 0.90, 0.5),
    "q4": (0.40, 0.55, 3.0),
}


@test
def quantized_quality(tmp):
    """q8 and q4 logits against f32 over 256 positions: errors and top-1 agreement."""
    d, cfg, ids, shape = random_model(tmp, 21, 256, 4, dim=256, hidden_dim=512, layers=2, heads=8, kv_heads=2, experts=8, top_k=2)
    base, base_e = engine_logits(export(d, os.path.join(tmp, "f32.bin"), "f32"), ids, **shape)
    spread = float(base.std())
    notes = []
    for wtype, (max_rms, min_top1, max_err_same) in QUANT_BOUNDS.items():
        got, got_e = engine_logits(export(d, os.path.join(tmp, f"{wtype}.bin"), wtype), ids, **shape)
        err = np.abs(got - base)
        rms = float(np.sqrt(np.mean(err ** 2))) / spread
        top1 = float(np.mean(got.argmax(-1) == base.argmax(-1)))
        same = (got_e == base_e).all(axis=(1, 2))
        err_same = float(err[same].max()) if same.any() else 0.0
        notes.append(f"{wtype}: max err {err.max():.3f} ({err_same:.3f} where routing agrees, {100 * same.mean():.0f}% "
                     f"of positions), rms {rms:.3f} of std, top-1 {100 * top1:.1f}%")
        check(rms <= max_rms and top1 >= min_top1 and err_same <= max_err_same,
              f"{wtype} out of bounds (rms/std <= {max_rms}, top-1 >= {min_top1}, max err where routing agrees "
              f"<= {max_err_same}): {notes[-1]}")
    return f"256 positions, logit std {spread:.2f}; " + "; ".join(notes)


@test
def q6_embedding_layout(tmp):
    """A q4 file's embedding is q6: decoded here from the layout kernels.h documents (written
    anew, not export.py's code), every weight is within half a step of the checkpoint's and the
    steps are those of a 6-bit grid; then the engine's logits equal, to the q8 lm_head's rounding,
    those computed from the decoded rows (a misplaced bit moves a weight by 16 steps or more)."""
    d, cfg, ids, shape = random_model(tmp, 21, 6, 5, dim=64, hidden_dim=64, heads=4, kv_heads=2, experts=4, top_k=2,
                                      layers=1)
    model = export(d, os.path.join(tmp, "q4.bin"), "q4")
    emb = reference.load_safetensors(d)["model.embed_tokens.weight"].astype(np.float64)
    V, D = emb.shape
    G, nb = (V + 15) // 16, D // 32
    raw = np.fromfile(model, np.uint8, offset=tensor_offset(model, "model.embed_tokens.weight"), count=G * 13 * D)
    got = np.zeros((G * 16, D))
    for g in range(G):
        grp = raw[g * 13 * D:(g + 1) * 13 * D]
        scale = grp[:32 * nb].view("<f2").astype(np.float64).reshape(nb, 16)
        for b in range(nb):
            blk = grp[32 * nb + 384 * b: 32 * nb + 384 * (b + 1)]
            for l in range(16):
                for j in range(32):
                    lo = blk[j // 8 * 64 + l * 4 + j % 4]
                    lo = lo & 15 if j % 8 < 4 else lo >> 4
                    hi = blk[256 + j // 16 * 64 + l * 4 + j % 4] >> (2 * (j % 16 // 4)) & 3
                    got[g * 16 + l, 32 * b + j] = (int(lo | hi << 4) - 32) * scale[b, l]
    # each block's weights within one step of the checkpoint's (the rounding, and the clipping of
    # the end opposite the largest one), on a grid of about a 32nd of the block's largest
    scales = np.zeros((G * 16, nb))
    for g in range(G):
        scales[g * 16:(g + 1) * 16] = raw[g * 13 * D:g * 13 * D + 32 * nb].view("<f2").astype(np.float64).reshape(nb, 16).T
    step = np.abs(scales[:V])
    big = np.abs(emb).reshape(V, nb, 32).max(-1)
    err = np.abs(got[:V] - emb).reshape(V, nb, 32).max(-1)
    check((err <= 1.001 * step + 1e-12).all(), f"q6 embedding: a weight off by {float((err / step).max()):.2f} steps")
    check((step <= big / 24).all() and (step >= big / 33).all(), "q6 embedding: steps not on a 6-bit grid: "
          f"{float((big / step).min()):.1f} to {float((big / step).max()):.1f} steps to the largest weight")
    check(not got[V:].any(), "q6 embedding: the padding rows are not zero")
    logits, _ = engine_logits(model, ids[:1], **shape)
    # the embedding row alone (the layer's output added to it is the same in both): the engine run
    # on a copy whose embedding is f32 must agree to the q8/q4 rounding of the rest
    ref, _ = engine_logits(export(d, os.path.join(tmp, "q8.bin"), "q8"), ids[:1], **shape)
    rel = float(np.abs(logits - ref).max() / np.abs(ref).max())
    check(rel < 0.2, f"q6 embedding: logits differ from the q8 file's by {rel:.2f} of their range")
    return f"{V}x{D} embedding: max error {float((err / step).max()):.3f} steps; logits within {rel:.3f} of q8's"


@test
def simd_matches_portable(tmp):
    """The SIMD kernels (release build) agree with the portable C ones (debug build) in every format.
    Float formats agree to rounding (1e-4). In q8/q4 the int8 activations are rounded from slightly
    different sums, and one flipped rounding step moves a product by 1/127 of an element's share:
    a few of those give differences of order 1e-3, so quantized formats get 0.05."""
    d, cfg, ids, shape = random_model(tmp, 8, 16, 2, dim=128, hidden_dim=192, layers=2, heads=4, kv_heads=2, experts=4, top_k=2)
    worst = {}
    for wtype, tol in (("f32", TOL), ("bf16", TOL), ("q8", 0.05), ("q4", 0.05)):
        model = export(d, os.path.join(tmp, f"{wtype}.bin"), wtype)
        a, ea = engine_logits(model, ids, engine=ENGINE, **shape)
        b, eb = engine_logits(model, ids, engine=DEBUG_ENGINE, **shape)
        compare_experts(ea, eb, f"{wtype} SIMD vs portable")
        err = float(np.abs(a - b).max())
        check(err <= tol, f"{wtype} SIMD vs portable: max abs difference {err:.3g} > {tol}")
        worst[wtype] = err
    return ", ".join(f"{k} {v:.1g}" for k, v in worst.items())


SOURCES = [os.path.join(ROOT, f) for f in ("mixtral.c", "kernels.c", "pool.c", "chat.c", "tokenizer.c")]
BUILD_FLAGS = ["-Wall", "-Wextra", "-Werror", "-std=c11", "-D_GNU_SOURCE"]
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512VNNI = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vnni"]


def x86_builds():
    """The x86-64 kernel builds to test, each (name, compiler flags, kernels source, cpu flags it needs):
    AVX2 and AVX-512 VNNI. The AVX-512 build runs for real where the CPU has it and otherwise
    with those instructions emulated (tests/avx512_emulation.h)."""
    kernels, emulated = os.path.join(ROOT, "kernels.c"), os.path.join(HERE, "avx512_emulated.c")
    builds = [("avx2", AVX2, kernels, {"avx2", "fma", "f16c"})]
    if {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags():
        builds.append(("avx512-vnni", AVX512VNNI, kernels, {"avx512_vnni"}))
    else:
        builds.append(("avx512-vnni (emulated)", AVX2 + ["-I" + HERE], emulated, {"avx2", "fma", "f16c"}))
    return builds


@test
def kernels_match_reference(tmp):
    """Every SIMD kernel against its portable reference, directly (tests/kernels_test.c: random data with
    odd sizes, bit for bit where the arithmetic is exact, within float rounding elsewhere), for every
    kernel build this machine can run: this build's flags, the portable C build, and on x86-64 AVX2
    and AVX-512 VNNI (emulated where the CPU lacks it). NEON: make test-cross."""
    test_src = os.path.join(HERE, "kernels_test.c")
    builds = [("native (-march=native)", ["-march=native"], os.path.join(ROOT, "kernels.c"), set()),
              ("portable", [], os.path.join(ROOT, "kernels.c"), set())]
    notes = []
    if platform.machine() in ("x86_64", "AMD64"):
        have = cpu_flags()
        x86 = x86_builds()
        if not any("emulated" in b[0] for b in x86):  # the emulation too, so it is kept complete everywhere
            x86.append(("avx512-vnni (emulated)", AVX2 + ["-I" + HERE], os.path.join(HERE, "avx512_emulated.c"),
                        {"avx2", "fma", "f16c"}))
        for name, flags, src, needs in x86:
            if not needs <= have:
                notes.append(f"{name} not run (the CPU lacks {' '.join(sorted(needs - have))})")
                continue
            builds.append((name, flags, src, needs))
    else:
        notes.append("x86-64 builds not run on " + platform.machine())
    ran = []
    for name, flags, src, _ in builds:
        exe = os.path.join(tmp, "kernels_test")
        r = run([CC, "-O2", *flags, *BUILD_FLAGS, "-o", exe, test_src, src, "-lm"])
        check(r.returncode == 0, f"kernels_test build {name} failed:\n{r.stderr}")
        r = run([exe, str(stable_seed(name))])
        check(r.returncode == 0, f"{name}: kernels differ from the reference:\n{r.stderr}{r.stdout}")
        path = name.split()[0]
        check(path in ("native", "portable") or f"({path})" in r.stdout,
              f"the {name} build compiled another path: {r.stdout.strip()}")
        ran.append(f"{name}: {r.stdout.split(': ', 1)[1].split(',')[0]}")
    return "; ".join(ran + notes)


@test
def avx512_identical_to_avx2(tmp):
    """Whole-model logits of the AVX-512 VNNI build equal the AVX2 build's bit for bit (the same
    integer sums, the same float operations lane by lane), q8 and q4, prompts and decoding.
    Real AVX-512 where the CPU has it, else emulated (tests/avx512_emulation.h); the real
    build also always compiles."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise Skip("the AVX-512 code is for x86-64 and this machine is " + platform.machine())
    if not {"avx2", "fma", "f16c"} <= cpu_flags():
        raise Skip("this CPU has no AVX2, which the x86 kernel builds need")
    for flags in (AVX512VNNI, ["-march=sapphirerapids"], ["-march=znver3"]):
        r = run([CC, "-O2", *flags, *BUILD_FLAGS, "-c", "-o", os.path.join(tmp, "k.o"), os.path.join(ROOT, "kernels.c")])
        check(r.returncode == 0, f"build with {' '.join(flags)} failed:\n{r.stderr}")
    d, cfg, ids, shape = random_model(tmp, 41, 12, 7, dim=192, hidden_dim=256, layers=2, heads=4, kv_heads=2, experts=4, top_k=2)
    models = {w: export(d, os.path.join(tmp, f"{w}.bin"), w) for w in ("q8", "q4")}
    exes = {}
    for name, flags, src, _ in x86_builds():
        exe = os.path.join(tmp, "mixtral-" + name.split()[0])
        others = [f for f in SOURCES if not f.endswith("kernels.c")]
        r = run([CC, "-O2", *flags, *BUILD_FLAGS, "-o", exe, src, *others, "-lm", "-lpthread"])
        check(r.returncode == 0, f"{name} build failed:\n{r.stderr}")
        exes[name] = exe
    base = exes.pop("avx2")
    for name, exe in exes.items():
        for wtype, model in models.items():
            for chunk in (None, 1):  # tiles of several tokens, and one token at a time (dot products)
                a, ea = engine_logits(model, ids, engine=base, chunk=chunk, **shape)
                b, eb = engine_logits(model, ids, engine=exe, chunk=chunk, **shape)
                what = f"{name} {wtype} chunk {chunk or 'default'}"
                compare_experts(eb, ea, what)
                if not np.array_equal(a, b):
                    p, v = np.argwhere(a != b)[0]
                    raise Failure(f"{what}: logits differ from the AVX2 build, first at position {p} token {v}: "
                                  f"{b[p, v]!r} vs {a[p, v]!r} (max {float(np.abs(a - b).max()):.3g})")
    return ", ".join(exes) + ": identical to AVX2, q8 and q4, prompts and decoding"


@test
def kernels_keep_their_prefetches(tmp):
    """The quantized kernels prefetch their weight stream (kernels.c); a compiler once dropped
    every one of those prefetches without a word (decoding ran 15% slower). Each x86 kernel build
    (AVX2, AVX-512 VNNI) must hold prefetch instructions in gemm_quant's code."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise Skip("the software prefetches are x86 code and this machine is " + platform.machine())
    objdump = shutil.which("objdump")
    if not objdump:
        raise Skip("objdump is missing (binutils)")
    counts = []
    for name, flags in (("avx2", AVX2), ("avx512-vnni", AVX512VNNI)):
        obj = os.path.join(tmp, name + ".o")
        r = run([CC, "-O3", *flags, *BUILD_FLAGS, "-c", os.path.join(ROOT, "kernels.c"), "-o", obj])
        check(r.returncode == 0, f"{name}: build failed:\n{r.stderr}")
        asm = run([objdump, "-d", "--no-show-raw-insn", obj]).stdout
        body = asm[asm.find("<x86_gemm_quant>:"):]
        body = body[:body.find("\n\n")]
        n = len(re.findall(r"\bprefetcht[01]\b", body))
        check(n >= 8, f"{name}: x86_gemm_quant holds {n} prefetch instructions (its q8 and q4 loops prefetch)")
        counts.append(f"{name} {n}")
    return "prefetches in x86_gemm_quant: " + ", ".join(counts)


@cross_test
def neon_kernels_under_qemu(tmp):
    """The NEON kernels, cross-compiled for aarch64 (plain, and with dot-product instructions)
    and run under qemu: directly against the portable references (tests/kernels_test.c), and whole
    models against this machine's build: 1e-4 for float formats, and for q8/q4 the 0.05 of
    simd_matches_portable; identical experts."""
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not cc or not qemu:
        raise Skip("aarch64-linux-gnu-gcc or qemu-aarch64 is missing (make test-cross installs them with apt)")
    d, cfg, ids, shape = random_model(tmp, 31, 10, 6, dim=128, hidden_dim=192, layers=2, heads=4, kv_heads=2, experts=4, top_k=2)
    worst = 0.0
    for arch in ("armv8-a", "armv8.2-a+dotprod"):
        exe = os.path.join(tmp, "mixtral-" + arch.replace("+", "-"))
        r = run([cc, "-O2", "-march=" + arch, "-Wall", "-Wextra", "-Werror", "-std=c11", "-D_GNU_SOURCE", "-static",
                 "-o", exe, *SOURCES, "-lm", "-lpthread"])
        check(r.returncode == 0, f"cross build for {arch} failed:\n{r.stderr}")
        # the kernels directly against their references (tests/kernels_test.c)
        kt = exe + "-kernels_test"
        r = run([cc, "-O2", "-march=" + arch, *BUILD_FLAGS, "-static", "-o", kt, os.path.join(HERE, "kernels_test.c"),
                 os.path.join(ROOT, "kernels.c"), "-lm"])
        check(r.returncode == 0, f"kernels_test cross build for {arch} failed:\n{r.stderr}")
        r = run([qemu, kt, str(stable_seed(arch))])
        check(r.returncode == 0, f"{arch}: NEON kernels differ from the reference:\n{r.stderr}{r.stdout}")
        wrapper = exe + ".sh"
        with open(wrapper, "w") as f:
            f.write(f"#!/bin/sh\nexec {qemu} {exe} \"$@\"\n")
        os.chmod(wrapper, 0o755)
        for wtype, tol in (("f32", TOL), ("bf16", TOL), ("q8", 0.05), ("q4", 0.05)):
            model = os.path.join(tmp, f"{wtype}.bin")
            if not os.path.exists(model):
                export(d, model, wtype)
            a, ea = engine_logits(model, ids, **shape)
            b, eb = engine_logits(model, ids, engine=wrapper, **shape)
            compare_experts(eb, ea, f"{arch} {wtype}")
            err = float(np.abs(a - b).max())
            check(err <= tol, f"{arch} {wtype}: NEON differs from this machine's build by {err:.3g} > {tol}")
            worst = max(worst, err)
    return f"armv8-a and armv8.2-a+dotprod: kernels match the references; all formats; largest difference {worst:.2g}"


@test
def gguf_import(tmp):
    """export.py reads a llama.cpp GGUF of a Mixtral (tests/gguf_writer.py lays one out as llama.cpp's
    converter does: permuted q/k rows, stacked or per-expert tensors, dimensions innermost first):
    F32 and BF16 GGUFs export to files whose logits equal the Hugging Face folder's exports bit for bit,
    and a Q8_0 GGUF exports to q8 with its blocks unchanged: byte for byte the weights that a folder
    holding the Q8_0 values dequantized exports to."""
    import gguf_writer
    d, cfg, ids, shape = random_model(tmp, 17, 12, 3, dim=64, hidden_dim=128, heads=4, kv_heads=2, experts=4, top_k=2)
    notes = []
    for gtype, stacked, wtype in (("F32", True, "f32"), ("BF16", False, "bf16")):
        g = gguf_writer.write_gguf(d, os.path.join(tmp, f"m-{gtype}.gguf"), gtype, stacked)
        a, ea = engine_logits(export(d, os.path.join(tmp, f"hf-{wtype}.bin"), wtype), ids, **shape)
        b, eb = engine_logits(export(g, os.path.join(tmp, f"gg-{wtype}.bin"), wtype), ids, **shape)
        compare_experts(eb, ea, f"GGUF {gtype}")
        check(np.array_equal(a, b), f"GGUF {gtype} -> {wtype}: logits differ from the folder's by up to "
                                    f"{float(np.abs(a - b).max()):.3g}")
        notes.append(f"{gtype} ({'stacked' if stacked else 'per-expert'}) -> {wtype} identical")
    # Q8_0: the folder that holds exactly the dequantized Q8_0 values
    g = gguf_writer.write_gguf(d, os.path.join(tmp, "m-Q8_0.gguf"), "Q8_0")
    W = reference.load_safetensors(d)
    deq = {}
    for name, x in W.items():
        x = np.asarray(x, np.float32)
        if x.ndim == 2 and "gate.weight" not in name:
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            perm = "q_proj" in name or "k_proj" in name
            y = gguf_writer.permute(x, heads) if perm else x
            blocks = np.frombuffer(gguf_writer.q8_0(y), np.uint8).reshape(-1, 34)
            dq = (blocks[:, 2:].view(np.int8).astype(np.float32) * blocks[:, :2].copy().view("<f2").astype(np.float32))
            y = dq.reshape(x.shape)
            if perm:  # back to Hugging Face order
                hd = x.shape[0] // heads
                y = y.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(x.shape)
            x = y
        deq[name] = ("F32", list(x.shape), x.astype("<f4").tobytes())
    d2 = os.path.join(tmp, "deq")
    os.makedirs(d2)
    write_safetensors(os.path.join(d2, "model.safetensors"), deq)
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(d, f), d2)
    a = open(export(d2, os.path.join(tmp, "deq-q8.bin"), "q8"), "rb").read()
    b = open(export(g, os.path.join(tmp, "gg-q8.bin"), "q8"), "rb").read()
    wa, wb = struct.unpack_from("<Q", a, 104)[0], struct.unpack_from("<Q", b, 104)[0]  # weights_offset
    if a[wa:] != b[wb:]:
        diff = next(i for i in range(min(len(a) - wa, len(b) - wb)) if a[wa + i] != b[wb + i])
        raise Failure(f"Q8_0 GGUF -> q8: weights differ from the dequantized folder's, first at weight byte {diff}")
    notes.append("Q8_0 -> q8 weights byte-identical")
    return "; ".join(notes)


# ----------------------------------------------------------------------------
# the tokenizer against the sentencepiece library

import compare_tokenizer  # noqa: E402

_tok_models = {}


def tokenizer_model(tokenizer):
    """A tiny model file carrying the given tokenizer (the weights do not matter here)."""
    if tokenizer not in _tok_models:
        base = tempfile.mkdtemp(prefix="mixtral_tok_")
        vocab = 32768 if "v3" in tokenizer else 32000
        d = os.path.join(base, "hf")
        hf.write_checkpoint(d, hf.make_config(dim=8, hidden_dim=8, layers=1, heads=2, kv_heads=1, experts=2,
                                              top_k=1, vocab=vocab), seed=1, tokenizer=tokenizer)
        _tok_models[tokenizer] = (base, export(d, os.path.join(base, "model.bin"), "f32"))
    return _tok_models[tokenizer][1]


def make_tokenizer_test(tokenizer, seed):
    def t(tmp):
        total, fails = compare_tokenizer.compare(tokenizer_model(tokenizer),
                                                 os.path.join(ROOT, "tokenizers", tokenizer), seed=seed, n=3000)
        if fails:
            raise Failure(f"{len(fails)}/{total} differ from sentencepiece; first ones:\n  " + "\n  ".join(fails[:8]))
        return f"{total}/{total} encodes, decodes and round trips agree with sentencepiece"
    t.__name__ = "tokenizer_" + tokenizer.replace(".model", "").replace("-", "_")
    return t


test(make_tokenizer_test("mistral-v1.model", 1))
test(make_tokenizer_test("mistral-v3.model", 2))


@test
def tokenizer_hooks_and_big_prompt(tmp):
    """--tokenize-file and --detokenize, and a 1 MB prompt of mixed text, against sentencepiece."""
    import random
    import sentencepiece
    model = tokenizer_model("mistral-v1.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(ROOT, "tokenizers", "mistral-v1.model"))
    rng = random.Random(5)
    parts = compare_tokenizer.corpus(3, 4000, ["hello", "world", "expert", "router"])
    blob = b""
    while len(blob) < 1 << 20:
        blob += rng.choice(parts) + rng.choice([b" ", b"\n", b""])
    path = os.path.join(tmp, "big.txt")
    open(path, "wb").write(blob)
    r = run([ENGINE, model, "--tokenize-file", path])
    check(r.returncode == 0, r.stderr)
    got = [int(x) for x in r.stdout.split()]
    want = sp.encode(blob)
    if got != want:
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise Failure(f"1 MB prompt: first difference at id {i}: {got[i:i + 5]} vs {want[i:i + 5]}")
    ids = [1, 22557, 28725, 28705, 3 + 0xE2, 3 + 0x82, 3 + 0xAC, 2, 1318]
    r = run([ENGINE, model, "--detokenize", " ".join(map(str, ids))])
    check(r.returncode == 0, r.stderr)
    check(r.stdout == sp.decode(ids) + "\n", f"--detokenize: {r.stdout!r} vs {sp.decode(ids)!r}")
    expect_error([ENGINE, model, "--detokenize", "1 40000"], "40000")
    return f"{len(blob)} bytes -> {len(got)} ids, identical; --detokenize matches"


CONVERSATIONS = [
    [("user", "Hello!")],
    [("system", "You are terse."), ("user", "What is a mixture of experts?")],
    [("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")],
    [("system", "Rule one."), ("system", "Rule two."), ("user", "Go.")],
    [("user", "Ça va? 日本語 😀👍🏽"), ("assistant", "Très bien, merci."), ("user", "Et toi?")],
    [("user", "Type [INST] and <s> and [/INST] literally </s>")],
    [("user", "")],
    [("user", "line one\nline two\n\tindented"), ("assistant", "ok\n")],
    [("user", f"turn {i}") if i % 2 == 0 else ("assistant", f"reply {i}") for i in range(9)],
    [("user", "a"), ("system", "late system message"), ("assistant", "b"), ("user", "c")],
    [("system", "S"), ("user", "q"), ("assistant", "a")],
    [("user", "  leading and trailing spaces  "), ("assistant", " x "), ("user", "\u2581 literal")],
]


def mistral_common_ids(sp, conv, v3):
    """mistral-common's instruct format, written from its rule independently of mixtral.c; a final
    assistant message is left open (continue_final_message)."""
    system = "\n\n".join(c for r, c in conv if r == "system")
    ids, first = [1], True
    last = max(i for i, (r, _) in enumerate(conv) if r != "system")
    for i, (role, content) in enumerate(conv):
        if role == "user":
            if first and system:
                content = system + "\n\n" + content
            first = False
            ids += [3] + sp.encode(content) + [4] if v3 else sp.encode(f"[INST] {content} [/INST]")
        elif role == "assistant":
            ids += sp.encode(content) + ([2] if i != last else [])
    return ids


@test
def chat_format(tmp):
    """--chat-ids-file equals mistral-common's format for a dozen conversations, v1 and v3."""
    import sentencepiece
    n = 0
    for tok, v3 in (("mistral-v1.model", False), ("mistral-v3.model", True)):
        sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(ROOT, "tokenizers", tok))
        model = tokenizer_model(tok)
        for i, conv in enumerate(CONVERSATIONS):
            path = os.path.join(tmp, f"conv{i}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"messages": [{"role": r, "content": c} for r, c in conv]}, f, ensure_ascii=i % 2 == 0)
            r = run([ENGINE, model, "--chat-ids-file", path])
            check(r.returncode == 0, f"{tok} conversation {i}: {r.stderr}")
            got = [int(x) for x in r.stdout.split()]
            want = mistral_common_ids(sp, conv, v3)
            check(got == want, f"{tok} conversation {i} {conv!r}:\n  mixtral.c {got}\n  expected  {want}")
            n += 1
    return f"{n} conversations identical"


@test
def chat_session(tmp):
    """Interactive chat: each turn feeds only its new tokens; /reset starts over; a full context is reported."""
    import sentencepiece
    model = small_model(tmp)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(_small["hf"], "tokenizer.model"))
    r = run([ENGINE, model, "-m", "chat", "-n", "5", "-t", "0", "-y", "Be brief."],
            input="first question\nsecond one\n/reset\nthird\n")
    check(r.returncode == 0, r.stderr)
    counts = [int(l.split()[0][1:]) for l in r.stderr.splitlines() if l.startswith("[") and "new tokens in" in l]
    want = [1 + len(sp.encode("[INST] Be brief.\n\nfirst question [/INST]")),
            1 + len(sp.encode("[INST] second one [/INST]")),   # EOS closing the reply, then the turn
            1 + len(sp.encode("[INST] Be brief.\n\nthird [/INST]"))]
    check(counts == want, f"tokens fed per turn {counts}, expected {want}\n{r.stderr}")
    check(r.stdout.count("Assistant: ") == 3 and "[new conversation]" in r.stdout, r.stdout)
    r = run([ENGINE, model, "-m", "chat", "-n", "50", "-c", "24"], input="hello there\nand again and again\n")
    check(r.returncode == 0 and "context of 24 tokens is full" in r.stderr, f"full context: {r.stderr}")
    bad = os.path.join(tmp, "bad.json")
    for text, where in (('{"messages": [{"role": "user", "content": "x"},]}', "trailing comma"),
                        ('{"messages": [{"role": "user", "content": "x"}', "expected ','"),
                        ('{"messages": [{"role": "user"}]}', "content"),
                        ('{"messages": [{"role": "robot", "content": "x"}]}', "robot"),
                        ('{"messages": [{"role": "assistant", "content": "x"}]}', "alternates"),
                        ('{"messages": "no"}', "expected '['"), ('[]', "expected '{'"),
                        ('{"messages": []} x', "trailing"),
                        # strict JSON: numbers in ignored fields, NUL in a role, control characters echoed escaped
                        ('{"n": 01, "messages": []}', "expected ','"), ('{"n": 1.e5, "messages": []}', "malformed number"),
                        ('{"n": -, "messages": []}', "expected a value"), ('{"n": tru, "messages": []}', "expected a value"),
                        ('{"messages": [{"role": "user\\u0000", "content": "x"}]}', "user\\x00"),
                        ('{"messages": [{"role": "\\u001b[31mred", "content": "x"}]}', "\\x1b[31mred"),
                        ('{"messages": [], "messages": []}', "second")):
        open(bad, "w").write(text)
        expect_error([ENGINE, model, "--chat-ids-file", bad], where)
        expect_error([ENGINE, model, "-m", "chat", "--chat-file", bad], where)
    return "per-turn token counts match; /reset; full context; 15 malformed files"


# ----------------------------------------------------------------------------
# bad input: a clear error and exit status 1, never a crash

def expect_error(cmd, *needles):
    for exe in (cmd[0], DEBUG_ENGINE) if cmd[0] == ENGINE else (cmd[0],):
        r = run([exe] + cmd[1:])
        check(r.returncode == 1, f"{' '.join(cmd)}: exit status {r.returncode}, expected 1\n{r.stderr}")
        err = r.stderr.strip()
        check(err and "error" in err, f"{' '.join(cmd)}: no error message on stderr")
        check("Sanitizer" not in err and "runtime error" not in err, f"{exe}: sanitizer report:\n{err}")
        for n in needles:
            check(n.lower() in err.lower(), f"{' '.join(cmd)}: stderr does not mention {n!r}:\n{err}")
    return err


_small = {}


def small_model(tmp):
    """A small valid model file, shared by the bad-input tests."""
    if "path" not in _small:
        base = tempfile.mkdtemp(prefix="mixtral_small_")
        d = os.path.join(base, "hf")
        hf.write_checkpoint(d, hf.make_config(), seed=11)
        _small["hf"] = d
        _small["path"] = export(d, os.path.join(base, "model.bin"), "bf16")
        _small["base"] = base
    return _small["path"]


def patched(tmp, name, offset, fmt, value):
    src = small_model(tmp)
    dst = os.path.join(tmp, name)
    shutil.copy(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))
    return dst


# header offsets (export.py HEADER_FORMAT): version 8, weight_type 16, dim 24, n_heads 36,
# n_kv_heads 40, head_dim 44, n_experts 48, top_k 52, vocab 56, tokenizer n_pieces 256
@test
def bad_model_files(tmp):
    m = small_model(tmp)
    size = os.path.getsize(m)
    cut = os.path.join(tmp, "cut.bin")
    with open(m, "rb") as f, open(cut, "wb") as g:
        g.write(f.read(size - 100))
    expect_error([ENGINE, cut, "-n", "1"], "re-run export.py")
    tiny = os.path.join(tmp, "tiny.bin")
    with open(tiny, "wb") as g:
        g.write(b"MIXTRALC\x01")
    expect_error([ENGINE, tiny], "too small")
    empty = os.path.join(tmp, "empty.bin")
    open(empty, "wb").close()
    expect_error([ENGINE, empty])
    expect_error([ENGINE, os.path.join(tmp, "does-not-exist.bin")], "cannot open")
    expect_error([ENGINE, tmp], "is a folder")
    foreign = os.path.join(tmp, "foreign.bin")
    with open(foreign, "wb") as g:
        g.write(b"PK\x03\x04" + bytes(range(256)) * 40)
    expect_error([ENGINE, foreign], "not a mixtral.c model file")
    sys.path.insert(0, ROOT)
    import export as exporter
    v = exporter.VERSION
    expect_error([ENGINE, patched(tmp, "future.bin", 8, "<I", v + 1)], f"version {v + 1}", "update mixtral.c")
    expect_error([ENGINE, patched(tmp, "old.bin", 8, "<I", v - 1)], f"version {v - 1}", "re-run export.py")
    expect_error([ENGINE, patched(tmp, "wtype.bin", 16, "<I", 99)], "weight type")
    expect_error([ENGINE, patched(tmp, "dim0.bin", 24, "<i", 0)], "dim")
    expect_error([ENGINE, patched(tmp, "dimneg.bin", 24, "<i", -64)], "dim")
    expect_error([ENGINE, patched(tmp, "dimhuge.bin", 24, "<i", 1 << 30)], "dim")
    expect_error([ENGINE, patched(tmp, "heads.bin", 36, "<i", 3)], "n_heads")
    expect_error([ENGINE, patched(tmp, "kvheads.bin", 40, "<i", 0)], "n_kv_heads")
    expect_error([ENGINE, patched(tmp, "headdim.bin", 44, "<i", 15)], "head_dim")
    expect_error([ENGINE, patched(tmp, "topk.bin", 52, "<i", 9)], "top_k")
    expect_error([ENGINE, patched(tmp, "experts.bin", 48, "<i", 5)], "header")
    expect_error([ENGINE, patched(tmp, "vocab.bin", 56, "<i", 32001)], "re-run export.py")
    expect_error([ENGINE, patched(tmp, "pieces.bin", 256, "<I", 31999)], "tokenizer")
    expect_error([ENGINE, patched(tmp, "pieces2.bin", 256 + 16 + 6, "<H", 60000)], "tokenizer")
    return "truncated, tiny, empty, missing, directory, foreign, versions, corrupt dims and tokenizer"


@test
def bad_tokens_and_context(tmp):
    m = small_model(tmp)
    expect_error([ENGINE, m, "--ids", "1,32000", "--dump-logits", os.path.join(tmp, "x")], "32000")
    expect_error([ENGINE, m, "--ids", "1,-5", "--dump-logits", os.path.join(tmp, "x")], "-5")
    expect_error([ENGINE, m, "--ids", "1,abc", "--dump-logits", os.path.join(tmp, "x")], "--ids")
    expect_error([ENGINE, m, "--ids", "1,2,3,4,5,6", "-c", "4", "--dump-logits", os.path.join(tmp, "x")], "context")
    expect_error([ENGINE, m, "-i", "a prompt that is longer than the context", "-c", "4"], "context")
    expect_error([ENGINE, m, "-n", "many"], "-n")
    expect_error([ENGINE, m, "--threads", "0"], "--threads")
    expect_error([ENGINE, m, "-t", "-1"], "-t")
    expect_error([ENGINE, m, "-p", "2"], "-p")
    expect_error([ENGINE, m, "--no-such-flag", "1"], "unknown option")
    # a full context during generation stops with a note, not an error
    r = run([ENGINE, m, "-i", "hi", "-n", "50", "-c", "8"])
    check(r.returncode == 0 and "context" in r.stderr, f"context-limited generation: {r.returncode}\n{r.stderr}")
    # an output file never replaces an input: the model survives --dump-logits MODEL
    before = open(m, "rb").read()
    for flag in ("--dump-logits", "--dump-experts"):
        cmd = [ENGINE, m, "--ids", "1,2", "--dump-logits", os.path.join(tmp, "x"), flag, m]
        expect_error(cmd, "input file")
    text = os.path.join(tmp, "t.txt")
    open(text, "w").write("one two three four five six seven eight nine ten " * 4)
    expect_error([ENGINE, m, "--perplexity", text, "-c", "8", "--kl-base", text], "input file")
    check(open(m, "rb").read() == before, "the model file changed")
    check(not os.path.exists(os.path.join(tmp, "x.partial")), "a partial output was left behind")
    return "out-of-range and malformed ids, long prompts, bad flags, outputs onto inputs refused"


@test
def help_and_version(tmp):
    """-h and --help print the usage to stdout and exit 0, anywhere on the line; --version names the
    program version, the file format this build reads and its kernels; a missing model is still an error."""
    for cmd in ([ENGINE, "-h"], [ENGINE, "--help"], [ENGINE, "model.bin", "-i", "x", "--help"]):
        r = run(cmd)
        check(r.returncode == 0 and r.stdout.startswith("usage: mixtral") and "--perplexity" in r.stdout,
              f"{' '.join(cmd[1:])}: exit {r.returncode}, stdout {r.stdout[:80]!r}")
    r = run([ENGINE, "--version"])
    check(r.returncode == 0 and re.match(r"mixtral\.c \S+, model file format \d+, kernels \S", r.stdout),
          f"--version: exit {r.returncode}, {r.stdout!r}")
    expect_error([ENGINE], "model file")
    return r.stdout.strip()


@test
def perplexity_and_kl(tmp):
    """--perplexity against the numpy reference: the same windows (the first token BOS, the second halves
    scored), exp(mean NLL) within 1e-3 relative; --kl-divergence of a file against its own --kl-base is
    0 with top-1 agreement 1; a q8 file's KL and top-1 equal those computed from the reference's and the
    engine's logits."""
    import sentencepiece
    d, cfg, _, shape = random_model(tmp, 21, 1, 0, dim=64, hidden_dim=128, heads=4, kv_heads=2, experts=4, top_k=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    text = os.path.join(tmp, "text.txt")
    open(text, "w").write(open(os.path.join(ROOT, "demo", "heldout.txt")).read()[:1500])
    W = 32
    ids = [1] + sp.encode(open(text).read())
    windows = len(ids) // W
    W_ = reference.load_safetensors(d)
    ref_lp, nll = [], []
    for w in range(windows):
        win = ids[w * W:(w + 1) * W]
        win[0] = 1
        logits, _ = reference.forward(W_, cfg, win)
        for j in range(W // 2, W - 1):
            z = logits[j] - logits[j].max()
            lp = z - np.log(np.exp(z).sum())
            ref_lp.append(lp)
            nll.append(-lp[ids[w * W + j + 1]])
    want = float(np.exp(np.mean(nll)))
    f32 = export(d, os.path.join(tmp, "f32.bin"), "f32")
    base = os.path.join(tmp, "base.kl")
    r = run([ENGINE, f32, "--perplexity", text, "-c", str(W), "--kl-base", base])
    check(r.returncode == 0, r.stderr)
    got = float(r.stdout.split()[1])
    check(abs(got - want) <= 1e-3 * want, f"perplexity {got}, reference {want}")
    r = run([ENGINE, f32, "--perplexity", text, "-c", str(W), "--kl-divergence", base])
    res = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    check(res["kl_mean"] < 1e-9 and res["top1"] == 1.0, f"a file against its own base: {res}")
    q8 = export(d, os.path.join(tmp, "q8.bin"), "q8")
    r = run([ENGINE, q8, "--perplexity", text, "-c", str(W), "--kl-divergence", base])
    res = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    q_lp = []
    for w in range(windows):
        win = ids[w * W:(w + 1) * W]
        win[0] = 1
        logits, _ = engine_logits(q8, win, **shape)
        for j in range(W // 2, W - 1):
            z = logits[j].astype(np.float64) - logits[j].max()
            q_lp.append(z - np.log(np.exp(z).sum()))
    ref_lp, q_lp = np.array(ref_lp), np.array(q_lp)
    kl = (np.exp(ref_lp) * (ref_lp - q_lp)).sum(-1).mean()
    top = (ref_lp.argmax(-1) == q_lp.argmax(-1)).mean()
    check(abs(res["kl_mean"] - kl) <= 1e-6 + 1e-3 * kl and abs(res["top1"] - top) < 1e-5,
          f"q8: engine KL {res['kl_mean']}, top-1 {res['top1']}; from the logits {kl}, {top}")
    return f"perplexity {got:.2f} (reference {want:.2f}); q8 KL {kl:.2g}, top-1 {top:.3f}, {len(nll)} positions"


def write_safetensors(path, tensors):
    """tensors: {name: (dtype string, shape, raw bytes)}"""
    header, off = {}, 0
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    hb = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + b"".join(raw for _, _, raw in tensors.values()))


def read_safetensors_raw(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in h.items() if k != "__metadata__"}


@test
def export_errors(tmp):
    small_model(tmp)
    src = _small["hf"]
    cases = []

    def variant(name, edit):
        d = os.path.join(tmp, name)
        shutil.copytree(src, d)
        edit(d)
        cases.append((name, d))

    def edit_config(key, value):
        def f(d):
            c = json.load(open(os.path.join(d, "config.json")))
            c[key] = value
            json.dump(c, open(os.path.join(d, "config.json"), "w"))
        return f

    def edit_tensors(fn):
        def f(d):
            p = os.path.join(d, "model.safetensors")
            t = read_safetensors_raw(p)
            fn(t)
            write_safetensors(p, t)
        return f

    def truncate(d):
        p = os.path.join(d, "model.safetensors")
        os.truncate(p, os.path.getsize(p) - 1000)

    def bad_header(d):
        p = os.path.join(d, "model.safetensors")
        with open(p, "r+b") as f:
            f.seek(8)
            f.write(b"{nonsense")

    def huge_header(d):
        p = os.path.join(d, "model.safetensors")
        with open(p, "r+b") as f:
            f.write(struct.pack("<Q", 1 << 40))

    def retype(t):
        dt, shape, raw = t["model.norm.weight"]
        t["model.norm.weight"] = ("I16", shape, raw)

    variant("no_config", lambda d: os.remove(os.path.join(d, "config.json")))
    variant("bad_config_json", lambda d: open(os.path.join(d, "config.json"), "w").write("{\"model_type\": "))
    variant("llama", edit_config("model_type", "llama"))
    variant("heads_zero", edit_config("num_attention_heads", 0))
    variant("topk_too_big", edit_config("num_experts_per_tok", 9))
    variant("shape_mismatch", edit_config("intermediate_size", 100))
    variant("no_tokenizer", lambda d: os.remove(os.path.join(d, "tokenizer.model")))
    variant("bad_tokenizer", lambda d: open(os.path.join(d, "tokenizer.model"), "wb").write(b"\xff" * 100))
    variant("no_weights", lambda d: os.remove(os.path.join(d, "model.safetensors")))
    variant("missing_tensor", edit_tensors(lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight")))
    variant("unexpected_tensor", edit_tensors(lambda t: t.update({"model.layers.0.extra.weight": ("F32", [2], b"\0" * 8)})))
    variant("unsupported_dtype", edit_tensors(retype))
    variant("truncated_safetensors", truncate)
    variant("malformed_header", bad_header)
    variant("huge_header_length", huge_header)
    # what a fuzzer found (issue 14): tracebacks, hangs, and files the engine would refuse
    variant("nested_json", lambda d: open(os.path.join(d, "config.json"), "w").write("[" * 100000 + "]" * 100000))
    variant("huge_float", lambda d: open(os.path.join(d, "config.json"), "w").write(
        open(os.path.join(src, "config.json")).read().replace('"rope_theta": 1000000.0', '"rope_theta": 1e999')))
    variant("eps_underflows", edit_config("rms_norm_eps", 1e-50))
    variant("theta_denormal", edit_config("rope_theta", 1e-300))
    variant("head_dim_too_big", edit_config("head_dim", 16386))
    variant("million_layers", edit_config("num_hidden_layers", 1000000))
    variant("huge_vocab", edit_config("vocab_size", 200000000))
    variant("dtype_list", edit_tensors(lambda t: t.update({"model.norm.weight": (["F32"], *t["model.norm.weight"][1:])})))
    variant("huge_shape", edit_tensors(lambda t: t.update({"model.norm.weight": ("F32", [2**62, 2**62], b"")})))
    variant("nan_weights", edit_tensors(lambda t: t.update({"model.norm.weight": (
        "F32", t["model.norm.weight"][1], np.full(t["model.norm.weight"][1], np.nan, "<f4").tobytes())})))
    variant("inf_bf16", edit_tensors(lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": (
        "BF16", t["model.layers.0.self_attn.q_proj.weight"][1],
        b"\x80\x7f" + t["model.layers.0.self_attn.q_proj.weight"][2][2:])})))
    tok_model = open(os.path.join(src, "tokenizer.model"), "rb").read()

    def tokenizer_edit(old, new):
        def f(d):
            check(old in tok_model, f"tokenizer.model lacks {old!r}")
            open(os.path.join(d, "tokenizer.model"), "wb").write(tok_model.replace(old, new, 1))
        return f
    variant("malformed_byte_piece", tokenizer_edit(b"<0x41>", b"<0xZ1>"))
    # unk_id (TrainerSpec field 40) of 2^40: a varint the file format cannot hold
    variant("unk_id_huge", lambda d: open(os.path.join(d, "tokenizer.model"), "wb").write(
        tok_model + b"\x12\x08" + b"\xc0\x02" + b"\x80\x80\x80\x80\x80\x20"))
    variant("long_error", edit_config("model_type", "x" * 300000))
    expected = {"no_config": "config.json", "bad_config_json": "config.json", "llama": "model_type",
                "heads_zero": "num_attention_heads", "topk_too_big": "num_experts_per_tok",
                "shape_mismatch": "w1.weight", "no_tokenizer": "tokenizer.model", "bad_tokenizer": "tokenizer.model",
                "no_weights": "model.safetensors", "missing_tensor": "experts.2.w3.weight",
                "unexpected_tensor": "model.layers.0.extra.weight", "unsupported_dtype": "I16",
                "truncated_safetensors": "truncated", "malformed_header": "model.safetensors",
                "huge_header_length": "model.safetensors", "nested_json": "config.json", "huge_float": "rope_theta",
                "eps_underflows": "rms_norm_eps", "theta_denormal": "rope_theta", "head_dim_too_big": "head_dim",
                "million_layers": "num_hidden_layers", "huge_vocab": "vocab_size", "dtype_list": "dtype",
                "huge_shape": "model.norm.weight", "nan_weights": "NaN", "inf_bf16": "q_proj",
                "malformed_byte_piece": "byte piece", "unk_id_huge": "unk_id", "long_error": "model_type"}
    for name, d in cases:
        out = os.path.join(tmp, name + ".bin")
        r = run([PYTHON, os.path.join(ROOT, "export.py"), d, out], timeout=60)
        lines = [l for l in r.stderr.strip().splitlines() if l]
        check(r.returncode == 1, f"export {name}: exit {r.returncode}, expected 1\n{r.stderr[-2000:]}")
        check(len(lines) == 1 and lines[0].startswith("export.py: error:") and len(lines[0]) < 600,
              f"export {name}: expected one bounded error line, got:\n{r.stderr[:2000]}")
        check(expected[name] in lines[0], f"export {name}: message does not name {expected[name]!r}: {lines[0]}")
        check(not os.path.exists(out) and not os.path.exists(out + ".partial"), f"export {name}: left a file behind")
    # SIGTERM and SIGINT during an export: the partial file removed, one line, no traceback
    import signal
    import time
    big = os.path.join(tmp, "big")
    hf.write_checkpoint(big, hf.make_config(dim=512, hidden_dim=1024, layers=4, experts=8), seed=2)
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = os.path.join(tmp, "big.bin")
        p = subprocess.Popen([PYTHON, os.path.join(ROOT, "export.py"), big, out, "--type", "q4"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(300):  # until the partial file exists
            if os.path.exists(out + ".partial"):
                break
            time.sleep(0.02)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        check(p.returncode != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1,
              f"export.py after {sig.name}: exit {p.returncode}, stderr:\n{err[-2000:]}")
        check(not os.path.exists(out + ".partial") and not os.path.exists(out), f"{sig.name} left a file behind")
    return f"{len(cases)} malformed checkpoints rejected with one-line errors; SIGTERM and SIGINT clean up"


# ----------------------------------------------------------------------------
# the command line: prompts, sampling, stop strings, Ctrl-C, summaries, chat

def greedy_reference(d, cfg, prompt, n, penalty=1.0, last_n=64):
    """Greedy continuation by the numpy reference, with llama.cpp's repetition penalty (a recent
    token's logit divided by the penalty if positive, multiplied if not), written from that rule."""
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    W = reference.load_safetensors(d)
    ids = [1] + sp.encode(prompt)
    for _ in range(n):
        logits, _ = reference.forward(W, cfg, ids)
        x = logits[-1].astype(np.float32)
        for t in set(ids[-last_n:]):
            x[t] = x[t] / penalty if x[t] > 0 else x[t] * penalty
        nxt = int(np.argmax(x))
        if nxt == 2:
            break
        ids.append(nxt)
    return sp.decode(ids), ids


@test
def sampling_options(tmp):
    """--top-k 1 and --min-p 1 are greedy at any temperature; --repeat-penalty equals the reference's
    greedy decoding with the penalty; a seed from the clock is printed and repeats the run; --stop ends
    the text where the stop string begins, printing none of it."""
    model = small_model(tmp)
    base = [ENGINE, model, "-i", "Hello world", "-n", "16"]
    greedy = run(base + ["-t", "0"])
    check(greedy.returncode == 0, greedy.stderr)
    for extra in (["--top-k", "1"], ["--min-p", "1"], ["--top-k", "1", "--top-p", "0.5", "--min-p", "0.2"]):
        r = run(base + ["-t", "1.5", "-s", "3"] + extra)
        check(r.returncode == 0 and r.stdout == greedy.stdout,
              f"{' '.join(extra)} at -t 1.5 is not greedy:\n  {r.stdout!r}\n  greedy {greedy.stdout!r}")
    r = run(base + ["-t", "1.5", "-s", "3", "--top-k", "40", "--min-p", "0.01"])
    check(r.returncode == 0 and r.stdout != greedy.stdout, "--top-k 40 sampled the greedy text; is it sampling?")
    # the repetition penalty against the reference, on the trained demo model, whose greedy text
    # repeats itself (a random model's never does, so a penalty would change nothing there)
    demo = os.path.join(ROOT, "demo", "model")
    demo_cfg = json.load(open(os.path.join(demo, "config.json")))
    demo_bin = export(demo, os.path.join(tmp, "demo.bin"), "bf16")
    prompt = "And it came to pass"
    plain, plain_ids = greedy_reference(demo, demo_cfg, prompt, 16)
    changed = 0
    for penalty, last_n in ((1.5, 16), (1.2, 64), (0.8, 8)):
        want, ids = greedy_reference(demo, demo_cfg, prompt, 16, penalty=penalty, last_n=last_n)
        changed += ids != plain_ids
        r = run([ENGINE, demo_bin, "-i", prompt, "-n", "16", "-t", "0", "--repeat-penalty", str(penalty),
                 "--repeat-last-n", str(last_n)])
        check(r.returncode == 0 and r.stdout == want + "\n",
              f"--repeat-penalty {penalty} --repeat-last-n {last_n}:\n  engine    {r.stdout!r}\n  reference {want!r}")
    check(changed == 3, "a penalty left the greedy text as it was: the test would not see a broken penalty")
    # the clock's seed is printed, and repeats the run
    r = run(base + ["-t", "1"])
    m = re.search(r"seed (\d+)", r.stderr)
    check(r.returncode == 0 and m, f"no seed on stderr: {r.stderr!r}")
    again = run(base + ["-t", "1", "-s", m.group(1)])
    check(again.stdout == r.stdout and "seed" not in again.stderr,
          f"-s {m.group(1)} does not repeat the run:\n  {r.stdout!r}\n  {again.stdout!r}")
    # stop strings: cut where the first one begins, in the generated text only
    prompt_text = "Hello world"
    gen = greedy.stdout[len(prompt_text):-1]
    check(len(gen) > 12, f"too little text to test --stop: {gen!r}")
    stop = gen[6:10]
    want = prompt_text + gen[:gen.index(stop)] + "\n"
    r = run(base + ["-t", "0", "--stop", "no such text here", "--stop", stop])
    check(r.returncode == 0 and r.stdout == want, f"--stop {stop!r}: printed {r.stdout!r}, expected {want!r}")
    r = run(base + ["-t", "0", "--stop", prompt_text])
    check(r.stdout == greedy.stdout, f"a stop string in the prompt only must not stop: {r.stdout!r}")
    expect_error([ENGINE, model, "--stop", ""], "--stop")
    expect_error([ENGINE, model, "--top-k", "-1"], "--top-k")
    expect_error([ENGINE, model, "--min-p", "1.5"], "--min-p")
    return f"greedy filters, penalties equal the reference ({changed} of 3 change the text), seed printed and repeated, stop at {stop!r}"


@test
def prompt_files_and_summary(tmp):
    """-f FILE and -f - give the same text as -i (one final newline dropped); a prompt longer than
    the context names both lengths; stderr has the load line and one summary line with peak RSS;
    --quiet leaves stdout alone; -c past the model's positions warns with both numbers; the default
    thread count follows the CPU affinity mask."""
    model = small_model(tmp)
    text = "The quick brown fox\njumps over"
    path = os.path.join(tmp, "prompt.txt")
    open(path, "w").write(text + "\n")
    ref = run([ENGINE, model, "-i", text, "-n", "8", "-t", "0"])
    check(ref.returncode == 0, ref.stderr)
    r = run([ENGINE, model, "-f", path, "-n", "8", "-t", "0"])
    check(r.stdout == ref.stdout, f"-f {path}: {r.stdout!r}, -i: {ref.stdout!r}")
    r = run([ENGINE, model, "-f", "-", "-n", "8", "-t", "0"], input=text + "\n")
    check(r.stdout == ref.stdout, f"-f -: {r.stdout!r}, -i: {ref.stdout!r}")
    lines = ref.stderr.strip().splitlines()
    check(lines[0].startswith("mixtral: loaded") and "resident" in lines[0], f"no load line: {ref.stderr!r}")
    check(re.fullmatch(r"prompt: \d+ tokens, [\d.]+ tok/s; generated: 8 tokens, [\d.]+ tok/s; peak RSS \d+ MB", lines[-1]),
          f"summary line: {lines[-1]!r}")
    q = run([ENGINE, model, "-i", text, "-n", "8", "-t", "0", "--quiet"])
    check(q.returncode == 0 and q.stdout == ref.stdout and q.stderr == "", f"--quiet: stderr {q.stderr!r}")
    long_prompt = os.path.join(tmp, "long.txt")
    open(long_prompt, "w").write("word " * 300)
    err = expect_error([ENGINE, model, "-f", long_prompt, "-c", "64"], "context holds 64")
    check(re.search(r"prompt is 30\d tokens", err), f"the prompt's length is not named: {err}")
    expect_error([ENGINE, model, "-f", path, "-i", "x"], "-f")
    expect_error([ENGINE, model, "-f", os.path.join(tmp, "missing.txt")], "missing.txt")
    r = run([ENGINE, model, "-i", "x", "-n", "1", "-c", "5000"])
    check(r.returncode == 0 and "5000" in r.stderr and "4096" in r.stderr and "warning" in r.stderr,
          f"-c 5000 past 4096 positions: {r.stderr!r}")
    # prompt progress, on a terminal only: stderr on a pseudo-terminal, a prompt of many chunks
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([ENGINE, model, "-f", long_prompt, "-n", "1", "--chunk", "16", "-c", "512"],
                         stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    p.wait(timeout=60)
    os.close(master)
    check(re.search(rb"\[prompt: \d+/30\d tokens, [\d.]+ tok/s\]", seen), f"no prompt progress on a terminal: {seen[-500:]!r}")
    check(b"[prompt:" not in run([ENGINE, model, "-f", long_prompt, "-n", "1", "--chunk", "16", "-c", "512"]).stderr.encode(),
          "prompt progress printed when stderr is not a terminal")
    if shutil.which("taskset"):
        r = run(["taskset", "-c", "0", ENGINE, model, "-i", "x", "-n", "1"])
        check(r.returncode == 0 and "; 1 threads," in r.stderr, f"taskset -c 0: {r.stderr!r}")
    return "files, stdin, summary, --quiet, long prompt, progress on a terminal only, -c warning, affinity"


@test
def other_formats_given_as_model(tmp):
    """A GGUF file, a safetensors file, a folder or a FIFO given as MODEL: an error that says what it
    is and how to make a model file (export.py), never a hang."""
    small_model(tmp)
    gguf = os.path.join(tmp, "m.gguf")
    with open(gguf, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + bytes(300))
    expect_error([ENGINE, gguf], "GGUF", "export.py")
    st = next(os.path.join(_small["hf"], f) for f in os.listdir(_small["hf"]) if f.endswith(".safetensors"))
    expect_error([ENGINE, st], "safetensors", "export.py")
    expect_error([ENGINE, _small["hf"]], "folder", "export.py")
    fifo = os.path.join(tmp, "fifo")
    os.mkfifo(fifo)
    expect_error([ENGINE, fifo], "not a regular file")
    return "GGUF, safetensors, folder, FIFO"


@test
def contradictory_options(tmp):
    """Options that would be silently ignored are errors."""
    model = small_model(tmp)
    conv = os.path.join(tmp, "c.json")
    json.dump({"messages": [{"role": "user", "content": "hi"}]}, open(conv, "w"))
    sysonly = os.path.join(tmp, "s.json")
    json.dump({"messages": [{"role": "system", "content": "be brief"}]}, open(sysonly, "w"))
    expect_error([ENGINE, model, "-m", "chat", "--chat-file", conv, "-y", "x"], "-y")
    expect_error([ENGINE, model, "-m", "chat", "--chat-file", sysonly], "nothing to reply to")
    expect_error([ENGINE, model, "-m", "chat", "--ids", "1,2", "--dump-logits", os.path.join(tmp, "l")], "--ids")
    expect_error([ENGINE, model, "-m", "chat", "-i", "hello"], "-i")
    expect_error([ENGINE, model, "-y", "system"], "-m chat")
    expect_error([ENGINE, model, "--chat-file", conv], "-m chat")
    expect_error([ENGINE, model, "-m", "generate", "--bench"], "--bench")
    return "7 contradictions refused"


def slow_model(tmp):
    """A model slow enough (4 layers of 512, one thread: a few hundred tokens/s) that a reply of
    thousands of tokens is still running when the test interrupts it."""
    d = os.path.join(tmp, "slow")
    hf.write_checkpoint(d, hf.make_config(dim=512, hidden_dim=512, layers=4, heads=8, kv_heads=2, experts=8),
                        seed=3)
    return d, export(d, os.path.join(tmp, "slow.bin"), "bf16")


class Session:
    """A running mixtral with its output collected as it comes."""

    def __init__(self, cmd):
        import threading
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        for f, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=self._pump, args=(f, buf), daemon=True).start()

    @staticmethod
    def _pump(f, buf):
        while True:
            b = f.read1(4096)
            if not b:
                break
            buf.extend(b)

    def wait_for(self, text, count=1, timeout=60):
        import time
        t0 = time.time()
        while self.out.count(text) < count:
            check(time.time() - t0 < timeout and self.p.poll() is None,
                  f"waiting for {count} x {text!r}; exit {self.p.poll()}\nstdout {bytes(self.out)[-300:]!r}\n"
                  f"stderr {bytes(self.err).decode(errors='replace')}")
            time.sleep(0.01)

    def send(self, line):
        self.p.stdin.write(line.encode() + b"\n")
        self.p.stdin.flush()

    def interrupt_after(self, text, count):
        """Once `count` x text has appeared and a little more, Ctrl-C."""
        import signal
        import time
        self.wait_for(text, count)
        time.sleep(0.3)
        self.p.send_signal(signal.SIGINT)

    def finish(self, timeout=30):
        rc = self.p.wait(timeout)
        import time
        time.sleep(0.1)
        return rc, bytes(self.out).decode(errors="replace"), bytes(self.err).decode(errors="replace")


@test
def ctrl_c(tmp):
    """A real SIGINT: in chat it stops the reply and returns to the prompt, and the conversation goes
    on (the next turn feeds the EOS closing the stopped reply, then its own tokens); at the prompt it
    exits 0. In generate mode it stops generation and still prints the summary line."""
    import sentencepiece
    d, model = slow_model(tmp)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    s = Session([ENGINE, model, "-m", "chat", "-n", "100000", "-c", "4096", "--threads", "1"])
    s.wait_for(b"User: ")
    s.send("hello there")
    s.interrupt_after(b"Assistant: ", 1)
    s.wait_for(b"User: ", 2)
    s.send("second")
    s.interrupt_after(b"Assistant: ", 2)
    s.wait_for(b"User: ", 3)
    s.interrupt_after(b"User: ", 3)
    rc, out, err = s.finish()
    check(rc == 0, f"Ctrl-C at the prompt: exit {rc}\n{err}")
    check(err.count("[reply stopped]") == 2, f"two replies stopped?\n{err}")
    fed = [int(l.split()[0][1:]) for l in err.splitlines() if "new tokens in" in l]
    want = [1 + len(sp.encode("[INST] hello there [/INST]")), 1 + len(sp.encode("[INST] second [/INST]"))]
    check(fed == want, f"tokens fed per turn {fed}, expected {want}")
    check(re.search(r"peak RSS \d+ MB", err.splitlines()[-1]), f"no summary at the end: {err!r}")
    s = Session([ENGINE, model, "-n", "100000", "-c", "4096", "--threads", "1", "-i", "Once"])
    s.interrupt_after(b"Once", 1)
    rc, out, err = s.finish()
    check(rc == 130 and "interrupted" in err and re.search(r"generated: \d+ tokens", err),
          f"Ctrl-C in generate: exit {rc}, stderr {err!r}")
    return "chat: two replies stopped, conversation continued, exit 0 at the prompt; generate: 130 with summary"


@test
def chat_details(tmp):
    """Blank lines are not turns; a conversation file ending with the assistant's message continues
    it (no EOS; its text printed, then more); --expert-stats after every chat reply, counting that
    turn's tokens."""
    import sentencepiece
    model = small_model(tmp)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(_small["hf"], "tokenizer.model"))
    r = run([ENGINE, model, "-m", "chat", "-n", "4", "-t", "0"], input="\n   \nhello\n\t\n")
    check(r.returncode == 0 and r.stderr.count("new tokens in") == 1 and r.stdout.count("Assistant: ") == 1,
          f"blank lines sent as turns:\n{r.stdout}\n{r.stderr}")
    conv = os.path.join(tmp, "c.json")
    json.dump({"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "Once upon"}]},
              open(conv, "w"))
    ids = [int(x) for x in run([ENGINE, model, "--chat-ids-file", conv]).stdout.split()]
    want = [1] + sp.encode("[INST] Say it [/INST]") + sp.encode("Once upon")
    check(ids == want, f"final assistant message: {ids}, expected {want} (no EOS)")
    # the continuation is the greedy continuation of those ids, printed after the message's text
    W, cfg = reference.load_safetensors(_small["hf"]), hf.make_config()
    cont = list(ids)
    for _ in range(3):
        logits, _ = reference.forward(W, cfg, cont)
        cont.append(int(np.argmax(logits[-1])))
    r = run([ENGINE, model, "-m", "chat", "--chat-file", conv, "-n", "3", "-t", "0"], input="")
    text = sp.decode(cont[len(ids) - len(sp.encode("Once upon")):])
    check(r.returncode == 0 and r.stdout.startswith("Assistant: " + text + "\n"),
          f"continued message: {r.stdout!r}, expected 'Assistant: {text}'")
    r = run([ENGINE, model, "-m", "chat", "-n", "5", "-t", "0", "--expert-stats"], input="one\ntwo three\n")
    check(r.returncode == 0, r.stderr)
    fed = [int(l.split()[0][1:]) for l in r.stderr.splitlines() if "new tokens in" in l]
    outs = [int(l.split()[0][1:]) for l in r.stderr.splitlines() if " out, " in l]
    routed = [int(l.split()[3]) for l in r.stdout.splitlines() if l.startswith("expert usage over")]
    # every fed token is routed: the turn's, and the reply's but for an EOS that ended it
    want = [f + o for f, o in zip(fed, outs)]
    check(all(r_ in (w, w - 1) for r_, w in zip(routed, want)) and len(routed) == len(want) == 2, f"expert stats per reply over {routed} tokens, expected {want} (fed {fed}, out {outs})")
    return "blank lines skipped, final message continued, stats per reply"


@test
def command_line_under_sanitizers(tmp):
    """The options of this section once more under AddressSanitizer and UBSan (make debug)."""
    model = small_model(tmp)
    conv = os.path.join(tmp, "c.json")
    json.dump({"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "Once"}]},
              open(conv, "w"))
    runs = [(["-i", "Hello", "-n", "20", "-t", "0.9", "-s", "1", "--top-k", "5", "--min-p", "0.05", "--top-p", "0.8",
              "--repeat-penalty", "1.3", "--stop", "e", "--stop", "the", "--expert-stats", "--trace-experts"], None),
            (["-f", "-", "-n", "5", "-t", "0", "--quiet"], "from standard input\n"),
            (["-m", "chat", "--chat-file", conv, "-n", "4", "--expert-stats", "--stop", "a"], "\n  \nnext\n/reset\nx\n")]
    for args, stdin in runs:
        r = run([DEBUG_ENGINE, model] + args, input=stdin)
        check(r.returncode == 0 and "runtime error" not in r.stderr and "Sanitizer" not in r.stderr,
              f"mixtral-debug {' '.join(args)}: exit {r.returncode}\n{r.stderr}")
    return f"{len(runs)} runs clean"


@test
def native_kernels_under_sanitizers(tmp):
    """The fastest kernels this machine has (-march=native: the ones make builds, with their
    per-thread buffers), under AddressSanitizer, LeakSanitizer and UBSan: chunked prompts and
    decoding on 3 threads in q8 and q4, with the same logits as the release build."""
    exe = os.path.join(tmp, "mixtral-native-asan")
    r = run([CC, "-O1", "-g", "-march=native", "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
             *BUILD_FLAGS, "-o", exe, *SOURCES, "-lm", "-lpthread"])
    check(r.returncode == 0, f"native sanitizer build failed:\n{r.stderr}")
    d, cfg, ids, shape = random_model(tmp, 41, 21, 7, dim=128, hidden_dim=256, layers=2, heads=4, kv_heads=2,
                                      experts=4, top_k=2)
    for wtype in ("q8", "q4"):
        model = export(d, os.path.join(tmp, f"{wtype}.bin"), wtype)
        want, _ = engine_logits(model, ids, **shape)
        got, _ = engine_logits(model, ids, engine=exe, threads=3, **shape)
        check(np.array_equal(got, want), f"{wtype}: the sanitizer build's logits differ from the release build's")
        r = run([exe, model, "-i", "Hello there, how are you", "-n", "6", "-t", "0", "--threads", "3"])
        sanitized_ok(r, f"{wtype}: native sanitizer build")
    return "q8, q4: clean, logits identical to the release build"


@test
def builds_with_clang(tmp):
    """The Makefile's `make CC=clang` (its -Werror included) builds the engine with this machine's
    kernels, and the build gives the gcc build's logits to rounding (clang fuses a * b + c in
    plain C where gcc -std=c11 does not: 1e-6 apart, within the 1e-4 of the float formats)."""
    clang = shutil.which("clang")
    if not clang:
        raise Skip("clang is not installed")
    exe = os.path.join(tmp, "mixtral-clang")
    r = run([clang, "-O3", "-march=native", *BUILD_FLAGS, "-o", exe, *SOURCES, "-lm", "-lpthread"])
    check(r.returncode == 0, f"clang build failed:\n{r.stderr}")
    d, cfg, ids, shape = random_model(tmp, 43, 12, 8, dim=64, hidden_dim=128, layers=1, heads=4, kv_heads=2,
                                      experts=4, top_k=2)
    worst = 0.0
    for wtype in ("q8", "q4"):
        model = export(d, os.path.join(tmp, f"{wtype}.bin"), wtype)
        want, _ = engine_logits(model, ids, **shape)
        got, _ = engine_logits(model, ids, engine=exe, **shape)
        err = float(np.abs(got - want).max())
        check(err <= TOL, f"{wtype}: the clang build's logits differ from gcc's by up to {err:.3g}")
        worst = max(worst, err)
    return f"clang build: logits within {worst:.1g} of gcc's in q8 and q4"


@test
def readme_sample_is_make_run(tmp):
    """The sample under the README's first commands is what `make run` prints (its command taken
    from the Makefile, the demo model exported afresh), and its usage block is what -h prints."""
    recipe = next(l.strip() for l in open(os.path.join(ROOT, "Makefile")) if l.startswith("\t./mixtral $(DEMO_BIN)"))
    model = export(os.path.join(ROOT, "demo", "model"), os.path.join(tmp, "demo.bin"), "bf16")
    import shlex
    args = shlex.split(recipe)[2:]
    r = run([ENGINE, model] + args)
    check(r.returncode == 0, r.stderr)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"`make run` prints[^\n]*\n\n```\n(.*?)```", readme, re.S)
    check(m, "no sample of `make run` in the README")
    check(m.group(1).rstrip("\n") == r.stdout.rstrip("\n"),
          f"README sample differs from `make run`:\n--- README\n{m.group(1)}--- make run\n{r.stdout}")
    usage = re.search(r"## Using it\n\n```\n(.*?)```", readme, re.S)
    h = run([ENGINE, "-h"]).stdout
    check(usage and usage.group(1) == h, "the README's usage block is not what mixtral -h prints")
    return f"{len(r.stdout)} characters identical; the usage block is mixtral -h"


# ----------------------------------------------------------------------------
# hardening (issue 14): what fuzzing found, each kept fixed by a test

def tensor_offset(model, name):
    """Byte offset of a tensor in a model file, from export.py's own layout (tensor_plan, MATRIX_TYPES)."""
    sys.path.insert(0, ROOT)
    import export as ex
    head = open(model, "rb").read(ex.HEADER_SIZE)
    f = struct.unpack_from(ex.HEADER_FORMAT, head)
    names = ("magic version header_size weight_type block_size dim hidden_dim n_layers n_heads n_kv_heads "
             "head_dim n_experts top_k vocab_size max_seq_len sliding_window bos_id eos_id row_group rope_theta "
             "rms_norm_eps tokenizer_offset tokenizer_size weights_offset file_size").split()
    h = dict(zip(names, f))
    kinds = dict(zip(ex.MATRIX_KINDS, f[len(names):]))
    c = {k: h[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "n_experts",
                           "top_k", "vocab_size")}
    c["tie_word_embeddings"] = False
    off = h["weights_offset"]
    for tname, shape, kind in ex.tensor_plan(c):
        off = ex.align(off, ex.TENSOR_ALIGN)
        if tname == name:
            return off
        off += ex.tensor_bytes(shape, ex.F32 if kind is None else kinds[kind])
    raise Failure(f"no tensor {name}")


def sanitized_ok(r, what):
    check(r.returncode == 0 and "runtime error" not in r.stderr and "Sanitizer" not in r.stderr,
          f"{what}: exit {r.returncode}\n{r.stderr[-3000:]}")


@test
def hardened_engine(tmp):
    """Sampling from NaN logits (-t 1.2e-38) and from a vocabulary of one token; NaN router weights in
    --trace-experts/--expert-stats; rope_theta and rms_norm_eps outside sane ranges; 16 threads on this
    machine: under the sanitizers, each a clean run or a clear error."""
    m = small_model(tmp)
    for engine in (ENGINE, DEBUG_ENGINE):
        r = run([engine, m, "-i", "hi", "-n", "4", "-t", "1.2e-38", "-s", "1"])
        sanitized_ok(r, f"{os.path.basename(engine)} -t 1.2e-38")
    # NaN router weights (export.py refuses them, so the file is patched)
    nan = os.path.join(tmp, "nan_router.bin")
    shutil.copy(m, nan)
    with open(nan, "r+b") as f:
        f.seek(tensor_offset(nan, "model.layers.0.block_sparse_moe.gate.weight"))
        f.write(np.full(64, np.nan, "<f4").tobytes())
    r = run([DEBUG_ENGINE, nan, "-i", "hi", "-n", "3", "--trace-experts", "--expert-stats", "-t", "0.8", "-s", "1"])
    sanitized_ok(r, "NaN router weights")
    # a vocabulary of one piece: BOS = EOS = 0
    d = os.path.join(tmp, "one")
    cfg = hf.make_config(vocab=1)
    cfg["bos_token_id"] = cfg["eos_token_id"] = 0
    hf.write_checkpoint(d, cfg, seed=4)
    sys.path.insert(0, os.path.join(HERE, "fuzz"))
    import make_seeds
    open(os.path.join(d, "tokenizer.model"), "wb").write(make_seeds.sentencepiece_model([("<unk>", 0.0, 2)]))
    one = export(d, os.path.join(tmp, "one.bin"), "bf16")
    for args in (["-t", "1", "-p", "0.5"], ["-t", "0.5", "--top-k", "2", "--min-p", "0.5"], ["-t", "0"]):
        r = run([DEBUG_ENGINE, one, "-i", "x", "-n", "3", "-s", "2"] + args)
        sanitized_ok(r, f"vocabulary of 1, {' '.join(args)}")
    # rope_theta and rms_norm_eps: finite, normal, in range, or the loader names the field
    sys.path.insert(0, ROOT)
    import export as ex
    fmt = ex.HEADER_FORMAT
    theta_at = struct.calcsize(fmt[:fmt.index("f")])  # the first float field
    for value, field, at in ((1e-300, "rope_theta", 0), (1e-40, "rope_theta", 0), (float("inf"), "rope_theta", 0),
                             (float("nan"), "rope_theta", 0), (1e13, "rope_theta", 0), (0.0, "rms_norm_eps", 4),
                             (1e-45, "rms_norm_eps", 4), (2.0, "rms_norm_eps", 4)):
        expect_error([ENGINE, patched(tmp, f"{field}_{value}.bin", theta_at + at, "<f", value)], field)
    # oversubscribed: 16 threads on this machine, same numbers as 1
    ids = [1, 415, 2936, 9060, 285, 1142, 13]
    a, _ = engine_logits(m, ids, threads=1, vocab=32000, layers=2, top_k=2)
    b, _ = engine_logits(m, ids, threads=16, vocab=32000, layers=2, top_k=2)
    check(np.array_equal(a, b), "--threads 16 gives other logits than --threads 1")
    return "NaN logits, NaN router, 1-token vocabulary, 8 bad theta/eps headers, 16 threads"


@test
def chat_file_memory_is_linear(tmp):
    """A conversation file of 32k messages (1.5 MB) reads within a 256 MB address-space limit: memory
    grows with the file, not with its square (each string once took the rest of the file: 18 GB)."""
    import resource
    model = tokenizer_model("mistral-v1.model")
    path = os.path.join(tmp, "long.json")
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i}"} for i in range(32000)]
    json.dump({"messages": msgs}, open(path, "w"))
    limit = 256 << 20

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    r = subprocess.run([ENGINE, model, "--chat-ids-file", path], capture_output=True, text=True, preexec_fn=cap,
                       timeout=120)
    check(r.returncode == 0 and len(r.stdout.split()) > 32000, f"exit {r.returncode}: {r.stderr[-500:]}")
    return f"{os.path.getsize(path) / 1e6:.1f} MB, 32000 messages, under a 256 MB limit"


@test
def long_user_defined_piece(tmp):
    """A vocabulary with a user-defined piece of 5000 bytes: text is split at it as sentencepiece
    splits it (compared with the library), in time linear in the text (it was cubic in the piece)."""
    import sentencepiece
    import time
    piece = "ab" * 2500
    src = open(os.path.join(ROOT, "tokenizers", "mistral-v1.model"), "rb").read()
    sys.path.insert(0, os.path.join(HERE, "fuzz"))
    import make_seeds
    extra = make_seeds.field(1, 2, make_seeds.field(1, 2, piece.encode()) + make_seeds.field(2, 5, struct.pack("<f", 0.0))
                             + make_seeds.field(3, 0, 4))
    d = os.path.join(tmp, "hf")
    hf.write_checkpoint(d, hf.make_config(dim=8, hidden_dim=8, layers=1, heads=2, kv_heads=1, experts=2, top_k=1,
                                          vocab=32001), seed=1)
    tok = os.path.join(d, "tokenizer.model")
    open(tok, "wb").write(src + extra)
    model = export(d, os.path.join(tmp, "m.bin"), "f32")
    sp = sentencepiece.SentencePieceProcessor(model_file=tok)
    text = ("x " + piece + "abab y " + piece[:4999] + " ") * 3
    path = os.path.join(tmp, "t.txt")
    open(path, "w").write(text)
    r = run([ENGINE, model, "--tokenize-file", path])
    got, want = [int(x) for x in r.stdout.split()], sp.encode(text)
    check(got == want, f"ids differ from sentencepiece's: first at {next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))}")
    big = os.path.join(tmp, "big.txt")
    open(big, "w").write(piece[:4999] * 40)  # 200 KB that nearly matches at every position
    t0 = time.time()
    r = run([ENGINE, model, "--tokenize-file", big], timeout=120)
    check(r.returncode == 0, r.stderr)
    return f"same ids as sentencepiece; 200 KB of near-matches in {time.time() - t0:.1f} s"


@test
def fuzz_corpus_replay(tmp):
    """Every committed fuzz input (tests/fuzz/corpus) through its target, built with ASan and UBSan
    without libFuzzer (tests/fuzz/replay.c): what `make fuzz` once passed keeps passing."""
    model = tokenizer_model("mistral-v1.model")
    total = 0
    for target in ("model", "tokenizer", "chat", "options"):
        exe = os.path.join(tmp, f"replay_{target}")
        r = run([CC, "-O1", "-g", "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all",
                 "-std=c11", "-D_GNU_SOURCE", "-Wno-unused-function", "-I" + ROOT, "-o", exe,
                 os.path.join(HERE, "fuzz", f"fuzz_{target}.c"), os.path.join(HERE, "fuzz", "replay.c"),
                 *[os.path.join(ROOT, f) for f in ("kernels.c", "pool.c", "chat.c", "tokenizer.c")], "-lm", "-lpthread"])
        check(r.returncode == 0, f"building the {target} replay:\n{r.stderr[-3000:]}")
        corpus = os.path.join(HERE, "fuzz", "corpus", target)
        r = run([exe, corpus], env=dict(os.environ, MIXTRAL_FUZZ_MODEL=model, ASAN_OPTIONS="detect_leaks=0"))
        check(r.returncode == 0 and "runtime error" not in r.stderr, f"replaying {corpus}:\n{r.stderr[-3000:]}")
        total += int(r.stdout.split()[1])
    return f"{total} inputs replayed clean"


@test
def thread_pool_under_tsan(tmp):
    """The engine built with ThreadSanitizer: prompts in chunks and decoding on 3 threads, and chat,
    report no data race."""
    exe = os.path.join(tmp, "mixtral-tsan")
    r = run([CC, "-O1", "-g", "-fsanitize=thread", "-std=c11", "-D_GNU_SOURCE", "-o", exe,
             *[os.path.join(ROOT, f) for f in ("mixtral.c", "kernels.c", "pool.c", "chat.c", "tokenizer.c")],
             "-lm", "-lpthread"])
    if r.returncode != 0:
        raise Skip(f"{CC} cannot build with -fsanitize=thread: {r.stderr.strip().splitlines()[-1:]}")
    m = small_model(tmp)
    probe = run([exe, "--version"])
    prefix = []
    if probe.returncode != 0 and shutil.which("setarch"):  # TSan and a randomised address space
        prefix = ["setarch", platform.machine(), "-R"]
        probe = run(prefix + [exe, "--version"])
    if probe.returncode != 0:
        raise Skip(f"ThreadSanitizer does not run here: {probe.stderr.strip()[:200]}")
    size = os.path.getsize(m)
    for args, stdin in ((["-i", "Hello world, once more", "-n", "12", "--threads", "3", "--chunk", "3"], None),
                        (["-i", "Hello world", "-n", "12", "--threads", "2", "--chunk", "2", "-c", "64",
                          "--mem", str(size - 150000 + (6 << 20))], None),
                        (["-m", "chat", "-n", "6", "--threads", "2", "-t", "0"], "hi\nagain\n")):
        r = run(prefix + [exe, m] + args, input=stdin, env=dict(os.environ, TSAN_OPTIONS="halt_on_error=1"))
        check(r.returncode == 0 and "ThreadSanitizer" not in r.stderr, f"TSan, {' '.join(args)}:\n{r.stderr[-3000:]}")
    return "no data race: chunked prompt and decoding on 3 threads, the expert cache's I/O threads, chat on 2"


@test
def export_mutations(tmp):
    """300 mutated checkpoints through export.py (tests/export_mutations.py; make fuzz runs 10,000):
    no traceback, no hang, one bounded error line, and whatever it writes mixtral runs."""
    r = run([PYTHON, os.path.join(HERE, "export_mutations.py"), "--n", "300", "--seed", "7"], timeout=900)
    check(r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:])
    return r.stdout.strip().splitlines()[0]


@test
def expert_cache_identical(tmp):
    """With the expert cache (--mem less than the file), the logits and expert choices are the same
    bit for bit as with the whole file in memory, in every weight format, for a prompt in chunks
    (the layer's experts in waves when they outnumber the slots) and token by token; the cache
    reports its hit rate and prefetch accuracy, and a budget too small says what it needs."""
    d, cfg, ids, shape = random_model(tmp, 21, 24, 5, dim=64, hidden_dim=2048, heads=4, kv_heads=2, experts=8,
                                      top_k=2, layers=3, tie=True)  # tied: the experts are most of the file
    sys.path.insert(0, ROOT)
    import export as ex
    n = 0
    for wtype in ("f32", "bf16", "q8", "q4"):
        model = export(d, os.path.join(tmp, f"m_{wtype}.bin"), wtype)
        size = os.path.getsize(model)
        c = ex.read_config(d)
        span = sum(ex.tensor_bytes(sh, ex.MATRIX_TYPES[wtype][k]) for k, sh in
                   (("w1", (c["hidden_dim"], c["dim"])), ("w3", (c["hidden_dim"], c["dim"])), ("w2", (c["dim"], c["hidden_dim"]))))
        slot = (span + 2 * 4096 - 1) // 4096 * 4096  # the span and the ends of the blocks it starts and ends in
        resident = size - 3 * 8 * span
        base, base_e = engine_logits(model, ids, **shape)
        # --mem holds the working buffers too (model_load's estimate, for chunks of 4 here)
        C, D, H, V = 4, cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
        work = (4 * (C * (3 * D + 2 * D + 2 * 2 * D + 2 * 2 * H + V) + 4 * 4096) + 8 * C * max(D, H) * 5 // 4
                + 2 * ((C + 7) // 8 * 8) * max(D, H) * 5 // 4 + V * 32 + (2 << 20))  # (2 threads' kernel tiles)
        budgets = [resident + slots * slot + work for slots in (12, 8, 3, 1)]  # 3, 1: waves in a 4-token chunk
        budgets = [mem for mem in budgets if mem < size]  # (a small file has no room for the larger ones)
        check(len(budgets) >= 2 and budgets[-2] == resident + 3 * slot + work, f"{wtype}: no room for 3 slots below {size}")
        for mem in budgets:
            for chunk, policy in ((4, "lru"), (4, "usage"), (1, "lru")):
                got, got_e = engine_logits(model, ids, chunk=chunk, extra=("--mem", str(mem), "--cache-policy", policy),
                                           **shape)
                check(np.array_equal(got, base) and np.array_equal(got_e, base_e),
                      f"{wtype}, --mem {mem}, chunk {chunk}, --cache-policy {policy}: differs from the file in memory "
                      f"by up to {np.abs(got - base).max():.3g}")
                n += 1
        got, _ = engine_logits(model, ids, engine=DEBUG_ENGINE, chunk=4, extra=("--mem", str(mem)), **shape)  # ASan, UBSan
        check(np.array_equal(got, engine_logits(model, ids, engine=DEBUG_ENGINE, **shape)[0]), f"{wtype}: debug build differs")
        r = run([ENGINE, model, "-i", "Hello world", "-n", "20", "-t", "0", "--mem", str(mem), "--chunk", "4", "--expert-stats"])
        check(r.returncode == 0 and re.search(r"expert cache: \d+ slots .* hit rate [\d.]+% .* prefetch accuracy [\d.]+%",
                                              r.stdout + r.stderr), f"no cache report:\n{r.stdout}\n{r.stderr}")
    expect_error([ENGINE, model, "-i", "x", "--mem", "4K"], "--mem")
    expect_error([ENGINE, model, "-i", "x", "--mem", "12Q"], "--mem")
    return f"{n} runs identical (4 formats, budgets of 1 to 12 slots of 24, chunked and token by token, both policies)"


# ----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", default="", help="run only tests whose name contains this")
    ap.add_argument("--cross", action="store_true", help="run the cross tests (make test-cross) instead of the others")
    a = ap.parse_args()
    for exe in (ENGINE, DEBUG_ENGINE, compare_tokenizer.TOK_BATCH):
        if not os.path.exists(exe):
            sys.exit(f"run_tests.py: {exe} is missing; run 'make test', which builds it")
    passed = failed = skipped = 0
    for t in TESTS:
        if a.k not in t.__name__:
            continue
        if getattr(t, "cross", False) != a.cross:
            if not a.cross:
                skipped += 1
                print(f"SKIP {t.__name__}: a cross test; make test-cross runs it", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="mixtral_test_") as tmp:
            try:
                detail = t(tmp)
                passed += 1
                print(f"PASS {t.__name__}: {detail or ''}", flush=True)
            except Skip as e:
                skipped += 1
                print(f"SKIP {t.__name__}: {e}", flush=True)
            except Failure as e:
                failed += 1
                print(f"FAIL {t.__name__}: {e}", flush=True)
            except Exception:
                failed += 1
                print(f"FAIL {t.__name__}: unexpected exception\n{traceback.format_exc()}", flush=True)
    for base in [_small.get("base")] + [b for b, _ in _tok_models.values()]:
        if base:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()
