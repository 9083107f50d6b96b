"""One start to a ready engine, and what Inductor's caches did in it (run it twice against one LINGBOT_COMPILE_CACHE).

    LINGBOT_COMPILE_CACHE=/tmp/cc python3 scripts/compile_cache_check.py [--ranks 1]

Prints the seconds from process start to a ready random-weight engine (warm-up included, no text encoder),
Inductor's FX-graph and AOTAutograd cache counters (hits, misses, bypasses) and every distinct reason Inductor
logged for bypassing its FX-graph cache. docs/PERFORMANCE.md v16c found the fused chains re-lowered in every
process although the Triton binaries came from the folder; this shows whether, and why.
"""
import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import logging  # noqa: E402

import worker  # noqa: E402,F401  - applies LINGBOT_COMPILE_CACHE before torch is imported

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


class _Reasons(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "bypass" in msg[:80].lower():  # not the cache-key dumps, which list "bypass" settings further on
            self.seen[msg[:300]] = self.seen.get(msg[:300], 0) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=1)
    a = ap.parse_args()
    reasons = _Reasons()
    for name in ("torch._inductor.codecache", "torch._functorch._aot_autograd.autograd_cache"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(reasons)
    from worker.parallel.pool import load_generator

    gen = load_generator("lingbot-world-fast", "cuda", a.ranks, text_encoder=False)
    ready = time.perf_counter() - T0
    print(f"start to ready: {ready:.1f} s (torch {torch.__version__})")
    for group in ("inductor", "aot_autograd"):
        print(group, {k: v for k, v in sorted(counters[group].items()) if "cache" in k})
    for msg, n in sorted(reasons.seen.items(), key=lambda kv: -kv[1]):
        print(f"{n:4d}x {msg}")
    if hasattr(gen, "close"):
        gen.close()


if __name__ == "__main__":
    main()
