"""CUDA graphs of a steady chunk's DiT forwards, for sequence-parallel ranks.

On several ranks a chunk is ~200 block-forwards of ~280 host-side ops each, and every rank's GPU waits inside the
~800 all-to-alls of a chunk for the slowest rank's host to launch its side. On 4 x H200 the host needed as long
per block as the GPU (docs/PERFORMANCE.md v17): the ranks were bound by Python, not by their GPUs. Once the K/V
cache holds its full span, every chunk's forwards have the same shapes and read the same buffers except for the
noisy latents, the time embedding, the condition, the chunk's RoPE tables and camera modulation, and the cache
slots it writes. Those go into fixed buffers (the slots as a device-side index, `KVCache.index_slots`) and each
forward becomes one graph replay: one graph serves the four denoising steps, one the cache refresh. NCCL's
collectives are captured with the rest, so a replay runs a whole forward, exchanges included, with no host work.

Measured (docs/PERFORMANCE.md v17, v18): 4 x H200, end to end 824 ms per chunk eager, 719 ms with graphs per job
(v17); in one call of v18, 754 ms with graphs per job and 668 ms with graphs kept across jobs. Fewer ranks do not
gain: one GPU's host is far ahead of its GPU already (v15b), and on 2 x H200 graphs lost 1447 to 1203 ms in one
call of v18, when the leader's decoder co-ran with the replays; with the decode in bands between chunks, nothing
co-runs and they still lose (1096 to 1083 ms, v20f). So `auto` keeps graphs from AUTO_MIN_RANKS ranks on and uses
none below.

LINGBOT_CUDA_GRAPHS: `auto` (default: `warm` on 4+ CUDA ranks, else `0`), `warm` (every span of the cache
captured once and kept across jobs of one geometry, so a job replays from its first chunk; see JobGraphs), `1`
(graphs for one job, captured after its first full-span chunk, on any CUDA device), `0` (never), or `rerun` /
`rerun-warm`: a stand-in for `1` / `warm` that "replays" by running the captured forward again, eagerly, on the
same fixed buffers. It runs on the CPU, so the tests can check the buffer plumbing a real graph depends on (a
buffer not refreshed per chunk gives wrong latents there too).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from worker.models.dit import ChunkContext, LingBotDiT
from worker.models.kv_cache import KVCache
from worker.parallel.sp import SequenceParallel

log = logging.getLogger("worker.graphs")

MODES = ("auto", "0", "1", "warm", "rerun", "rerun-warm")
AUTO_MIN_RANKS = 4


def check_mode(value: str, name: str = "LINGBOT_CUDA_GRAPHS") -> str:
    value = value.strip().lower()
    if value not in MODES:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(MODES)}")
    return value


def mode_setting() -> str:
    return check_mode(os.environ.get("LINGBOT_CUDA_GRAPHS", "auto"))


def resolve(mode: str | None, device: torch.device, sp: SequenceParallel) -> str:
    """The mode a job runs under, the same on every rank: an engine's own (Engine.configure), else
    LINGBOT_CUDA_GRAPHS. `auto` is `warm` from AUTO_MIN_RANKS CUDA ranks on and `0` below; a real graph mode
    without CUDA is `0` (the stand-ins run anywhere)."""
    mode = mode_setting() if mode is None else check_mode(mode)
    if is_stand_in(mode):
        return mode
    if device.type != "cuda":
        return "0"
    if mode == "auto":
        return "warm" if sp.world >= AUTO_MIN_RANKS else "0"
    return mode


def keeps_graphs(mode: str) -> bool:
    """Whether this mode keeps every span's graphs across jobs (`warm`, `rerun-warm`)."""
    return mode.endswith("warm")


def is_stand_in(mode: str) -> bool:
    """Whether this mode replays through the CPU stand-in (`rerun`, `rerun-warm`)."""
    return mode.startswith("rerun")


class _Rerun:
    """The `rerun` stand-in for torch.cuda.CUDAGraph: replay runs the captured function again."""

    def capture(self, fn: Callable[[], object]) -> None:
        self._fn = fn
        fn()

    def replay(self) -> object:
        return self._fn()


class _Graph:
    def __init__(self, pool) -> None:
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self, fn: Callable[[], object]) -> None:
        # On the caller's stream when it has one, whose priority the kernels keep (the leader's DiT stream runs
        # ahead of its decoder's); capture cannot run on the default stream (the followers'). thread_local: the
        # leader's decoder thread keeps using CUDA on its own stream meanwhile.
        stream = torch.cuda.current_stream()
        if stream == torch.cuda.default_stream():
            stream = torch.cuda.Stream()
        with torch.cuda.graph(self.graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
            self.out = fn()  # lives in the graph's pool; every replay rewrites it

    def replay(self) -> object:
        self.graph.replay()
        return self.out


class ChunkBuffers:
    """The fixed inputs every graph of one geometry reads, refilled per job (text K/V, when the buffers outlive
    the job), per chunk (condition, RoPE tables, camera modulation) and per forward (latents, time embedding)."""

    def __init__(self, ctx: ChunkContext, x: torch.Tensor, y: torch.Tensor, time_emb: tuple[torch.Tensor, ...],
                 refresh_emb: tuple[torch.Tensor, ...], text_kv: list, own_text_kv: bool) -> None:
        self.x, self.y = x.clone(), y.clone()
        self.emb = tuple(t.clone() for t in time_emb)
        self.refresh_emb = tuple(t.clone() for t in refresh_emb)  # t = 0: the same for every job
        self.ctx = ChunkContext(ctx.grid, ctx.start_frame, ctx.num_tokens, ctx.cos.clone(), ctx.sin.clone(),
                                [t.clone() for t in ctx.cam_scale], [t.clone() for t in ctx.cam_shift], ctx.cache,
                                ctx.attn_mask)
        self.text_kv = [(k.clone(), v.clone()) for k, v in text_kv] if own_text_kv else text_kv

    def load_job(self, text_kv: list) -> None:
        for (dst_k, dst_v), (k, v) in zip(self.text_kv, text_kv):
            dst_k.copy_(k)
            dst_v.copy_(v)

    def load_chunk(self, ctx: ChunkContext, y: torch.Tensor) -> None:
        """This chunk's inputs (its cache slots went to the device index in begin_chunk)."""
        static = self.ctx
        static.cos.copy_(ctx.cos)
        static.sin.copy_(ctx.sin)
        for dst, src in zip(static.cam_scale + static.cam_shift, ctx.cam_scale + ctx.cam_shift):
            dst.copy_(src)
        self.y.copy_(y)


class ChunkGraphs:
    """The denoising forward and the cache refresh at one span of the K/V cache, as replayable graphs."""

    def __init__(self, dit: LingBotDiT, sp: SequenceParallel, buffers: ChunkBuffers, pool, rerun: bool) -> None:
        b = self.buffers = buffers
        self._denoise, self._refresh = (_Rerun() if rerun else _Graph(pool) for _ in range(2))
        # Capture order matters for `rerun`, which runs both: the refresh last leaves the clean chunk's K/V.
        self._denoise.capture(lambda: dit(b.x, b.y, 0.0, b.text_kv, b.ctx, sp, time_emb=b.emb))
        self._refresh.capture(lambda: dit(b.x, b.y, 0.0, b.text_kv, b.ctx, sp, cache_only=True,
                                          time_emb=b.refresh_emb))

    def denoise(self, x: torch.Tensor, time_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The flow prediction for x at this step's time embedding. The result is a fixed buffer that the next
        replay overwrites: use it before the next call."""
        self.buffers.x.copy_(x)
        for dst, src in zip(self.buffers.emb, time_emb):
            dst.copy_(src)
        return self._denoise.replay()

    def refresh(self, x0: torch.Tensor) -> None:
        """Write the clean chunk's K/V into the cache."""
        self.buffers.x.copy_(x0)
        self._refresh.replay()


class JobGraphs:
    """Which graphs a job replays, and when it captures them. Graphs are keyed by the cache's span (its valid
    tokens), the only thing that differs between the forwards of two chunks of one geometry.

    - `1`: the full span is captured after the first steady chunk and replayed for the rest of the job; graphs,
      fixed buffers and cache go with the job.
    - `warm`: every span is captured, once, after the first chunk that reaches it, and kept on the engine with
      the cache and the fixed buffers, so later jobs of the same geometry replay from their first chunk on. The
      engine keeps one geometry, the latest (a job of another geometry replaces it).
    - `rerun`, `rerun-warm`: `1` and `warm` with the CPU stand-in.
    """

    def __init__(self, key: tuple, cache: KVCache, keep_all_spans: bool, rerun: bool) -> None:
        self.key, self.cache = key, cache
        self.keep_all_spans, self.rerun = keep_all_spans, rerun
        self.buffers: ChunkBuffers | None = None
        self.spans: dict[int, ChunkGraphs | None] = {}  # valid tokens -> graphs (None: the capture failed)
        self.pool = None if rerun or not torch.cuda.is_available() else torch.cuda.graph_pool_handle()

    @classmethod
    def for_job(cls, engine, mode: str, key: tuple, text_kv: list, *, job_cache: Callable[[], KVCache],
                kept_cache: Callable[[], KVCache]) -> JobGraphs:
        """This job's graphs: for `warm`, the set an earlier job of this geometry left on the engine (refilled
        with this job's text K/V), else a new one (with a cache from kept_cache, which it keeps); otherwise a
        set for this job alone (with a cache from job_cache)."""
        rerun = is_stand_in(mode)
        if not keeps_graphs(mode):
            engine.warm_graphs = None  # a kept set no job uses any more
            return cls(key, job_cache(), keep_all_spans=False, rerun=rerun)
        warm = engine.warm_graphs
        if warm is None or warm.key != key:
            engine.warm_graphs = None  # the old geometry's cache and graphs go before the new ones are made
            warm = engine.warm_graphs = cls(key, kept_cache(), keep_all_spans=True, rerun=rerun)
        elif warm.buffers is not None:
            warm.buffers.load_job(text_kv)
        return warm

    def lookup(self) -> ChunkGraphs | None:
        """The graphs for the cache's span after this chunk's begin_chunk, if captured."""
        return self.spans.get(self.cache.valid_tokens)

    def after_eager_chunk(self, dit: LingBotDiT, sp: SequenceParallel, text_kv: list, ctx: ChunkContext,
                          x0: torch.Tensor, y: torch.Tensor, time_emb: tuple, refresh_emb: tuple,
                          more_chunks: bool) -> None:
        """Capture this span's graphs if this job's mode wants them and they are not there yet. Every rank calls
        this after the same chunk; they agree on the outcome, so a capture that fails on one rank sends all of
        them back to eager forwards instead of leaving them out of step. Capturing runs nothing (except under
        `rerun`): the cache and the buffers keep what the eager chunk left."""
        span = self.cache.valid_tokens
        if span in self.spans or not (self.keep_all_spans or (self.cache.full and more_chunks)):
            return
        self.cache.index_slots()  # from the first capture on (eager chunks before it keep the direct writes)
        try:
            if self.buffers is None:
                self.buffers = ChunkBuffers(ctx, x0, y, time_emb, refresh_emb, text_kv, own_text_kv=self.keep_all_spans)
            else:  # this chunk's inputs, as a capture that runs (`rerun`) must rewrite this chunk's K/V from them
                self.buffers.load_chunk(ctx, y)
                self.buffers.x.copy_(x0)
            graphs = ChunkGraphs(dit, sp, self.buffers, self.pool, self.rerun)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot be captured: eager forwards still work
            log.warning("CUDA graph capture failed, staying eager: %s: %s", type(exc).__name__, str(exc)[:500])
            graphs = None
        if sp.enabled:
            ok = torch.tensor([graphs is not None], dtype=torch.int32, device=x0.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=sp.group)
            if not ok.item():
                if graphs is not None:
                    log.warning("CUDA graph capture failed on another rank, staying eager")
                graphs = None
        self.spans[span] = graphs
