#!/usr/bin/env python3
"""
make quality: how much each weight format loses, as KL divergence from the
same model's lossless bf16 run, and how often the most likely token agrees.

Two models, each on text it was not trained on (demo/heldout.txt: the Book of
Revelation, held out from the demo model's training):
  demo   the trained demo model (demo/model), all of the text;
  bench  the random checkpoint with Mixtral-8x7B layer shapes that make bench
         generates (2 layers), the text's first 60 verses (18 windows).
Each format runs `mixtral --perplexity TEXT -c 128` with --kl-divergence
against the bf16 file's --kl-base. Positions scored: the second half of each
window, as llama.cpp's perplexity tool scores them.

Our formats: bf16 with --bf16-activations (activations rounded to bf16 for
vdpbf16ps), q8, q4, q3 and q2, the last two with an importance matrix our
engine makes from a calibration text (--calib, another text than the scored
one: by default the GPL-3's text, /usr/share/common-licenses/GPL-3).

With --llama-perplexity (llama.cpp's) and GGUFs of the same models (--gguf
MODEL:NAME=PATH, one of them NAME=bf16, the base), each GGUF is measured the
same way with llama-perplexity's --kl-divergence, in the same run; the same
for ik_llama.cpp with --ik-perplexity and --ik-gguf. For every peer file, ours
is exported at its exact size (export.py --fit, with our importance matrix)
and the table gives our KL over the peer's:

    python3 bench/quality.py [--llama-perplexity PATH --gguf bench:bf16=B.gguf --gguf bench:IQ2_XS=Q.gguf ...]
        [--ik-perplexity PATH --ik-gguf bench:bf16=B.gguf --ik-gguf bench:IQ2_KS=K.gguf] [--models bench]
"""
import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench  # noqa: E402

CACHE = os.path.join(ROOT, ".cache", "quality")
TEXT = os.path.join(ROOT, "demo", "heldout.txt")
CALIB = "/usr/share/common-licenses/GPL-3"
CTX = 128


def export(src, out, wtype, extra=()):
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(os.path.join(ROOT, "export.py")):
        bench.sh([sys.executable, os.path.join(ROOT, "export.py"), src, out, "--type", wtype, *extra])
    return out


def importance(engine, bf16, calib, out):
    """Our importance matrix of a model, from its bf16 file on the calibration text (once)."""
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(bf16):
        bench.sh([engine, bf16, "--perplexity", calib, "-c", str(CTX), "--imatrix", out])
    return out


def ours(models, text, engine):
    """KL rows for our formats of each model: (model, format, bytes, kl mean, kl p99, top-1, ppl)."""
    rows = []
    for name, files in models.items():
        base = os.path.join(CACHE, f"{name}.kl")
        out, _ = bench.sh([engine, files["bf16"], "--perplexity", text[name], "-c", str(CTX), "--kl-base", base])
        ppl = float(re.search(r"perplexity ([0-9.]+)", out).group(1))
        rows.append((name, "bf16 (base)", os.path.getsize(files["bf16"]), 0.0, 0.0, 1.0, ppl))
        for fmt in [f for f in files if f != "bf16"]:
            path, extra = files[fmt] if isinstance(files[fmt], tuple) else (files[fmt], [])
            out, _ = bench.sh([engine, path, "--perplexity", text[name], "-c", str(CTX), "--kl-divergence", base, *extra])
            r = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
            rows.append((name, fmt, os.path.getsize(path), r["kl_mean"], r["kl_p99"], r["top1"], r["perplexity"]))
        os.remove(base)
    return rows


def peers(tool, ggufs, text, engine_name="llama.cpp"):
    """The same measure with llama.cpp's (or ik_llama.cpp's) llama-perplexity for each GGUF."""
    rows = []
    for model, files in ggufs.items():
        if "bf16" not in files:
            sys.exit(f"quality: --gguf for {model} needs a bf16 file, the base")
        base = os.path.join(CACHE, f"{model}-{engine_name}.kld")
        common = ["-f", text[model], "-c", str(CTX), "-t", str(os.cpu_count() or 1), "-b", str(CTX)]
        bench.sh([tool, "-m", files["bf16"], *common, "--kl-divergence-base", base])
        for name, path in files.items():
            if name == "bf16":
                continue
            out, err = bench.sh([tool, "-m", path, *common, "--kl-divergence-base", base, "--kl-divergence"])
            log = out + err
            kl = float(re.search(r"Mean\s+KLD:\s+([0-9.]+)", log).group(1))
            p99 = re.search(r"99\.0%\s+KLD:\s+([0-9.]+)", log)
            top = float(re.search(r"Same top p:\s+([0-9.]+)", log).group(1)) / 100
            ppl = re.search(r"Mean\s+PPL\(Q\)\s*:\s+([0-9.]+)", log)
            rows.append((model, f"{engine_name} {name}", os.path.getsize(path), kl, float(p99.group(1)) if p99 else float("nan"),
                         top, float(ppl.group(1)) if ppl else float("nan")))
        os.remove(base)
    return rows


KV_CONTEXTS = (4096, 8192)
PEER_KV = {"f16": "f16", "q8": "q8_0", "q4": "q4_0"}


def kv_quality(engine, model, text, peers_kv, ours=True, contexts=KV_CONTEXTS):
    """What each KV cache type loses: our --kv bf16, q8, q4 against --kv f32, and each peer's -ctk/-ctv
    against its own f16 cache (peers_kv: [(name, llama-perplexity, GGUF, extra args)]), on the same text
    at -c 4096 and 8192 (the second halves of each window scored)."""
    rows = []
    for ctx in contexts:
        base = os.path.join(CACHE, f"kv{ctx}.kl")
        if ours:
            bench.sh([engine, model, "--perplexity", text, "-c", str(ctx), "--kv", "f32", "--kl-base", base])
            for kv in ("bf16", "q8", "q4"):
                out, _ = bench.sh([engine, model, "--perplexity", text, "-c", str(ctx), "--kv", kv, "--kl-divergence", base])
                r = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])
                rows.append((ctx, f"ours --kv {kv}", r["kl_mean"], r["kl_p99"], r["top1"]))
            os.remove(base)
        for name, tool, gguf, extra in peers_kv:
            base = os.path.join(CACHE, f"kv{ctx}-{name}.kld")
            fa = ["-fa", "1"] if name == "ik_llama.cpp" else ["-fa"]  # (flash attention: quantized V caches need it)
            common = ["-m", gguf, "-f", text, "-c", str(ctx), "-b", "512", "-t", str(os.cpu_count() or 1), *fa, *extra]
            bench.sh([tool, *common, "-ctk", "f16", "-ctv", "f16", "--kl-divergence-base", base])
            rotations = [[], ["-khad", "-vhad"]] if name == "ik_llama.cpp" else [[]]  # (ik_llama.cpp's Hadamard option)
            for kv in ("q8", "q4"):
                for rot in rotations:
                    out, err = bench.sh([tool, *common, *rot, "-ctk", PEER_KV[kv], "-ctv", PEER_KV[kv], "--kl-divergence-base",
                                         base, "--kl-divergence"])
                    log = out + err
                    kl = float(re.search(r"Mean\s+KLD:\s+([0-9.]+)", log).group(1))
                    p99 = re.search(r"99\.0%\s+KLD:\s+([0-9.]+)", log)
                    top = float(re.search(r"Same top p:\s+([0-9.]+)", log).group(1)) / 100
                    what = f"{name} -ctk/-ctv {PEER_KV[kv]}" + (" -khad -vhad" if rot else "")
                    rows.append((ctx, what, kl, float(p99.group(1)) if p99 else float("nan"), top))
            os.remove(base)
    print()
    print(f"KV cache types: KL divergence from the same engine's f32 (ours) or f16 (peers') cache, the bench model in q8 "
          f"(Q8_0 for the peers), {os.path.basename(text)}, second halves of each window scored")
    print(f"{'-c':>5} {'KV cache':34} {'mean KL':>10} {'99% KL':>10} {'top-1':>7}")
    for ctx, what, kl, p99, top in rows:
        print(f"{ctx:5d} {what:34} {kl:10.6f} {p99:10.6f} {top:7.4f}")


def parse_ggufs(specs):
    out = {}
    for g in specs:
        model, rest = g.split(":", 1)
        name, path = rest.split("=", 1)
        out.setdefault(model, {})[name] = path
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-perplexity", help="llama.cpp's llama-perplexity, to measure its formats beside ours")
    ap.add_argument("--gguf", action="append", default=[], metavar="MODEL:NAME=PATH",
                    help="a GGUF of the demo or bench model; NAME bf16 is the base")
    ap.add_argument("--ik-perplexity", help="ik_llama.cpp's llama-perplexity, for --ik-gguf files")
    ap.add_argument("--ik-gguf", action="append", default=[], metavar="MODEL:NAME=PATH",
                    help="a GGUF for ik_llama.cpp (its own types); NAME bf16 is the base")
    ap.add_argument("--calib", default=CALIB, help="the calibration text of our importance matrix")
    ap.add_argument("--models", default="demo,bench", help="which models: demo, bench or both")
    ap.add_argument("--kv", action="store_true", help="the KV cache types instead of the weight formats (bench model, "
                    "q8; with --kv-gguf the peers' too)")
    ap.add_argument("--kv-gguf", help="the Q8_0 GGUF of the bench model for the peers' KV cache runs")
    ap.add_argument("--kv-peer-args", default="", help="extra arguments for the peers' KV runs")
    ap.add_argument("--kv-peers-only", action="store_true", help="with --kv: only the peers (ours measured before)")
    ap.add_argument("--kv-contexts", default="4096,8192", help="with --kv: the contexts (-c) measured")
    a = ap.parse_args()
    os.makedirs(CACHE, exist_ok=True)
    engine = os.path.join(ROOT, "mixtral")
    if a.kv:
        models = bench.ensure_models(["q8"])
        peers_kv = [(name, tool, a.kv_gguf, a.kv_peer_args.split()) for name, tool in
                    (("llama.cpp", a.llama_perplexity), ("ik_llama.cpp", a.ik_perplexity)) if tool and a.kv_gguf]
        # llama.cpp's perplexity needs twice the context in tokens: heldout.txt and the GPL-3's text
        long_text = os.path.join(CACHE, "kv-text.txt")
        with open(long_text, "w") as f:
            f.write(open(TEXT).read() + "\n" + open(CALIB).read())
        kv_quality(engine, models["q8"], long_text, peers_kv, not a.kv_peers_only,
                   [int(c) for c in a.kv_contexts.split(",")])
        return
    which = a.models.split(",")
    short = os.path.join(CACHE, "heldout-start.txt")
    with open(TEXT) as f:
        open(short, "w").write("".join(f.readlines()[:60]))
    text = {"demo": TEXT, "bench": short}
    sources = {"demo": os.path.join(ROOT, "demo", "model"), "bench": os.path.join(bench.CACHE, "hf")}
    models = {}
    if "bench" in which:
        models["bench"] = bench.ensure_models(["bf16", "q8", "q4"])
    if "demo" in which:
        models["demo"] = {t: export(sources["demo"], os.path.join(CACHE, f"demo-{t}.bin"), t) for t in ("bf16", "q8", "q4")}
    ggufs, ik_ggufs = parse_ggufs(a.gguf), parse_ggufs(a.ik_gguf)
    for name, files in models.items():
        files["bf16 --bf16-activations"] = (files["bf16"], ["--bf16-activations"])
        imatrix = importance(engine, files["bf16"], a.calib, os.path.join(CACHE, f"{name}.imatrix"))
        with_im = ("--imatrix", imatrix)
        for t in ("q3", "q2"):
            files[t] = export(sources[name], os.path.join(CACHE, f"{name}-{t}.bin"), t, with_im)
        for peer, group in (("llama.cpp", ggufs.get(name, {})), ("ik_llama.cpp", ik_ggufs.get(name, {}))):
            for fmt, path in group.items():
                if fmt != "bf16":
                    size = os.path.getsize(path)
                    files[f"fit {peer} {fmt}"] = export(sources[name], os.path.join(CACHE, f"{name}-fit-{fmt}.bin"), "q4",
                                                        ("--fit", str(size), *with_im))
    rows = ours(models, text, engine)
    if a.llama_perplexity and ggufs:
        rows += peers(a.llama_perplexity, {m: g for m, g in ggufs.items() if m in models}, text)
    if a.ik_perplexity and ik_ggufs:
        rows += peers(a.ik_perplexity, {m: g for m, g in ik_ggufs.items() if m in models}, text, "ik_llama.cpp")
    print()
    print(f"KL divergence from the same model's bf16 run (each engine its own), text: demo/heldout.txt (bench: its "
          f"first 60 verses), windows of -c {CTX}, second halves scored; importance matrices from {a.calib}")
    print(f"{'model':6} {'format':30} {'file GB':>8} {'mean KL':>9} {'99% KL':>9} {'top-1':>7} {'ppl':>10} {'ours/peer KL':>13}")
    by = {(r[0], r[1]): r for r in rows}
    for model, fmt, size, kl, p99, top, ppl in sorted(rows, key=lambda r: (r[0], -r[2])):
        ratio = ""
        if fmt.startswith(("llama.cpp ", "ik_llama.cpp ")) and (model, "fit " + fmt) in by:
            ratio = f"{by[(model, 'fit ' + fmt)][3] / kl:13.2f}" if kl > 0 else ""
        print(f"{model:6} {fmt:30} {size / 1e9:8.3f} {kl:9.5f} {p99:9.5f} {top:7.4f} {ppl:10.3f} {ratio}")


if __name__ == "__main__":
    main()
