"""Where a steady chunk's wall time goes in the real rollout: GPU busy time per stream, idle gaps, top kernels.

Runs the full-size random-weight generator (1 or N ranks; only rank 0 is traced) through a rollout with decode,
traces the leader from the arrival of chunk `--from` to chunk `--to` with torch.profiler, and prints
per-stream busy time (union of kernel intervals), the time no kernel ran at all, and the top kernels grouped
by stream. Run on a GPU:
    python3 scripts/profile_rollout.py [--ranks 1] [--chunks 8] [--from 5] [--to 7] [--json PATH]
"""
import argparse
import collections
import json
import os
import tempfile
import time

from torch.profiler import ProfilerActivity, profile

from worker.bench import _bench_job
from worker.parallel.pool import load_generator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--from", dest="start", type=int, default=5)
    ap.add_argument("--to", dest="stop", type=int, default=7)
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default="lingbot-world-fast")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="832x480")
    a = ap.parse_args()

    trace, arrivals = _trace_rollout(a)
    wall_ms = (arrivals[a.stop][1] - arrivals[a.start][1]) * 1e3
    n_chunks = a.stop - a.start
    kernels = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if not kernels:
        print(f"no GPU kernels traced (device {a.device}); wall {wall_ms:.0f} ms for {n_chunks} chunks")
        return
    t0 = min(e["ts"] for e in kernels)
    t1 = max(e["ts"] + e["dur"] for e in kernels)

    by_stream = collections.defaultdict(list)
    for e in kernels:
        by_stream[e["args"].get("stream", -1)].append((e["ts"], e["ts"] + e["dur"]))
    all_iv = [iv for v in by_stream.values() for iv in v]
    span = (t1 - t0) / 1e3
    print(f"\n== {a.ranks} rank(s): chunks {a.start}->{a.stop}: wall {wall_ms:.0f} ms ({wall_ms / n_chunks:.0f} ms/chunk); "
          f"traced GPU span {span:.0f} ms")
    busy = _union(all_iv) / 1e3
    print(f"GPU busy (any stream) {busy:.0f} ms = {busy / span:.1%} of the span; idle {span - busy:.0f} ms")
    for s, iv in sorted(by_stream.items(), key=lambda kv: -sum(e - b for b, e in kv[1])):
        print(f"  stream {s}: {len(iv)} kernels, busy {_union(iv) / 1e3:.0f} ms, sum {sum(e - b for b, e in iv) / 1e3:.0f} ms")
    # kernels by name per stream (top), per chunk
    agg = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        key = (e["args"].get("stream", -1), e["name"][:90])
        agg[key][0] += 1
        agg[key][1] += e["dur"]
    print("top kernels (ms per chunk, count per chunk):")
    for (s, name), (cnt, dur) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:40]:
        print(f"  s{s:<3} {dur / 1e3 / n_chunks:8.1f} ms {cnt / n_chunks:7.0f}x  {name}")
    # gaps on the busiest stream (the DiT): how much of its span is idle, in gaps of which size
    dit_stream = max(by_stream, key=lambda s: sum(e - b for b, e in by_stream[s]))
    iv = sorted(by_stream[dit_stream])
    gaps = [iv[i + 1][0] - iv[i][1] for i in range(len(iv) - 1) if iv[i + 1][0] > iv[i][1]]
    hist = collections.Counter()
    for g in gaps:
        hist["<5us" if g < 5 else "<20us" if g < 20 else "<100us" if g < 100 else "<1ms" if g < 1000 else ">=1ms"] += g
    print(f"DiT stream {dit_stream} gaps: total {sum(gaps) / 1e3:.0f} ms over {len(gaps)} gaps: " +
          ", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in sorted(hist.items())))
    big = sorted(gaps, reverse=True)[:8]
    print("largest DiT-stream gaps (ms):", [round(g / 1e3, 2) for g in big])
    print("per-chunk stats:", [(i, {k: round(v) for k, v in st.items()}) for i, _, st in arrivals])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"wall_ms": wall_ms, "agg": [[s, n, c, d] for (s, n), (c, d) in agg.items()]}, f)


def _union(iv: list[tuple[float, float]]) -> float:
    """Total length covered by a set of [start, end) intervals."""
    total, end = 0.0, -1e30
    for s, e in sorted(iv):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _trace_rollout(a) -> tuple[dict, list]:
    """Run the rollout, tracing the leader between the arrivals of chunks a.start and a.stop."""
    gen = load_generator(a.model, a.device, a.ranks, text_encoder=False)
    try:
        w, h = (int(v) for v in a.size.split("x"))
        job = _bench_job(w, h, a.chunks, 15, 3, decode=not a.no_decode)
        prof = profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU])
        arrivals = []
        for out in gen.rollout(job):
            arrivals.append((out.index, time.perf_counter(), out.stats))
            if out.index == a.start:
                prof.start()
            if out.index == a.stop:
                prof.stop()
    finally:
        if hasattr(gen, "close"):
            gen.close()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f), arrivals


if __name__ == "__main__":  # the rank processes are spawned: they re-import this file
    main()
