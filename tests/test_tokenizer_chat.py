"""
The tokenizer against the sentencepiece library, and the chat format against
mistral-common's rules: conversations, sessions, conversation files.
"""
from harness import *  # noqa: F401,F403


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


def mistral_common_ids(sp, conv, v3, open_end=False):
    """mistral-common's instruct format, written from its rule independently of mixtral.c: every
    assistant message ends with EOS, a final one only stays open when marked "prefix": true
    (open_end)."""
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
            ids += sp.encode(content) + ([2] if i != last or not open_end else [])
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
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(SMALL["hf"], "tokenizer.model"))
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


@test
def conversation_endings(tmp):
    """A conversation file whose last message is the assistant's is complete, its answer closed
    with EOS, as mistral-common and apply_chat_template format it ([user "2+2?", assistant "4"]
    ends ... 28781, 2); "prefix": true on that message or "continue_final_message": true on the file
    leaves it open to be continued. In chat, a complete file waits for the user's next turn; with
    nothing on standard input it says in one line how to go on, and exits 0; with a line, that turn
    follows the EOS."""
    import sentencepiece
    model = tokenizer_model("mistral-v1.model")
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(ROOT, "tokenizers", "mistral-v1.model"))
    base = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    closed = mistral_common_ids(sp, [("user", "2+2?"), ("assistant", "4")], False)
    check(closed[-2:] == [28781, 2], f"the reference itself: {closed}")
    cases = [(base, closed), (dict(base, continue_final_message=True), closed[:-1])]
    prefixed = {"messages": [base["messages"][0], dict(base["messages"][1], prefix=True)]}
    cases.append((prefixed, closed[:-1]))
    for i, (conv, want) in enumerate(cases):
        path = os.path.join(tmp, f"e{i}.json")
        json.dump(conv, open(path, "w"))
        got = [int(x) for x in run([ENGINE, model, "--chat-ids-file", path]).stdout.split()]
        check(got == want, f"{json.dumps(conv)}:\n  mixtral.c {got}\n  expected  {want}")
    small = small_model(tmp)
    path = os.path.join(tmp, "complete.json")
    json.dump(base, open(path, "w"))
    r = run([ENGINE, small, "-m", "chat", "--chat-file", path, "-n", "3", "-t", "0"], input="")
    check(r.returncode == 0 and "Assistant: " not in r.stdout and r.stderr.count("is complete") == 1
          and "prefix" in r.stderr, f"a complete conversation, nothing on stdin:\n{r.stdout}\n{r.stderr}")
    r = run([ENGINE, small, "-m", "chat", "--chat-file", path, "-n", "3", "-t", "0"], input="and 3+3?\n")
    check(r.returncode == 0 and r.stdout.count("Assistant: ") == 1 and "is complete" not in r.stderr,
          f"a complete conversation, then a turn:\n{r.stdout}\n{r.stderr}")
    return "closed with EOS unless prefix or continue_final_message; chat waits for the user, or says how to go on"


@test
def chat_details(tmp):
    """Blank lines are not turns; a conversation file ending with the assistant's message marked
    "prefix": true continues it (no EOS; its text printed, then more); --expert-stats after every
    chat reply, counting that turn's tokens."""
    import sentencepiece
    model = small_model(tmp)
    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(SMALL["hf"], "tokenizer.model"))
    r = run([ENGINE, model, "-m", "chat", "-n", "4", "-t", "0"], input="\n   \nhello\n\t\n")
    check(r.returncode == 0 and r.stderr.count("new tokens in") == 1 and r.stdout.count("Assistant: ") == 1,
          f"blank lines sent as turns:\n{r.stdout}\n{r.stderr}")
    conv = os.path.join(tmp, "c.json")
    json.dump({"messages": [{"role": "user", "content": "Say it"},
                            {"role": "assistant", "content": "Once upon", "prefix": True}]}, open(conv, "w"))
    ids = [int(x) for x in run([ENGINE, model, "--chat-ids-file", conv]).stdout.split()]
    want = [1] + sp.encode("[INST] Say it [/INST]") + sp.encode("Once upon")
    check(ids == want, f"final assistant message: {ids}, expected {want} (no EOS)")
    # the continuation is the greedy continuation of those ids, printed after the message's text
    W, cfg = reference.load_safetensors(SMALL["hf"]), hf.make_config()
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
