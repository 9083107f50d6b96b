"""Where a multi-rank chunk goes, on every rank (profile_rollout.py traces the leader only).

Loads the full-size random-weight generator on N ranks once, then
- runs a rollout and prints, per rank and chunk, the host wall time between chunks and the host time spent
  inside the DiT forwards (a host that needs as long as its GPU starves it: docs/PERFORMANCE.md v17; chunks that
  replay CUDA graphs, the default from 4 ranks on, run no forward on the host and show ~0 there);
- runs a second rollout with torch.profiler on every rank for chunks PROFILE_FROM..PROFILE_TO-1 and prints, per rank: GPU busy
  time with and without NCCL kernels (NCCL kernels spin while they wait for a peer), the top kernels, and the
  host-side ops of the busiest threads. When OUT is set each rank also writes its GPU timeline (every kernel,
  copy and memset: name, stream, start and duration in us; the ranks share one host clock) to
  $OUT/rank<r>_kernels.json.gz, for reading the exchanges rank against rank afterwards. (One file per rank: a
  lent machine returns at most 8 files, so the summaries go to stdout only.)

    [PROFILE_FROM=7 PROFILE_TO=9] python3 scripts/profile_ranks.py --ranks 4 [--chunks 10] [--no-decode]

The patches below are module-level on purpose: spawned ranks re-import this file (as __mp_main__), so they apply
on every rank. The profiled rollout is recognised on every rank by its seed.
"""
import argparse
import collections
import gzip
import json
import os
import tempfile
import time

import torch

import worker.rollout as rollout_mod
from profile_rollout import _union  # scripts/ is on the path: this file runs as a script
from worker.models.dit import LingBotDiT

PROFILE_SEED = 777
_window = (int(os.environ.get("PROFILE_FROM", "7")), int(os.environ.get("PROFILE_TO", "9")))
_host = {"forward": 0.0}

_forward = LingBotDiT.forward


def _timed_forward(self, *args, **kwargs):
    t = time.perf_counter()
    try:
        return _forward(self, *args, **kwargs)
    finally:
        _host["forward"] += time.perf_counter() - t


_denoise_chunks = rollout_mod._denoise_chunks


def _observed_chunks(engine, job, stop=None):
    rank, (first, last) = engine.sp.rank, _window
    prof, rows, t_last = None, [], time.perf_counter()
    _host["forward"] = 0.0
    for item in _denoise_chunks(engine, job, stop):
        c, now = item[0], time.perf_counter()
        rows.append((c, round((now - t_last) * 1e3), round(_host["forward"] * 1e3)))
        t_last, _host["forward"] = now, 0.0
        if job.seed == PROFILE_SEED and c == first - 1:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                      torch.profiler.ProfilerActivity.CPU])
            prof.start()
            t_prof = time.perf_counter()
        if prof is not None and c == last - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - t_prof
            prof.stop()
            _summarize(prof, rank, wall, last - first)
            prof = None
        yield item
    print(f"[rank {rank}] seed {job.seed}: per chunk (index, host ms between chunks, host ms inside forwards): "
          f"{rows}", flush=True)


LingBotDiT.forward = _timed_forward
rollout_mod._denoise_chunks = _observed_chunks


def _summarize(prof, rank: int, wall: float, n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    lines = [f"== rank {rank}: {n} chunks, wall {wall * 1e3:.0f} ms ({wall * 1e3 / n:.0f} ms per chunk)"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    if kernels:
        span = (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)) / 1e3
        busy = _union((e["ts"], e["ts"] + e["dur"]) for e in kernels) / 1e3
        nccl = [e for e in kernels if "nccl" in e["name"].lower()]
        compute = _union((e["ts"], e["ts"] + e["dur"]) for e in kernels if "nccl" not in e["name"].lower()) / 1e3
        lines.append(f"GPU span {span:.0f} ms: busy {busy:.0f} ({busy / span:.1%}), without NCCL {compute:.0f} "
                     f"({compute / span:.1%}); NCCL kernels {len(nccl)}, {sum(e['dur'] for e in nccl) / 1e3:.0f} ms")
        by_name = collections.defaultdict(lambda: [0, 0.0])
        for e in kernels:
            entry = by_name[(e["args"].get("stream", -1), e["name"][:80])]
            entry[0] += 1
            entry[1] += e["dur"]
        for (stream, name), (count, dur) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:22]:
            lines.append(f"  s{stream:<3} {dur / 1e3 / n:8.1f} ms/chunk {count / n:6.0f}x  {name}")
    host = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver") and "dur" in e]
    by_thread = collections.defaultdict(list)
    for e in host:
        by_thread[e["tid"]].append(e)
    for tid, evs in sorted(by_thread.items(), key=lambda kv: -len(kv[1]))[:3]:
        ops = [e for e in evs if e["cat"] == "cpu_op"]
        runtime = [e for e in evs if e["cat"] != "cpu_op"]
        lines.append(f" thread {tid}: {len(ops) / n:.0f} ops/chunk, ops busy "
                     f"{_union((e['ts'], e['ts'] + e['dur']) for e in ops) / 1e3 / n:.0f} ms/chunk, "
                     f"{len(runtime) / n:.0f} CUDA calls/chunk ({sum(e['dur'] for e in runtime) / 1e3 / n:.0f} ms)")
        by_name = collections.defaultdict(lambda: [0, 0.0])
        for e in evs:
            entry = by_name[e["name"][:70]]
            entry[0] += 1
            entry[1] += e["dur"]
        for name, (count, dur) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:18]:
            lines.append(f"    {dur / 1e3 / n:7.1f} ms/chunk {count / n:6.0f}x  {name}")
    text = "\n".join(lines)
    print(text, flush=True)
    if os.environ.get("OUT"):
        timeline = [(e["name"], e["args"].get("stream", -1), e["ts"], e["dur"]) for e in kernels]
        with gzip.open(os.path.join(os.environ["OUT"], f"rank{rank}_kernels.json.gz"), "wt") as f:
            json.dump({"rank": rank, "chunks": n, "wall_ms": wall * 1e3, "kernels": timeline}, f)


def main() -> None:
    from worker.bench import _bench_job
    from worker.parallel.pool import load_generator

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=10, help="chunks of the unprofiled rollout")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--model", default="lingbot-world-fast")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="832x480")
    a = ap.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    t = time.perf_counter()
    gen = load_generator(a.model, a.device, a.ranks, text_encoder=False)
    print(f"loaded in {time.perf_counter() - t:.1f} s", flush=True)
    try:
        for label, chunks, seed in (("unprofiled", a.chunks, 0), ("profiled", _window[1] + 1, PROFILE_SEED)):
            job = _bench_job(w, h, chunks, 15, 3, seed=seed, decode=not a.no_decode)
            t, arrivals = time.perf_counter(), []
            for out in gen.rollout(job):
                arrivals.append((out.index, round(out.stats["dit_ms"]), round(out.stats["decode_ms"]),
                                 round((time.perf_counter() - t) * 1e3)))
            print(f"## {label}: (chunk, DiT ms, decode ms, arrival ms) {arrivals}", flush=True)
    finally:
        if hasattr(gen, "close"):
            gen.close()


if __name__ == "__main__":
    main()
