"""`python -m worker bench`: a warm rollout with full-size random weights, timed per chunk.

Reports per chunk and as medians over the steady state (once the attention span sink + window is full):
DiT ms (the chunk before's cache refresh + 4 steps), decode ms, frame-encode ms (JPEG for the stream + H.264 for
the MP4), end-to-end chunk ms, generated fps, time to first chunk, peak memory per rank, and MFU: the FLOPs we count
for a chunk over the DiT time, against a bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from worker import media
from worker.camera import INTRINSICS_SOURCE_HEIGHT, INTRINSICS_SOURCE_WIDTH
from worker.config import (ACTION_FOCAL, CHUNK_LATENT_FRAMES, DiTConfig, VAE_STRIDE, chunk_tokens,
                           pixel_frames_for_chunk)
from worker.models import chunk_graphs
from worker.models.attention import active_backend
from worker.parallel.sp import decode_split
from worker.rollout import RolloutJob, decode_priority
from worker.schedule import dmd_schedule


def dit_chunk_flops(cfg: DiTConfig, lat_h: int, lat_w: int, kv_frames: int, refresh: bool = True,
                    refresh_kv_frames: int | None = None, camera_frames: float = CHUNK_LATENT_FRAMES
                    ) -> dict[str, float]:
    """Matmul FLOPs of one chunk's DiT time: 4 denoising forwards + 1 cache refresh, camera adapters once.

    kv_frames: latent frames the chunk's queries attend to (its own 3 included). The refresh in a chunk's DiT time
    is the chunk before's (worker/rollout.py runs it after that chunk's frames): refresh False for chunk 0, which
    has none; refresh_kv_frames: the span it attends to, the chunk before's (default kv_frames, as when steady).
    camera_frames: the chunk's frames whose camera modulation was computed, not taken from the camera memo.
    """
    _, ph, pw = cfg.patch_size
    n = chunk_tokens(cfg, lat_h, lat_w)
    frame = (lat_h // ph) * (lat_w // pw)
    d, f, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    linear = 2 * n * d * d * 6 + 2 * n * d * f * 2  # self q,k,v,o + cross q,o; FFN up/down

    def block_flops(keys: int) -> int:  # QK^T + PV for self and cross attention, and the linears
        return linear + 4 * n * keys * d + 4 * n * cfg.text_len * d

    block = block_flops(kv_frames * frame)
    steps = len(dmd_schedule().timesteps)
    # the refresh runs every block but the last fully; the last only projects K and V
    refresh_keys = (kv_frames if refresh_kv_frames is None else refresh_kv_frames) * frame
    embed = 2 * n * cfg.in_dim * math.prod(cfg.patch_size) * d
    head = 2 * n * d * cfg.out_dim * math.prod(cfg.patch_size)
    refresh = embed + (layers - 1) * block_flops(refresh_keys) + 2 * n * d * d * 2 if refresh else 0
    camera = (layers * 4 * 2 * n * d * d + 2 * n * cfg.camera_in_features * d + 2 * 2 * n * d * d) \
        * camera_frames / CHUNK_LATENT_FRAMES
    total = steps * (embed + layers * block + head) + refresh + camera
    return {"total": float(total), "per_forward": float(layers * block), "camera": float(camera)}


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    if device.type != "cuda":
        n, iters = 1024, 3
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def gpu_ms(fn, n: int = 10, warmup: int = 3) -> list[float]:
    """Milliseconds of GPU time of each of n calls of fn() on the current CUDA stream, after `warmup` calls
    (CUDA events around each call; for the stand-alone scripts under scripts/)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CAMERA_PATHS = ("keys", "held", "distinct")


def _camera_path(kind: str, latent_frames: int, seed: int) -> dict:
    """The RolloutJob camera fields of a bench path. The path changes the cost only through the camera memo
    (worker/models/camera_memo.py), which computes each distinct frame motion once:
    keys: a 6-frame cycle of key sets, 5 distinct motions (the default since v0);
    held: "w" held, one motion;
    distinct: poses whose every step differs (a turn that keeps tightening), so no frame's condition repeats and
      every frame is computed: the memo's worst case. The seed moves the curve, so a warm-up never primes it."""
    if kind == "keys":
        path = [["w"], ["w"], ["w", "l"], ["l"], [], ["d"]]
        return {"camera_actions": [path[i % len(path)] for i in range(latent_frames)]}
    if kind == "held":
        return {"camera_actions": [["w"]] * latent_frames}
    if kind == "distinct":
        poses = []
        for k in range((latent_frames - 1) * VAE_STRIDE[0] + 1):  # one per pixel frame
            yaw = math.radians(0.01 * (k + 7 * seed) ** 1.5)
            c2w = [[math.cos(yaw), 0.0, math.sin(yaw), 0.002 * k * k], [0.0, 1.0, 0.0, 0.0],
                   [-math.sin(yaw), 0.0, math.cos(yaw), 0.05 * k], [0.0, 0.0, 0.0, 1.0]]
            poses.append(c2w)
        return {"poses": poses, "intrinsics": [ACTION_FOCAL, ACTION_FOCAL, INTRINSICS_SOURCE_WIDTH / 2,
                                               INTRINSICS_SOURCE_HEIGHT / 2]}  # the actions' K
    raise ValueError(f"camera path {kind!r}: expected one of {', '.join(CAMERA_PATHS)}")


def _bench_job(width: int, height: int, chunks: int, window: int, sink: int, seed: int = 0,
               decode: bool = True, camera: str = "keys") -> RolloutJob:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 2 - 1
    return RolloutJob(prompt="benchmark", image=image, num_chunks=chunks, width=width, height=height, seed=seed,
                      kv_window=window, kv_sink=sink, decode=decode,
                      **_camera_path(camera, chunks * CHUNK_LATENT_FRAMES, seed))


def _mean(xs: list[float]) -> float:
    return float(statistics.fmean(xs)) if xs else float("nan")


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def run_bench(generator, *, width: int, height: int, chunks: int, window: int, sink: int, warmup_chunks: int,
              save_latents: Path | None = None, decode: bool = True, camera: str = "keys") -> dict:
    engine = getattr(generator, "engine", generator)
    dev = engine.device
    cfg = engine.dit.cfg
    lat_h, lat_w = height // VAE_STRIDE[1], width // VAE_STRIDE[2]
    if warmup_chunks:
        for _ in generator.rollout(_bench_job(width, height, warmup_chunks, window, sink, seed=1, decode=decode,
                                                    camera=camera)):
            pass
    if hasattr(generator, "reset_peak_memory"):
        generator.reset_peak_memory()
    elif dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    rows, latents = [], []
    with tempfile.TemporaryDirectory() as tmp:
        mp4 = media.Mp4Writer(Path(tmp) / "bench.mp4", width, height)
        t_start = time.perf_counter()
        t_prev = t_start
        first_chunk_s = None
        for out in generator.rollout(_bench_job(width, height, chunks, window, sink, decode=decode, camera=camera)):
            t0 = time.perf_counter()
            if out.frames is not None:
                media.encode_frames(out.frames, "jpeg", 85)
                mp4.write(out.frames)
            now = time.perf_counter()
            if first_chunk_s is None:
                first_chunk_s = now - t_start
            kv_frames = min((out.index + 1) * CHUNK_LATENT_FRAMES, sink + window)
            computed = out.stats.get("camera_frames_computed", float(CHUNK_LATENT_FRAMES))
            flops = dit_chunk_flops(cfg, lat_h, lat_w, kv_frames, refresh=out.index > 0,
                                    refresh_kv_frames=min(out.index * CHUNK_LATENT_FRAMES, sink + window),
                                    camera_frames=computed)["total"]
            rows.append({
                "chunk": out.index, "frames": pixel_frames_for_chunk(out.index), "kv_frames": kv_frames,
                "dit_ms": out.stats["dit_ms"], "decode_ms": out.stats["decode_ms"],
                "decode_launch_ms": out.stats["decode_launch_ms"], "encode_ms": (now - t0) * 1e3,
                "chunk_ms": (now - t_prev) * 1e3, "dit_tflop": flops / 1e12,
                "condition_cached": bool(out.stats.get("condition_cached", 0.0)),
                "condition_layers": int(out.stats.get("condition_layers", 0)),
                "graph_replay": bool(out.stats.get("graph_replay", 0.0)),
                "camera_frames_computed": int(computed),
                "host_ms": out.stats.get("host_ms"),  # the leader's host time to queue the chunk
                "band_decode_ms": out.stats.get("band_decode_ms"),  # decoded in bands: GPU ms, with the gather
            })
            t_prev = now
            if save_latents is not None:
                latents.append(out.latents.float().cpu())
        if decode:
            mp4.close()
        else:
            mp4.abort()
        total_s = time.perf_counter() - t_start
    if save_latents is not None:
        torch.save(torch.cat(latents, dim=1), save_latents)

    ranks = getattr(generator, "world", 1)
    peak_tflops = matmul_peak_tflops(dev)
    steady = [r for r in rows if r["kv_frames"] >= min(sink + window, chunks * CHUNK_LATENT_FRAMES) and r["chunk"] > 0]
    steady = steady or rows[1:] or rows
    med = {k: _median([r[k] for r in steady]) for k in ("dit_ms", "dit_tflop", "decode_ms", "encode_ms", "chunk_ms")}
    med["host_ms"] = _median([r["host_ms"] for r in steady if r["host_ms"] is not None])
    # The last chunk decodes alone once the DiT has stopped, so its gap to the one before is short (~0.7 s against
    # ~2 s on one H100): it measures the pipeline draining, not a steady chunk. Until v14 it was in the mean,
    # which put the end-to-end figure ~100 ms under the DiT time (docs/PERFORMANCE.md). The median of the rest
    # also keeps one late delivery (a decode that waited behind the DiT) from moving the figure.
    flowing = [r["chunk_ms"] for r in steady if r["chunk"] < rows[-1]["chunk"]] or [r["chunk_ms"] for r in steady]
    end_to_end_ms = _median(flowing)
    # Long sessions: once the image condition comes from the encoder's fixed point the leader no longer encodes.
    cached = [r for r in steady if r["condition_cached"]]
    med_cached = {"dit_ms": _median([r["dit_ms"] for r in cached]),
                  "chunk_ms": _median([r["chunk_ms"] for r in cached])} if cached else None
    frames_total = sum(r["frames"] for r in rows)
    mfu = med["dit_tflop"] / (med["dit_ms"] / 1e3) / (peak_tflops * ranks)
    if hasattr(generator, "peak_memory"):
        peak_mem = generator.peak_memory()
    else:
        peak_mem = [torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0]
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "ranks": ranks, "model": engine.info.name, "width": width, "height": height, "chunks": chunks,
        "kv_window": window, "kv_sink": sink, "camera": camera, "steady_chunks": [r["chunk"] for r in steady],
        "camera_memo_gb": engine.dit.camera_memo.budget / 1e9,
        "median": med, "end_to_end_chunk_ms": end_to_end_ms, "steady_mean_chunk_ms": _mean(flowing),
        "condition_cached_chunks": [r["chunk"] for r in cached], "median_condition_cached": med_cached,
        "graph_replay_chunks": [r["chunk"] for r in rows if r["graph_replay"]],
        "generated_fps": 12 / (end_to_end_ms / 1e3), "overall_fps": frames_total / total_s,
        "decode": decode, "first_chunk_s": first_chunk_s,
        "total_s": total_s, "matmul_peak_tflops": peak_tflops, "mfu": mfu,
        "peak_memory_gib": [round(m / 2**30, 2) for m in peak_mem], "rows": rows,
        "torch": torch.__version__, "fp8": os.environ.get("LINGBOT_FP8") == "1",
        "attention": active_backend(dev, head_dim=cfg.head_dim),
        "decode_priority": decode_priority(engine.decode_priority) if decode else None,  # as the leader ran it
        "decode_split": decode_split(engine.decode_split) if decode and engine.sp.enabled else None,
        # per-rank tokens of a chunk and heads (worker/parallel/sp.py: even, unless the leader alone decodes)
        "sp_split": {"tokens": engine.sp.split_tokens(chunk_tokens(cfg, height // VAE_STRIDE[1], width // VAE_STRIDE[2])),
                     "heads": engine.sp.split_heads(cfg.num_heads)},
    }


def print_table(res: dict) -> None:
    print(f"\n{res['model']} on {res['ranks']} x {res['device']}  {res['width']}x{res['height']}  "
          f"window {res['kv_window']} + sink {res['kv_sink']}  attention {res['attention']}  camera path "
          f"{res['camera']} (memo {res['camera_memo_gb']:g} GB)")
    print(f"{'chunk':>5} {'kv':>3} {'dit ms':>9} {'decode ms':>9} {'encode ms':>9} {'chunk ms':>9} {'cam':>3}  "
          "condition encoder")
    for r in res["rows"]:
        cond = "fixed point" if r["condition_cached"] else f"{r['condition_layers']} layers"
        replay = "  (graph replay)" if r.get("graph_replay") else ""
        print(f"{r['chunk']:>5} {r['kv_frames']:>3} {r['dit_ms']:>9.1f} {r['decode_ms']:>9.1f} "
              f"{r['encode_ms']:>9.1f} {r['chunk_ms']:>9.1f} {r['camera_frames_computed']:>3}  {cond}{replay}")
    print("cam: the chunk's frames whose camera modulation was computed (the rest came from the camera memo)")
    m = res["median"]
    print(f"steady (chunks {res['steady_chunks'][0]}..{res['steady_chunks'][-1]}): DiT median {m['dit_ms']:.1f} ms, "
          f"decode {m['decode_ms']:.1f} ms (wall, overlapped), encode {m['encode_ms']:.1f} ms, "
          f"end-to-end {res['end_to_end_chunk_ms']:.1f} ms/chunk (median; mean {res['steady_mean_chunk_ms']:.1f}; the last "
          f"chunk, which drains, left out) -> {res['generated_fps']:.2f} fps generated; "
          f"whole rollout {res['overall_fps']:.2f} fps; host {m['host_ms']:.1f} ms to queue a chunk")
    if res.get("median_condition_cached"):
        mc, cc = res["median_condition_cached"], res["condition_cached_chunks"]
        print(f"steady with the condition at its fixed point (chunks {cc[0]}..{cc[-1]}, no encoder work): "
              f"DiT median {mc['dit_ms']:.1f} ms")
    print(f"first chunk {res['first_chunk_s']:.3f} s; MFU {100 * res['mfu']:.1f}% of "
          f"{res['matmul_peak_tflops']:.3g} TFLOP/s x {res['ranks']}; "
          f"peak memory GiB per rank {res['peak_memory_gib']}")
    if res["ranks"] > 1:
        print(f"split per rank: tokens {res['sp_split']['tokens']}, heads {res['sp_split']['heads']}")
    if res["graph_replay_chunks"]:
        print(f"CUDA graph replays: chunks {res['graph_replay_chunks'][0]}..{res['graph_replay_chunks'][-1]}")


def cmd_bench(a) -> int:
    from worker.parallel.pool import load_generator

    width, height = (int(v) for v in a.size.lower().split("x"))
    model = a.model or "lingbot-world-fast"
    if a.fp8:
        os.environ["LINGBOT_FP8"] = "1"  # read by Engine.load on every rank (spawned ranks inherit it)
    # One list per setting; a run for every combination, in one process (one model load: same-machine pairs).
    options = {"cuda_graphs": _modes(a.cuda_graphs, "--cuda-graphs", lambda v: chunk_graphs.check_mode(v, "mode")),
               "decode_priority": _modes(a.decode_priority, "--decode-priority", decode_priority),
               "decode_split": _modes(a.decode_split, "--decode-split", decode_split),
               "decode_cost": [0.0] if a.no_decode else _modes(a.decode_cost, "--decode-cost", _decode_cost)}
    if options["decode_cost"] != [None]:  # read by RankPool.start; without a decode the split is even
        os.environ["LINGBOT_SP_DECODE_COST"] = str(options["decode_cost"][0])
    runs = [dict(zip(options, values)) for values in itertools.product(*options.values())]
    varied = [k for k, v in options.items() if len(v) > 1]
    gen = load_generator(model, a.device, a.ranks, text_encoder=False)
    results = []
    try:
        if len(options["decode_cost"]) > 1 and getattr(gen, "world", 1) < 2:
            raise SystemExit("--decode-cost: several values need 2 or more ranks")
        for run in runs:
            # A new decode split takes its own default cost (RankPool.configure) unless a cost was given.
            settings = {k: v for k, v in run.items() if v is not None
                        and (k != "decode_cost" or k in varied or run["decode_split"] is not None)}
            if settings:
                gen.configure(**settings)
            tag = "".join(f"_{_TAGS[k]}{run[k]:g}" if isinstance(run[k], float) else f"_{_TAGS[k]}{run[k]}"
                          for k in varied)  # latents per run: lat_g0_d0.5.pt
            latents = a.save_latents.with_name(f"{a.save_latents.stem}{tag}{a.save_latents.suffix}") \
                if a.save_latents is not None and tag else a.save_latents
            res = run_bench(gen, width=width, height=height, chunks=a.chunks, window=a.kv_window, sink=a.kv_sink,
                            warmup_chunks=a.warmup_chunks, save_latents=latents, decode=not a.no_decode,
                            camera=a.camera)
            res.update({k: v for k, v in run.items() if k not in ("decode_priority", "decode_split")})
            res["command"] = "python -m worker " + " ".join(os.sys.argv[1:])
            print_table(res)
            results.append(res)
            if a.json:  # after every run: a sweep cut short keeps what it measured
                a.json.write_text(json.dumps(results[0] if len(runs) == 1 else results, indent=2))
    finally:
        if hasattr(gen, "close"):
            gen.close()
    return 0


_TAGS = {"cuda_graphs": "g", "decode_priority": "p", "decode_split": "s", "decode_cost": "d"}


def _decode_cost(value: str) -> float:
    """One --decode-cost value: a number in [0, 1)."""
    try:
        cost = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not 0 <= cost < 1:
        raise ValueError(f"{cost} must be in [0, 1)")
    return cost


def _modes(spec: str | None, flag: str, check) -> list:
    """A setting: one value, a comma-separated list (one run each, same process), or None for the default; `check`
    turns each value into the setting or raises ValueError."""
    if spec is None:
        return [None]
    try:
        return [check(v) for v in spec.split(",")]
    except ValueError as exc:
        raise SystemExit(f"{flag}: {exc}") from None
