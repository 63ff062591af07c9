"""
The shared harness of the test suite: running the engine and export.py, building
random checkpoints, comparing logits and expert choices with the first
differences printed, and the test registry (@test, @cross_test) that
tests/run_tests.py runs. Each tests/test_*.py file holds the tests of one
feature and starts with `from harness import *`.
"""
import argparse  # noqa: F401 (for the test files)
import json  # noqa: F401
import os
import platform  # noqa: F401
import re  # noqa: F401
import shutil
import struct  # noqa: F401
import subprocess
import sys
import tempfile  # noqa: F401
import traceback  # noqa: F401
import time  # noqa: F401
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


def export(hf_dir, out, wtype="f32", extra=()):
    r = run([PYTHON, os.path.join(ROOT, "export.py"), hf_dir, out, "--type", wtype, *extra])
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
    if "--kv" not in extra:  # the exact KV cache: the references compute in full precision
        cmd += ["--kv", "f32"]
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


def sp_ids(d, text):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model")).encode(text)


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


# what the Makefile builds: mixtral.c and LIB, what a program that #includes mixtral.c links with it
LIB = [os.path.join(ROOT, f) for f in ("eval.c", "expert_cache.c", "session.c", "util.c", "kernels.c", "pool.c", "chat.c",
                                      "tokenizer.c")]


SOURCES = [os.path.join(ROOT, "mixtral.c")] + LIB


BUILD_FLAGS = ["-Wall", "-Wextra", "-Werror", "-std=c11", "-D_GNU_SOURCE"]


AVX2 = ["-mavx2", "-mfma", "-mf16c"]


AVX512VNNI = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-mavx512vbmi"]  # (VBMI: the q3/q2 permutes)


def x86_builds():
    """The x86-64 kernel builds to test, each (name, compiler flags, kernels source, cpu flags it needs):
    AVX2 and AVX-512 VNNI. The AVX-512 build runs for real where the CPU has it and otherwise
    with those instructions emulated (tests/avx512_emulation.h)."""
    kernels, emulated = os.path.join(ROOT, "kernels.c"), os.path.join(HERE, "avx512_emulated.c")
    builds = [("avx2", AVX2, kernels, {"avx2", "fma", "f16c"})]
    if {"avx512f", "avx512bw", "avx512_vnni", "avx512vbmi"} <= cpu_flags():
        builds.append(("avx512-vnni", AVX512VNNI, kernels, {"avx512_vnni"}))
    else:
        builds.append(("avx512-vnni (emulated)", AVX2 + ["-I" + HERE], emulated, {"avx2", "fma", "f16c"}))
    return builds


import compare_tokenizer  # noqa: E402


TOK_MODELS = {}


def tokenizer_model(tokenizer):
    """A tiny model file carrying the given tokenizer (the weights do not matter here)."""
    if tokenizer not in TOK_MODELS:
        base = tempfile.mkdtemp(prefix="mixtral_tok_")
        vocab = 32768 if "v3" in tokenizer else 32000
        d = os.path.join(base, "hf")
        hf.write_checkpoint(d, hf.make_config(dim=8, hidden_dim=8, layers=1, heads=2, kv_heads=1, experts=2,
                                              top_k=1, vocab=vocab), seed=1, tokenizer=tokenizer)
        TOK_MODELS[tokenizer] = (base, export(d, os.path.join(base, "model.bin"), "f32"))
    return TOK_MODELS[tokenizer][1]


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


SMALL = {}


def small_model(tmp):
    """A small valid model file, shared by the bad-input tests."""
    if "path" not in SMALL:
        base = tempfile.mkdtemp(prefix="mixtral_small_")
        d = os.path.join(base, "hf")
        hf.write_checkpoint(d, hf.make_config(), seed=11)
        SMALL["hf"] = d
        SMALL["path"] = export(d, os.path.join(base, "model.bin"), "bf16")
        SMALL["base"] = base
    return SMALL["path"]


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


def tensor_offset(model, name):
    """Byte offset of a tensor in a model file, from export.py's own layout (tensor_plan, RECIPES)."""
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
