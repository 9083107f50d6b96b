"""The causal rollout: chunks of 3 latent frames, 4 DMD steps each, a cache refresh, a streamed decode.

Official Fast semantics (reference/fast_rollout.md section 4), per chunk c:

    x = noise[c]                                            one seeded generator, drawn up front for all chunks
    for i, t in enumerate([999, 978, 947, 825]):
        v  = dit(x, y[c], t)                                 KV cache holds the clean context of earlier chunks
        x0 = x - sigma_first(t) * v                          (float64 math)
        x  = (1 - s') x0 + s' eps   with s' = sigma_second(t_next), eps from the same generator (not after the last)
    frames = vae.decode_chunk(x0)                            9 frames for chunk 0, then 12
    dit(x0, y[c], t=0)                                       refresh: the cache now holds the CLEAN chunk's K/V
                                                             (not after the job's last chunk: nothing reads it)

The refresh does not change the chunk's frames, so it is queued after their decode, at the next chunk's start
(once every rank has agreed to go on): a chunk's frames come one forward sooner.

Every rank runs this loop in lockstep on identical latents (same seed, same device type); only the leader
encodes text and the image condition (then broadcasts them). The frames are decoded in bands of rows, one per
rank, right after the chunk, and gathered to the leader (or, with the decode split "leader", by the leader alone
beside the next chunk: worker/parallel/sp.py decode_split). Each chunk starts with the
leader's go/stop, host to host, so a consumer that stops iterating (cancel) releases the other ranks at the next
chunk boundary instead of leaving them inside a collective.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from worker import media
from worker.camera import CameraChunk, iter_camera_condition
from worker.config import CHUNK_LATENT_FRAMES, VAE_STRIDE, VAE_Z_DIM, MASK_CHANNELS, pixel_frames_for_chunk
from worker.models import chunk_graphs, vae_rows
from worker.models.kv_cache import KVCache
from worker.schedule import dmd_schedule
from worker.parallel.sp import decode_split
from worker.transfer import to_device, to_host

_GO, _STOP = 1, 0
FIRST_FRAMES_FIRST = True  # False: chunk 1's DiT does not wait for chunk 0's decode to be queued (A/B switch)


@dataclass
class RolloutJob:
    prompt: str
    image: torch.Tensor | None  # [3, H, W] in [-1, 1]; leader only
    num_chunks: int
    width: int
    height: int
    seed: int
    kv_window: int
    kv_sink: int
    camera_actions: list[list[str]] | None = None  # one key set per latent frame, or
    poses: list | None = None  # official c2w per pixel frame, with
    intrinsics: list | None = None  # [fx, fy, cx, cy] for 480x832
    decode: bool = True  # False: latents only (benchmarks of the DiT alone); ChunkOutput.frames is None

    def camera_chunks(self) -> Iterator[CameraChunk]:
        """The condition [1, 384, 3, H/8, W/8] and its frames' keys per chunk; every rank builds them from the
        job, so only the spec travels."""
        return iter_camera_condition(
            width=self.width, height=self.height, num_chunks=self.num_chunks,
            actions=self.camera_actions, poses=self.poses, intrinsics=self.intrinsics,
        )

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // VAE_STRIDE[1], self.width // VAE_STRIDE[2]


@dataclass
class ChunkOutput:
    index: int
    frame_start: int  # index of the first pixel frame of this chunk in the whole video
    # uint8 RGB [T, H, W, 3] on the host (None if job.decode is False). Made on the decoder's own stream and
    # thread, so a consumer never reads device memory another stream may still be writing, and the wait for the
    # GPU lands in the pipeline stage that owns the work.
    frames: np.ndarray | None
    latents: torch.Tensor  # [16, 3, H/8, W/8] fp32, the chunk's clean x0
    stats: dict[str, float] = field(default_factory=dict)  # dit_ms, decode_ms, condition_cached, condition_layers


def _mark(device: torch.device):
    """A point in time on this thread's stream: a CUDA event on a GPU (no host sync), wall time on the CPU."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _wait(mark) -> None:
    """Wait until `mark` (from _mark) has happened on the device."""
    if isinstance(mark, torch.cuda.Event):
        mark.synchronize()


def _wait_ms(start, end) -> float:
    """Wait until `end` (from _mark) has happened on the device; milliseconds from `start` to `end`."""
    _wait(end)
    if isinstance(end, torch.cuda.Event):
        return start.elapsed_time(end)
    return (end - start) * 1e3


def _sync(device: torch.device) -> None:
    """Wait for THIS thread's stream only: a device-wide sync would make the DiT wait for the decoder and back."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _priorities() -> tuple[int, int, int]:
    """(first chunk's decode, DiT, later decodes) as CUDA stream priorities, lower number = served first.

    The DiT is the critical path, so the decoder's kernels normally only fill the SMs it leaves idle. The first
    chunk's frames are the job's time to first output, so they go ahead of the DiT of chunk 1: the GPU work is
    the same either way, but the wait lands on chunk 1 instead of on the first frames."""
    least, greatest = torch.cuda.Stream.priority_range()
    dit = greatest + 1 if greatest + 1 < least else greatest
    return greatest, dit, least


DECODE_PRIORITIES = ("low", "high")


def decode_priority(value: str | None) -> str:
    """The leader's decode stream priority for chunks after the first: an engine's own setting (Engine.configure),
    else LINGBOT_DECODE_PRIORITY, else `low`.

    `low`: the decoder fills the SMs the DiT leaves idle (one GPU, where the DiT is the whole critical path).
    `high`: the decoder goes ahead of the DiT, like the first chunk's. Measured on 4 x H200 with graph replays
    (docs/PERFORMANCE.md v18): no difference, so `low` stays the default."""
    value = (value if value is not None else os.environ.get("LINGBOT_DECODE_PRIORITY", "low")).strip().lower()
    if value not in DECODE_PRIORITIES:
        raise ValueError(f"decode priority {value!r}: must be one of {', '.join(DECODE_PRIORITIES)}")
    return value


def _band_decoder(engine, job: "RolloutJob"):
    """This rank's VAE for a job decoded in bands (its rows set, its decode stream started) and every band's row
    count; None when the job's frames are not decoded in bands."""
    sp = engine.sp
    if not (job.decode and sp.enabled and decode_split(engine.decode_split) == "bands"):
        return None
    bands = vae_rows.balanced_bands(engine.vae.vae.decoder, job.latent_hw[0], sp.world)
    return engine.decoder(rows=bands[sp.rank]), [b - a for a, b in bands]


def _decode_band(engine, band, x0: torch.Tensor) -> torch.Tensor:
    """This rank's band of the chunk's frames, then every rank's band: uint8 [T, H, W, 3] on the device. Queued on
    the DiT's stream after the chunk, like its collectives and in the same order on every rank: the decode has the
    GPU to itself (beside the DiT it took ~700 ms for ~170 ms of kernels on 4 x H200, docs/PERFORMANCE.md v19)."""
    vae, counts = band
    try:
        mine = media.pixels_to_uint8(vae.decode_chunk(x0[0]))
        return engine.sp.gather(mine, sum(counts), dim=1, counts=counts)
    except BaseException:
        # The other ranks are in this chunk's gather or past it, not at a boundary: the group is out of step.
        engine.ranks_in_sync = False
        raise


def _stream(device: torch.device, priority: int):
    """A CUDA stream context for a pipeline thread (nothing on the CPU). Lower number = higher priority."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device, priority=priority))


def _share(engine, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Leader's tensor -> every rank (a no-op on one rank)."""
    if engine.sp.is_leader:
        out = tensor.to(engine.device, dtype).reshape(shape).contiguous()
    else:
        out = torch.empty(shape, dtype=dtype, device=engine.device)
    return engine.sp.broadcast(out)


def _prompt_context(engine, prompt: str) -> torch.Tensor:
    sp, d = engine.sp, engine.dit.cfg.text_dim
    ctx = engine.encode_prompt(prompt) if sp.is_leader else None
    n = _share(engine, None if ctx is None else torch.tensor([ctx.shape[0]]), (1,), torch.int64)
    return _share(engine, ctx, (1, int(n.item()), d), torch.float32)


def _agree_to_continue(engine, stopping: bool) -> bool:
    """Chunk boundary: the leader's go/stop reaches every rank (SequenceParallel.agree: host to host where the
    pool gave it a control group, so the GPUs keep running the chunks already queued)."""
    return engine.sp.agree(_STOP if stopping else _GO) == _GO


# Chunks a rank's host may have queued ahead of its GPU. The host queues chunk c while the GPU runs c-1, so the
# GPU never waits for the host at a chunk boundary (on 4 x H200 it did, ~35-110 ms per chunk while the leader's
# host launched the chunk's camera modulation and condition encode; docs/PERFORMANCE.md v19); more would only
# delay a cancel, since queued GPU work runs to its end.
LOOKAHEAD_CHUNKS = 2


def _denoise_chunks(engine, job: RolloutJob, stop: threading.Event | None = None
                    ) -> Iterator[tuple[int, torch.Tensor, dict[str, float], tuple]]:
    """The DiT side of the rollout, on every rank: yields (chunk index, clean x0 [1,16,3,h,w], stats, marks).

    Nothing here waits for the GPU beyond LOOKAHEAD_CHUNKS: x0 is yielded as soon as its work is queued, so the
    CPU prepares the next chunk while the GPU still runs this one instead of the GPU idling at every chunk
    boundary. Whoever reads x0 first waits with _wait_ms(*marks), which also gives the chunk's DiT time (GPU time
    between the two marks).
    stats on the leader: condition_cached (1.0 when the image condition came from the encoder's fixed point
    instead of an encode), condition_layers (encoder layers run for it; see StreamingVAE.next_condition_chunk),
    graph_replay (1.0 when the chunk's forwards were CUDA graph replays, worker/models/chunk_graphs.py),
    camera_frames_computed (latent frames whose camera modulation was computed, not reused: camera_memo.py) and
    host_ms (the host's time to queue the chunk, not counting its wait at the lookahead bound; it includes the
    waits inside launches once CUDA's launch queue is full, so it bounds the host's own work from above: while it
    stays under the chunk's period, the GPU never waits for the host)."""
    dit, sp, dev = engine.dit, engine.sp, engine.device
    leader = sp.is_leader
    sched = dmd_schedule()
    lat_h, lat_w = job.latent_hw
    n_lat = CHUNK_LATENT_FRAMES * job.num_chunks

    gen = torch.Generator(device=dev).manual_seed(job.seed)
    noise = torch.randn(1, VAE_Z_DIM, n_lat, lat_h, lat_w, generator=gen, device=dev, dtype=torch.float32)
    engine.ranks_in_sync = not sp.enabled  # until every rank is past the prompt broadcast
    text_kv = dit.encode_text(_prompt_context(engine, job.prompt))
    engine.ranks_in_sync = True
    time_emb = {t: dit.time_embedding_for(t) for t in (*sched.timesteps, 0)}
    pt, ph, pw = dit.cfg.patch_size

    def make_cache(total_frames: int = n_lat // pt) -> KVCache:
        return KVCache(num_layers=dit.cfg.num_layers, frame_tokens=(lat_h // ph) * (lat_w // pw),
                       total_frames=total_frames, sink=job.kv_sink, window=job.kv_window,
                       heads=sp.local_heads(dit.cfg.num_heads), head_dim=dit.cfg.head_dim, dtype=dit.dtype,
                       device=dev)

    graph_mode = engine.graph_mode
    if graph_mode != "0":
        key = (lat_h, lat_w, job.kv_sink, job.kv_window, sp.leader_share, sp.leader_head_share)
        # Kept graphs outlive the job: their cache holds the longest span any job of this geometry can have.
        graphs = chunk_graphs.JobGraphs.for_job(engine, graph_mode, key, text_kv, job_cache=make_cache,
                                                kept_cache=lambda: make_cache(job.kv_sink + job.kv_window))
        cache = graphs.cache
    else:
        graphs, cache = None, make_cache()
    refresh = None  # the chunk before's cache refresh: queued once every rank has agreed on the next chunk
    cameras = job.camera_chunks()
    conditions = engine.condition_stream(job.image, job.num_chunks) if leader else None
    finished = False
    at_boundary = True  # True while every rank waits at the same point (a chunk boundary)
    last_done = -1
    ends: list = []  # each chunk's end mark, for the lookahead bound
    try:
        for c in range(job.num_chunks):
            if c >= LOOKAHEAD_CHUNKS:
                _wait(ends[c - LOOKAHEAD_CHUNKS])
            t_host = time.perf_counter()
            camera = next(cameras)
            plucker = to_device(camera.field, dev)
            stopping = leader and stop is not None and stop.is_set()
            if not _agree_to_continue(engine, stopping):
                finished = True  # every rank agreed to stop here
                return
            at_boundary = False
            t0 = _mark(dev)
            if refresh is not None:  # the chunk before's: its frames did not wait for it, and a stop skips it
                refresh()
                refresh = None
            y_shape = (1, MASK_CHANNELS + VAE_Z_DIM, CHUNK_LATENT_FRAMES, lat_h, lat_w)
            y = _share(engine, next(conditions) if leader else None, y_shape, torch.float32)
            cond = {"condition_cached": float(engine.vae.condition_at_fixed_point),
                    "condition_layers": float(engine.vae.condition_layers_run[0])} if leader else {}
            f0 = c * CHUNK_LATENT_FRAMES
            computed = dit.camera_memo.computed
            ctx = dit.prepare_chunk(plucker, f0, cache, sp, frame_keys=camera.frame_keys)
            replay = graphs.lookup() if graphs is not None else None
            if replay is not None:
                replay.buffers.load_chunk(ctx, y)
            if leader:
                cond["graph_replay"] = float(replay is not None)
                # Frames whose camera modulation this chunk computed rather than took from the memo.
                cond["camera_frames_computed"] = float(dit.camera_memo.computed - computed if dit.camera_memo.enabled
                                                       else plucker.shape[2])
            x = noise[:, :, f0 : f0 + CHUNK_LATENT_FRAMES]
            x0 = x
            for i, t in enumerate(sched.timesteps):
                if replay is not None:
                    v = replay.denoise(x, time_emb[t])
                else:
                    v = dit(x, y, t, text_kv, ctx, sp, time_emb=time_emb[t])
                x0 = (x.double() - sched.x0_sigmas[i] * v.double()).float()
                if i + 1 < len(sched.timesteps):
                    s = sched.renoise_sigmas[i]
                    eps = torch.randn(x0.shape, generator=gen, device=dev, dtype=torch.float32)
                    x = (1 - s) * x0 + s * eps
            # The refresh only serves later chunks: the job's last one skips it (a fifth of its DiT).
            refresh = functools.partial(_refresh, dit, sp, text_kv, ctx, x0, y, time_emb[sched.timesteps[0]],
                                        time_emb[0], replay, graphs)
            if c + 1 == job.num_chunks:
                refresh(more_chunks=False)
                refresh = None
            del ctx
            at_boundary = True
            last_done = c
            ends.append(_mark(dev))
            if leader:
                cond["host_ms"] = (time.perf_counter() - t_host) * 1e3
            yield c, x0, cond, (t0, ends[-1])
        finished = True
    finally:
        if sp.enabled and not finished:
            if not at_boundary:
                # A rank failed inside a chunk: the others sit in a collective we cannot match any more.
                engine.ranks_in_sync = False
            elif leader and last_done + 1 < job.num_chunks and engine.ranks_in_sync:
                # Stopped between chunks without the stop flag (an error on the leader): release the
                # followers, which wait at the next chunk's go/stop.
                try:
                    _agree_to_continue(engine, stopping=True)
                except Exception:  # noqa: BLE001 - a broken group is reported by the pool, not here
                    engine.ranks_in_sync = False


def _refresh(dit, sp, text_kv, ctx, x0: torch.Tensor, y: torch.Tensor, first_emb: tuple, refresh_emb: tuple,
             replay, graphs, more_chunks: bool = True) -> None:
    """A chunk's cache refresh (its clean K/V for the chunks after it; none after the job's last chunk), then
    the CUDA graph capture the chunk may be due for (which needs the refreshed cache). Queued at the start of
    the next chunk, after the go, so the chunk's frames are decoded first (on every rank's DiT stream in bands):
    they no longer wait for a forward that does not change them."""
    if more_chunks:
        if replay is not None:
            replay.refresh(x0)
        else:
            dit(x0, y, 0, text_kv, ctx, sp, cache_only=True, time_emb=refresh_emb)
    if replay is None and graphs is not None:
        graphs.after_eager_chunk(dit, sp, text_kv, ctx, x0, y, first_emb, refresh_emb, more_chunks=more_chunks)


_DONE = object()


def rollout(engine, job: RolloutJob) -> Iterator[ChunkOutput]:
    """Yields one ChunkOutput per chunk on the leader; followers yield nothing and return when told to.

    On the leader three things overlap: the DiT of chunk c+1 (producer thread), the VAE decode of chunk c
    (decoder thread, its own CUDA stream; decoded in bands, on every rank's DiT stream after the chunk, the decoder
    thread only copies the frames to the host) and whatever the consumer does with chunk c-1 (frame encoding,
    network). Queues are bounded, so a slow consumer slows generation instead of piling up frames; closing
    the generator (cancel) stops the producer at the next chunk boundary and releases every rank.
    """
    if not engine.sp.is_leader:
        with torch.inference_mode():
            band = _band_decoder(engine, job)
            for _, x0, _, _ in _denoise_chunks(engine, job):
                if band is not None:
                    _decode_band(engine, band, x0)
        _sync(engine.device)  # the job ends when its GPU work does (and an asynchronous error surfaces here)
        return

    dev = engine.device
    stop = threading.Event()  # producer: stop at the next chunk boundary (cancel, or the decoder failed)
    cancelled = threading.Event()  # the consumer is gone: nobody reads `out` any more
    to_decode: queue.Queue = queue.Queue(maxsize=2)
    out: queue.Queue = queue.Queue(maxsize=2)
    # The first chunk's frames are the job's time to first output. The DiT of chunk 1 waits until the decoder has
    # queued their kernels: otherwise the decoder's launches wait for the GIL behind the DiT thread's (chunk 0's
    # decode took 1.5-3x longer that way, docs/PERFORMANCE.md v13). The GPU stays busy with the decode meanwhile.
    first_queued = threading.Event()
    if not FIRST_FRAMES_FIRST:
        first_queued.set()
    band = _band_decoder(engine, job)  # decoded in bands: by the DiT thread, after each chunk

    def put(q: queue.Queue, item, until: threading.Event) -> bool:
        """Blocking put that gives up once `until` is set (its reader has gone away)."""
        while not until.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            with torch.inference_mode(), _stream(dev, _priorities()[1] if dev.type == "cuda" else 0):
                chunks = _denoise_chunks(engine, job, stop)
                try:
                    for item in chunks:
                        if band is not None:
                            item = (*item, _decode_band(engine, band, item[1]), _mark(dev))
                        if not put(to_decode, item, until=stop):
                            break
                        while item[0] == 0 and not first_queued.wait(0.05) and not stop.is_set():
                            pass
                finally:
                    chunks.close()  # stopped early: the other ranks are released at the boundary
                    # After a cancel up to LOOKAHEAD_CHUNKS chunks are still queued: they finish before the job
                    # does, so that the next job never writes buffers (kept CUDA graphs) this one still reads.
                    _sync(dev)
        except BaseException as exc:  # noqa: BLE001 - handed on behind the chunks already done, in order
            put(to_decode, exc, until=stop)
        finally:
            put(to_decode, _DONE, until=stop)

    def decode() -> None:
        try:
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            decoder = engine.decoder() if band is None else None
            frame_start = 0
            first, _, later = _priorities() if dev.type == "cuda" else (0, 0, 0)
            if decode_priority(engine.decode_priority) == "high":
                later = first
            with torch.inference_mode(), _stream(dev, later):
                while True:
                    try:
                        item = to_decode.get(timeout=0.1)
                    except queue.Empty:
                        if cancelled.is_set():
                            break
                        continue
                    if item is _DONE:
                        break
                    if isinstance(item, BaseException):  # the DiT failed: after the chunks before it
                        put(out, item, until=cancelled)
                        break
                    c, x0, dit_stats, marks, *banded = item
                    dit_stats["dit_ms"] = _wait_ms(*marks)  # x0 is ready once the DiT stream is past the mark
                    t1 = time.perf_counter()
                    n_frames = pixel_frames_for_chunk(c)
                    frames, launched = None, t1
                    if banded:  # decoded and gathered on the DiT's stream: copied from there once it is done
                        gathered, ready = banded
                        if isinstance(ready, torch.cuda.Event):
                            torch.cuda.current_stream(dev).wait_event(ready)
                        dit_stats["band_decode_ms"] = _wait_ms(marks[1], ready)  # the GPU's, gather included
                        frames = to_host(gathered).numpy()
                        del gathered, banded
                        assert frames.shape[0] == n_frames, (frames.shape, n_frames)
                    elif job.decode:
                        with _stream(dev, first) if c == 0 else contextlib.nullcontext():
                            video = decoder.decode_chunk(x0[0])
                            launched = time.perf_counter()
                            first_queued.set()
                            # On this stream, after the decode: the copy to the host waits for exactly the
                            # decoder's kernels (and releases the GIL meanwhile).
                            frames = media.frames_to_uint8(video)
                            del video
                        assert frames.shape[0] == n_frames, (frames.shape, n_frames)
                    first_queued.set()
                    # decode_launch_ms: the host's part (queueing the decoder's kernels); the rest of decode_ms is
                    # the GPU's, shared with the DiT of the next chunk.
                    stats = {**dit_stats, "decode_ms": (time.perf_counter() - t1) * 1e3,
                             "decode_launch_ms": (launched - t1) * 1e3}
                    if not put(out, ChunkOutput(c, frame_start, frames, x0[0], stats), until=cancelled):
                        break
                    frame_start += n_frames
        except BaseException as exc:  # noqa: BLE001
            stop.set()
            put(out, exc, until=cancelled)
        finally:
            put(out, _DONE, until=cancelled)

    threads = [threading.Thread(target=produce, name="rollout-dit", daemon=True),
               threading.Thread(target=decode, name="rollout-decode", daemon=True)]
    for t in threads:
        t.start()
    try:
        while True:
            try:
                item = out.get(timeout=0.5)
            except queue.Empty:
                # Both threads gone and nothing left to read: never wait forever (and hold the engine) on them.
                if not any(t.is_alive() for t in threads) and out.empty():
                    raise RuntimeError("rollout threads ended without a result") from None
                continue
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        stop.set()
        for t in threads:
            while t.is_alive():  # drain so a blocked put sees the stop flag
                for q in (to_decode, out):
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                t.join(timeout=0.05)
