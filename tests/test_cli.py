"""
The command line: prompts, sampling, stop strings, Ctrl-C, summaries, options that
contradict each other, the README's sample.
"""
from harness import *  # noqa: F401,F403


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
    st = next(os.path.join(SMALL["hf"], f) for f in os.listdir(SMALL["hf"]) if f.endswith(".safetensors"))
    expect_error([ENGINE, st], "safetensors", "export.py")
    expect_error([ENGINE, SMALL["hf"]], "folder", "export.py")
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


@test
def context_with_a_sliding_window(tmp):
    """With a sliding window the context the user gets is still -c (the window only bounds the KV
    cache): chat reports 'context N/-c', --perplexity scores windows of -c tokens, and generation
    stops when -c positions are full (before, all three saw 2,147,483,647 positions)."""
    d, cfg, _, _ = random_model(tmp, 5, 1, 0, heads=4, kv_heads=2, experts=4, top_k=2, window=8)
    model = export(d, os.path.join(tmp, "w.bin"), "bf16")
    r = run([ENGINE, model, "-m", "chat", "-c", "48", "-n", "4", "-t", "0"], input="Hello there\n")
    check(r.returncode == 0 and re.search(r"context \d+/48\]", r.stderr) and "2147483647" not in r.stderr,
          f"chat's context line:\n{r.stderr[-800:]}")
    text = os.path.join(tmp, "t.txt")
    open(text, "w").write(open(os.path.join(ROOT, "demo", "heldout.txt")).read()[:600])
    r = run([ENGINE, model, "--perplexity", text, "-c", "16"])
    check(r.returncode == 0 and "windows of -c 16" in r.stdout, f"--perplexity -c 16:\n{r.stdout}{r.stderr[-500:]}")
    r = run([ENGINE, model, "-i", "Once", "-c", "24", "-n", "100", "-t", "0"])
    check(r.returncode == 0 and "context of 24 tokens is full" in r.stderr, f"-c 24, 100 steps:\n{r.stderr[-500:]}")
    return "chat, --perplexity and generation keep to -c 48/16/24 with a window of 8"


@test
def tiny_temperature_is_greedy(tmp):
    """A temperature so small that the logits over it overflow (-t 1.2e-38) gives the greedy text under
    every sampler setting (it printed token 0, ' ⁇ ', from NaN probabilities before)."""
    model = small_model(tmp)
    settings = [[], ["--top-k", "5"], ["--min-p", "0.1"], ["-p", "1"], ["--repeat-penalty", "1.3"],
                ["--top-k", "3", "--min-p", "0.05", "-p", "0.5", "--repeat-penalty", "0.8"]]
    for extra in settings:
        runs = [run([ENGINE, model, "-i", "Once upon a time", "-n", "12", "-q", "-s", "1", "-t", t, *extra])
                for t in ("0", "1.2e-38", "1e-30")]
        for r in runs:
            check(r.returncode == 0, f"{extra}: {r.stderr[-300:]}")
        check(runs[1].stdout == runs[0].stdout and runs[2].stdout == runs[0].stdout,
              f"{extra}: -t 1.2e-38 gives {runs[1].stdout!r}, -t 1e-30 {runs[2].stdout!r}; greedy {runs[0].stdout!r}")
    return f"{len(settings)} sampler settings: -t 1.2e-38 and 1e-30 print the greedy text"


@test
def threads_beyond_the_cpus(tmp):
    """--threads beyond the CPUs this process may use runs as many threads as it has CPUs and says so
    once (16 threads on 2 CPUs ran the demo 7.6x slower before); within them, no message."""
    model = small_model(tmp)
    cpus = len(os.sched_getaffinity(0))
    r = run([ENGINE, model, "-i", "Hello", "-n", "4", "-t", "0", "--threads", str(cpus + 14)])
    check(r.returncode == 0 and r.stderr.count(f"is more than the {cpus} CPUs") == 1
          and f"{cpus} threads, context" in r.stderr, f"--threads {cpus + 14}:\n{r.stderr[-600:]}")
    if shutil.which("taskset") and cpus > 1:
        r = run(["taskset", "-c", "0", ENGINE, model, "-i", "Hello", "-n", "4", "-t", "0", "--threads", "4"])
        check(r.returncode == 0 and "more than the 1 CPUs" in r.stderr and "1 threads, context" in r.stderr,
              f"taskset -c 0, --threads 4:\n{r.stderr[-600:]}")
    r = run([ENGINE, model, "-i", "Hello", "-n", "4", "-t", "0", "--threads", str(cpus)])
    check(r.returncode == 0 and "more than" not in r.stderr, r.stderr[-400:])
    return f"--threads {cpus + 14} runs {cpus}, said once; taskset to 1 CPU runs 1"


@test
def install_and_uninstall(tmp):
    """make install PREFIX=...: mixtral and mixtral-export run from any folder (the export of the demo
    model through the installed command loads in the installed program); make uninstall removes
    what it put there."""
    prefix = os.path.join(tmp, "prefix")
    r = run(["make", "-s", "-C", ROOT, "install", f"PREFIX={prefix}", f"PYTHON={PYTHON}"])
    check(r.returncode == 0, f"make install: {r.stderr[-500:]}")
    out = os.path.join(tmp, "demo.bin")
    r = run([os.path.join(prefix, "bin", "mixtral-export"), os.path.join(ROOT, "demo", "model"), out, "--type", "q8"],
            cwd="/")
    check(r.returncode == 0, f"installed mixtral-export: {r.stderr[-500:]}")
    r = run([os.path.join(prefix, "bin", "mixtral"), out, "-i", "And it came", "-n", "4", "-t", "0", "-q"], cwd="/")
    check(r.returncode == 0 and r.stdout.startswith("And it came"), f"installed mixtral: {r.stderr[-500:]}")
    r = run(["make", "-s", "-C", ROOT, "uninstall", f"PREFIX={prefix}"])
    left = [os.path.join(d, f) for d, _, fs in os.walk(prefix) for f in fs]
    check(r.returncode == 0 and not left, f"make uninstall left {left}")
    return "installed, run from /, uninstalled"


@test
def performance_cores_by_default(tmp):
    """On a hybrid CPU whose performance cores Linux lists (/sys/devices/cpu_core/cpus), the default
    threads are those of them this process may use; --threads still decides; without the list, all
    usable CPUs. Checked with a build that reads a fake sysfs tree (-DMIXTRAL_SYSFS)."""
    sysfs = os.path.join(tmp, "sys")
    exe = os.path.join(tmp, "mixtral-sysfs")
    r = run([CC, "-O1", *BUILD_FLAGS, f'-DMIXTRAL_SYSFS="{sysfs}"', "-o", exe, *SOURCES, "-lm", "-lpthread"])
    check(r.returncode == 0, r.stderr[-1000:])
    model = small_model(tmp)
    cpus = sorted(os.sched_getaffinity(0))

    def threads(*extra):
        r = run([exe, model, "-i", "x", "-n", "1", *extra])
        m = re.search(r"(\d+) threads, context", r.stderr)
        check(r.returncode == 0 and m, r.stderr[-500:])
        return int(m.group(1))

    check(threads() == len(cpus), "no cpu_core list: not all usable CPUs")
    os.makedirs(os.path.join(sysfs, "devices", "cpu_core"))
    lists = {f"{cpus[0]}": 1, f"{cpus[0]}-{cpus[0]}": 1, f"{cpus[0]},100-103": 1, "200-203": len(cpus)}
    if len(cpus) >= 2:
        lists[f"{cpus[0]}-{cpus[1]}"] = 2 if cpus[1] == cpus[0] + 1 else 1
    for text, want in lists.items():
        open(os.path.join(sysfs, "devices", "cpu_core", "cpus"), "w").write(text + "\n")
        got = threads()
        check(got == want, f"cpu_core/cpus {text!r}: {got} threads by default, expected {want}")
    check(threads("--threads", str(len(cpus))) == len(cpus), "--threads did not decide")
    return f"{len(lists)} performance-core lists: default threads as listed and usable; --threads decides"


@test
def without_proc(tmp):
    """With an empty /proc (a container without it; here a mount namespace with a tmpfs over /proc),
    a run prints the same text as with it, and picks its defaults without it: the file mapped (no
    memory figure to read it in by), the usable CPUs as threads, a load line; --mem less than the
    file still gives the expert cache, with the same text."""
    if not shutil.which("unshare") or run(["unshare", "-m", "true"]).returncode != 0:
        raise Skip("no mount namespace here (unshare -m needs root)")
    model = small_model(tmp)
    size = os.path.getsize(model)
    args = [model, "-i", "Once upon a time", "-n", "12", "-t", "0", "-c", "256", "--chunk", "4", "--threads", "2"]
    want = run([ENGINE, *args])
    check(want.returncode == 0, want.stderr[-300:])
    shell = 'mount -t tmpfs tmpfs /proc && exec "$@"'
    got = run(["unshare", "-m", "sh", "-c", shell, "sh", ENGINE, *args[:-2]])
    cpus = len(os.sched_getaffinity(0))
    check(got.returncode == 0 and got.stdout == want.stdout, f"without /proc: {got.stdout!r} vs {want.stdout!r}\n{got.stderr}")
    check(f"mapped) in" in got.stderr and f"{cpus} threads" in got.stderr, f"defaults without /proc:\n{got.stderr}")
    r = run([ENGINE, model, "--bench", "-c", "256", "--chunk", "4", "--threads", "2", "--mem", str(size - 1)])
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    mem = rep["cache_other_bytes"] + 3 * rep["cache_slot_bytes"]
    got = run(["unshare", "-m", "sh", "-c", shell, "sh", ENGINE, *args, "--mem", str(mem), "--expert-stats"])
    check(got.returncode == 0 and got.stdout.split("\n\nexpert usage")[0] == want.stdout.rstrip("\n")
          and "expert cache: 3 slots" in got.stdout, f"the expert cache without /proc:\n{got.stdout}\n{got.stderr}")
    return "same text without /proc, mapped, all CPUs; the expert cache too"


@test
def make_run_without_numpy(tmp):
    """make run on a fresh clone with a Python that has no numpy (the demo's bf16 export needs none):
    it builds, exports and prints the README's sample; the bf16 file equals the one export.py
    writes with numpy."""
    plain = None
    for cand in ("python3", "/usr/local/bin/python3", "/usr/bin/python3"):
        path = shutil.which(cand)
        if path and run([path, "-c", "import numpy"]).returncode != 0:
            plain = path
            break
    if not plain:
        raise Skip("every Python here has numpy")
    clone = os.path.join(tmp, "clone")
    r = run(["git", "clone", "-q", ROOT, clone])
    if r.returncode != 0:
        raise Skip(f"cannot clone the checkout: {r.stderr.strip()[:200]}")
    r = run(["make", "-s", "-C", clone, "run", f"PYTHON={plain}"], timeout=900)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    sample = re.search(r"`make run` prints[^\n]*\n\n```\n(.*?)```", readme, re.S).group(1)
    check(r.returncode == 0 and r.stdout.endswith(sample), f"make run with {plain} (no numpy): exit {r.returncode}\n"
          f"{r.stdout[-400:]}\n{r.stderr[-800:]}")
    with_numpy = export(os.path.join(ROOT, "demo", "model"), os.path.join(tmp, "np.bin"), "bf16")
    check(open(with_numpy, "rb").read() == open(os.path.join(clone, ".cache", "demo-bf16.bin"), "rb").read(),
          "the bf16 file without numpy differs from the one with it")
    return f"make run with {plain}: the README's sample; the same file as with numpy"


def filtered_distribution(logits, temperature, top_k, min_p, top_p):
    """The distribution the sampler options define, written from the help text with numpy in float64:
    softmax at the temperature, then top-k, min-p and top-p in that order, each on what the one
    before kept (ties by id), renormalised. Also how close the nearest filter boundary is, relative
    to the quantity it compares (a draw there may go either way in float32)."""
    p = np.exp((logits.astype(np.float64) - logits.max()) / temperature)
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    keep, margin = order, 1.0
    if top_k > 0:
        keep = keep[:top_k]
        if top_k < len(order):
            margin = min(margin, (p[order[top_k - 1]] - p[order[top_k]]) / p[order[top_k - 1]])
    if min_p > 0:
        floor = min_p * p[order[0]]
        margin = min([margin] + [abs(p[i] - floor) / floor for i in keep])
        keep = [i for i in keep if p[i] >= floor]
    if 0 < top_p < 1:
        mass = sum(p[i] for i in keep)
        cum, out = 0.0, []
        for i in keep:
            margin = min(margin, abs(cum - top_p * mass) / mass)
            out.append(i)
            cum += p[i]
            if cum > top_p * mass:
                break
        margin = min(margin, abs(cum - top_p * mass) / mass)
        keep = out
    q = np.zeros_like(p)
    q[keep] = p[keep]
    return q / q.sum(), margin


@test
def sampler_draws_the_filtered_distribution(tmp):
    """tests/sample_draws (mixtral.c's sampler) draws from logits many times; the counts must be those of
    the distribution the options define (filtered_distribution, numpy): never a token a filter drops,
    and each kept token within 6 standard deviations of its share (and 4 draws). Vocabularies of 1,000 and 32,000
    tokens, flat and peaked, every filter alone and together. The same counts from the portable build
    and the AVX2 build, 1,000 tokens (the sampler's vector code gives the same bits everywhere)."""
    exe = os.path.join(ROOT, "tests", "sample_draws")
    check(os.path.exists(exe), f"{exe} is missing; make test builds it")
    builds = {"native": exe}
    others = [f for f in SOURCES if not f.endswith("mixtral.c")]
    for name, flags in (("portable", []), ("avx2", AVX2)):
        if name == "avx2" and not (platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma", "f16c"} <= cpu_flags()):
            continue
        b = os.path.join(tmp, "sample_draws-" + name)
        r = run([CC, "-O2", *flags, *BUILD_FLAGS, "-Wno-unused-function", "-I" + ROOT, "-o", b,
                 os.path.join(HERE, "sample_draws.c"), *others, "-lm", "-lpthread"])
        check(r.returncode == 0, f"sample_draws build {name} failed:\n{r.stderr}")
        builds[name] = b
    settings = [(1.0, 0, 0.0, 1.0), (0.8, 0, 0.0, 0.9), (1.0, 40, 0.0, 1.0), (1.3, 0, 0.05, 1.0),
                (0.7, 0, 0.0, 0.5), (1.0, 5, 0.02, 0.8), (2.0, 100, 0.0, 0.95)]
    rng = np.random.default_rng(11)
    done = 0
    for vocab, scale, draws in ((1000, 1.5, 50000), (1000, 4.0, 100000), (32000, 3.0, 5000)):
        for temperature, top_k, min_p, top_p in settings:
            for _ in range(20):  # logits whose filter boundaries are not on a knife's edge
                logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
                want, margin = filtered_distribution(logits, temperature, top_k, min_p, top_p)
                if margin > 1e-5:
                    break
            path = os.path.join(tmp, "logits.f32")
            logits.tofile(path)
            args = [path, str(draws), str(temperature), str(top_k), str(min_p), str(top_p), "7"]
            what = f"vocab {vocab} scale {scale}: -t {temperature} --top-k {top_k} --min-p {min_p} -p {top_p}"
            counts = {}
            for name, b in builds.items():
                if name != "native" and vocab > 1000:  # (the portable build's sampler is slow)
                    continue
                r = run([b] + args)
                check(r.returncode == 0, f"{what}: sample_draws ({name}) failed:\n{r.stderr}")
                counts[name] = np.array([int(x) for x in r.stdout.split()])
            got = counts["native"]
            for name, c in counts.items():
                check(np.array_equal(c, got), f"{what}: the {name} build drew other tokens than the native build")
            dropped = np.nonzero((want == 0) & (got > 0))[0]
            check(len(dropped) == 0, f"{what}: drew tokens the filters drop, first {dropped[:5].tolist()} "
                                     f"({got[dropped[:5]].tolist()} times)")
            # 6 standard deviations, and a few draws more for the many tokens expected less than once
            expected = want * draws
            bad = np.nonzero(np.abs(got - expected) > 6 * np.sqrt(expected * (1 - want)) + 4)[0]
            check(len(bad) == 0, f"{what}: frequencies off, first token {bad[:1].tolist()}: drawn "
                                 f"{got[bad[:1]].tolist()} times, expected {expected[bad[:1]].tolist()}")
            done += 1
    return f"{done} vocabularies x settings; builds {', '.join(builds)} draw the same tokens"
