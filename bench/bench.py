#!/usr/bin/env python3
"""
make bench: decode and prefill speed against the machine's memory bandwidth.

Makes once (cached in .cache/bench, outside git) a random checkpoint with
Mixtral-8x7B layer shapes and 2 layers (6.3 GB in bf16, streamed to disk),
exports it to bf16, q8 and q4, and runs `mixtral --bench` for each format and
thread count, each run between two measurements of the sustained read
bandwidth (bench/bandwidth, same thread count): the run's GB/s is compared with
their mean, two numbers taken under the same load on this shared machine.
Each row is the median of --repeat rounds, column by column.

With peers (a llama.cpp and/or an ik_llama.cpp llama-bench, and GGUFs of the
same checkpoint: .cache/bench/hf is the Hugging Face folder to convert), each
round also runs them (`llama-bench -p 128 -n 64`, ik_llama.cpp with -rtr 1)
right after ours, and the table gives the medians of the per-round ratios.

    python3 bench/bench.py [--threads 1,2] [--types bf16,q8,q4] [--repeat 3]
        [--llama-bench PATH] [--ik-bench PATH] [--gguf q8=Q8_0.gguf --gguf q4=Q4_0.gguf]
"""
import argparse
import json
import os
import re
from statistics import median
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(ROOT, ".cache", "bench")
sys.path.insert(0, os.path.join(ROOT, "tests"))

# Mixtral-8x7B: the real layer shapes, 2 of its 32 layers
SHAPE = dict(dim=4096, hidden_dim=14336, layers=2, heads=32, kv_heads=8, experts=8, top_k=2, vocab=32000)
FULL_LAYERS = 32


def sh(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{r.stderr}")
    return r.stdout, r.stderr


def last_json(text):
    return json.loads([l for l in text.splitlines() if l.startswith("{")][-1])


def ensure_models(types):
    hf_dir = os.path.join(CACHE, "hf")
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        import hf_checkpoint as hf
        print("bench: writing the Mixtral-8x7B-shaped 2-layer checkpoint (6.3 GB, once)...", flush=True)
        cfg = hf.make_config(**SHAPE)
        hf.write_checkpoint(hf_dir + ".partial", cfg, dtype="bf16", shards=3, seed=0)
        os.replace(hf_dir + ".partial", hf_dir)
    paths = {}
    for t in types:
        path = os.path.join(CACHE, f"{t}.bin")
        if os.path.exists(path):
            head = open(path, "rb").read(12)
            if head[:8] != b"MIXTRALC" or int.from_bytes(head[8:12], "little") != export_version():
                os.remove(path)  # an older format: export again
        if not os.path.exists(path):
            print(f"bench: exporting {t}...", flush=True)
            sh([sys.executable, os.path.join(ROOT, "export.py"), hf_dir, path, "--type", t])
        paths[t] = path
    return paths


def export_version():
    for line in open(os.path.join(ROOT, "export.py")):
        if line.startswith("VERSION = "):
            return int(line.split("=")[1])
    return -1


def peer_run(tool, gguf, threads, ik):
    """One llama-bench run (128-token prompt, 64 generated): (prompt tok/s, decode tok/s)."""
    cmd = [tool, "-m", gguf, "-p", "128", "-n", "64", "-t", str(threads), "-r", "1"]
    cmd += ["-rtr", "1", "-o", "json"] if ik else ["-o", "jsonl"]
    out, _ = sh(cmd)
    rows = json.loads(out) if ik else [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    pp = [r["avg_ts"] for r in rows if r.get("n_prompt") == 128 and r.get("n_gen") == 0]
    tg = [r["avg_ts"] for r in rows if r.get("n_gen") == 64 and r.get("n_prompt") == 0]
    if not pp or not tg:
        sys.exit(f"bench: no results from {' '.join(cmd)}:\n{out[:500]}")
    return pp[0], tg[0]


DEPTHS = (1024, 4096, 16384, 32768)  # decoding after these many tokens; and a 512-token prompt after 8192
PEER_KV = {"f32": "f32", "bf16": "bf16", "q8": "q8_0", "q4": "q4_0"}  # our --kv, ik_llama.cpp's -ctk/-ctv


def peer_depth_run(tool, gguf, threads, kv):
    """ik_llama.cpp at depth with the KV type that matches ours: a 512-token prompt and 32 tokens decoded
    after each of DEPTHS (its llama-bench -gp), and a 512-token prompt after 8192 from its llama-sweep-bench
    beside llama-bench (a 512-token prompt at each depth 0, 512, .. 8192, its row N_KV = 8192); without
    that tool, the time of llama-bench -p 8704 less that of -p 8192, which the noise of two long runs
    can swamp: {"pp512": tok/s, "pp512@8192": tok/s, 1024: tok/s, ...}."""
    kv_args = ["-fa", "1", "-ctk", PEER_KV[kv], "-ctv", PEER_KV[kv]]
    sweep = os.path.join(os.path.dirname(tool), "llama-sweep-bench")
    have_sweep = os.access(sweep, os.X_OK)
    cmd = [tool, "-m", gguf, "-p", "512" if have_sweep else "512,8192,8704", "-n", "0", "-t", str(threads), "-r", "1",
           "-rtr", "1", "-o", "json", *kv_args]
    for d in DEPTHS:
        cmd += ["-gp", f"{d},32"]
    rows = json.loads(sh(cmd)[0])
    pp = {r["n_prompt"]: r["avg_ts"] for r in rows if r.get("n_gen") == 0}
    out = {"pp512": pp[512]}
    if have_sweep:
        log = "".join(sh([sweep, "-m", gguf, "-c", "8704", "-b", "512", "-ub", "512", "-n", "1", "-t", str(threads),
                          "-rtr", *kv_args]))  # (-rtr: a flag here, not llama-bench's -rtr 1)
        row = re.search(r"\|\s*512\s*\|\s*1\s*\|\s*8192\s*\|\s*[0-9.]+\s*\|\s*([0-9.]+)\s*\|", log)
        if not row:
            sys.exit(f"bench.py: no row for N_KV = 8192 in the output of {sweep}:\n{log[-2000:]}")
        out["pp512@8192"] = float(row.group(1))
    else:
        out["pp512@8192"] = 512 / (8704 / pp[8704] - 8192 / pp[8192])
    for d in DEPTHS:
        out[d] = next(r["avg_ts"] for r in rows if r.get("n_prompt") == d and r.get("n_gen") == 32)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--types", default="bf16,q8,q4,q3,q2")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per row; the median is shown")
    ap.add_argument("--llama-bench", help="a llama.cpp llama-bench to run beside ours, round by round")
    ap.add_argument("--ik-bench", help="an ik_llama.cpp llama-bench (run with -rtr 1), the same way")
    ap.add_argument("--depth", default="", metavar="TYPES",
                    help="also a 512-token prompt, decoding after 1024, 4096, 16384 and 32768 tokens and a 512-token "
                         "prompt after 8192 for these weight types (e.g. q4), beside ik_llama.cpp's when it is given")
    ap.add_argument("--depth-repeat", type=int, default=1, help="rounds of each depth run (they are long)")
    ap.add_argument("--kv", default="f32", metavar="TYPES",
                    help="the KV cache types of the depth runs (e.g. f32,q8,q4); ik_llama.cpp gets the same "
                         "(-ctk/-ctv f32, q8_0, q4_0, -fa 1)")
    ap.add_argument("--gguf", action="append", default=[], metavar="TYPE=PATH",
                    help="the peers' GGUF of the same checkpoint for one of our types, e.g. q8=m-q8_0.gguf")
    ap.add_argument("--ik-gguf", action="append", default=[], metavar="TYPE=PATH",
                    help="ik_llama.cpp's own GGUF for one of our types (e.g. q2=m-IQ2_KS.gguf), instead of --gguf's")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    types = a.types.split(",")
    ggufs = dict(g.split("=", 1) for g in a.gguf)
    ik_ggufs = dict(ggufs, **dict(g.split("=", 1) for g in a.ik_gguf))
    peers = [(name, tool, name == "ik_llama.cpp") for name, tool in (("llama.cpp", a.llama_bench),
                                                                      ("ik_llama.cpp", a.ik_bench)) if tool]
    paths = ensure_models(types)
    engine, bw_tool = os.path.join(ROOT, "mixtral"), os.path.join(ROOT, "bench", "bandwidth")
    # multiply-adds per prompt token: q, k, v, o; the router; top_k experts of three matrices
    D, H, KVD = SHAPE["dim"], SHAPE["hidden_dim"], SHAPE["kv_heads"] * SHAPE["dim"] // SHAPE["heads"]
    macs_per_token = SHAPE["layers"] * (2 * D * D + 2 * D * KVD + SHAPE["experts"] * D + SHAPE["top_k"] * 3 * D * H)
    # The 32-layer projection: the per-layer bytes scale with depth, lm_head does not.
    V = SHAPE["vocab"]
    edge = {"f32": 4.0, "bf16": 2.0, "q8": 17 / 16, "q4": 17 / 16, "q3": 17 / 16, "q2": 9 / 16}  # lm_head's bytes a weight

    depth_types = [t for t in a.depth.split(",") if t]
    rows, peer_rows, depth_rows = [], [], []
    for t in types:
        for n in threads:
            runs, ratios = [], {}
            for _ in range(a.repeat):  # one round: bandwidth, ours, bandwidth, then each peer
                before = last_json(sh([bw_tool, str(n), "1024"])[0])["read_gb_per_s"]
                res = last_json(sh([engine, paths[t], "--threads", str(n), "--bench"])[0])
                after = last_json(sh([bw_tool, str(n), "1024"])[0])["read_gb_per_s"]
                bw = (before + after) / 2
                runs.append(dict(res, bw=bw, ratio=res["gb_per_s"] / bw))
                for name, tool, ik in peers:
                    gguf = (ik_ggufs if ik else ggufs).get(t)
                    if not gguf:
                        continue
                    pp, tg = peer_run(tool, gguf, n, ik)
                    ratios.setdefault(name, []).append((res["prefill_tok_s"] / pp, res["decode_tok_s"] / tg, pp, tg))
            res = {k: median([r[k] for r in runs]) for k in ("prefill_tok_s", "decode_tok_s", "bytes_per_token",
                                                               "gb_per_s", "bw", "ratio")}
            bw, ratio = res["bw"], res["ratio"]
            head = V * D * edge[t]
            per_layer = (res["bytes_per_token"] - head) / SHAPE["layers"]
            full = per_layer * FULL_LAYERS + head
            gemm = res["prefill_tok_s"] * macs_per_token / 1e9
            rows.append((t, n, res["prefill_tok_s"], gemm, res["decode_tok_s"], res["bytes_per_token"],
                         res["gb_per_s"], bw, 100 * ratio, res["gb_per_s"] * 1e9 / full))
            for name, r in ratios.items():
                peer_file = os.path.basename((ik_ggufs if name == "ik_llama.cpp" else ggufs)[t])
                peer_rows.append((t, n, f"{name} {peer_file}", median(x[2] for x in r), median(x[3] for x in r),
                                  median(x[0] for x in r), median(x[1] for x in r)))
            print(f"  {t} x{n}: prefill {res['prefill_tok_s']:.1f} tok/s, decode {res['decode_tok_s']:.2f} tok/s, "
                  f"{res['gb_per_s']:.1f} of {bw:.1f} GB/s ({100 * ratio:.0f}%)", flush=True)

    # At depth: each weight type of --depth with each KV type of --kv, ours and ik_llama.cpp's in turns
    keys = ["pp512", "pp512@8192"] + list(DEPTHS)
    ik_tool = a.ik_bench
    for t in depth_types:
        for kv in a.kv.split(","):
            n = threads[-1]
            depth_runs = []
            for _ in range(a.depth_repeat):
                res = last_json(sh([engine, paths[t], "--threads", str(n), "--bench-depth", "--kv", kv])[0])
                ours = {"pp512": res["pp512_tok_s"], "pp512@8192": res["pp512_at_8192_tok_s"],
                        **{d: res[f"decode_at_{d}_tok_s"] for d in DEPTHS}}
                peer = peer_depth_run(ik_tool, ik_ggufs[t], n, kv) if ik_tool and t in ik_ggufs else None
                depth_runs.append((ours, peer))
                print(f"  {t} --kv {kv} at depth: " + ", ".join(f"{k} {ours[k]:.1f}" for k in keys) +
                      (" | ik " + ", ".join(f"{k} {peer[k]:.1f}" for k in keys) if peer else ""), flush=True)
            has_peer = all(p for _, p in depth_runs)
            depth_rows.append((t, kv, n, {k: median(o[k] for o, _ in depth_runs) for k in keys},
                               {k: median(p[k] for _, p in depth_runs) for k in keys} if has_peer else None,
                               {k: median(o[k] / p[k] for o, p in depth_runs) for k in keys} if has_peer else None))

    kernels = runs[0].get("kernels", "?")
    print()
    print(f"Mixtral-8x7B layer shapes, 2 layers; 128-token prompt, 64 decoded tokens; kernels: {kernels}; "
          f"median of {a.repeat} rounds; mem GB/s: sustained read bandwidth measured just before and after each run")
    print(f"{'format':6} {'thr':>3} {'prefill tok/s':>13} {'GMAC/s':>7} {'decode tok/s':>12} {'MB/token':>9} "
          f"{'GB/s':>6} {'mem GB/s':>8} {'% of mem':>8} {'32-layer tok/s':>14}")
    for t, n, pf, gemm, dec, b, gbs, bw, pct, full in rows:
        print(f"{t:6} {n:3d} {pf:13.2f} {gemm:7.1f} {dec:12.2f} {b / 1e6:9.1f} {gbs:6.1f} {bw:8.1f} {pct:7.0f}% "
              f"{full:14.2f}")
    print("('32-layer tok/s' projects the full model's decode speed from the GB/s achieved)")
    if peer_rows:
        print()
        print("Peers on the same checkpoint (GGUF), interleaved round by round with ours; ratios are the medians "
              "of the per-round ratios ours/peer")
        print(f"{'format':6} {'thr':>3} {'peer':34} {'prompt tok/s':>12} {'decode tok/s':>12} {'ours/peer prompt':>16} "
              f"{'ours/peer decode':>16}")
        for t, n, name, pp, tg, rp, rd in peer_rows:
            print(f"{t:6} {n:3d} {name:34} {pp:12.2f} {tg:12.2f} {rp:16.2f} {rd:16.2f}")

    if depth_rows:
        print()
        print("At depth, beside ik_llama.cpp with the same KV type (-ctk/-ctv, -fa 1; its -gp D,32; for the prompt after "
              "8192 its llama-sweep-bench's row N_KV = 8192, or without that tool its -p 8704 less -p 8192), medians; "
              "ratio = median of the per-round ours/ik")
        print(f"{'format':6} {'kv':4} {'thr':>3} {'what':30} {'ours tok/s':>10} {'ik tok/s':>9} {'ours/ik':>8}")
        for t, kv, n, ours, ik, ratio in depth_rows:
            for k in keys:
                what = ("512-token prompt" if k == "pp512" else "512-token prompt after 8192" if k == "pp512@8192"
                        else f"decode after {k} tokens")
                peer = f"{ik[k]:9.2f} {ratio[k]:8.2f}" if ik else f"{'':9} {'':8}"
                print(f"{t:6} {kv:4} {n:3d} {what:30} {ours[k]:10.2f} {peer}")


if __name__ == "__main__":
    main()