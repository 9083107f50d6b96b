"""Steady chunks as graph replays (worker/models/chunk_graphs.py), checked on the CPU with the `rerun` stand-in:
its replay runs the captured forward again on the same fixed buffers, so every input a real CUDA graph would read
from those buffers must be refreshed per chunk and per step, or the latents come out wrong."""

from __future__ import annotations

import pytest
import torch

from worker.engine import Engine
from worker.models import chunk_graphs
from worker.models.chunk_graphs import ChunkBuffers, ChunkGraphs
from worker.parallel.sp import SINGLE, SequenceParallel
from worker.rollout import RolloutJob

ACTIONS = [["w"], ["l"], ["w", "d"], [], ["i"], ["s"], ["j"], ["w"], ["k"], ["a"]]


def _job(window: int) -> RolloutJob:
    g = torch.Generator().manual_seed(0)
    return RolloutJob(prompt="a corridor", image=torch.rand(3, 48, 64, generator=g) * 2 - 1, num_chunks=6,
                      width=64, height=48, seed=3, kv_window=window, kv_sink=3,
                      camera_actions=[ACTIONS[i % len(ACTIONS)] for i in range(18)])


def _latents(engine, job) -> torch.Tensor:
    return torch.cat([c.latents for c in engine.rollout(job)], dim=1)


@pytest.fixture(scope="module")
def engine():
    return Engine.load("tiny", device="cpu", dtype=torch.float32)


def test_mode_setting(monkeypatch):
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "sometimes")
    with pytest.raises(ValueError, match="LINGBOT_CUDA_GRAPHS"):
        chunk_graphs.mode_setting()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # device types only: nothing runs on them
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "auto")
    assert chunk_graphs.resolve(None, cpu, SINGLE) == "0"  # auto: kept graphs with 4+ CUDA ranks, nothing below
    assert chunk_graphs.resolve(None, cpu, SequenceParallel(0, 4)) == "0"
    assert chunk_graphs.resolve(None, cuda, SequenceParallel(0, 2)) == "0"
    assert chunk_graphs.resolve(None, cuda, SequenceParallel(0, 4)) == "warm"
    assert chunk_graphs.resolve("1", cuda, SINGLE) == "1" and chunk_graphs.resolve("1", cpu, SINGLE) == "0"
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "0")
    assert chunk_graphs.resolve(None, cuda, SequenceParallel(0, 4)) == "0"
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun")
    assert chunk_graphs.resolve(None, cpu, SINGLE) == "rerun"


# window 6: a chunk's frames are one run of slots; window 7: they wrap around the window inside a chunk.
# gated: the replays run with LINGBOT_GATED_NORM's deferred FFN residuals, the eager reference without.
@pytest.mark.parametrize("window, gated", [(6, False), (7, False), (7, True)])
def test_replayed_chunks_give_the_eager_latents(engine, window, gated, monkeypatch):
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "0")
    ref = _latents(engine, _job(window))
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun")
    monkeypatch.setattr(engine.dit, "gated_norm", gated)
    replays = []
    real = ChunkGraphs.denoise
    monkeypatch.setattr(ChunkGraphs, "denoise", lambda self, x, emb: replays.append(1) or real(self, x, emb))
    got = _latents(engine, _job(window))
    # the cache is full after chunk 2 (window 6) or 3 (window 7): the chunks after it replay, 4 steps each
    assert len(replays) == 4 * (6 - (3 if window == 6 else 4))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_buffer_not_refreshed_per_chunk_shows(engine, monkeypatch):
    """The check above can fail: leave the RoPE tables of the capture chunk in place and the latents change."""
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "0")
    ref = _latents(engine, _job(6))
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun")
    real = ChunkBuffers.load_chunk

    def stale_rope(self, ctx, y):
        cos, sin = self.ctx.cos.clone(), self.ctx.sin.clone()
        real(self, ctx, y)
        self.ctx.cos.copy_(cos)
        self.ctx.sin.copy_(sin)

    monkeypatch.setattr(ChunkBuffers, "load_chunk", stale_rope)
    got = _latents(engine, _job(6))
    assert not torch.allclose(got, ref, rtol=1e-3, atol=1e-3)


def test_a_kernel_that_fails_to_compile_inside_a_capture_fails_the_capture_only(monkeypatch):
    """Outside a capture a fused chain that fails to compile runs eagerly from then on; inside a CUDA graph
    capture (where a recompile can fail for capture's own reasons) the failure fails the capture instead, and the
    kernel is tried again on the next call."""
    from worker.models import fused

    compiles = []

    def failing_compile(fn, **kwargs):
        compiles.append(fn)

        def run(*args):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda *a: None, RuntimeError("no copies in capture"), None)

        return run

    class CudaLike:  # only `.is_cuda` is read before the compiled function is called
        is_cuda = True

    @fused.fusable(tokens={})
    def chain(x):
        return "eager"

    monkeypatch.setattr(fused, "_COMPILE", True)
    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed):
        chain(CudaLike())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert chain(CudaLike()) == "eager"  # the same compiled function fails again, outside a capture: eager
    assert chain(CudaLike()) == "eager" and len(compiles) == 1  # and stays eager without compiling again


def _job_b(window: int = 6) -> RolloutJob:
    job = _job(window)
    job.prompt, job.seed = "a forest path in the rain", 11
    return job


def test_warm_graphs_serve_every_span_and_later_jobs_from_their_first_chunk(engine, monkeypatch):
    """`warm` (through its CPU stand-in): the first job captures each span of the cache as it reaches it; a
    later job of the same geometry, with another prompt, replays every chunk; both give the eager latents."""
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "0")
    ref_a, ref_b = _latents(engine, _job(6)), _latents(engine, _job_b())
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun-warm")
    replays = []
    real = ChunkGraphs.denoise
    monkeypatch.setattr(ChunkGraphs, "denoise", lambda self, x, emb: replays.append(1) or real(self, x, emb))
    try:
        torch.testing.assert_close(_latents(engine, _job(6)), ref_a, rtol=1e-5, atol=1e-5)
        # spans of 3, 6 and 9 frames, each captured after its first chunk: chunks 3-5 replay the last
        assert len(replays) == 4 * 3 and sorted(engine.warm_graphs.spans) == [36, 72, 108]
        torch.testing.assert_close(_latents(engine, _job_b()), ref_b, rtol=1e-5, atol=1e-5)
        assert len(replays) == 4 * 3 + 4 * 6  # the second job replays from chunk 0
        # another geometry replaces the kept set and still gives the eager latents
        monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "0")
        ref_c = _latents(engine, _job(7))
        monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun-warm")
        torch.testing.assert_close(_latents(engine, _job(7)), ref_c, rtol=1e-5, atol=1e-5)
        assert engine.warm_graphs.key[3] == 7
    finally:
        engine.warm_graphs = None


def test_warm_graphs_take_each_jobs_text(engine, monkeypatch):
    """The kept graphs read the text K/V from fixed buffers: a later job that did not refill them would
    replay the earlier job's prompt."""
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "0")
    ref_b = _latents(engine, _job_b())
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun-warm")
    monkeypatch.setattr(ChunkBuffers, "load_job", lambda self, text_kv: None)
    try:
        _latents(engine, _job(6))
        assert not torch.allclose(_latents(engine, _job_b()), ref_b, rtol=1e-3, atol=1e-3)
    finally:
        engine.warm_graphs = None


def test_start_up_warm_up_captures_every_span_under_warm(engine, monkeypatch):
    from worker.parallel import pool

    monkeypatch.setattr(pool, "DEFAULT_SIZE", (64, 48))  # the full default size takes minutes on a CPU
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun-warm")
    try:
        pool.warmup(engine)
        # window 15 + sink 3 = 18 latent frames of 12 tokens: six chunks, six spans
        assert sorted(engine.warm_graphs.spans) == [36 * k for k in range(1, 7)]
    finally:
        engine.warm_graphs = None
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun")
    chunks = []
    real = engine.rollout
    monkeypatch.setattr(engine, "rollout", lambda job: chunks.append(job.num_chunks) or real(job))
    pool.warmup(engine)
    assert chunks == [2]  # two chunks otherwise (the second runs the first refresh and a steady decode)
    monkeypatch.setenv("LINGBOT_WARMUP", "1")
    pool.warmup(engine, pool.warmup_chunks_setting())
    assert chunks == [2, 1]
    for bad in ("yes", "-1", "1.5"):
        monkeypatch.setenv("LINGBOT_WARMUP", bad)
        with pytest.raises(ValueError, match="LINGBOT_WARMUP"):
            pool.warmup_chunks_setting()
    # A bad value stops a start before the model loads.
    monkeypatch.setattr(pool.Engine, "load", lambda *a, **k: pytest.fail("loaded despite a bad LINGBOT_WARMUP"))
    with pytest.raises(ValueError, match="LINGBOT_WARMUP"):
        pool.load_generator("tiny", "cpu", 1)
