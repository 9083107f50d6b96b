"""Soak: 50 sequential jobs through ONE JobRunner/Engine (tiny model, CPU), with failures injected on purpose.

Every good job must produce exactly what the same request produces on a FRESH engine in a FRESH process (a
subprocess running this file as a script, one new Engine per request): any state that survives a job - KV cache,
text-prompt cache, RNG, camera history, the VAE's causal feature caches, a stuck lock or thread - shows up as a
different chunk. Compared per chunk: sha256 of the clean latents and of the decoded video tensor (both taken at
the generator boundary, so format "none" is covered too) and of the streamed frame bytes (JPEG/WebP of the same
uint8 frames are byte-identical; the MP4 container is not, so it is not compared).

The failures: bad input of several kinds (rejected before the rollout), an exception in the DiT mid-chunk, an
out-of-memory error mid-chunk, an exception in the VAE decoder thread, and a cancellation (consumer closes the
generator) after the first chunk.

Host memory: RSS (after gc and glibc malloc_trim, so memory the allocator merely keeps in its per-thread arenas
does not count; every job starts 2 threads) is sampled after every job from the 6th on (5 jobs of warm-up).
Levels are medians: baseline = the first 5 samples, middle = 10 around the middle, end = the last 10.
Bounds: end - baseline < +150 MB and end - middle < +50 MB. Why: the tiny model's per-job working set is a few MB
(a 128x96 3-chunk job holds < 5 MB of latents, frames and KV cache), but PyTorch's CPU allocator and x264 keep
blocks of the varying shapes (3 sizes x 1-3 chunks); measured end - baseline runs between -20 and +60 MB, and the
second half stays within a few MB. A steady per-job leak of frames, caches, an MP4 buffer or a thread's stack
breaks the second-half bound; small state leaks are what the bit-identical comparison above is for.
"""

from __future__ import annotations

import base64
import ctypes
import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
N_JOBS = 50
WARMUP = 5
RSS_BOUND_MB = 150

SIZES = [(64, 48), (128, 96), (96, 64)]
PROMPTS = ["a stone corridor", "a sunny beach with waves", "a neon city street at night", "a forest path"]
PATHS = [
    [[], ["w"], ["w", "l"]],
    [[], ["a"], ["d"], ["i"], ["k"], ["j"]],
    [[], [], []],
    [["s"], ["w", "d"], ["l"], ["l"], [], ["w"], ["a", "j"]],
]
FORMATS = ["jpeg", "webp", "none"]


def _image_b64(w: int, h: int, variant: int) -> str:
    img = Image.radial_gradient("L").convert("RGB").resize((w, h))
    if variant % 2:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def good_request(i: int) -> dict:
    w, h = SIZES[(0, 0, 2, 0, 1)[i % 5]]  # mostly the smallest size: the soak must stay fast on 2 cores
    chunks = 3 if (w, h) == (64, 48) and i % 7 == 0 else 2 if i % 3 == 0 else 1
    req = {
        "prompt": PROMPTS[i % len(PROMPTS)],  # repeats: the prompt cache is hit in the soak, missed when fresh
        "image": _image_b64(w, h, i // 3),
        "size": f"{w}x{h}",
        "num_chunks": chunks,
        "seed": 1000 + 7 * i,
        "camera_actions": PATHS[i % len(PATHS)][: 3 * chunks],
        "stream": {"format": FORMATS[i % 3], "quality": 60 + i % 30},
    }
    if i % 4 == 1:
        req["kv_window"], req["kv_sink"] = 3, 0  # the smallest window: chunk 2 evicts chunk 0 from the cache
    return req


# Failure kinds, cycled. "bad:*" are rejected before the rollout; the others fail (or stop) inside it.
FAILURES = ["dit_error", "bad:size", "cancel", "oom", "bad:image_garbage", "decoder_error", "bad:action",
            "dit_error", "bad:truncated_png", "cancel", "oom", "bad:unknown_field"]


def bad_request(kind: str, i: int) -> tuple[dict, str]:
    """(request, the field the error must name)."""
    base = good_request(i)
    if kind == "bad:size":
        return {**base, "size": "100x50"}, "size"
    if kind == "bad:image_garbage":
        return {**base, "image": "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()}, "image"
    if kind == "bad:action":
        return {**base, "camera_actions": [[], ["w"], ["fly"]]}, "camera_actions[2]"
    if kind == "bad:truncated_png":
        raw = base64.b64decode(base["image"])
        return {**base, "image": base64.b64encode(raw[: len(raw) // 2]).decode()}, "image"
    if kind == "bad:unknown_field":
        return {**base, "steps": 8}, "steps"
    raise ValueError(kind)


def _sha(t: torch.Tensor | np.ndarray) -> str:
    a = t.detach().to("cpu").contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]


class Recording:
    """Wraps the engine: records a digest of every chunk's clean latents and decoded video."""

    def __init__(self, generator) -> None:
        self.generator = generator
        self.chunks: list[str] = []

    def rollout(self, job):
        for c in self.generator.rollout(job):
            self.chunks.append(f"{c.index}:{c.frame_start}:{_sha(c.latents)}:{_sha(c.frames)}")
            yield c


def digest_items(items: list[dict], recorded: list[str]) -> dict:
    frames = [hashlib.sha256("".join(it["frames"]).encode()).hexdigest()[:16]
              for it in items if it.get("type") == "chunk"]
    video = items[-1]
    return {"chunks": list(recorded), "frames": frames, "num_frames": video.get("num_frames"),
            "types": [it.get("type") for it in items]}


def run_good(runner, rec: Recording, req: dict, job_id: str) -> dict:
    rec.chunks.clear()
    items = list(runner.run(req, job_id=job_id))
    assert items[-1].get("type") == "video", items[-1]
    Path(items[-1]["path"]).unlink()  # keep the soak's disk use flat
    return digest_items(items, rec.chunks)


# --- the fresh-process reference (this file run as a script) -------------------------------------------------


def fresh_main() -> None:
    """stdin: JSON list of requests. stdout: JSON list of digests, each from a brand-new Engine."""
    from worker.engine import Engine
    from worker.service import JobRunner

    torch.set_num_threads(1)
    reqs = json.load(sys.stdin)
    out_dir = tempfile.mkdtemp(prefix="soak-fresh-")
    results = []
    for n, req in enumerate(reqs):
        rec = Recording(Engine.load("tiny", device="cpu"))
        runner = JobRunner.from_env(rec, rec.generator.preset, {"LINGBOT_OUTPUT_DIR": out_dir})
        results.append(run_good(runner, rec, req, f"fresh-{n}"))
    print("FRESH-RESULTS " + json.dumps(results))


# --- the soak ------------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    """Resident set after a GC and glibc's malloc_trim: what is still in use, not freed memory the allocator keeps
    in its per-thread arenas (every job starts 2 threads, so arenas fill up and make raw RSS swing by ~200 MB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: raw RSS, same bounds
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise


def _plan() -> list[tuple[int, str | None]]:
    """Every 4th job (from the 3rd) fails on purpose: 12 failures, 38 good jobs, interleaved."""
    plan, f = [], 0
    for i in range(N_JOBS):
        if i % 4 == 2 and f < len(FAILURES):
            plan.append((i, FAILURES[f]))
            f += 1
        else:
            plan.append((i, None))
    return plan


def _no_rollout_threads() -> bool:
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if not [t for t in threading.enumerate() if t.name.startswith("rollout-")]:
            return True
        time.sleep(0.01)
    return False


def test_soak_50_jobs_one_engine_match_fresh_process(tmp_path):
    from worker.engine import Engine
    from worker.service import JobRunner

    plan = _plan()
    good = [(i, good_request(i)) for i, kind in plan if kind is None]
    # The reference runs concurrently in its own process (same code, same thread count, a fresh Engine per job).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # One thread in each process: the two run side by side on 2 cores, and the same thread count on both sides
    # keeps CPU reductions in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stderr = (tmp_path.parent / f"{tmp_path.name}-fresh.log").open("w+")
    fresh = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], cwd=ROOT, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
    try:
        fresh.stdin.write(json.dumps([r for _, r in good]))
        fresh.stdin.close()

        engine = Engine.load("tiny", device="cpu")
        rec = Recording(engine)
        runner = JobRunner.from_env(rec, engine.preset, {"LINGBOT_OUTPUT_DIR": str(tmp_path)})
        dit, vae = engine.dit, engine.vae
        soak: dict[int, dict] = {}
        injected: dict[str, int] = {}
        rss: list[float] = []
        for i, kind in plan:
            if kind is None:
                soak[i] = run_good(runner, rec, good_request(i), f"soak-{i}")
            elif kind.startswith("bad:"):
                req, field = bad_request(kind, i)
                items = list(runner.run(req, job_id=f"soak-{i}"))
                assert len(items) == 1 and items[0]["field"] == field, (kind, items)
            elif kind == "cancel":
                gen = runner.run(good_request(i) | {"num_chunks": 3}, job_id=f"soak-{i}")
                assert next(gen)["type"] in ("chunk", "progress")
                gen.close()
            else:
                req = good_request(i) | {"num_chunks": 3}
                calls = {"n": 0}
                if kind == "decoder_error":
                    real = vae.decode_chunk

                    def broken(x, real=real):
                        calls["n"] += 1
                        if calls["n"] == 2:  # the second chunk's decode: the VAE cache holds chunk 0
                            raise RuntimeError("injected VAE failure")
                        return real(x)

                    vae.decode_chunk = broken
                else:
                    exc = (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
                           if kind == "oom" else RuntimeError("injected DiT failure"))

                    def broken(*a, real=dit.forward, exc=exc, **k):
                        calls["n"] += 1
                        if calls["n"] == 7:  # 5 forwards per chunk: this is step 2 of chunk 1, mid-chunk
                            raise exc
                        return real(*a, **k)

                    dit.forward = broken
                try:
                    items = list(runner.run(req, job_id=f"soak-{i}"))
                finally:
                    vae.__dict__.pop("decode_chunk", None)
                    dit.__dict__.pop("forward", None)
                err = items[-1]
                assert set(err) == {"error", "field"}, (kind, err)
                assert all(it.get("type") in ("chunk", "progress") for it in items[:-1])
                expect = {"oom": "out of GPU memory", "dit_error": "injected DiT failure",
                          "decoder_error": "injected VAE failure"}[kind]
                assert expect in err["error"], (kind, err)
            if kind is not None:
                injected[kind] = injected.get(kind, 0) + 1
            # After every job, good or bad: the engine is free, no rollout thread survives, no file is left over.
            assert not engine._lock.locked(), (i, kind)
            assert _no_rollout_threads(), (i, kind)
            assert not [p for p in tmp_path.rglob("*") if p.is_file()], (i, kind)
            if i + 1 > WARMUP:
                rss.append(_rss_mb())

        out = fresh.stdout.read()
        fresh.wait(timeout=240)
    finally:
        torch.set_num_threads(threads)
        if fresh.poll() is None:
            fresh.kill()
            fresh.wait()
        stderr.seek(0)
        err_text = stderr.read()
        stderr.close()
    assert fresh.returncode == 0, err_text[-3000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("FRESH-RESULTS "))
    reference = json.loads(line[len("FRESH-RESULTS "):])
    assert len(reference) == len(good)

    leaks = [(i, soak[i], ref) for (i, _), ref in zip(good, reference) if soak[i] != ref]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    half = len(rss) // 2
    baseline, middle, end = med(rss[:5]), med(rss[half - 5 : half + 5]), med(rss[-10:])
    print(f"\nsoak: {N_JOBS} jobs ({len(good)} good, {sum(injected.values())} failures injected: "
          f"{', '.join(f'{k}x{v}' for k, v in sorted(injected.items()))}), leaks found: {len(leaks)}, "
          f"RSS {baseline:.0f} MB after warm-up, end {end - baseline:+.1f} MB (bound +{RSS_BOUND_MB}), "
          f"second half {end - middle:+.1f} MB (bound +50), largest sample {max(rss) - baseline:+.1f} MB")
    assert not leaks, "jobs differ from a fresh process:\n" + "\n".join(
        f"job {i}: soak {s}\n        fresh {r}" for i, s, r in leaks[:5])
    assert end - baseline < RSS_BOUND_MB, [round(x) for x in rss]
    assert end - middle < 50, [round(x) for x in rss]
    # The comparison is not vacuous: every good job streamed its chunks, and seeds/sizes really differ.
    assert all(len(d["chunks"]) == good_request(i)["num_chunks"] for i, d in soak.items())
    assert len({d["chunks"][0] for d in soak.values()}) == len(soak)


if __name__ == "__main__":
    fresh_main()
