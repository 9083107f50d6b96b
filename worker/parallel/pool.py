"""A warm pool of ranks for one worker: this process is rank 0, it spawns ranks 1..N-1 once.

Each rank loads the DiT and waits on a pipe for jobs; for each job rank 0 sends the job spec (the image
stays on rank 0) and all ranks run the rollout in lockstep over torch.distributed (NCCL on GPU, gloo on CPU).
Commands travel over pipes, not collectives, so an idle pool never trips a collective timeout.

Failure handling: a monitor thread watches the rank processes. A rank that dies makes the running
collective fail (gloo: at once; NCCL: the monitor aborts the communicator, or the process-group timeout
fires), the job fails with a clear error, and the pool turns unhealthy for good: the platform must replace
the worker (RunPod refresh_worker, Modal container exit). A hang is bounded by LINGBOT_RANK_TIMEOUT_S.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.distributed as dist

from worker.config import (
    CHUNK_LATENT_FRAMES,
    DEFAULT_KV_SINK,
    DEFAULT_KV_WINDOW,
    DEFAULT_SIZE,
    FULL,
    VAE_STRIDE,
    chunk_tokens,
)
from worker.engine import Engine, default_device
from worker.models import chunk_graphs
from worker.models.attention import backend_setting as attention_backend_setting
from worker.models.wave_split import setting as wave_split_setting
from worker.parallel import early
from worker.parallel.early import MULTICAST_OFF
from worker.parallel.sp import (
    SequenceParallel,
    decode_split,
    default_decode_cost,
    exchange_asked,
    exchange_kind,
    leader_share_for,
)
from worker.rollout import ChunkOutput, RolloutJob

log = logging.getLogger("worker.pool")


class RankFailure(RuntimeError):
    """A rank died, hung or fell out of step: the job failed and the worker must be replaced."""

    fatal = True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _init_group(rank: int, world: int, port: int, device: str, timeout_s: float):
    """Join the data group (NCCL on GPUs) and return the control group: gloo, host to host, for the chunk
    boundary's go/stop (SequenceParallel.agree)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        _backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout,
    )
    return dist.new_group(backend="gloo", timeout=timeout)


def _with_copies(sp: SequenceParallel, device: str) -> SequenceParallel:
    """`sp` with the copy-engine exchange where exchange_kind picks it and every rank could set it up; else `sp`
    (NCCL). Every rank calls this at the same point and they agree over `sp.control`, so all of them use the same
    exchange: a container that cannot share GPU memory between processes falls back to NCCL with a warning,
    unless LINGBOT_SP_EXCHANGE=copy asked for the copies, which then fails the start naming the setting. Its
    buffer is sized for the full-size model's largest request under sp's token and head split (393 MB a rank on
    2 GPUs at 1280x1280), so that no job grows it."""
    rank, world, control = sp.rank, sp.world, sp.control
    if exchange_kind(device, world) != "copy":
        return sp
    from worker.parallel import copy_exchange

    cfg, (width, height) = FULL.dit, FULL.max_size
    tokens = chunk_tokens(cfg, height // VAE_STRIDE[1], width // VAE_STRIDE[2])
    elems = copy_exchange.region_elems(sp.split_tokens(tokens), sp.split_heads(cfg.num_heads), cfg.head_dim)
    copies, reason = copy_exchange.CopyExchange(rank, world, device), ""
    try:
        copies.setup(elems)
    except Exception as exc:  # noqa: BLE001 - whatever the driver or torch says, NCCL still works
        copies, reason = None, f"{type(exc).__name__}: {exc}"[:300]
    ok = torch.tensor([int(copies is not None)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=control)
    if ok.item():
        return replace(sp, copies=copies)
    reason = reason or "it failed on another rank"
    if exchange_asked() == "copy":
        raise RuntimeError(f"LINGBOT_SP_EXCHANGE=copy: the copy-engine exchange could not be set up ({reason}); "
                           "set LINGBOT_SP_EXCHANGE=nccl")
    log.warning("rank %d: the copy-engine exchange could not be set up (%s): NCCL all-to-alls instead", rank, reason)
    return sp


def _share_cpu(world: int) -> None:
    """Each rank's intra-op thread pool gets its share of the cores instead of every rank sizing its pool to the
    whole machine. On 4 x H200 the same per-chunk host work (RoPE tables, camera staging) took ~300 ms on the
    followers and ~60 ms on the leader with N full-size pools on 64 cores (docs/PERFORMANCE.md v17); landed with
    moving that work off the critical path, not measured alone."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))


def _follower_main(rank: int, world: int, port: int, model: str | None, device: str, dtype: torch.dtype | None,
                   timeout_s: float, text_encoder: bool, shares: tuple[float, float | None], log_level: int,
                   conn) -> None:
    # A spawned process starts with logging unconfigured: log at the leader's level, so its load times show too.
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.update(MULTICAST_OFF)
    _share_cpu(world)
    try:
        control = _init_group(rank, world, port, device, timeout_s)
        dev = f"cuda:{rank}" if device.startswith("cuda") else device
        sp = _with_copies(SequenceParallel(rank, world, control=control, leader_share=shares[0],
                                           leader_head_share=shares[1]), dev)
        engine = Engine.load(model, device=dev, dtype=dtype, sp=sp, text_encoder=text_encoder)
        conn.send(("ready", None))
    except BaseException as exc:  # noqa: BLE001 - report, then die
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    while True:
        msg = conn.recv()
        cmd = msg[0]
        if cmd == "stop":
            break
        if cmd == "job":
            try:
                for _ in engine.rollout(msg[1]):
                    pass
                conn.send(("done", None))
            except BaseException as exc:  # noqa: BLE001
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                if not engine.ranks_in_sync:
                    raise
        elif cmd == "configure":
            engine.configure(**msg[1])
            conn.send(("ok", None))
        elif cmd == "memory":
            peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
            conn.send(("memory", peak))
        elif cmd == "reset_memory":
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            conn.send(("ok", None))
    _end_group(engine)


def _end_group(engine: Engine | None, timeout_s: float = 20.0) -> None:
    """Leave the process group without hanging the caller. Graphs kept across jobs hold NCCL work captured on the
    communicator: they go first, after the device has finished with them. A destroy that still does not return
    (a peer already killed) is left behind in a daemon thread: the process is closing anyway."""
    if engine is not None:
        engine.warm_graphs = None
        if engine.device.type == "cuda":
            try:
                torch.cuda.synchronize(engine.device)
            except RuntimeError as exc:  # a device error of the last job: teardown goes on regardless
                log.warning("device error at teardown: %s", exc)
    if not dist.is_initialized():
        return
    done = threading.Event()

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group is gone either way
            pass
        done.set()

    threading.Thread(target=destroy, name="destroy-process-group", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("process group teardown did not finish within %.0f s; leaving it to process exit", timeout_s)


class RankPool:
    def __init__(self, engine: Engine, procs: list, conns: list, timeout_s: float) -> None:
        self.engine = engine
        self.procs, self.conns = procs, conns
        self.timeout_s = timeout_s
        self.unhealthy_reason: str | None = None
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="rank-monitor", daemon=True)
        self._monitor.start()

    @classmethod
    def start(
        cls,
        model: str | None,
        *,
        ranks: int,
        device: str,
        dtype: torch.dtype | None = None,
        text_encoder: bool = True,
        timeout_s: float | None = None,
        decode_cost: float | None = None,
        head_share: float | None = None,
    ) -> "RankPool":
        """Spawn ranks 1..N-1, load the model on every rank, return when all are ready.

        decode_cost: the leader's frame decode as a fraction of one GPU's DiT time per chunk (default
        $LINGBOT_SP_DECODE_COST, else sp.default_decode_cost for $LINGBOT_DECODE_SPLIT: 0 when every rank decodes
        a band); the leader gets that much less of the tokens.
        head_share: the leader's fraction of the attention heads; None splits them evenly (tests use it to run
        uneven head groups)."""
        timeout_s = timeout_s or float(os.environ.get("LINGBOT_RANK_TIMEOUT_S", "300"))
        if ranks < 1:
            raise ValueError(f"ranks: {ranks} must be >= 1")
        if decode_cost is None:
            raw = os.environ.get("LINGBOT_SP_DECODE_COST", str(default_decode_cost(ranks, decode_split())))
            try:
                decode_cost = float(raw)
                if not 0 <= decode_cost < 1:
                    raise ValueError(raw)
            except ValueError:
                raise ValueError(f"LINGBOT_SP_DECODE_COST: {raw!r} is not a number in [0, 1)") from None
        share = leader_share_for(ranks, decode_cost)
        exchange_kind(device, ranks)  # a bad LINGBOT_SP_EXCHANGE fails here, before any rank starts
        os.environ.update(MULTICAST_OFF)  # inherited by the spawned ranks
        if device.startswith("cuda") and torch.cuda.device_count() < ranks:
            raise ValueError(f"ranks: {ranks} GPUs asked for, {torch.cuda.device_count()} visible")
        port = _free_port()

        def args(rank: int) -> tuple:
            return (rank, ranks, port, model, device, dtype, timeout_s, text_encoder, (share, head_share),
                    logging.getLogger().getEffectiveLevel())

        procs, conns = [], []
        started = early.take(ranks)  # spawned at process start (early.start): their imports are done or under way
        if started is not None:
            for rank, (p, conn) in enumerate(started, start=1):
                procs.append(p)
                conns.append(conn)
                try:
                    conn.send((args(rank), dict(os.environ)))
                except OSError:  # it died since take() looked
                    early.stop(started)
                    raise RankFailure(f"rank {rank} exited (code {p.exitcode}) before the pool started") from None
        else:
            ctx = mp.get_context("spawn")
            for rank in range(1, ranks):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_follower_main, name=f"lingbot-rank{rank}", daemon=True,
                                args=(*args(rank), child))
                p.start()
                procs.append(p)
                conns.append(parent)
        try:
            control = _init_group(0, ranks, port, device, timeout_s)
            if device.startswith("cuda"):  # on the CPU this process's pool is the tests' too: left alone
                _share_cpu(ranks)
            dev = "cuda:0" if device.startswith("cuda") else device
            sp = _with_copies(SequenceParallel(0, ranks, control=control, leader_share=share,
                                               leader_head_share=head_share), dev)
            engine = Engine.load(model, device=dev, dtype=dtype, sp=sp, text_encoder=text_encoder)
            if engine.dit.cfg.num_heads < ranks:
                raise ValueError(f"ranks: {ranks} is more than the {engine.dit.cfg.num_heads} attention heads")
            for rank, conn in enumerate(conns, start=1):
                kind, detail = _recv(conn, procs[rank - 1], timeout_s)
                if kind != "ready":
                    raise RankFailure(f"rank {rank} failed to load the model: {detail}")
        except BaseException:
            for p in procs:
                p.kill()
            raise
        heads = engine.dit.cfg.num_heads
        log.info("rank pool ready: %d ranks on %s; rank 0 takes %.1f%% of the tokens and %d of %d heads; exchanges: %s",
                 ranks, device, 100 * share if ranks > 1 else 100.0, engine.sp.local_heads(heads), heads,
                 "copy engines" if engine.sp.copies is not None else _backend(device))
        return cls(engine, procs, conns, timeout_s)

    # --- health ---------------------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return len(self.procs) + 1

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason is None

    def _mark_unhealthy(self, reason: str) -> None:
        if self.unhealthy_reason is None:
            self.unhealthy_reason = reason
            log.error("rank pool unhealthy: %s", reason)

    def _dead_rank(self, grace_s: float = 0.0) -> str | None:
        """The first follower that has exited, looking for up to grace_s: a killed rank's sockets close (and the
        leader's collective fails) a moment before its process can be reaped."""
        deadline = time.monotonic() + grace_s
        while True:
            for rank, p in enumerate(self.procs, start=1):
                if not p.is_alive():
                    return f"rank {rank} exited with code {p.exitcode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            dead = self._dead_rank()
            if dead and self.unhealthy_reason is None:
                self._mark_unhealthy(dead)
                _abort_collectives()

    # --- jobs -------------------------------------------------------------------------------------------
    def rollout(self, job: RolloutJob) -> Iterator[ChunkOutput]:
        if not self.healthy:
            raise RankFailure(f"worker is unhealthy ({self.unhealthy_reason}); it must be replaced")
        spec = replace(job, image=None)  # the image condition is encoded on rank 0 and broadcast
        for conn in self.conns:
            conn.send(("job", spec))
        completed = False
        try:
            yield from self.engine.rollout(job)
            completed = True
        except GeneratorExit:
            raise
        except Exception as exc:
            dead = self._dead_rank(grace_s=0.0 if self.engine.ranks_in_sync else 2.0)
            if dead or not self.engine.ranks_in_sync:
                self._mark_unhealthy(dead or f"ranks out of step after: {exc}")
                raise RankFailure(f"multi-GPU rollout failed: {self.unhealthy_reason}") from exc
            raise
        finally:
            if self.healthy:
                self._collect(completed)

    def _collect(self, completed: bool) -> None:
        """Every rank reports the end of the job; a rank that does not is a failure of the pool."""
        for rank, conn in enumerate(self.conns, start=1):
            try:
                kind, detail = _recv(conn, self.procs[rank - 1], self.timeout_s)
            except RankFailure as exc:
                self._mark_unhealthy(str(exc))
                continue
            if kind == "error" and completed:
                self._mark_unhealthy(f"rank {rank} failed: {detail}")

    def configure(self, *, decode_cost: float | None = None, cuda_graphs: str | None = None,
                  decode_priority: str | None = None, decode_split: str | None = None) -> None:
        """From the next job on, on every rank: who decodes (sp.decode_split) with the token split for this decode
        cost (a new decode split without a cost takes that split's default), and the CUDA-graph mode
        (Engine.configure); on the leader the decode stream's priority (decode split "leader"). Benchmarks
        compare settings in one process instead of loading the model once each."""
        if decode_split is not None and decode_cost is None:
            decode_cost = default_decode_cost(self.world, decode_split)
        settings = {"cuda_graphs": cuda_graphs, "decode_split": decode_split,
                    "leader_share": None if decode_cost is None else leader_share_for(self.world, decode_cost)}
        self.engine.configure(**settings, decode_priority=decode_priority)  # checks before any other rank takes it
        for rank, conn in enumerate(self.conns, start=1):
            conn.send(("configure", settings))
            kind, detail = _recv(conn, self.procs[rank - 1], self.timeout_s)
            if kind != "ok":
                raise RankFailure(f"rank {rank} did not take the new settings: {detail}")

    def peak_memory(self) -> list[int]:
        """Peak allocated bytes per rank (GPU only; 0 on CPU)."""
        dev = self.engine.device
        out = [torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0]
        for rank, conn in enumerate(self.conns, start=1):
            conn.send(("memory", None))
            out.append(_recv(conn, self.procs[rank - 1], self.timeout_s)[1])
        return out

    def reset_peak_memory(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.engine.device)
        for rank, conn in enumerate(self.conns, start=1):
            conn.send(("reset_memory", None))
            _recv(conn, self.procs[rank - 1], self.timeout_s)

    def close(self) -> None:
        self._stop.set()
        for conn, p in zip(self.conns, self.procs):
            try:
                if p.is_alive():
                    conn.send(("stop", None))
            except OSError:
                pass
        # The leader leaves the group while the followers do, not after they have exited. With the leader joining
        # them first, every follower's teardown ran out its 20 s in the 4-GPU benches of docs/PERFORMANCE.md v18,
        # and the leader's own, after they had gone, did not: NCCL's teardown looks like it waits for every rank.
        # In this order none of v19's seven 4-GPU processes ran out its 20 s.
        _end_group(self.engine)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _recv(conn, proc, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.1):
        if not proc.is_alive():
            raise RankFailure(f"{proc.name} exited with code {proc.exitcode}")
        if time.monotonic() > deadline:
            raise RankFailure(f"{proc.name} did not answer within {timeout_s:.0f} s")
    try:
        return conn.recv()
    except EOFError:
        raise RankFailure(f"{proc.name} closed its pipe (exit code {proc.exitcode})") from None


def _abort_collectives() -> None:
    """Unblock rank 0 if it waits in an NCCL collective on a dead peer (gloo fails by itself)."""
    if not dist.is_initialized() or dist.get_backend() != "nccl":
        return
    try:
        dist.distributed_c10d._abort_process_group()  # torch >= 2.6
    except Exception as exc:  # noqa: BLE001 - best effort; the process-group timeout still bounds the wait
        log.warning("could not abort NCCL communicators: %s", exc)


def load_generator(model: str | None, device: str | None, ranks: int | None, *, text_encoder: bool = True):
    """An Engine on one rank, or a RankPool in front of one: what the CLI and both platform adapters serve."""
    device = device or default_device()
    ranks = ranks or int(os.environ.get("LINGBOT_NUM_GPUS", "1"))
    attention_backend_setting()  # a bad LINGBOT_ATTENTION(_SPLIT) or LINGBOT_WARMUP fails here, before the loading
    wave_split_setting()
    chunks = warmup_chunks_setting()
    if ranks > 1:
        gen = RankPool.start(model, ranks=ranks, device=device, text_encoder=text_encoder)
    else:
        gen = Engine.load(model, device=device, text_encoder=text_encoder)
    if device.startswith("cuda") and chunks:
        warmup(gen, chunks)
    return gen


# A job's second chunk is the first to run a cache refresh and to decode with every decoder cache filled from a
# chunk before, and the decoder's fused norms compile again for those inputs' strides: after a one-chunk warm-up
# a fresh worker's first job stalled 3.4 s in its second chunk (one H100, empty kernel cache; PERFORMANCE.md v31d).
DEFAULT_WARMUP_CHUNKS = 2


def warmup_chunks_setting() -> int:
    """LINGBOT_WARMUP: chunks of the start-up warm-up job (0: none; default DEFAULT_WARMUP_CHUNKS)."""
    value = os.environ.get("LINGBOT_WARMUP", str(DEFAULT_WARMUP_CHUNKS)).strip()
    if not value.isdigit():
        raise ValueError(f"LINGBOT_WARMUP={value!r}: must be a number of chunks (0 turns the warm-up off)")
    return int(value)


def warmup(gen, chunks: int = DEFAULT_WARMUP_CHUNKS) -> float:
    """A throw-away job of `chunks` chunks at the default size on every rank: kernel compilation, cuDNN plans and
    the allocator are paid at start-up, not by the first caller. Under LINGBOT_CUDA_GRAPHS=warm, at least as many
    chunks as it takes to fill the K/V cache, so that every span's graphs are captured here too. Returns the
    seconds it took."""
    t = time.perf_counter()
    w, h = DEFAULT_SIZE
    engine = getattr(gen, "engine", gen)
    if chunk_graphs.keeps_graphs(engine.graph_mode):
        chunks = max(chunks, -(-(DEFAULT_KV_SINK + DEFAULT_KV_WINDOW) // CHUNK_LATENT_FRAMES))
    g = torch.Generator().manual_seed(0)
    job = RolloutJob(prompt="warm-up", image=torch.rand(3, h, w, generator=g) * 2 - 1, num_chunks=chunks, width=w,
                     height=h, seed=0, kv_window=DEFAULT_KV_WINDOW, kv_sink=DEFAULT_KV_SINK)
    for _ in gen.rollout(job):
        pass
    log.info("warm-up (%d chunk%s) done in %.1f s", chunks, "s" * (chunks > 1), time.perf_counter() - t)
    return time.perf_counter() - t
