"""The q/k RMSNorm + RoPE kernel (worker/models/qk_norm_rope.py), run by Triton's interpreter on the CPU.

The tests marked triton_interpreted run in a child pytest with TRITON_INTERPRET=1, which the one unmarked test
starts (tests/conftest.py: Triton picks its interpreter when it is imported).

The interpreter executes the kernel's own indexing and math with NumPy, so the layouts (plain, send layout of even
and uneven head groups, a cache slot inside a larger buffer) are checked here against the eager reference the
fused chains use. One thing differs from a GPU: the interpreter truncates fp32 -> bf16 casts instead of rounding
them to nearest, so bf16 is checked to a few units in the last place there and exactly in fp32.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from worker.config import CHUNK_LATENT_FRAMES
from worker.models import fused, qk_norm_rope as qk
from worker.models.dit import build_dit

pytest.importorskip("triton", reason="Triton has no wheels for this platform (the test extra installs it on Linux)")


def test_the_kernel_under_tritons_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, timeout=600)
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail  # 5 if no test was collected there
    assert re.search(r"\d+ passed", run.stdout) and "skipped" not in run.stdout, tail


def test_the_chains_it_replaces_leave_the_prewarm_registry():
    """A prewarm manifest from before the kernel lists Inductor's q/k chains: with the kernel on they are no longer
    traced at start-up (unregistered entries are skipped and dropped, tests/test_prewarm.py)."""
    from worker.models import prewarm

    assert qk._ENABLED and qk.triton is not None
    names = {f"{c.__module__}.{c.__qualname__}" for c in (fused.rms_norm_rope, fused.rms_norm_rope_packed)}
    assert names == {"worker.models.fused.rms_norm_rope", "worker.models.fused.rms_norm_rope_packed"}
    assert not names & prewarm.REGISTRY.keys()
    assert "worker.models.fused.modulated_norm" in prewarm.REGISTRY  # the other chains stay


@pytest.fixture
def interpreted():
    assert os.environ.get("TRITON_INTERPRET") == "1" and qk.triton is not None


def _reference(x, w, eps, cos, sin, groups):
    y = fused._rope(fused._rms(x, w, eps).unflatten(-1, (sum(groups), -1)), cos, sin)
    return torch.cat([part.reshape(-1) for part in y.split(list(groups), dim=2)])


def _inputs(b, tokens, heads, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(b, tokens, heads * head_dim, generator=g)).to(dtype)
    w = (1 + 0.2 * torch.randn(heads * head_dim, generator=g)).to(dtype)
    angles = 6 * torch.rand(tokens, head_dim // 2, generator=g)
    return x, w, angles.cos(), angles.sin()


@pytest.mark.triton_interpreted
@pytest.mark.parametrize("b,tokens,head_dim,groups", [
    (1, 7, 8, (5,)),  # one GPU: [B, L, H, D]; 20 pairs per row, in tiles of 16 and 4
    (2, 6, 8, (2, 2, 1)),  # uneven head groups, two sequences
    (1, 9, 16, (3, 3)),
    (1, 4, 4, (1, 3)),  # a leader with a smaller head share; 8 pairs, the second tile all masked
    (1, 5, 8, (4, 3)),  # 28 pairs: 16, then 12 in a tile of 16
])
def test_kernel_matches_the_reference_layouts(interpreted, b, tokens, head_dim, groups):
    x, w, cos, sin = _inputs(b, tokens, sum(groups), head_dim, torch.float32)
    got = qk.qk_norm_rope(x, w, 1e-6, cos, sin, groups)
    want = _reference(x, w, 1e-6, cos, sin, groups)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    if len(groups) > 1:  # the layout matters: the plain [B, L, H, D] order is not the send layout
        assert not torch.allclose(got, _reference(x, w, 1e-6, cos, sin, (sum(groups),)), atol=1e-3)


@pytest.mark.triton_interpreted
def test_kernel_in_bf16_rounds_where_the_reference_does(interpreted):
    x, w, cos, sin = _inputs(2, 5, 6, 8, torch.bfloat16)
    got = qk.qk_norm_rope(x, w, 1e-6, cos, sin, (4, 2))
    want = _reference(x, w, 1e-6, cos, sin, (4, 2))
    assert got.dtype == want.dtype == torch.bfloat16
    # Three roundings, each truncated by the interpreter: at most a few bf16 steps (2^-7 relative) apart.
    torch.testing.assert_close(got.float(), want.float(), rtol=4 * 2**-7, atol=1e-2)


@pytest.mark.triton_interpreted
def test_kernel_writes_only_its_out_slot(interpreted):
    x, w, cos, sin = _inputs(1, 6, 4, 8, torch.float32)
    buffer = torch.full((1, 20, 4, 8), float("nan"))
    slot = buffer[:, 8:14]  # a chunk's cache slot: contiguous, inside a larger buffer
    assert qk.qk_norm_rope(x, w, 1e-6, cos, sin, (4,), out=slot) is slot
    torch.testing.assert_close(slot.reshape(-1), _reference(x, w, 1e-6, cos, sin, (4,)), rtol=2e-6, atol=2e-6)
    assert buffer[:, :8].isnan().all() and buffer[:, 14:].isnan().all()
    with pytest.raises(ValueError, match="contiguous"):
        qk.qk_norm_rope(x, w, 1e-6, cos, sin, (4,), out=buffer[:, ::2][:, :6])


@pytest.mark.triton_interpreted
@pytest.mark.parametrize("window", [6, 7])  # 7: some chunks wrap around the window, so cache.write copies them
def test_tiny_dit_with_the_kernel_equals_the_fused_chains(interpreted, monkeypatch, window):
    """The DiT's one-GPU path with the kernel (k and v written straight into the chunk's cache slots where they
    are one run) gives the chunks the fused chains and cache.write give."""
    from test_dit import TINY, _chunked, _inputs

    model = build_dit(TINY, dtype=torch.float32, seed=3)
    x, y, cam, text = _inputs(num_chunks=4)
    launches = []
    launch = qk._launch
    monkeypatch.setattr(qk, "_launch", lambda *a: launches.append(a[-1] is not None) or launch(*a))
    with_kernel, _ = _chunked(model, x, y, cam, text, sink=3, window=window)
    assert len(launches) == 4 * TINY.num_layers * 2  # q and k of every block in every chunk
    into_slot = sum(launches)  # k written straight into the chunk's cache slot (q never is)
    assert into_slot == len(launches) // 2 if window == 6 else 0 < into_slot < len(launches) // 2
    monkeypatch.setattr(qk, "_ENABLED", False)
    fused_chains, _ = _chunked(model, x, y, cam, text, sink=3, window=window)
    torch.testing.assert_close(with_kernel, fused_chains, rtol=1e-5, atol=1e-5)
    assert with_kernel.shape[2] == 4 * CHUNK_LATENT_FRAMES


@pytest.mark.triton_interpreted
def test_two_ranks_with_the_kernel_match_one_rank(interpreted, monkeypatch):
    """2 gloo ranks, the leader with 1 of 4 heads (uneven head groups), both running the kernel (the spawned rank
    inherits TRITON_INTERPRET): the kernel's send layout through the real exchange gives the 1-rank latents. Window
    7: some chunks are received into their cache slots, the ones that wrap go through cache.write."""
    from test_parallel import _job, _latents

    from worker.engine import Engine
    from worker.parallel.pool import RankPool

    job = _job(chunks=4)
    job.kv_window = 7
    launches = []
    launch = qk._launch
    monkeypatch.setattr(qk, "_launch", lambda *a: launches.append(a[5]) or launch(*a))
    ref = _latents(Engine.load("tiny", device="cpu", dtype=torch.float32), job)
    assert launches and set(launches) == {(4,)}  # one rank: plain [B, L, H, D]
    launches.clear()
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=120, head_share=0.25)
    try:
        torch.testing.assert_close(_latents(pool, job), ref, rtol=1e-4, atol=1e-4)
    finally:
        pool.close()
    assert launches and set(launches) == {(1, 3)}  # the leader's launches, in the send layout of groups 1 and 3


@pytest.mark.triton_interpreted
def test_a_kernel_that_fails_falls_back_to_the_fused_chains(interpreted, monkeypatch, caplog):
    x, w, cos, sin = _inputs(1, 5, 4, 8, torch.float32)

    def broken(*args):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(qk, "_launch", broken)
    monkeypatch.setattr(qk, "_interpreting", lambda: False)  # as on a GPU, where a failure must not raise
    monkeypatch.setattr(qk, "_triton_runs", lambda x: not qk._failed)
    monkeypatch.setattr(qk, "_failed", False)
    got = qk.qk_norm_rope(x, w, 1e-6, cos, sin, (4,))
    assert "no kernel today" in caplog.text and qk._failed
    torch.testing.assert_close(got, _reference(x, w, 1e-6, cos, sin, (4,)), rtol=1e-6, atol=1e-6)
