"""Multi-rank rollout on CPU with gloo: 2 ranks give the 1-rank frames; a dead rank fails the job, bounded."""

from __future__ import annotations

import os
import signal
import threading
import time
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import worker.parallel.sp as sp_mod
from worker.engine import Engine
from worker.models.chunk_graphs import ChunkGraphs
from worker.parallel.pool import RankFailure, RankPool
from worker.parallel.sp import (
    SequenceParallel,
    consecutive_slices,
    default_decode_cost,
    exchange_kind,
    leader_share_for,
)
from worker.rollout import RolloutJob

pytestmark = pytest.mark.slow


def _job(chunks: int = 3, seed: int = 5) -> RolloutJob:
    g = torch.Generator().manual_seed(0)
    return RolloutJob(prompt="a corridor", image=torch.rand(3, 48, 64, generator=g) * 2 - 1, num_chunks=chunks,
                      width=64, height=48, seed=seed, kv_window=6, kv_sink=3,
                      camera_actions=[ACTIONS[i % len(ACTIONS)] for i in range(3 * chunks)])


ACTIONS = [["w"], ["l"], ["w", "d"], [], ["i"], ["s"], ["j"], ["w"], ["k"], ["a"]]


def _latents(gen, job) -> torch.Tensor:
    return torch.cat([c.latents for c in gen.rollout(job)], dim=1)


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_round_trip_even_and_uneven_splits(world: int):
    """Ulysses exchange on 2 and 3 gloo ranks: seq->heads->seq is the identity, for an odd token count (5 / 2), and
    for a leader that takes less (30%) of 7 tokens and 5 heads, with k/v stacked in front of the token axis."""
    ctx = mp.get_context("spawn")
    port = _port()
    procs = [ctx.Process(target=_a2a_worker, args=(r, world, port)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def test_split_gives_the_leader_its_share_and_everyone_something():
    even = SequenceParallel(0, 2)
    assert even.split_tokens(4680) == (2340, 2340) and even.split_tokens(5) == (2, 3)
    share = leader_share_for(2, 0.08)
    assert share == pytest.approx(0.46)
    sp = SequenceParallel(0, 2, leader_share=share)
    assert sp.split_tokens(4680) == (2153, 2527)
    # heads stay even unless asked: the attention kernel runs whole waves, one extra head can cost a wave
    assert sp.split_heads(40) == (20, 20) and SequenceParallel(0, 4, leader_share=0.2).split_heads(40) == (10,) * 4
    assert SequenceParallel(0, 3).split_heads(40) == (13, 14, 13)
    uneven = SequenceParallel(1, 2, leader_share=share, leader_head_share=share)
    assert uneven.split_heads(40) == (18, 22) and uneven.local_heads(40) == 22
    assert consecutive_slices(uneven.split_heads(40))[1] == slice(18, 40)
    # a decode so costly that the leader would get nothing still leaves it one head and one token
    many = SequenceParallel(0, 8, leader_share=leader_share_for(8, 0.5))
    assert many.split_tokens(40)[0] == 1 and sum(many.split_tokens(40)) == 40 and min(many.split_tokens(40)) >= 1
    with pytest.raises(ValueError, match="decode cost"):
        leader_share_for(2, 1.5)
    with pytest.raises(ValueError, match="over 8 ranks"):
        many.split_tokens(5)
    # the default decode cost as measured per rank count: 4 ranks give the leader 16% of a chunk's 4680 tokens
    assert [default_decode_cost(w, "leader") for w in (2, 3, 4, 8)] == [0.04, 0.04, 0.12, 0.12]
    assert [default_decode_cost(w) for w in (2, 4)] == [0.0, 0.0]  # every rank decodes a band: an even split
    assert SequenceParallel(0, 4, leader_share=leader_share_for(4, default_decode_cost(4, "leader"))
                            ).split_tokens(4680)[0] == 749


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _a2a_worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for sp, (s, h) in ((SequenceParallel(rank, world), (5, 4)),
                       (SequenceParallel(rank, world, leader_share=0.3, leader_head_share=0.3), (7, 5))):
        full = torch.arange(2 * s * h * 3, dtype=torch.float32).reshape(2, 1, s, h, 3)  # [k/v, B, S, H, D]
        shard = sp.shard(full, dim=2)
        assert shard.shape[2] == sp.split_tokens(s)[rank]
        mine = consecutive_slices(sp.split_heads(h))[rank]

        def seq_to_heads(x: torch.Tensor) -> torch.Tensor:
            return sp.seq_to_heads_async(sp.pack_heads(x), x.shape, s)()

        heads = seq_to_heads(shard)  # two leading dims: the received blocks are reassembled
        assert torch.equal(heads, full[:, :, :, mine])  # all tokens, this rank's heads
        q = seq_to_heads(shard[0])  # batch of one: received in place, no reassembly
        assert torch.equal(q, full[0, :, :, mine])
        assert torch.equal(torch.cat(sp.heads_to_seq_parts(q, h), -2), shard[0])
        parts = sp.heads_to_seq_parts(q, h)  # one block per rank's head group, in head order
        assert tuple(p.shape[-2] for p in parts) == sp.split_heads(h) and torch.equal(torch.cat(parts, -2), shard[0])
        ordered = list(sp.heads_to_seq_ordered(q, h))  # without copies: the same parts, numbered in head order
        assert [j for j, _ in ordered] == list(range(world))
        assert all(torch.equal(p, want) for (_, p), want in zip(ordered, parts))
        assert torch.equal(sp.gather(shard[0], s), full[0])
        # Received in place: the exchange writes into the caller's buffer (a K/V cache slot) and returns it.
        slot = torch.full((1, s, sp.local_heads(h), 3), -1.0)
        got = sp.seq_to_heads_async(sp.pack_heads(shard[0]), shard[0].shape, s, out=slot)()
        assert got.data_ptr() == slot.data_ptr() and torch.equal(slot, full[0, :, :, mine])
        # A slot that is not one contiguous block still gets the right values, through a copy.
        wide = torch.full((1, s, sp.local_heads(h), 6), -1.0)
        got = sp.seq_to_heads_async(sp.pack_heads(shard[0]), shard[0].shape, s, out=wide[..., :3])()
        assert torch.equal(wide[..., :3], full[0, :, :, mine]) and (wide[..., 3:] == -1).all()
    # The chunk boundary's go/stop: the leader's value on every rank, over the data group or the control group.
    control = dist.new_group(backend="gloo")
    for sp in (SequenceParallel(rank, world), SequenceParallel(rank, world, control=control)):
        assert sp.agree(7 if rank == 0 else 0) == 7
    dist.destroy_process_group()


# even split; leader with 1 of 4 heads and 9 of 36 tokens. A window of 6 latent frames holds whole chunks, so K/V
# arrive straight in the cache; with 7 a chunk's frames wrap around the window and go through KVCache.write.
# FP8 linears take the plain projections instead of the head-group GEMMs.
@pytest.mark.parametrize("decode_cost, window, fp8", [(0.0, 6, False), (0.5, 7, False), (0.5, 6, True)])
def test_two_ranks_match_one_rank(decode_cost: float, window: int, fp8: bool, monkeypatch):
    torch.manual_seed(0)
    job = _job(chunks=4)
    job.kv_window = window
    if fp8:
        monkeypatch.setenv("LINGBOT_FP8", "1")  # read by Engine.load on every rank
    one = Engine.load("tiny", device="cpu", dtype=torch.float32)
    ref = _latents(one, job)
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60, decode_cost=decode_cost,
                          head_share=0.25 if decode_cost else None)
    assert pool.engine.sp.local_heads(4) == (2 if decode_cost == 0 else 1)
    try:
        got = _latents(pool, job)
        # fp32 on both sides: the token split changes only GEMM blocking and the attention summation order.
        # bf16 weights would need ~1e-2; fp32 keeps the check tight enough to catch any misrouted token or head.
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert pool.healthy
        # the pool stays warm: a second job (another seed) runs too and differs
        other = _latents(pool, _job(chunks=4, seed=6))
        assert not torch.allclose(other, ref, atol=1e-3)
    finally:
        pool.close()


def test_two_ranks_replaying_steady_chunks_match_one_rank(monkeypatch):
    """The sequence-parallel forward as graph replays (the CPU stand-in, see tests/test_chunk_graphs.py): each
    rank's exchanges, cache slots (written through the device-side index, wrapping with window 7) and fixed
    buffers give the 1-rank eager latents."""
    job = _job(chunks=6)
    job.kv_window = 7
    one = Engine.load("tiny", device="cpu", dtype=torch.float32)
    ref = _latents(one, job)
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun")  # inherited by the spawned rank
    replays = []
    real = ChunkGraphs.denoise
    monkeypatch.setattr(ChunkGraphs, "denoise", lambda self, x, emb: replays.append(1) or real(self, x, emb))
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60, head_share=0.25)
    try:
        torch.testing.assert_close(_latents(pool, job), ref, rtol=1e-4, atol=1e-4)
        assert len(replays) == 4 * 2  # the cache is full after chunk 3: chunks 4 and 5 replay (on the leader)
        assert pool.healthy
    finally:
        pool.close()


def test_gated_norm_on_one_and_two_ranks_with_replays_matches_it_off(monkeypatch):
    """LINGBOT_GATED_NORM, on by default (each block's FFN residual added by the next block's first norm, the last
    one's by the head's, in one kernel): one rank gives the latents of the plain forward bit for bit (fp32 on the
    CPU: the same math), cache refreshes included; 2 ranks (the leader with 1 of 4 heads, window 7) give them too,
    with the steady chunks as graph replays (the CPU stand-in), which capture the deferred residuals with the rest."""
    job = _job(chunks=6)
    job.kv_window = 7
    monkeypatch.setenv("LINGBOT_GATED_NORM", "0")  # read when each rank builds its model; a spawned one inherits it
    plain = Engine.load("tiny", device="cpu", dtype=torch.float32)
    assert not plain.dit.gated_norm
    ref = _latents(plain, job)
    monkeypatch.delenv("LINGBOT_GATED_NORM")  # the default
    one = Engine.load("tiny", device="cpu", dtype=torch.float32)
    assert one.dit.gated_norm
    assert torch.equal(_latents(one, job), ref)
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun")
    replays = []
    real = ChunkGraphs.denoise
    monkeypatch.setattr(ChunkGraphs, "denoise", lambda self, x, emb: replays.append(1) or real(self, x, emb))
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60, head_share=0.25)
    try:
        assert pool.engine.dit.gated_norm
        torch.testing.assert_close(_latents(pool, job), ref, rtol=1e-4, atol=1e-4)
        assert len(replays) == 4 * 2 and pool.healthy  # chunks 4 and 5 replayed
    finally:
        pool.close()


def test_two_ranks_with_kept_graphs_match_one_rank_across_jobs(monkeypatch):
    """`warm` graphs (the CPU stand-in) on 2 ranks: every span captured in the first job and kept; the second job,
    another prompt and seed, replays from its first chunk; both give the 1-rank eager latents."""
    first, second = _job(chunks=5), _job(chunks=5, seed=9)
    second.prompt = "a forest path in the rain"
    one = Engine.load("tiny", device="cpu", dtype=torch.float32)
    refs = [_latents(one, job) for job in (first, second)]
    monkeypatch.setenv("LINGBOT_CUDA_GRAPHS", "rerun-warm")  # inherited by the spawned rank
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60, head_share=0.25)
    try:
        for job, ref in zip((first, second), refs):
            torch.testing.assert_close(_latents(pool, job), ref, rtol=1e-4, atol=1e-4)
        assert sorted(pool.engine.warm_graphs.spans) == [36, 72, 108] and pool.healthy
    finally:
        pool.close()


@pytest.mark.parametrize("ranks, split", [(2, "bands"), (3, "bands"), (2, "leader")])
def test_every_decode_split_gives_the_one_rank_frames(ranks: int, split: str):
    """Decoded in bands (every rank its rows, gathered to the leader) or by the leader alone, switched by configure:
    the 1-rank frames (fp32: the same up to the conv sums' order, so at most one uint8 step where a value sits on a
    rounding edge). A cancelled job first: the next one starts its bands' caches afresh."""
    job = _job(chunks=3)
    one = Engine.load("tiny", device="cpu", dtype=torch.float32)
    ref = list(one.rollout(job))
    pool = RankPool.start("tiny", ranks=ranks, device="cpu", dtype=torch.float32, timeout_s=60)
    try:
        pool.configure(decode_split=split)
        it = pool.rollout(job)
        next(it)
        it.close()
        got = list(pool.rollout(job))
        assert [c.frames.shape for c in got] == [c.frames.shape for c in ref]
        for a, b in zip(ref, got):
            diff = np.abs(a.frames.astype(int) - b.frames.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
            assert ("band_decode_ms" in b.stats) == (split == "bands")
        assert pool.healthy
    finally:
        pool.close()


def test_a_failed_band_decode_fails_the_job_at_once(monkeypatch):
    """The leader's band decode fails between its chunk and the gather, where the follower already waits: the job
    fails and the worker retires at once, instead of the leader waiting at a go/stop the follower never reaches
    (the gloo timeout, 60 s here)."""
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60)
    try:
        real, calls = pool.engine.vae.decode_chunk, []

        def broken(latents):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("decoder blew up")
            return real(latents)

        monkeypatch.setattr(pool.engine.vae, "decode_chunk", broken)
        t0 = time.monotonic()
        with pytest.raises(RankFailure, match="decoder blew up"):
            list(pool.rollout(_job(chunks=4)))
        assert time.monotonic() - t0 < 30
        assert not pool.healthy
    finally:
        pool.close()


def test_bad_decode_split_names_the_setting(monkeypatch):
    monkeypatch.setenv("LINGBOT_DECODE_SPLIT", "rank0")
    with pytest.raises(ValueError, match="decode split 'rank0': must be one of bands, leader"):
        RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60)


def test_exchange_kind_defaults_and_names_the_setting(monkeypatch):
    monkeypatch.delenv("LINGBOT_SP_EXCHANGE", raising=False)
    monkeypatch.setattr(sp_mod, "_peers_reachable", lambda world: True)
    # copy engines where measured (2 GPUs that reach each other), NCCL elsewhere; one rank exchanges nothing
    assert exchange_kind("cuda:0", 2) == "copy"
    assert exchange_kind("cuda:0", 4) == "nccl" and exchange_kind("cpu", 2) == "nccl"
    assert exchange_kind("cuda:0", 1) == "nccl"
    monkeypatch.setenv("LINGBOT_SP_EXCHANGE", "NCCL")
    assert exchange_kind("cuda:0", 2) == "nccl"
    monkeypatch.setenv("LINGBOT_SP_EXCHANGE", "copy")
    assert exchange_kind("cuda:0", 4) == "copy"
    with pytest.raises(ValueError, match="LINGBOT_SP_EXCHANGE=copy needs CUDA GPUs with peer access"):
        RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60)
    monkeypatch.setenv("LINGBOT_SP_EXCHANGE", "ipc")
    with pytest.raises(ValueError, match="LINGBOT_SP_EXCHANGE='ipc': must be one of nccl, copy"):
        exchange_kind("cuda:0", 2)
    # GPUs without peer access (PCIe without P2P): NCCL by default, and asking for copies fails at start-up
    monkeypatch.setattr(sp_mod, "_peers_reachable", lambda world: False)
    monkeypatch.delenv("LINGBOT_SP_EXCHANGE")
    assert exchange_kind("cuda:0", 2) == "nccl"
    monkeypatch.setenv("LINGBOT_SP_EXCHANGE", "copy")
    with pytest.raises(ValueError, match="peer access"):
        exchange_kind("cuda:0", 2)


class _FakeCopies:
    """Stands in for CopyExchange on gloo ranks: set-up fails on the rank named by FAIL_RANK."""

    def __init__(self, rank, world, device):
        self.rank = rank

    def setup(self, elems):
        if str(self.rank) == os.environ.get("FAIL_RANK"):
            raise RuntimeError("cannot share GPU memory here")
        self.elems = elems


def _copies_worker(rank: int, world: int, port: int, fail_rank: int | None, asked: bool, out) -> None:
    import worker.parallel.copy_exchange as copy_exchange
    import worker.parallel.pool as pool_mod

    os.environ["FAIL_RANK"] = str(fail_rank)
    if asked:
        os.environ["LINGBOT_SP_EXCHANGE"] = "copy"
    pool_mod.exchange_kind = lambda device, world: "copy"  # as on 2 GPUs with peer access
    copy_exchange.CopyExchange = _FakeCopies
    control = pool_mod._init_group(rank, world, port, "cpu", 60)
    try:
        copies = pool_mod._with_copies(SequenceParallel(rank, world, control=control), "cpu").copies
        out.put((rank, type(copies).__name__ + (f" {copies.elems}" if copies is not None else "")))
    except RuntimeError as exc:
        out.put((rank, str(exc)))


@pytest.mark.parametrize("fail_rank, asked", [(None, False), (1, False), (0, True)])
def test_every_rank_takes_the_same_exchange(fail_rank, asked):
    """The copy exchange is used only where every rank could set it up; otherwise every rank falls back to NCCL, or,
    where LINGBOT_SP_EXCHANGE=copy asked for it, every rank fails naming the setting."""
    ctx = mp.get_context("spawn")
    port, out = _port(), ctx.Queue()
    procs = [ctx.Process(target=_copies_worker, args=(r, 2, port, fail_rank, asked, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    if fail_rank is None:  # sized once for the largest request: 1280x1280 is 19200 tokens, 9600 and 20 heads a rank
        assert got == {0: "_FakeCopies 49152000", 1: "_FakeCopies 49152000"}
    elif not asked:
        assert got == {0: "NoneType", 1: "NoneType"}
    else:
        assert "cannot share GPU memory here" in got[0] and "failed on another rank" in got[1]
        assert all("set LINGBOT_SP_EXCHANGE=nccl" in v for v in got.values())


def test_cancel_releases_ranks_and_next_job_is_correct():
    job = _job()
    one = Engine.load("tiny", device="cpu", dtype=torch.float32)
    ref = _latents(one, job)
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60)
    try:
        it = pool.rollout(job)
        next(it)
        it.close()  # the consumer stops after chunk 0, as a RunPod cancel does
        assert pool.healthy
        torch.testing.assert_close(_latents(pool, job), ref, rtol=1e-4, atol=1e-4)
    finally:
        pool.close()


def test_a_rank_that_dies_as_the_collective_fails_is_still_named():
    """The leader's collective can fail (connection reset) a moment before the killed rank's process is reaped;
    the failure must still name the rank, not only the socket error."""
    class Proc:
        def __init__(self, dies_after_s: float) -> None:
            self.t_dead, self.exitcode = time.monotonic() + dies_after_s, -9

        def is_alive(self) -> bool:
            return time.monotonic() < self.t_dead

    pool = types.SimpleNamespace(procs=[Proc(1e9), Proc(0.2)])
    assert RankPool._dead_rank(pool) is None
    assert RankPool._dead_rank(pool, grace_s=2.0) == "rank 2 exited with code -9"
    pool.procs[1].t_dead = time.monotonic() + 1e9
    t0 = time.monotonic()
    assert RankPool._dead_rank(pool, grace_s=0.3) is None
    assert 0.3 <= time.monotonic() - t0 < 1.0


def test_killed_rank_fails_job_within_bounded_time():
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=30)
    try:
        it = pool.rollout(_job(chunks=6))
        next(it)
        killer = threading.Timer(0.05, lambda: os.kill(pool.procs[0].pid, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1"):
            for _ in it:
                pass
        assert time.monotonic() - t0 < 30
        assert not pool.healthy
        assert "rank 1" in pool.unhealthy_reason
        # the next job is refused at once with the reason, never hangs
        with pytest.raises(RankFailure, match="unhealthy"):
            next(pool.rollout(_job()))
    finally:
        pool.close()


def test_bad_decode_cost_names_the_setting(monkeypatch):
    monkeypatch.setenv("LINGBOT_SP_DECODE_COST", "1.5")
    with pytest.raises(ValueError, match=r"LINGBOT_SP_DECODE_COST: '1.5' is not a number in \[0, 1\)"):
        RankPool.start("tiny", ranks=2, device="cpu")


@pytest.fixture
def no_early_followers(monkeypatch):
    """Each test starts with no early followers and leaves none behind."""
    from worker.parallel import early

    monkeypatch.setattr(early, "_followers", None)
    yield early
    if early._followers:
        early.stop(early._followers)


def test_followers_started_early_serve_the_pool(no_early_followers, monkeypatch):
    """Ranks spawned at process start (early.start, before the entry point's heavy imports) become the pool's
    followers, and get the leader's environment as it is when the pool starts: LINGBOT_FP8, set after the spawn,
    reaches the follower's load (without it, its plain linears would not give the 1-rank FP8 latents)."""
    early = no_early_followers
    early.start(2)
    spawned = [p.pid for p, _ in early._followers]
    assert len(spawned) == 1
    monkeypatch.setenv("LINGBOT_FP8", "1")
    job = _job(chunks=2)
    ref = _latents(Engine.load("tiny", device="cpu", dtype=torch.float32), job)
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60)
    try:
        assert [p.pid for p in pool.procs] == spawned and early._followers is None
        torch.testing.assert_close(_latents(pool, job), ref, rtol=1e-4, atol=1e-4)
    finally:
        pool.close()


def test_early_followers_that_do_not_fit_are_stopped(no_early_followers):
    """Started for 3 ranks, asked for 2: the early ones are stopped and the pool spawns its own. One rank starts
    nothing."""
    early = no_early_followers
    early.start(1)
    assert early._followers is None
    early.start(3)
    started = [p for p, _ in early._followers]
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60)
    try:
        assert pool.procs[0].pid not in [p.pid for p in started]
        for p in started:
            p.join(timeout=10)
            assert not p.is_alive()
        assert len(_latents(pool, _job(chunks=1))) == 16
    finally:
        pool.close()


def test_an_early_follower_that_died_is_replaced_or_reported(no_early_followers, monkeypatch):
    """A follower that died before the pool started: found dead when the pool takes them, fresh ranks are spawned;
    dying after that look, the pool's start fails with the rank named instead of a broken pipe."""
    early = no_early_followers
    early.start(2)
    dead, _ = early._followers[0]
    dead.kill()
    dead.join(timeout=10)
    pool = RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60)
    try:
        assert pool.procs[0].pid != dead.pid and pool.healthy
    finally:
        pool.close()
    early.start(2)
    followers = early._followers
    followers[0][0].kill()
    followers[0][0].join(timeout=10)
    monkeypatch.setattr(early, "take", lambda ranks: followers)  # as if it died just after take() looked
    with pytest.raises(RankFailure, match="rank 1 exited"):
        RankPool.start("tiny", ranks=2, device="cpu", dtype=torch.float32, timeout_s=60)
