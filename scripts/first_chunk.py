"""Time to the first chunk, with and without chunk 1's DiT waiting for chunk 0's decode to be queued.

    python3 scripts/first_chunk.py [--ranks 1] [--rollouts 4]
Loads the full-size random-weight generator once, then alternates short (3-chunk) rollouts at 832x480 between
the two settings of worker.rollout.FIRST_FRAMES_FIRST and prints each rollout's first-chunk time and chunk-0 row.
"""
import argparse
import statistics

from worker import rollout
from worker.bench import run_bench
from worker.config import DEFAULT_KV_SINK, DEFAULT_KV_WINDOW
from worker.parallel.pool import load_generator


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--rollouts", type=int, default=4, help="rollouts per setting")
    a = ap.parse_args()
    gen = load_generator("lingbot-world-fast", "cuda", a.ranks, text_encoder=False)
    times = {True: [], False: []}
    try:
        for i in range(2 * a.rollouts):
            rollout.FIRST_FRAMES_FIRST = ahead = i % 2 == 0
            res = run_bench(gen, width=832, height=480, chunks=3, window=DEFAULT_KV_WINDOW, sink=DEFAULT_KV_SINK,
                            warmup_chunks=0)
            r0 = res["rows"][0]
            times[ahead].append(res["first_chunk_s"])
            print(f"first frames first={ahead!s:5}: first chunk {res['first_chunk_s']:.3f} s (dit {r0['dit_ms']:.0f}, "
                  f"decode {r0['decode_ms']:.0f}, encode {r0['encode_ms']:.0f} ms); chunk 1 dit "
                  f"{res['rows'][1]['dit_ms']:.0f} ms")
    finally:
        if hasattr(gen, "close"):
            gen.close()
    for ahead, t in times.items():
        print(f"FIRST_FRAMES_FIRST={ahead}: median {statistics.median(t):.3f} s over {len(t)}: {[round(x, 3) for x in t]}")


if __name__ == "__main__":
    main()
