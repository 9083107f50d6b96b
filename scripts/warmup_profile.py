"""Where the start-up warm-up's seconds go (its chunks: LINGBOT_WARMUP), with the kernel caches already full.

    LINGBOT_COMPILE_CACHE=/tmp/cc python3 scripts/warmup_profile.py [--ranks 1] [--top 45] [--model tiny --device cpu]

Run it twice against one cache folder: the first run fills the caches, the second is the case a worker with a
cache volume sees (docs/PERFORMANCE.md v21c: 24 s of warm-up after 41 s of weights on one H200). It builds the
full-size model with random weights (no text encoder), then runs `warmup` under a sampling profiler (every
working thread's stack every 5 ms) and prints the thread-seconds inside each function (inclusive) and per
library, Dynamo's compile-time table, and a second warm-up's seconds: the chunks' own work, with nothing left
to compile.
"""
import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import collections  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402

os.environ["LINGBOT_WARMUP"] = "0"  # the warm-up below is the one measured
import worker  # noqa: E402,F401  - applies LINGBOT_COMPILE_CACHE before torch is imported

import torch  # noqa: E402

LIBS = ("torch/_dynamo", "torch/_inductor", "torch/_functorch", "triton", "flash_attn", "cutlass", "torch/cuda",
        "torch/nn", "diffusers", "worker")


IDLE = {"wait", "get", "_wait_for_tstate_lock", "select", "poll", "recv", "_recv", "_recv_bytes", "accept",
        "sleep"}  # innermost frames of a thread that is waiting, not working


class Sampler(threading.Thread):
    """Every thread's stack every `interval` s (the rollout runs on its own thread, the caller waits on a queue);
    a thread whose innermost frame is a wait is not counted."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.inclusive: collections.Counter = collections.Counter()
        self.lib_leaf: collections.Counter = collections.Counter()
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident != self.ident and frame.f_code.co_name not in IDLE:
                    self._count(frame)

    def _count(self, frame) -> None:
        seen, lib = set(), None
        while frame is not None:
            code = frame.f_code
            key = f"{code.co_filename.split('site-packages/')[-1]}:{code.co_name}"
            if key not in seen:
                seen.add(key)
                self.inclusive[key] += 1
            if lib is None:  # the innermost frame that belongs to a library we name
                lib = next((x for x in LIBS if x in code.co_filename), None)
            frame = frame.f_back
        self.lib_leaf[lib or "other"] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--model", default="lingbot-world-fast")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from worker.parallel.pool import load_generator, warmup

    gen = load_generator(a.model, a.device, a.ranks, text_encoder=False)
    print(f"loaded at {time.perf_counter() - T0:.1f} s from process start", flush=True)
    from worker.models.prewarm import graphs_compiled

    traced = graphs_compiled()
    sampler = Sampler()
    sampler.start()
    first = warmup(gen)
    traced = graphs_compiled() - traced
    sampler.stop.set()
    sampler.join()
    second = warmup(gen)
    dt = sampler.interval
    print(f"warm-up: {first:.1f} s, {traced} graphs traced in it; a second one: {second:.1f} s; "
          f"{sampler.samples} samples of the first")
    print("seconds by the innermost library on the stack:")
    for lib, n in sampler.lib_leaf.most_common():
        print(f"  {n * dt:7.2f} s  {lib}")
    print("seconds inside each function (inclusive):")
    for key, n in sampler.inclusive.most_common(a.top):
        print(f"  {n * dt:7.2f} s  {key}")
    try:
        from torch._dynamo.utils import compile_times

        print(compile_times(repr="str", aggregate=True))
    except Exception as exc:  # noqa: BLE001 - a diagnostic; the table's API moves between versions
        print("no compile-time table:", exc)
    if hasattr(gen, "close"):
        gen.close()


if __name__ == "__main__":
    main()
