"""
The engine against tests/reference.py, the numpy forward pass written from the math: every
shape of model (grouped-query and multi-query attention, sliding windows, odd sizes, tied
embeddings), every thread count, prompts in chunks, and the shipped demo model against its
training script.
"""
from harness import *  # noqa: F401,F403


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
    # the engine runs at most as many threads as there are CPUs: a build that runs as many as asked
    # tries the shares of 3 and 7 on any machine
    many = os.path.join(tmp, "mixtral-oversubscribe")
    r = run([CC, "-O2", "-march=native", "-DMIXTRAL_OVERSUBSCRIBE", *BUILD_FLAGS, "-o", many, *SOURCES, "-lm", "-lpthread"])
    check(r.returncode == 0, f"building with -DMIXTRAL_OVERSUBSCRIBE:\n{r.stderr[-2000:]}")
    # the SIMD build and the portable build (the sanitizer one) each agree with themselves
    for wtype in ("f32", "bf16", "q8", "q4"):
        model = export(d, os.path.join(tmp, f"model_{wtype}.bin"), wtype)
        # a chunk of all the ids (batched products), and one token at a time (the rows shared out
        # with stealing, as when decoding)
        for engine, counts in ((many, (2, 3, 7)), (ENGINE, (2,)), (DEBUG_ENGINE, (2,))):
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


@test
def fewer_experts_per_token(tmp):
    """--experts-per-token N runs each token through N experts: the numpy reference with
    num_experts_per_tok = N gives the same logits and experts (N = 1 and 3 of a top-2 model of 4
    experts); more than the model has is refused."""
    d, cfg, ids, shape = random_model(tmp, 45, 10, 3, dim=64, hidden_dim=96, heads=4, kv_heads=2, experts=4, top_k=2)
    model = export(d, os.path.join(tmp, "f32.bin"), "f32")
    W = reference.load_safetensors(d)
    worst = 0.0
    for k in (1, 3):
        want, want_e = reference.forward(W, dict(cfg, num_experts_per_tok=k), ids)
        got, got_e = engine_logits(model, ids, extra=("--experts-per-token", str(k)), **dict(shape, top_k=k))
        worst = max(worst, compare_logits(got, want, f"--experts-per-token {k}"))
        compare_experts(got_e, want_e, f"--experts-per-token {k}")
    expect_error([ENGINE, model, "-i", "x", "--experts-per-token", "5"], "4 experts")
    return f"1 and 3 experts a token: max abs error {worst:.2g} against the reference"


@test
def bf16_activations(tmp):
    """--bf16-activations (bf16 weights times activations rounded to bf16, vdpbf16ps where the CPU
    has it) against the reference with the same rounding (reference.forward(bf16_activations=True)):
    most positions within 1e-3 (a value at a bf16 midpoint may round either way), and far closer
    than to the exact reference, so that the option does what it says; prompts and token by token,
    and the portable build's kernels too."""
    d, cfg, ids, shape = random_model(tmp, 5, 16, 3, dim=128, hidden_dim=192, heads=4, kv_heads=2, experts=4, top_k=2)
    model = export(d, os.path.join(tmp, "model.bin"), "bf16")
    W = reference.load_safetensors(d)
    exact, _ = reference.forward(W, cfg, ids, bf16=True)
    want, want_e = reference.forward(W, cfg, ids, bf16=True, bf16_activations=True)
    worst = []
    for engine, chunk in ((ENGINE, None), (ENGINE, 1), (DEBUG_ENGINE, None)):  # (the portable kernels)
        got, got_e = engine_logits(model, ids, engine=engine, chunk=chunk, extra=("--bf16-activations",), **shape)
        compare_experts(got_e, want_e, f"--bf16-activations chunk {chunk}")
        # per position: a value within float32's error of a bf16 midpoint rounds either way in the two
        # computations, and moves that position's logits by about 1e-2, so most positions, not all
        err, off = np.abs(got - want).max(1), np.abs(got - exact).max(1)
        close = np.mean(err < 1e-3)
        check(close >= 0.75 and np.median(err) < np.median(off) / 20,
              f"--bf16-activations chunk {chunk}: {close:.0%} of positions within 1e-3 of the reference that rounds "
              f"activations; median error {np.median(err):.3g}, from the exact reference {np.median(off):.3g}; "
              f"per position {np.round(err, 4).tolist()}")
        worst.append(close)
    return (f"{min(worst):.0%} of positions within 1e-3 of the reference (median distance from the exact one "
            f"{np.median(off):.2g})")
