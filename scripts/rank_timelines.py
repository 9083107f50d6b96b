"""Read the GPU timelines profile_ranks.py writes (rank<r>_kernels.json.gz), rank against rank on one clock.

    python3 scripts/rank_timelines.py DIR [--stream S]

Per rank: the broadcasts (a chunk boundary's go/stop and image condition) with their start on the common clock
and how long each waited, so a rank that waits for another at the boundary shows as a long broadcast; then, between
consecutive condition broadcasts (one chunk), the rank's NCCL time (sum, median and 90th percentile of the kernels:
NCCL kernels spin while a peer is late) and its busy time per stream. --stream S also lists stream S's gaps over
3 ms (the leader's decode stream: when its kernels ran against the DiT's). --gaps N lists, per rank, where the GPU
ran no compute kernel (NCCL's kernels left out: they spin while they wait): the N largest sums of idle time by the
kernels on either side of the gap, e.g. "after v's projection, before the attention" = waiting for an exchange.
"""
import argparse
import collections
import gzip
import json
import statistics
from pathlib import Path


def load(directory: Path) -> dict[int, list]:
    ranks = {}
    for path in sorted(directory.glob("rank*_kernels.json.gz")):
        with gzip.open(path, "rt") as f:
            data = json.load(f)
        ranks[data["rank"]] = sorted(data["kernels"], key=lambda k: k[2])
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--stream", type=int, default=None)
    ap.add_argument("--gaps", type=int, default=0, help="list the N largest idle-time sums by neighbouring kernels")
    a = ap.parse_args()
    ranks = load(a.directory)
    if not ranks:
        raise SystemExit(f"no rank*_kernels.json.gz in {a.directory}")
    base = min(ks[0][2] for ks in ranks.values())
    for rank, kernels in sorted(ranks.items()):
        ms = [(name, stream, (ts - base) / 1e3, dur / 1e3) for name, stream, ts, dur in kernels]
        casts = [(t, d) for name, _, t, d in ms if "Broadcast" in name]
        print(f"== rank {rank}: broadcasts (start ms, waited ms): "
              + ", ".join(f"({t:.1f}, {d:.2f})" for t, d in casts))
        # A boundary is a go/stop then the condition broadcast; a chunk runs from one condition to the next.
        starts = [t + d for t, d in casts[1::2]]
        for lo, hi in zip(starts, starts[1:]):
            nccl = sorted(d for name, _, t, d in ms if lo <= t < hi and "nccl" in name.lower())
            busy = collections.Counter()
            for name, stream, t, d in ms:
                if lo <= t < hi and "nccl" not in name.lower():
                    busy[stream] += d
            top = ", ".join(f"s{s} {v:.0f}" for s, v in busy.most_common(3))
            print(f"   chunk {lo:.0f}-{hi:.0f} ms ({hi - lo:.0f}): NCCL {sum(nccl):.0f} ms over {len(nccl)} kernels "
                  f"(median {statistics.median(nccl):.3f}, p90 {nccl[int(0.9 * len(nccl))]:.3f}); "
                  f"other kernels {sum(busy.values()):.0f} ms, by stream: {top}")
        if a.stream is not None:
            mine = [(t, d) for _, stream, t, d in ms if stream == a.stream]
            gaps = [(t0 + d0, t1) for (t0, d0), (t1, _) in zip(mine, mine[1:]) if t1 - (t0 + d0) > 3]
            print(f"   stream {a.stream}: {len(mine)} kernels, busy {sum(d for _, d in mine):.0f} ms, gaps over 3 ms: "
                  + ", ".join(f"{e:.0f}-{s:.0f}" for e, s in gaps))
        if a.gaps:
            idle_gaps(kernels, a.gaps)


def idle_gaps(kernels: list, top: int) -> None:
    """Gaps in the union of the compute kernels, summed by (kernel before, kernel after)."""
    compute = [k for k in kernels if "nccl" not in k[0].lower()]
    sums, counts = collections.Counter(), collections.Counter()
    end, before = compute[0][2], compute[0][0]
    for name, _, ts, dur in compute:
        if ts > end:
            key = (before[:48], name[:48])
            sums[key] += (ts - end) / 1e3
            counts[key] += 1
        if ts + dur > end:
            end, before = ts + dur, name
    print(f"   no compute kernel for {sum(sums.values()):.0f} ms in all; the largest by neighbours:")
    for (after, ahead), ms in sums.most_common(top):
        print(f"   {ms:8.1f} ms {counts[(after, ahead)]:5d}x  after {after} | before {ahead}")


if __name__ == "__main__":
    main()
