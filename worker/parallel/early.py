"""Follower ranks started before the leader imports torch and the model code.

A multi-GPU worker's follower ranks each import what the leader imports (torch, transformers, diffusers: 13-22 s
on the lent GPU machines, docs/PERFORMANCE.md v23c). Spawned by RankPool.start, after the leader's own imports,
they made every rank wait for a second round of them. Started here first thing instead, by an entry point that
has imported nothing heavy yet, they import beside the leader; RankPool.start then hands them their rank's load
arguments and the leader's environment as it is by then (docs/PERFORMANCE.md v24).

Only the standard library is imported here, so calling `start` costs the entry point nothing.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os

log = logging.getLogger("worker.pool")

# NVLink SHARP / multicast stays off everywhere (the lent machines and many clouds do not support it). Set
# before any rank is spawned, so every rank's NCCL sees it.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_followers: list | None = None  # [(process, pipe)] for ranks 1..N-1, until RankPool.start takes them


def start(ranks: int | None = None) -> None:
    """Spawn ranks 1..ranks-1 now (default: LINGBOT_NUM_GPUS, as load_generator reads it); each imports the
    worker's modules and waits for RankPool.start. A no-op for one rank, inside a spawned rank (which re-imports
    the entry point's module) and when already started."""
    global _followers
    if ranks is None:
        try:
            ranks = int(os.environ.get("LINGBOT_NUM_GPUS", "1").strip() or "1")
        except ValueError:
            return  # the load reports the bad value with its name
    if ranks <= 1 or mp.parent_process() is not None or _followers is not None:
        return
    os.environ.update(MULTICAST_OFF)
    ctx = mp.get_context("spawn")
    _followers = []
    for rank in range(1, ranks):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_follower_entry, args=(child,), name=f"lingbot-rank{rank}", daemon=True)
        p.start()
        child.close()
        _followers.append((p, parent))


def take(ranks: int) -> list | None:
    """The followers `start` spawned, for a pool of `ranks`: [(process, pipe)] for ranks 1..N-1, once. None when
    none were started, or when they do not fit (another rank count, one of them died): those are stopped, and
    RankPool.start spawns its own."""
    global _followers
    followers, _followers = _followers, None
    if followers is None:
        return None
    if len(followers) == ranks - 1 and all(p.is_alive() for p, _ in followers):
        return followers
    log.warning("early follower ranks not used (%d started for %d ranks, %d alive): spawning new ones",
                len(followers), ranks, sum(p.is_alive() for p, _ in followers))
    stop(followers)
    return None


def stop(followers: list) -> None:
    """Kill followers that will not be used (they wait on their pipes otherwise, until this process exits)."""
    for p, conn in followers:
        if p.is_alive():
            p.kill()
        conn.close()


def _follower_entry(conn) -> None:
    """A follower's life: the imports (while the leader makes its own), then its rank's arguments, then
    pool._follower_main as if RankPool.start had spawned it."""
    from worker.parallel import pool  # the heavy imports

    try:
        msg = conn.recv()
    except EOFError:  # the leader went away before starting the pool
        return
    args, env = msg
    # Settings the leader's code set after this process was spawned (a module that read one while being imported
    # saw the spawn-time value, as it did on the leader).
    os.environ.update(env)
    pool._follower_main(*args, conn)
