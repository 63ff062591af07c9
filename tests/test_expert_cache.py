"""
The expert cache (expert_cache.c): the same results, bit for bit, as the whole file in
memory, under every budget and policy, read from its own report.
"""
from harness import *  # noqa: F401,F403


@test
def expert_cache_identical(tmp):
    """With the expert cache (--mem less than the file), the logits and expert choices are the same
    bit for bit as with the whole file in memory, in every weight format, for a prompt in chunks
    (the layer's experts in waves when they outnumber the slots) and token by token; the cache
    reports its hit rate and prefetch accuracy, and a budget too small says what it needs."""
    d, cfg, ids, shape = random_model(tmp, 21, 24, 5, dim=64, hidden_dim=2048, heads=4, kv_heads=2, experts=8,
                                      top_k=2, layers=3, tie=True)  # tied: the experts are most of the file
    n = 0
    for wtype in ("f32", "bf16", "q8", "q4"):
        model = export(d, os.path.join(tmp, f"m_{wtype}.bin"), wtype)
        size = os.path.getsize(model)
        base, base_e = engine_logits(model, ids, context=256, **shape)
        # the cache's own report: a slot's bytes, and what the rest of --mem holds (other weights, working buffers)
        r = run([ENGINE, model, "--bench", "-c", "256", "--chunk", "4", "--threads", "2", "--mem", str(size - 1)])
        check(r.returncode == 0, f"--bench with the expert cache failed:\n{r.stderr[-2000:]}")
        rep = json.loads(r.stdout.strip().splitlines()[-1])
        slot, other = rep["cache_slot_bytes"], rep["cache_other_bytes"]
        budgets = [other + slots * slot for slots in (12, 8, 3, 1)]  # 3, 1: waves in a 4-token chunk
        budgets = [mem for mem in budgets if mem < size]  # (a small file has no room for the larger ones)
        check(len(budgets) >= 2 and budgets[-2] == other + 3 * slot, f"{wtype}: no room for 3 slots below {size}")
        r = run([ENGINE, model, "-i", "x", "-n", "1", "-c", "256", "--chunk", "4", "--mem", str(other + slot - 1)])
        check(r.returncode != 0 and "too little" in r.stderr, f"{wtype}: a slot short of one expert: {r.stderr[-500:]}")
        for mem in budgets:
            for chunk, policy in ((4, "lru"), (4, "usage"), (1, "lru")):
                got, got_e = engine_logits(model, ids, chunk=chunk, context=256,
                                           extra=("--mem", str(mem), "--cache-policy", policy), **shape)
                check(np.array_equal(got, base) and np.array_equal(got_e, base_e),
                      f"{wtype}, --mem {mem}, chunk {chunk}, --cache-policy {policy}: differs from the file in memory "
                      f"by up to {np.abs(got - base).max():.3g}")
                n += 1
        got, _ = engine_logits(model, ids, engine=DEBUG_ENGINE, chunk=4, context=256, extra=("--mem", str(mem)),
                               **shape)  # ASan, UBSan
        check(np.array_equal(got, engine_logits(model, ids, engine=DEBUG_ENGINE, **shape)[0]), f"{wtype}: debug build differs")
        r = run([ENGINE, model, "-i", "Hello world", "-n", "20", "-t", "0", "-c", "256", "--mem", str(mem), "--chunk", "4",
                 "--expert-stats"])
        check(r.returncode == 0 and re.search(r"expert cache: \d+ slots .* hit rate [\d.]+% .* prefetch accuracy [\d.]+%",
                                              r.stdout + r.stderr), f"no cache report:\n{r.stdout}\n{r.stderr}")
    expect_error([ENGINE, model, "-i", "x", "--mem", "4K"], "--mem")
    expect_error([ENGINE, model, "-i", "x", "--mem", "12Q"], "--mem")
    return f"{n} runs identical (4 formats, budgets of 1 to 12 slots of 24, chunked and token by token, both policies)"
