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
    """GB/s reading the file cold as the expert cache reads: 4 threads, 4 MB reads, O_DIRECT where the
    file system takes it (into page-aligned buffers), else through the page cache."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor
    drop_cache(path)
    size, piece = os.path.getsize(path), 4 << 20
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        os.preadv(fd, [mmap.mmap(-1, piece)], 0)
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    bufs = [mmap.mmap(-1, piece) for _ in range(4)]

    def read(i):
        buf, n = bufs[i % 4], 0
        for at in range(i * piece, size, 4 * piece):
            n += os.preadv(fd, [buf], at)
        return n
    try:
        t0 = time.time()
        with ThreadPoolExecutor(4) as ex:
            n = sum(ex.map(read, range(4)))
        return n / (time.time() - t0) / 1e9
    finally:
        os.close(fd)


HELPER = r"""
import mmap, os, sys, time
n = int(sys.argv[1])
m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, n - 8, 4096):  # a different value in every page: no same-page merging (KSM) can free them
    m[i:i + 8] = i.to_bytes(8, "little")
print("ready", flush=True)
time.sleep(1e9)
"""


class Pressure:
    """Helper processes holding touched anonymous memory until stopped, until MemAvailable is
    `leave` (within 2%): MemAvailable is an estimate, so the memory is taken in steps and read again."""

    def __init__(self, leave):
        self.ps = []
        atexit.register(self.stop)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: sys.exit(1))
        for _ in range(8):
            more = mem_available() - leave
            if more < leave // 50:
                break
            p = subprocess.Popen([sys.executable, "-c", HELPER, str(more)], stdout=subprocess.PIPE, text=True)
            self.ps.append(p)
            if p.stdout.readline().strip() != "ready":
                self.stop()
                sys.exit("bench-paging: the memory-pressure helper failed")
            time.sleep(1)  # the kernel's reclaim settles

    def check(self):
        if any(p.poll() is not None for p in self.ps):
            sys.exit("bench-paging: the memory-pressure helper died (killed for memory?): no valid measurement")

    def stop(self):
        for p in self.ps:
            if p.poll() is None:
                p.kill()
                p.wait()


def first_to_go():
    """Runs in a measured process before it starts: if memory runs out, the OOM killer takes it,
    not a helper (a run dies rather than measures without pressure)."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")


def measured(cmd, what):
    """A run's stdout, or None if it was killed for memory (SIGKILL)."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, preexec_fn=first_to_go)
    if r.returncode == -signal.SIGKILL:
        return None
    if r.returncode != 0:
        sys.exit(f"bench-paging: {what} failed:\n{r.stderr}")
    return r.stdout


def ours(engine, model, extra):
    drop_cache(model)
    out = measured([engine, model, "--bench", "--threads", "2", "-c", "256"] + extra, f"mixtral {' '.join(extra)}")
    if out is None:
        sys.exit(f"bench-paging: mixtral {' '.join(extra)} was killed for memory")
    return bench.last_json(out)


def llama(tool, gguf):
    """llama-bench's decode tok/s, or None when it was killed for memory."""
    drop_cache(gguf)
    out = measured([tool, "-m", gguf, "-p", "0", "-n", "32", "-t", "2", "-r", "1", "-o", "jsonl"], "llama-bench")
    if out is None:
        return None
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
    if mem_available() <= budget:
        sys.exit("bench-paging: less memory available than the budget already")
    rows = {"mapped": [], "cache": [], "usage": [], "llama.cpp": []}
    cache_runs, usage_runs, mapped_runs = [], [], []
    killed = 0
    pressure = Pressure(budget)
    print(f"pressure: {len(pressure.ps)} helper(s) holding memory, MemAvailable now {mem_available() / 1e9:.2f} GB",
          flush=True)
    try:
        for i in range(a.repeat):
            res = ours(engine, model, ["--mmap"])
            rows["mapped"].append(res["decode_tok_s"])
            mapped_runs.append(res)
            res = ours(engine, model, [])  # by default: the cache, its budget from the memory available
            rows["cache"].append(res["decode_tok_s"])
            cache_runs.append(res)
            res = ours(engine, model, ["--cache-policy", "usage"])
            rows["usage"].append(res["decode_tok_s"])
            usage_runs.append(res)
            if a.llama_bench and a.gguf:
                peer = llama(a.llama_bench, a.gguf)
                if peer is None:
                    killed += 1
                else:
                    rows["llama.cpp"].append(peer)
            pressure.check()
            print(f"  round {i + 1} (MemAvailable {mem_available() / 1e9:.2f} GB): mapped {rows['mapped'][-1]:.2f}, "
                  f"cache {rows['cache'][-1]:.2f} (usage policy {rows['usage'][-1]:.2f}) tok/s"
                  + (f", llama.cpp {peer:.2f}" if a.llama_bench and peer is not None else "")
                  + (", llama.cpp killed for memory" if a.llama_bench and peer is None else ""), flush=True)
    finally:
        pressure.stop()
    med = {k: median(v) for k, v in rows.items() if v}
    c = {k: median(r[k] for r in cache_runs) for k in ("cache_hit_rate", "prefetch_accuracy", "read_mb_s",
                                                         "decode_read_mb_per_token", "peak_rss_mb", "cache_slots",
                                                         "disk_read_mb_per_token", "cache_budget_mb", "cache_slot_mb")}
    usage_hit = median(r["cache_hit_rate"] for r in usage_runs)
    mapped_disk = median(r["disk_read_mb_per_token"] for r in mapped_runs)
    print()
    print(f"decode tok/s under pressure (median of {a.repeat}): mapped {med['mapped']:.2f}, expert cache "
          f"{med['cache']:.2f} ({med['cache'] / med['mapped']:.2f}x; usage policy {med['usage']:.2f}, hit rate "
          f"{100 * usage_hit:.1f}%)"
          + (f", llama.cpp {med['llama.cpp']:.2f} (cache/llama.cpp {med['cache'] / med['llama.cpp']:.2f}x)"
             if "llama.cpp" in med else "")
          + (f"; llama.cpp killed for memory in {killed} of {a.repeat} rounds" if killed else ""))
    print(f"expert cache: {c['cache_slots']:.0f} slots, hit rate {100 * c['cache_hit_rate']:.1f}%, prefetch accuracy "
          f"{100 * c['prefetch_accuracy']:.1f}%, reads {c['read_mb_s']:.0f} MB/s, {c['decode_read_mb_per_token']:.0f} MB "
          f"read per decoded token; peak RSS {c['peak_rss_mb']:.0f} MB, its budget {c['cache_budget_mb']:.0f} MB "
          f"(the KV cache aside), of the {budget / 1e6:.0f} MB left to it")
    print(f"read from the disk per decoded token (/proc/self/io): mapped {mapped_disk:.0f} MB, cache "
          f"{c['disk_read_mb_per_token']:.0f} MB")
    # The bound: a token costs at least its reads at the speed the cache reads, however well they overlap compute.
    mb, speed = c["decode_read_mb_per_token"], c["read_mb_s"]
    bound = min(free["decode_tok_s"], speed / mb if mb else float("inf"))
    print(f"bound: {mb:.0f} MB a token at the {speed:.0f} MB/s the cache reads = {bound:.1f} tok/s "
          f"(no pressure: {free['decode_tok_s']:.1f}); the cache reaches {100 * med['cache'] / bound:.0f}% of it")
    # What twice the mapped speed would take: the reads a token may cost, so the hit rate and the slots
    # (uniform routing: hits in proportion to the experts held) and the memory for them.
    lookups = bench.SHAPE["layers"] * 2
    n_experts = bench.SHAPE["layers"] * bench.SHAPE["experts"]
    room = 1 / (2 * med["mapped"]) - 1 / free["decode_tok_s"]
    if room <= 0:
        print(f"2x mapped ({2 * med['mapped']:.1f} tok/s) is more than the speed with no pressure: out of reach")
    else:
        allowed = room * speed  # MB a token may read, with no overlap of reads and compute
        hit = max(0.0, 1 - allowed / (lookups * c["cache_slot_mb"]))
        slots = min(n_experts, -(-hit * n_experts // 1))
        need = c["cache_budget_mb"] + (slots - c["cache_slots"]) * c["cache_slot_mb"]
        print(f"2x mapped ({2 * med['mapped']:.1f} tok/s) allows {allowed:.0f} MB of reads a token: a hit rate of "
              f"{100 * hit:.0f}%, about {slots:.0f} of {n_experts} experts held, {need:.0f} MB of memory against the "
              f"{budget / 1e6:.0f} MB left")
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
