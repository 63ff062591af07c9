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


def file_digest(path):
    import hashlib
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@test
def sessions(tmp):
    """--session: a second run of the same prompt, of a longer prompt that starts with it, and of a grown
    --chat-file conversation reuses the saved tokens' keys and values (it says how many) and prints
    exactly what a run without the session prints (greedy), in every KV type; a session of another
    model, another KV type or context, a truncated or a corrupt one is refused with one line and left
    as it was."""
    d, cfg, ids, shape = random_model(tmp, 43, 4, 3, dim=64, hidden_dim=96, heads=4, kv_heads=2, head_dim=32, experts=4,
                                      top_k=2)
    model = export(d, os.path.join(tmp, "m.bin"), "q8")
    n = 0
    for kv in ("f32", "q8", "q4"):
        sess = os.path.join(tmp, f"{kv}.session")
        base = [ENGINE, model, "-n", "12", "-t", "0", "-c", "256", "--kv", kv]
        for prompt in ("Once upon a time there was", "Once upon a time there was a king who"):
            want = run(base + ["-i", prompt])
            got = run(base + ["-i", prompt, "--session", sess])
            check(want.returncode == 0 and got.returncode == 0 and got.stdout == want.stdout,
                  f"--kv {kv}, {prompt!r}: with the session {got.stdout!r}, without {want.stdout!r}\n{got.stderr[-300:]}")
            n += 1
        again = run(base + ["-i", "Once upon a time there was a king who", "--session", sess])
        m = re.search(r"\[(\d+) tokens from", again.stderr)
        check(m and int(m.group(1)) >= 8 and again.stdout == want.stdout, f"--kv {kv}: the second run reused "
              f"{m.group(1) if m else 'nothing'}:\n{again.stderr[-300:]}")
    # a conversation file that grows: the reply is the same, and only the new turn is run
    conv = os.path.join(tmp, "conv.json")
    msgs = [{"role": "user", "content": "Tell me a story about a dragon."}]
    json.dump({"messages": msgs}, open(conv, "w"))
    sess = os.path.join(tmp, "chat.session")
    chat = [ENGINE, model, "-m", "chat", "-n", "10", "-t", "0", "-c", "512", "--chat-file", conv]
    first = run(chat + ["--session", sess], input="")
    check(first.returncode == 0, first.stderr[-300:])
    reply = first.stdout.split("Assistant: ", 1)[1].split("\n")[0]
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then what happened?"}]
    json.dump({"messages": msgs}, open(conv, "w"))
    want = run(chat, input="")
    got = run(chat + ["--session", sess], input="")
    m = re.search(r"\[(\d+) tokens from", got.stderr)
    check(got.stdout == want.stdout and m and int(m.group(1)) >= 10, f"the grown conversation: with the session "
          f"{got.stdout!r} (reused {m.group(1) if m else 'nothing'}), without {want.stdout!r}")
    # refusals, the file as it was
    sess = os.path.join(tmp, "f32.session")
    before = file_digest(sess)
    other = export(random_model(tmp, 47, 1, 0, name="other", dim=64, hidden_dim=96, heads=4, kv_heads=2, head_dim=32,
                                experts=4, top_k=2)[0], os.path.join(tmp, "other.bin"), "q8")
    cases = [([ENGINE, other, "-i", "Once", "-c", "256", "--session", sess], "another model"),
             ([ENGINE, model, "-i", "Once", "-c", "256", "--kv", "q8", "--session", sess], "type f32"),
             ([ENGINE, model, "-i", "Once", "-c", "300", "--kv", "f32", "--session", sess], "another context")]
    for cmd, needle in cases:
        expect_error(cmd, needle)
        check(file_digest(sess) == before, f"{needle}: the session file changed")
    raw = open(sess, "rb").read()
    for name, data, needle in (("cut", raw[:-100], "truncated"), ("flipped", raw[:60] + bytes([raw[60] ^ 1]) + raw[61:], "corrupt")):
        bad = os.path.join(tmp, name + ".session")
        open(bad, "wb").write(data)
        expect_error([ENGINE, model, "-i", "Once", "-c", "256", "--kv", "f32", "--session", bad], needle)
        check(open(bad, "rb").read() == data, f"{name}: the session file changed")
    return f"{n} runs, 3 KV types and a grown conversation identical with their sessions; 5 bad sessions refused"
