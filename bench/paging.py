#!/usr/bin/env python3
"""
make bench-paging: decoding a model larger than the memory it may use, with
the expert cache against plain mapping, under real memory pressure.

The Mixtral-8x7B-shaped 2-layer q4 model of make bench (1.9 GB) is given
memory of its size / --oversub (default 1.5): a helper process allocates and
touches the rest of the memory available, anonymous memory, which cannot be
evicted without swap, so the page cache really shrinks. Every run has the
same memory left: plain mapping (mixtral --mmap) uses it as page cache; the
expert cache (mixtral's default for a model larger than the memory available)
takes its budget from it; llama.cpp's llama-bench (it maps the file) when
given. Before each run the file is dropped from the page cache
(posix_fadvise DONTNEED). The helper is killed at the end, whatever happens.

Also measures the disk's sequential read speed (the file read cold), and from
it and the bytes the cache still reads per token, the bound on decode speed.

    python3 bench/paging.py [--oversub 1.5] [--repeat 3] [--llama-bench PATH --gguf Q4_0.gguf]
"""
import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
import time
from statistics import median

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench  # noqa: E402



def mem_available():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    sys.exit("bench-paging: no MemAvailable in /proc/meminfo (Linux only)")


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_read_speed(path):
    """GB/s reading the file cold as the expert cache reads: 4 threads, pread()s of 4 MB."""
    from concurrent.futures import ThreadPoolExecutor
    drop_cache(path)
    size, piece = os.path.getsize(path), 4 << 20
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.time()
        with ThreadPoolExecutor(4) as ex:
            n = sum(ex.map(lambda at: len(os.pread(fd, piece, at)), range(0, size, piece)))
        return n / (time.time() - t0) / 1e9
    finally:
        os.close(fd)


HELPER = r"""
import mmap, os, sys, time
try:  # the OOM killer takes anything but the helper (root only): a run dies rather than measures without pressure
    open(f"/proc/{os.getpid()}/oom_score_adj", "w").write("-1000")
except OSError:
    pass
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, n - 8, 4096):  # a different value in every page: no same-page merging (KSM) can free them
    m[i:i + 8] = i.to_bytes(8, "little")
print("ready", flush=True)
time.sleep(1e9)
"""


class Pressure:
    """A process holding `nbytes` of touched anonymous memory until stopped."""

    def __init__(self, nbytes):
        self.p = subprocess.Popen([sys.executable, "-c", HELPER, str(nbytes)], stdout=subprocess.PIPE, text=True)
        atexit.register(self.stop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: sys.exit(1))
        if self.p.stdout.readline().strip() != "ready":
            self.stop()
            sys.exit("bench-paging: the memory-pressure helper failed")

    def check(self):
        if self.p.poll() is not None:
            sys.exit("bench-paging: the memory-pressure helper died (killed for memory?): no valid measurement")

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def ours(engine, model, extra):
    drop_cache(model)
    r = subprocess.run([engine, model, "--bench", "--threads", "2", "-c", "256"] + extra, capture_output=True,
                       text=True, timeout=3600)
    if r.returncode != 0:
        sys.exit(f"bench-paging: {engine} {' '.join(extra)} failed:\n{r.stderr}")
    return bench.last_json(r.stdout)


def llama(tool, gguf):
    drop_cache(gguf)
    out, _ = bench.sh([tool, "-m", gguf, "-p", "0", "-n", "32", "-t", "2", "-r", "1", "-o", "jsonl"])
    rows = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return rows[0]["avg_ts"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--oversub", type=float, default=1.5, help="model size over the memory budget")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench, run under the same pressure")
    ap.add_argument("--gguf", help="the Q4_0 GGUF of the same checkpoint, for llama-bench")
    a = ap.parse_args()
    model = bench.ensure_models(["q4"])["q4"]
    engine = os.path.join(ROOT, "mixtral")
    size = os.path.getsize(model)
    budget = int(size / a.oversub)
    disk = disk_read_speed(model)
    free = ours(engine, model, [])  # no pressure: the model in memory
    print(f"model {size / 1e9:.2f} GB (q4, 8x7B layer shapes, 2 layers); budget {budget / 1e9:.2f} GB "
          f"({a.oversub}x oversubscribed); disk reads {disk:.2f} GB/s cold (4 threads, 4 MB preads); "
          f"no pressure: decode {free['decode_tok_s']:.1f} tok/s", flush=True)
    hold = mem_available() - budget
    if hold <= 0:
        sys.exit("bench-paging: less memory available than the budget already")
    print(f"pressure: a helper holds {hold / 1e9:.1f} GB, leaving {budget / 1e9:.2f} GB to each run", flush=True)
    rows = {"mapped": [], "cache": [], "llama.cpp": []}
    cache_runs, mapped_runs = [], []
    pressure = Pressure(hold)
    try:
        for i in range(a.repeat):
            res = ours(engine, model, ["--mmap"])
            rows["mapped"].append(res["decode_tok_s"])
            mapped_runs.append(res)
            res = ours(engine, model, [])  # by default: the cache, its budget from the memory available
            rows["cache"].append(res["decode_tok_s"])
            cache_runs.append(res)
            if a.llama_bench and a.gguf:
                rows["llama.cpp"].append(llama(a.llama_bench, a.gguf))
            pressure.check()
            print(f"  round {i + 1}: mapped {rows['mapped'][-1]:.2f}, cache {rows['cache'][-1]:.2f} tok/s"
                  + (f", llama.cpp {rows['llama.cpp'][-1]:.2f}" if rows["llama.cpp"] else ""), flush=True)
    finally:
        pressure.stop()
    med = {k: median(v) for k, v in rows.items() if v}
    c = {k: median(r[k] for r in cache_runs) for k in ("cache_hit_rate", "prefetch_accuracy", "read_mb_s",
                                                         "decode_read_mb_per_token", "peak_rss_mb", "cache_slots",
                                                         "disk_read_mb_per_token", "cache_budget_mb")}
    mapped_disk = median(r["disk_read_mb_per_token"] for r in mapped_runs)
    bound = disk * 1e3 / c["disk_read_mb_per_token"] if c["disk_read_mb_per_token"] else float("inf")
    print()
    print(f"decode tok/s under pressure (median of {a.repeat}): mapped {med['mapped']:.2f}, expert cache "
          f"{med['cache']:.2f} ({med['cache'] / med['mapped']:.2f}x)"
          + (f", llama.cpp {med['llama.cpp']:.2f} (cache/llama.cpp {med['cache'] / med['llama.cpp']:.2f}x)"
             if "llama.cpp" in med else ""))
    print(f"expert cache: {c['cache_slots']:.0f} slots, hit rate {100 * c['cache_hit_rate']:.1f}%, prefetch accuracy "
          f"{100 * c['prefetch_accuracy']:.1f}%, reads {c['read_mb_s']:.0f} MB/s, {c['decode_read_mb_per_token']:.0f} MB "
          f"read per decoded token; peak RSS {c['peak_rss_mb']:.0f} MB, its budget {c['cache_budget_mb']:.0f} MB "
          f"(the KV cache aside), of the {budget / 1e6:.0f} MB left to it")
    print(f"read from the disk per decoded token (/proc/self/io): mapped {mapped_disk:.0f} MB, cache "
          f"{c['disk_read_mb_per_token']:.0f} MB")
    print(f"bound from the disk: {disk:.2f} GB/s / {c['disk_read_mb_per_token']:.0f} MB per token = {bound:.1f} tok/s; "
          f"the cache reaches {100 * med['cache'] / bound:.0f}% of it")
    project(disk, c["cache_hit_rate"], c["cache_slots"] / (bench.SHAPE["layers"] * bench.SHAPE["experts"]),
            free["decode_tok_s"] * bench.SHAPE["layers"] / bench.FULL_LAYERS)


def project(disk, hit, share, full_speed):
    """Mixtral-8x7B on laptops of 16 and 32 GB, from this machine's disk speed: the experts that fit
    in what is left after the OS (3 GB), the other weights, a 2048-token KV cache and the buffers;
    hits in proportion to the share of experts held, as measured here (hit rate / share); each miss
    reads one expert; a token costs its reads at the disk's speed plus its compute at full speed
    (this machine's, scaled to 32 layers: no overlap assumed)."""
    L, E, K, D, H, V, KV = 32, 8, 2, 4096, 14336, 32000, 1024
    factor = hit / share if share else 1.0
    print()
    print(f"Projection for Mixtral-8x7B (measured here: disk {disk:.2f} GB/s, hit rate {100 * hit:.0f}% holding "
          f"{100 * share:.0f}% of the experts; full-memory decode {full_speed:.2f} tok/s at 32 layers):")
    for name, bpw, head_bpw in (("q4", 9 / 16, 17 / 16), ("q8", 17 / 16, 17 / 16)):
        expert = 3 * H * D * bpw
        other = 2 * V * D * head_bpw + L * (2 * D * D + 2 * KV * D) * bpw + L * E * D * 4
        for ram in (16, 32):
            room = ram * 2**30 - 3 * 2**30 - other - 2 * L * 2048 * KV * 4 - 200e6
            slots = max(0, min(L * E, int(room / expert)))
            h = min(1.0, factor * slots / (L * E))
            reads = L * K * (1 - h) * expert
            tps = 1 / (reads / (disk * 1e9) + 1 / full_speed)
            print(f"  {name} ({(other + L * E * expert) / 1e9:.0f} GB) on {ram} GB: {slots} of {L * E} experts held, "
                  f"~{100 * h:.0f}% hits, {reads / 1e9:.1f} GB read a token: about {tps:.2f} tok/s")


if __name__ == "__main__":
    main()
