"""
The KV cache (--kv f32, bf16, q8, q4): a prompt in chunks reads the same numbers as token by token,
any thread count gives the same, with and without a sliding window; the other types stay
within their rounding of the f32 cache (a random model amplifies it: every routing near-tie flips); the load line says what the cache takes.
"""
from harness import *  # noqa: F401,F403


@test
def kv_types_identical_across_chunks_and_threads(tmp):
    """Every KV type: logits bit-identical for a whole prompt, chunks of 3 and token by token, on 1
    and 2 threads, also with a sliding window shorter than the prompt (the ring); bf16 within 3%,
    q8 5%, q4 25% of the logits' spread (RMS) from the f32 cache."""
    out = []
    for window in (None, 5):
        d, cfg, ids, shape = random_model(tmp, 37, 14, 3, name=f"hf{window}", dim=64, hidden_dim=96, heads=4,
                                          kv_heads=2, head_dim=32, experts=4, top_k=2, window=window)
        model = export(d, os.path.join(tmp, f"m{window}.bin"), "q8")
        base, _ = engine_logits(model, ids, extra=("--kv", "f32"), **shape)
        spread = float(base.std())
        for kv, bound in (("bf16", 0.03), ("q8", 0.05), ("q4", 0.25)):
            first, _ = engine_logits(model, ids, extra=("--kv", kv), **shape)
            for chunk, threads in ((3, 2), (1, 2), (None, 1)):
                got, _ = engine_logits(model, ids, chunk=chunk, threads=threads, extra=("--kv", kv), **shape)
                check(np.array_equal(got, first), f"--kv {kv}, window {window}: chunk {chunk}, {threads} threads "
                      f"differs by up to {np.abs(got - first).max():.3g}")
            rms = float(np.sqrt(((first - base) ** 2).mean()) / spread)
            check(np.isfinite(first).all() and rms <= bound, f"--kv {kv}, window {window}: {rms:.4f} of the "
                  f"logits' spread from the f32 cache (bound {bound})")
            out.append(f"{kv}{'/w' if window else ''} {rms:.4f}")
    return "identical in chunks and threads; RMS from f32: " + ", ".join(out)


@test
def kv_memory_and_options(tmp):
    """The load line gives the KV cache's type and size (q8 about a quarter of f32, q4 about a
    seventh); --kv takes only its four types; q4 with a head_dim that is not a multiple of 32 is
    refused with the way out."""
    d, cfg, ids, shape = random_model(tmp, 39, 4, 3, dim=64, hidden_dim=96, heads=4, kv_heads=2, head_dim=64,
                                      experts=4, top_k=2, layers=4)
    model = export(d, os.path.join(tmp, "m.bin"), "bf16")
    mb = {}
    for kv in ("f32", "bf16", "q8", "q4"):
        r = run([ENGINE, model, "-i", "Hello", "-n", "2", "-c", "16384", "--kv", kv])
        m = re.search(r"KV cache (\w+) (\d+) MB", r.stderr)
        check(r.returncode == 0 and m and m.group(1) == kv, f"--kv {kv}: no KV cache in the load line:\n{r.stderr}")
        mb[kv] = int(m.group(2))
    want_f32 = 2 * 4 * 16384 * 2 * 64 * 4 / 1e6
    check(abs(mb["f32"] - want_f32) <= 1, f"f32 KV cache {mb['f32']} MB, expected {want_f32:.0f}")
    check(3.5 <= mb["f32"] / mb["q8"] <= 4.1 and 6.5 <= mb["f32"] / mb["q4"] <= 7.6,
          f"KV cache sizes {mb}: q8 should be about a quarter, q4 a seventh")
    expect_error([ENGINE, model, "-i", "x", "--kv", "q5"], "--kv")
    d2, _, _, _ = random_model(tmp, 41, 2, 3, name="odd", dim=64, hidden_dim=96, heads=4, kv_heads=2, head_dim=16,
                               experts=4, top_k=2)
    expect_error([ENGINE, export(d2, os.path.join(tmp, "odd.bin"), "bf16"), "-i", "x", "--kv", "q4"], "multiple of 32")
    return f"KV cache at -c 16384: " + ", ".join(f"{k} {v} MB" for k, v in mb.items())
