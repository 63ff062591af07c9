#!/usr/bin/env python3
"""
Mutation test of export.py: a small valid checkpoint, then N mutated copies of
it (config.json values and bytes, safetensors headers, tokenizer.model bytes,
the bytes of an importance matrix for it, --fit sizes), each exported in this
process. It fails on any traceback (an exception that
export.py's main does not turn into a one-line error), any hang (10 s), an
error that is not one bounded line, and any exit 0 whose file mixtral refuses
or cannot run (BOS, then one token).

    python3 tests/export_mutations.py [--n 10000] [--seed 1]
"""
import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import hf_checkpoint as hf  # noqa: E402
import export  # noqa: E402

ENGINE = os.path.join(ROOT, "mixtral")
VALUES = [0, -1, 1, 2, 3, 7, 8, 16, 31, 32, 64, 65, 1000, 10**6, 2**31 - 1, 2**31, 2**63, -2**63, 10**30,
          0.0, 1e-50, 1e-300, 1e-40, 0.5, 1.5, 1e6, 1e300, 1e308, float("nan"), float("inf"), -float("inf"),
          "", "mixtral", "silu", "llama", "x" * 5000, [], [1], [[[]]], {}, {"a": 1}, None, True, False]


class Hang(Exception):
    pass


def on_alarm(sig, frame):
    raise Hang()


def mutate_bytes(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(5)
        i = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(i, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del data[i:i + rng.randint(1, 64)]
        elif op == 3 and data:
            j = rng.randrange(len(data))
            data[i:i] = data[j:j + rng.randint(1, 256)]
        elif op == 4:
            data = data[:i]
    return bytes(data)


FIT_SIZES = ["0", "1", "100K", "1M", "5M", "1G", "12Q", "-5", "1e3", "nan", "", " 2M ", "2.5M", "9" * 40]


def mutate(rng, base, d, imatrix):
    """One mutated copy of the checkpoint in base, written to d; returns (what was done, extra export.py
    arguments): with an importance matrix (its bytes mutated) or a --fit size for kinds 6 and 7."""
    shutil.copytree(base, d)
    kind = rng.randrange(8)
    if kind == 6:  # the importance matrix's bytes
        path = os.path.join(d, "imatrix.dat")
        open(path, "wb").write(mutate_bytes(rng, open(imatrix, "rb").read()))
        return "imatrix bytes", ["--imatrix", path]
    if kind == 7:
        size = rng.choice(FIT_SIZES)
        return f"--fit {size!r}", ["--fit", size]
    return mutate_checkpoint(rng, d, kind), []


def mutate_checkpoint(rng, d, kind):
    cfg_path, st_path, tok_path = (os.path.join(d, f) for f in ("config.json", "model.safetensors", "tokenizer.model"))
    if kind <= 1:  # a config value
        cfg = json.load(open(cfg_path))
        key = rng.choice(list(cfg) + ["head_dim", "sliding_window", "rope_scaling", "extra"])
        cfg[key] = rng.choice(VALUES)
        open(cfg_path, "w").write(json.dumps(cfg))
        return f"config {key}={str(cfg[key])[:40]}"
    if kind == 2:  # config.json bytes
        open(cfg_path, "wb").write(mutate_bytes(rng, open(cfg_path, "rb").read()))
        return "config bytes"
    raw = open(st_path, "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    if kind == 3:  # a safetensors entry
        header = json.loads(raw[8:8 + hlen])
        name = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        header[name][field] = rng.choice(VALUES + ["F16", "BF16", "F32", "I8", [2, 2], [0, 0], [10**12, 1]])
        hb = json.dumps(header).encode()
        open(st_path, "wb").write(struct.pack("<Q", len(hb)) + hb + raw[8 + hlen:])
        return f"safetensors {name} {field}"
    if kind == 4:  # safetensors header bytes (the length field included)
        head = mutate_bytes(rng, raw[:8 + hlen])
        open(st_path, "wb").write(head + raw[8 + hlen:])
        return "safetensors bytes"
    tok = open(tok_path, "rb").read()  # tokenizer.model bytes, mostly in its first pieces
    cut = rng.choice([2000, 20000, len(tok)])
    open(tok_path, "wb").write(mutate_bytes(rng, tok[:cut]) + tok[cut:])
    return "tokenizer bytes"


def export_once(d, out, wtype, extra=()):
    """export.py's main in this process: (exit status, stderr)."""
    err = io.StringIO()
    argv = sys.argv
    sys.argv = ["export.py", d, out, "--type", wtype, *extra]
    signal.alarm(10)
    try:
        with contextlib.redirect_stderr(err):
            export.main()
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    finally:
        signal.alarm(0)
        sys.argv = argv
    return status, err.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    tmp = tempfile.mkdtemp(prefix="mixtral_mut_")
    signal.signal(signal.SIGALRM, on_alarm)
    failures, outcomes, t0 = [], {"refused": 0, "written": 0}, time.time()
    try:
        base = os.path.join(tmp, "base")
        hf.write_checkpoint(base, hf.make_config(dim=32, hidden_dim=64, layers=1, heads=2, kv_heads=1, experts=2,
                                                 top_k=1), seed=3)
        imatrix, text = os.path.join(tmp, "base.imatrix"), os.path.join(tmp, "text.txt")
        open(text, "w").write("The quick brown fox jumps over the lazy dog. " * 20)
        status, err = export_once(base, os.path.join(tmp, "base.bin"), "f32")
        r = subprocess.run([ENGINE, os.path.join(tmp, "base.bin"), "--perplexity", text, "-c", "16", "--imatrix", imatrix],
                           capture_output=True, text=True)
        if status != 0 or r.returncode != 0:
            sys.exit(f"export_mutations: cannot make the base importance matrix: {err}{r.stderr}")
        for i in range(a.n):
            d, out = os.path.join(tmp, f"m{i}"), os.path.join(tmp, f"m{i}.bin")
            what, extra = mutate(rng, base, d, imatrix)
            wtype = rng.choice(["q3", "q2"] if extra[:1] == ["--imatrix"] else ["f32", "bf16", "q8", "q4", "q3", "q2"])
            try:
                status, err = export_once(d, out, wtype, extra)
            except Hang:
                failures.append(f"{i} {what}: hang (over 10 s)")
                status, err = None, ""
            except Exception as e:  # noqa: BLE001 - what the test is looking for
                failures.append(f"{i} {what}: traceback {type(e).__name__}: {str(e)[:200]}")
                status, err = None, ""
            lines = err.strip().splitlines()
            if status == 0:
                outcomes["written"] += 1
                # loads, and runs BOS (a prompt fits any context of 1 or more) and one token after it
                r = subprocess.run([ENGINE, out, "-n", "1", "-t", "0", "--quiet"], capture_output=True,
                                   text=True, timeout=60)
                if r.returncode != 0:
                    failures.append(f"{i} {what}: exported ({wtype}) but mixtral refuses it: {r.stderr.strip()[:300]}")
            elif status is not None:
                outcomes["refused"] += 1
                errors = [l for l in lines if l.startswith("export.py: error:")]
                if status not in (1,) or len(errors) != 1 or len(errors[0]) > 600:
                    failures.append(f"{i} {what}: exit {status}, stderr {err[:300]!r}")
            shutil.rmtree(d)
            if os.path.exists(out):
                os.remove(out)
            if os.path.exists(out + ".partial"):
                failures.append(f"{i} {what}: left {out}.partial behind")
                os.remove(out + ".partial")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{a.n} mutations in {time.time() - t0:.0f} s: {outcomes['refused']} refused with one line, "
          f"{outcomes['written']} exported and run; {len(failures)} failures")
    for f in failures[:20]:
        print("  " + f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
