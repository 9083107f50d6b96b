"""CUDA graphs of a steady chunk's DiT forwards, for sequence-parallel ranks.

On several ranks a chunk is ~200 block-forwards of ~280 host-side ops each, and every rank's GPU waits inside the
~800 all-to-alls of a chunk for the slowest rank's host to launch its side. On 4 x H200 the host needed as long
per block as the GPU (docs/PERFORMANCE.md v17): the ranks were bound by Python, not by their GPUs. Once the K/V
cache holds its full span, every chunk's forwards have the same shapes and read the same buffers except for the
noisy latents, the time embedding, the condition, the chunk's RoPE tables and camera modulation, and the cache
slots it writes. Those go into fixed buffers (the slots as a device-side index, `KVCache.index_slots`) and each
forward becomes one graph replay: one graph serves the four denoising steps, one the cache refresh. NCCL's
collectives are captured with the rest, so a replay runs a whole forward, exchanges included, with no host work.

Measured (docs/PERFORMANCE.md v17): 4 x H200, end to end 824 -> 719 ms per chunk. Fewer ranks do not gain: one
GPU's host is far ahead of its GPU already (v15b), and on 2 x H200 (1208 ms with graphs, 1138 without on another
machine of the kind) the leader's decoder, no longer held back by the DiT thread's launches, co-runs with the DiT
and costs more than the graphs save. So `auto` uses graphs from AUTO_MIN_RANKS ranks on. Graphs live for one job
(they point at that job's cache and text K/V); capture costs well under a second, once, after the first steady
chunk.

LINGBOT_CUDA_GRAPHS: `auto` (default: 4+ CUDA ranks), `1` (any CUDA device), `0` (never), or `rerun`: a
stand-in that "replays" by running the captured forward again, eagerly, on the same fixed buffers. It runs on the
CPU, so the tests can check the buffer plumbing a real graph depends on (a buffer not refreshed per chunk gives
wrong latents there too).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from worker.models.dit import ChunkContext, LingBotDiT
from worker.parallel.sp import SequenceParallel

log = logging.getLogger("worker.graphs")

MODES = ("auto", "0", "1", "rerun")
AUTO_MIN_RANKS = 4


def check_mode(value: str, name: str = "LINGBOT_CUDA_GRAPHS") -> str:
    value = value.strip().lower()
    if value not in MODES:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(MODES)}")
    return value


def mode_setting() -> str:
    return check_mode(os.environ.get("LINGBOT_CUDA_GRAPHS", "auto"))


def resolve(mode: str | None) -> str:
    """An engine's own mode (Engine.configure), else LINGBOT_CUDA_GRAPHS."""
    return mode_setting() if mode is None else check_mode(mode)


def wanted(device: torch.device, sp: SequenceParallel, mode: str | None = None) -> bool:
    """Whether this job's steady chunks should run as graphs (the same answer on every rank)."""
    mode = resolve(mode)
    if mode == "rerun":
        return True
    if device.type != "cuda" or mode == "0":
        return False
    return mode == "1" or sp.world >= AUTO_MIN_RANKS


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


class ChunkGraphs:
    """The denoising forward and the cache refresh of one job's steady chunks, as replayable graphs."""

    def __init__(self, dit: LingBotDiT, sp: SequenceParallel, text_kv: list, ctx: ChunkContext, x: torch.Tensor,
                 y: torch.Tensor, time_emb: tuple[torch.Tensor, torch.Tensor],
                 refresh_emb: tuple[torch.Tensor, torch.Tensor], rerun: bool = False) -> None:
        # Fixed buffers, filled per chunk (load_chunk) and per forward (denoise / refresh).
        self.x, self.y = x.clone(), y.clone()
        self.emb = tuple(t.clone() for t in time_emb)
        self.ctx = ChunkContext(ctx.grid, ctx.start_frame, ctx.num_tokens, ctx.cos.clone(), ctx.sin.clone(),
                                [t.clone() for t in ctx.cam_scale], [t.clone() for t in ctx.cam_shift], ctx.cache,
                                ctx.attn_mask)
        ctx.cache.index_slots()
        pool = None if rerun else torch.cuda.graph_pool_handle()
        self._denoise, self._refresh = (_Rerun() if rerun else _Graph(pool) for _ in range(2))
        # Capture order matters for `rerun`, which runs both: the refresh last leaves the clean chunk's K/V.
        self._denoise.capture(lambda: dit(self.x, self.y, 0.0, text_kv, self.ctx, sp, time_emb=self.emb))
        self._refresh.capture(lambda: dit(self.x, self.y, 0.0, text_kv, self.ctx, sp, cache_only=True,
                                          time_emb=refresh_emb))

    @classmethod
    def capture(cls, dit: LingBotDiT, sp: SequenceParallel, text_kv: list, ctx: ChunkContext, x: torch.Tensor,
                y: torch.Tensor, time_emb: tuple[torch.Tensor, torch.Tensor],
                refresh_emb: tuple[torch.Tensor, torch.Tensor], rerun: bool = False) -> ChunkGraphs | None:
        """Capture after a steady chunk ran eagerly (every kernel and collective already warm). Every rank must
        call this at the same chunk; they agree on the outcome, so a capture that fails on one rank sends all of
        them back to eager forwards instead of leaving them out of step. Capturing runs nothing: the cache and
        the buffers keep what the eager chunk left. rerun: the CPU stand-in instead of CUDA graphs."""
        try:
            graphs = cls(dit, sp, text_kv, ctx, x, y, time_emb, refresh_emb, rerun)
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot be captured: eager forwards still work
            log.warning("CUDA graph capture failed, staying eager: %s: %s", type(exc).__name__, str(exc)[:500])
            graphs = None
        if sp.enabled:
            ok = torch.tensor([graphs is not None], dtype=torch.int32, device=x.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=sp.group)
            if not ok.item():
                if graphs is not None:
                    log.warning("CUDA graph capture failed on another rank, staying eager")
                return None
        return graphs

    def load_chunk(self, ctx: ChunkContext, y: torch.Tensor) -> None:
        """This chunk's inputs into the fixed buffers (its cache slots went to the device index in begin_chunk)."""
        static = self.ctx
        static.cos.copy_(ctx.cos)
        static.sin.copy_(ctx.sin)
        for dst, src in zip(static.cam_scale + static.cam_shift, ctx.cam_scale + ctx.cam_shift):
            dst.copy_(src)
        self.y.copy_(y)

    def denoise(self, x: torch.Tensor, time_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The flow prediction for x at this step's time embedding. The result is a fixed buffer that the next
        replay overwrites: use it before the next call."""
        self.x.copy_(x)
        for dst, src in zip(self.emb, time_emb):
            dst.copy_(src)
        return self._denoise.replay()

    def refresh(self, x0: torch.Tensor) -> None:
        """Write the clean chunk's K/V into the cache."""
        self.x.copy_(x0)
        self._refresh.replay()
