#!/usr/bin/env python3
"""
make bench: decode and prefill speed against the machine's memory bandwidth.

Makes once (cached in .cache/bench, outside git) a random checkpoint with
Mixtral-8x7B layer shapes and 2 layers (6.3 GB in bf16, streamed to disk),
exports it to bf16, q8 and q4, and runs `mixtral --bench` for each format and
thread count, each run between two measurements of the sustained read
bandwidth (bench/bandwidth, same thread count): the run's GB/s is compared with
their mean, two numbers taken under the same load on this shared machine.
Each row is the median of --repeat runs, column by column.

    python3 bench/bench.py [--threads 1,2] [--types bf16,q8,q4] [--repeat 3]
"""
import argparse
import json
import os
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--types", default="bf16,q8,q4")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    types = a.types.split(",")
    paths = ensure_models(types)
    engine, bw_tool = os.path.join(ROOT, "mixtral"), os.path.join(ROOT, "bench", "bandwidth")
    peak_tool = os.path.join(ROOT, "bench", "peak")
    # multiply-adds per prompt token: q, k, v, o; the router; top_k experts of three matrices
    D, H, KVD = SHAPE["dim"], SHAPE["hidden_dim"], SHAPE["kv_heads"] * SHAPE["dim"] // SHAPE["heads"]
    macs_per_token = SHAPE["layers"] * (2 * D * D + 2 * D * KVD + SHAPE["experts"] * D + SHAPE["top_k"] * 3 * D * H)
    # each format's peak for prompts: the rate of its kernels' multiply instructions alone, and
    # its ceiling: all the arithmetic of a block of the prompt tile, on registers (bench/peak;
    # f32 FMAs for the float formats, for both)
    peaks = {n: last_json(sh([peak_tool, str(n)])[0]) for n in threads}
    peak_key = {"f32": "f32_gmac_per_s", "bf16": "f32_gmac_per_s", "q8": "q8_gmac_per_s", "q4": "q4_gmac_per_s"}
    ceiling_key = {"f32": "f32_gmac_per_s", "bf16": "f32_gmac_per_s", "q8": "q8_block_gmac_per_s",
                   "q4": "q4_block_gmac_per_s"}

    # The 32-layer projection: the per-layer bytes scale with depth, lm_head does not.
    V, D = SHAPE["vocab"], SHAPE["dim"]
    edge = {"f32": 4.0, "bf16": 2.0, "q8": 1.0 + 4 / 64, "q4": 1.0 + 4 / 64}

    rows = []
    for t in types:
        for n in threads:
            runs = []
            for _ in range(a.repeat):
                before = last_json(sh([bw_tool, str(n), "1024"])[0])["read_gb_per_s"]
                res = last_json(sh([engine, paths[t], "--bench", "--threads", str(n)])[0])
                after = last_json(sh([bw_tool, str(n), "1024"])[0])["read_gb_per_s"]
                bw = (before + after) / 2
                runs.append(dict(res, bw=bw, ratio=res["gb_per_s"] / bw))
            res = {k: median([r[k] for r in runs]) for k in ("prefill_tok_s", "decode_tok_s", "bytes_per_token",
                                                               "gb_per_s", "bw", "ratio")}
            res["kernels"] = runs[0].get("kernels", "?")
            bw, ratio = res["bw"], res["ratio"]
            head = V * D * edge[t]
            per_layer = (res["bytes_per_token"] - head) / SHAPE["layers"]
            full = per_layer * FULL_LAYERS + head
            gemm = res["prefill_tok_s"] * macs_per_token / 1e9
            peak, ceiling = peaks[n][peak_key[t]], peaks[n][ceiling_key[t]]
            rows.append((t, n, res["prefill_tok_s"], res["decode_tok_s"], res["bytes_per_token"], res["gb_per_s"], bw,
                         100 * ratio, res["gb_per_s"] * 1e9 / full, res.get("kernels", "?"), gemm, 100 * gemm / peak,
                         ceiling * 1e9 / macs_per_token))
            print(f"  {t} x{n}: decode {res['decode_tok_s']:.2f} tok/s, {res['gb_per_s']:.1f} of {bw:.1f} GB/s "
                  f"({100 * ratio:.0f}%)", flush=True)

    print()
    print("Mixtral-8x7B layer shapes, 2 layers; 128-token prompt, 64 decoded tokens; "
          f"median of {a.repeat} runs; mem GB/s: sustained read bandwidth measured just before and after each run")
    print(f"{'format':6} {'thr':>3} {'prefill tok/s':>13} {'GMAC/s':>7} {'% of peak':>9} {'ceiling':>7} "
          f"{'decode tok/s':>12} {'MB/token':>9} {'GB/s':>6} {'mem GB/s':>8} {'% of mem':>8} {'32-layer tok/s':>14}")
    for t, n, pf, dec, b, gbs, bw, pct, full, _, gemm, gpct, ceiling in rows:
        print(f"{t:6} {n:3d} {pf:13.2f} {gemm:7.1f} {gpct:8.0f}% {ceiling:7.0f} {dec:12.2f} {b / 1e6:9.1f} {gbs:6.1f} "
              f"{bw:8.1f} {pct:7.0f}% {full:14.2f}")
    print(f"(kernels: {rows[0][9]}; 'peak': the rate of the format's multiply instructions alone, measured by "
          "bench/peak (G multiply-adds/s; q8: " + ", ".join(f"{p['q8_gmac_per_s']:.0f}" for p in peaks.values())
          + ", q4: " + ", ".join(f"{p['q4_gmac_per_s']:.0f}" for p in peaks.values())
          + ", f32 FMA for bf16: " + ", ".join(f"{p['f32_gmac_per_s']:.0f}" for p in peaks.values())
          + f" with {', '.join(str(n) for n in threads)} threads); 'ceiling': the prompt tok/s that all the arithmetic "
          "of the prompt tile's blocks, on registers alone, would give (q8: "
          + ", ".join(f"{p['q8_block_gmac_per_s']:.0f}" for p in peaks.values()) + ", q4: "
          + ", ".join(f"{p['q4_block_gmac_per_s']:.0f}" for p in peaks.values()) + " G/s); "
          "'32-layer tok/s' projects the full model's decode speed from the GB/s achieved)")


if __name__ == "__main__":
    main()
