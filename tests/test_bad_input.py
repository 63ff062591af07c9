"""
Bad input: a clear error and exit status 1, never a crash. Truncated and foreign model
files, bad tokens and contexts, malformed checkpoints for export.py; and the hardening that
fuzzing found, kept fixed (the fuzz corpus replayed, ThreadSanitizer, export mutations).
"""
from harness import *  # noqa: F401,F403


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
    expect_error([ENGINE, patched(tmp, "topk.bin", 52, "<i", 9)], "num_experts_per_tok")
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
def export_errors(tmp):
    small_model(tmp)
    src = SMALL["hf"]
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
def fuzz_corpus_replay(tmp):
    """Every committed fuzz input (tests/fuzz/corpus) through its target, built with ASan and UBSan
    without libFuzzer (tests/fuzz/replay.c): what `make fuzz` once passed keeps passing."""
    model = tokenizer_model("mistral-v1.model")
    total = 0
    for target in ("model", "tokenizer", "chat", "options", "session"):
        exe = os.path.join(tmp, f"replay_{target}")
        r = run([CC, "-O1", "-g", "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all",
                 "-std=c11", "-D_GNU_SOURCE", "-DMIXTRAL_FUZZ", "-Wno-unused-function", "-I" + ROOT, "-o", exe,
                 os.path.join(HERE, "fuzz", f"fuzz_{target}.c"), os.path.join(HERE, "fuzz", "replay.c"),
                 *LIB, "-lm", "-lpthread"])
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
    r = run([CC, "-O1", "-g", "-fsanitize=thread", "-std=c11", "-D_GNU_SOURCE", "-DMIXTRAL_OVERSUBSCRIBE", "-o", exe,
             *SOURCES, "-lm", "-lpthread"])
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


class SmallDisk:
    """A tmpfs of `size` bytes mounted on a folder of tmp (root only; else the test is skipped)."""

    def __init__(self, tmp, size):
        self.path = os.path.join(tmp, "disk")
        os.makedirs(self.path)
        r = run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.path])
        if r.returncode != 0:
            raise Skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()[:200]}")

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        run(["umount", "-l", self.path])


def fails_cleanly(cmd, needle, path, content, what):
    """cmd fails with one line naming `needle`, leaves `path` holding `content` and no partial file:
    for the engine, each of its builds on its own."""
    for exe in (ENGINE, DEBUG_ENGINE) if cmd[0] == ENGINE else (cmd[0],):
        r = run([exe] + cmd[1:])
        err = r.stderr.strip()
        check(r.returncode == 1 and len(err.splitlines()) == 1 and needle in err.lower(),
              f"{what}: {os.path.basename(exe)} exit {r.returncode}, stderr:\n{err[-600:]}")
        check(open(path, "rb").read() == content, f"{what}: {path} was changed")
        left = [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".partial")]
        check(not left, f"{what}: {os.path.basename(exe)} left {left} behind")


@test
def failed_outputs_leave_nothing(tmp):
    """Every output that fails, for any reason, removes what it began and leaves an existing file as it
    was: --dump-logits when --dump-experts cannot be written (it left L.partial before), and on a full
    disk (a 256 KB tmpfs the test mounts) --dump-logits, --kl-base, --imatrix, --session and
    export.py: one line, exit 1."""
    model = small_model(tmp)
    out = os.path.join(tmp, "out")
    os.makedirs(out)
    logits = os.path.join(out, "l.f32")
    old = b"old content"
    open(logits, "wb").write(old)
    ids = ",".join(["1"] + ["100"] * 20)
    fails_cleanly([ENGINE, model, "--ids", ids, "--dump-logits", logits, "--dump-experts",
                   os.path.join(tmp, "missing", "e.i32")], "cannot write", logits, old, "--dump-experts into a missing folder")
    n = 1
    with SmallDisk(tmp, 256 << 10) as disk:
        full = os.path.join(disk, "l.f32")
        open(full, "wb").write(old)
        fails_cleanly([ENGINE, model, "--ids", ids, "--dump-logits", full], "no space", full, old,
                      "--dump-logits on a full disk")
        text = os.path.join(tmp, "t.txt")
        open(text, "w").write(open(os.path.join(ROOT, "demo", "heldout.txt")).read()[:3000])
        base = os.path.join(disk, "base.kl")
        open(base, "wb").write(old)
        fails_cleanly([ENGINE, model, "--perplexity", text, "-c", "32", "--kl-base", base], "no space", base, old,
                      "--kl-base on a full disk")
        exported = os.path.join(disk, "m.bin")
        open(exported, "wb").write(old)
        r = run([PYTHON, os.path.join(ROOT, "export.py"), SMALL["hf"], exported, "--type", "q8"])
        check(r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "space" in r.stderr.lower(),
              f"export.py on a full disk: exit {r.returncode}\n{r.stderr[-500:]}")
        check(open(exported, "rb").read() == old and not [f for f in os.listdir(disk) if f.endswith(".partial")],
              "export.py on a full disk: the file changed or a partial file is left")
        # --imatrix and --session on a disk with 8 KB left
        im = os.path.join(disk, "m.imatrix")
        open(im, "wb").write(old)
        st = os.statvfs(disk)
        with open(os.path.join(disk, "filler"), "wb") as f:
            f.write(b"\0" * max(st.f_bavail * st.f_frsize - 8 * 1024, 0))
        fails_cleanly([ENGINE, model, "--perplexity", text, "-c", "32", "--imatrix", im], "no space", im, old,
                      "--imatrix on a full disk")
        sess = os.path.join(disk, "m.session")
        open(sess, "wb").write(old)
        os.remove(sess)  # (a session that is not a session would be refused before the run)
        r = run([ENGINE, model, "-i", "Once upon a time", "-n", "100", "-t", "0", "-c", "256", "--session", sess])
        check(r.returncode == 1 and "no space" in r.stderr.lower() and not os.path.exists(sess)
              and not [f for f in os.listdir(disk) if f.endswith(".partial")],
              f"--session on a full disk: exit {r.returncode}\n{r.stderr[-400:]}")
        n += 5
    return f"{n} failed outputs: no partial file left, the existing file untouched"


def chat_until_prompt(p, line, timeout=60):
    """Sends a line to a chat process and reads its stdout until the next 'User: ' prompt (or its end)."""
    import select
    if line is not None:
        p.stdin.write(line.encode() + b"\n")
        p.stdin.flush()
    got, t0 = b"", time.time()
    while b"User: " not in got and time.time() - t0 < timeout:
        ready, _, _ = select.select([p.stdout], [], [], 1)
        if ready:
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                break
            got += chunk
    return got


@test
def model_file_cut_short_while_running(tmp):
    """A chat whose model file is cut short between two turns: with --mmap (it died of SIGBUS before)
    and with the expert cache, one line saying that the file changed, exit 1."""
    model = small_model(tmp)
    size = os.path.getsize(model)
    r = run([ENGINE, model, "--bench", "-c", "256", "--chunk", "4", "--threads", "2", "--mem", str(size - 1)])
    check(r.returncode == 0, r.stderr[-500:])
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    one_slot = rep["cache_other_bytes"] + rep["cache_slot_bytes"]
    for how in (["--mmap"], ["--mem", str(one_slot), "--chunk", "4"]):
        copy = os.path.join(tmp, "copy.bin")
        shutil.copy(model, copy)
        p = subprocess.Popen([ENGINE, copy, "-m", "chat", "-n", "6", "-t", "0", "-c", "256", "--threads", "2", *how],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        chat_until_prompt(p, None)
        chat_until_prompt(p, "Hello")
        os.truncate(copy, size // 3)
        chat_until_prompt(p, "And again")
        p.stdin.close()
        err = p.stderr.read().decode(errors="replace")
        status = p.wait(timeout=60)
        check(status == 1 and "changed" in err and err.count("error") == 1,
              f"{' '.join(how)}: exit {status} (-7 is SIGBUS), stderr:\n{err[-800:]}")
    return "mapped and expert cache: 'the model file changed', exit 1"


@test
def reads_with_faults(tmp):
    """Faults injected into the reads of the model file (tests/fault_shim.c, LD_PRELOAD): short reads
    and EINTR give the same text, in the read-in and in the expert cache, and the same file from
    export.py; a failed read is one line naming the file and the offset, exit 1, wherever it falls
    (the header, the read-in, the weights kept resident, an embedding row, the cache's I/O threads,
    export.py's tensor reads)."""
    shim = os.path.join(tmp, "fault.so")
    r = run([CC, "-shared", "-fPIC", "-O1", "-o", shim, os.path.join(HERE, "fault_shim.c"), "-ldl"])
    if r.returncode != 0:
        raise Skip(f"cannot build the LD_PRELOAD shim: {r.stderr.strip()[-200:]}")
    model = small_model(tmp)
    size = os.path.getsize(model)
    r = run([ENGINE, model, "--bench", "-c", "256", "--chunk", "4", "--threads", "2", "--mem", str(size - 1)])
    check(r.returncode == 0, r.stderr[-500:])
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    few_slots = rep["cache_other_bytes"] + 2 * rep["cache_slot_bytes"]
    name = os.path.basename(model)
    n = 0
    for mode in (["--no-mmap"], ["--mem", str(few_slots)]):
        cmd = [ENGINE, model, "-i", "Hello world", "-n", "8", "-t", "0", "-q", "-c", "256", "--chunk", "4",
               "--threads", "2", *mode]
        want = run(cmd)
        check(want.returncode == 0, want.stderr[-500:])
        for kind in ("short", "eintr"):
            got = run(cmd, env=dict(os.environ, LD_PRELOAD=shim, FAULT_FILE=name, FAULT_KIND=kind))
            check(got.returncode == 0 and got.stdout == want.stdout, f"{mode[0]}, {kind} reads: exit {got.returncode}, "
                  f"{got.stdout!r} instead of {want.stdout!r}\n{got.stderr[-500:]}")
            n += 1
        where, failed = set(), []
        for at in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144):
            got = run(cmd, env=dict(os.environ, LD_PRELOAD=shim, FAULT_FILE=name, FAULT_KIND="error", FAULT_AT=str(at)))
            if got.returncode == 0 and got.stdout == want.stdout:
                continue  # the run made fewer reads
            err = got.stderr.strip()
            m = re.fullmatch(r"mixtral: error: (expert cache: )?cannot read (\S+) at offset (\d+): Input/output error.*", err)
            check(got.returncode == 1 and len(err.splitlines()) == 1 and m and m.group(2) == model,
                  f"{mode[0]}, read {at} fails: exit {got.returncode}, stderr:\n{err[-500:]}")
            where.add("cache" if m.group(1) else "offset 0" if m.group(3) == "0" else "later")
            failed.append(at)
            n += 1
        # the header's reads (1, 2), then the read-in (one read of this small file) or, with the cache,
        # the weights kept resident, the embedding rows and the cache's reads
        check(max(failed) >= 3 and (mode[0] == "--no-mmap" or {"cache", "later"} <= where),
              f"{mode[0]}: the failed reads were only reads {failed}, at {sorted(where)}")
    hf_dir = SMALL["hf"]
    shard = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")][0]
    out = os.path.join(tmp, "e.bin")
    exp = [PYTHON, os.path.join(ROOT, "export.py"), hf_dir, out, "--type", "q8"]
    r = run(exp)
    check(r.returncode == 0, r.stderr[-500:])
    want = open(out, "rb").read()
    for kind in ("short", "eintr"):
        os.remove(out)
        r = run(exp, env=dict(os.environ, LD_PRELOAD=shim, FAULT_FILE=shard, FAULT_KIND=kind))
        check(r.returncode == 0 and open(out, "rb").read() == want, f"export.py, {kind} reads: {r.stderr[-500:]}")
        n += 1
    for at in (1, 4, 12):
        r = run(exp, env=dict(os.environ, LD_PRELOAD=shim, FAULT_FILE=shard, FAULT_KIND="error", FAULT_AT=str(at)))
        err = r.stderr.strip()
        check(r.returncode == 1 and len(err.splitlines()) == 1 and shard in err and ("offset" in err or "Input/output" in err),
              f"export.py, read {at} fails: exit {r.returncode}\n{err[-500:]}")
        n += 1
    return f"{n} runs: short reads and EINTR change nothing; each failed read is one line with the file and offset"
