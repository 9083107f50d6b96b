"""Trace the fused kernels while the weights load, from a list of the calls a previous process compiled.

With full kernel caches (LINGBOT_COMPILE_CACHE) a start-up still spends ~12 s in Dynamo: every process traces
each fused chain (worker/models/fused.py) again before Inductor's cache can answer, and that happened in the
warm-up chunk, after ~40 s of reading weights during which the CPU waited on the disk (docs/PERFORMANCE.md v22).
The chains are functions of their arguments only, so they need no weights: each process records the argument
specs (shape, stride, dtype; values of the others) of every call that made Dynamo compile a graph, in a manifest
beside the kernel cache; the next process replays them on empty tensors in a thread while its weights load.

A manifest is a hint, never a requirement: an entry that no longer matches the code is skipped, and whatever the
replay missed compiles in the warm-up as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger("worker.prewarm")

# diffusers' and transformers' from_pretrained set the process-wide default dtype while they build a model. Dynamo
# guards every graph on it, and restores the value it found when a trace began once the trace ends: a trace that
# straddles such a load leaves the whole process on bf16 (seen on the CPU: every later graph traced again, and any
# tensor made without a dtype would be bf16). Loads of that kind hold this lock (`exclusive`); the replay takes it
# for each entry.
_STATE_LOCK = threading.Lock()
_REPLAYING = threading.local()  # set on the replay's thread: what it traces is not recorded again
REGISTRY: dict[str, Callable] = {}  # name -> the fused function's wrapper (fused.fusable registers them)
MAX_ENTRIES = 256  # a manifest is one model's chains at a few shapes: ~40 entries; this only bounds a runaway
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16,
                                                      torch.float8_e4m3fn, torch.int64, torch.int32, torch.bool)}


def enabled(env=os.environ) -> bool:
    """On wherever there is a kernel cache folder (LINGBOT_COMPILE_CACHE); LINGBOT_PREWARM=0 turns it off. On one
    H100 from a real bf16 checkpoint with the text encoder, the replay left the warm-up chunk nothing to trace:
    warm-up 6.4-8.3 s against 21-25.5 s, ready 63-74 s against 74-81 s (docs/PERFORMANCE.md v23b)."""
    return bool(env.get("LINGBOT_COMPILE_CACHE", "").strip()) and env.get("LINGBOT_PREWARM", "1") != "0"


def manifest_path(device: torch.device, rank: int, world: int, env=os.environ) -> Path | None:
    """Where this rank's manifest lives: beside the kernel caches, keyed by what the compiled graphs depend on
    (torch version, GPU model, rank layout). None unless `enabled`, and off CUDA."""
    if not enabled(env) or device.type != "cuda":
        return None
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    torch_version = re.sub(r"[^A-Za-z0-9.]+", "-", torch.__version__)
    return Path(env["LINGBOT_COMPILE_CACHE"]).expanduser() / "prewarm" / f"{torch_version}_{gpu}_r{rank}of{world}.json"


# --- recording ------------------------------------------------------------------------------------------------
def _spec(a: Any) -> dict | None:
    """A JSON description of one argument that `_build` turns back into an equivalent one; None if it can't."""
    if isinstance(a, torch.Tensor):
        return {"shape": list(a.shape), "stride": list(a.stride()), "offset": a.storage_offset(),
                "dtype": str(a.dtype).removeprefix("torch."), "param": isinstance(a, nn.Parameter),
                "inference": a.is_inference()}  # all four are in Dynamo's guard on a tensor argument
    if isinstance(a, torch.dtype):
        return {"torch_dtype": str(a).removeprefix("torch.")}
    if isinstance(a, tuple) and all(isinstance(x, int) for x in a):
        return {"tuple": list(a)}
    if a is None or isinstance(a, (bool, int, float, str)):
        return {"value": a}
    return None


def _build(spec: dict, device: torch.device) -> Any:
    if "shape" in spec:
        shape, stride = spec["shape"], spec["stride"]
        numel = spec["offset"] + 1 + sum((n - 1) * s for n, s in zip(shape, stride) if n > 0)
        with torch.inference_mode(spec["inference"]):
            t = torch.empty(numel, dtype=_DTYPES[spec["dtype"]], device=device).as_strided(shape, stride,
                                                                                             spec["offset"])
        return nn.Parameter(t, requires_grad=False) if spec["param"] else t
    if "torch_dtype" in spec:
        return _DTYPES[spec["torch_dtype"]]
    if "tuple" in spec:
        return tuple(spec["tuple"])
    return spec["value"]


class Recorder:
    """The calls of this process that compiled a graph, merged into its manifest as they happen."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.entries: dict[str, dict] = {}  # key (its JSON) -> entry
        self.replayed = False  # this process replayed the manifest (Prewarm)
        self._lock = threading.Lock()

    def open(self, path: Path | None) -> list[dict]:
        """Record into `path` from now on; returns the entries already there (for the replay)."""
        with self._lock:
            self.path, self.entries, self.replayed = path, {}, False
            if path is None or not path.exists():
                return []
            try:
                listed = json.loads(path.read_text())["entries"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring the unreadable prewarm manifest %s: %s", path, exc)
                return []
            for e in listed[:MAX_ENTRIES]:
                self.entries[json.dumps(e, sort_keys=True)] = e
            return list(self.entries.values())

    @property
    def recording(self) -> bool:
        """A manifest is being recorded (prewarm.enabled, on CUDA)."""
        return self.path is not None

    def note(self, name: str, args: tuple) -> None:
        """`name` compiled a graph for `args`: add them to the manifest if they can be written down."""
        if self.path is None or getattr(_REPLAYING, "on", False):  # the replay's graphs are already listed
            return
        specs = [_spec(a) for a in args]
        if any(s is None for s in specs):
            return
        entry = {"fn": name, "args": specs, "inference": torch.is_inference_mode_enabled(),
                 "grad": torch.is_grad_enabled(), "state": global_state()}
        key = json.dumps(entry, sort_keys=True)
        with self._lock:
            if self.replayed:  # a graph the replay should have traced: say which, to find out why it did not
                log.info("prewarm: %s traced a graph after the replay (%s)", name, "new entry" if key not in
                         self.entries else "its entry was replayed: a guard differed")
            if key in self.entries or len(self.entries) >= MAX_ENTRIES:
                return
            self.entries[key] = entry
            self._save()

    def _save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"entries": [e for e in self.entries.values() if e["fn"] in REGISTRY]}))
            tmp.replace(self.path)  # atomic: ranks and other workers on the same volume may read it
        except OSError as exc:
            log.warning("cannot write the prewarm manifest %s: %s", self.path, exc)
            self.path = None


RECORDER = Recorder()


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the replay off while the caller changes process-wide state (a library's model load)."""
    with _STATE_LOCK:
        yield


def global_state() -> dict:
    """The process-wide settings Dynamo guards every graph on (default dtype, thread count, TF32, autocast...)."""
    return json.loads(torch._C._dynamo.guards.GlobalStateGuard().__getstate__())


def _differing(before: dict, now: dict) -> list[str]:
    """The keys two `global_state()` snapshots both hold and disagree on."""
    return sorted(k for k in now if k in before and before[k] != now[k])


_STATS: dict | None = None


def graphs_compiled() -> int:
    """Dynamo's count of graphs compiled in this process: a fused call that raised it compiled one."""
    global _STATS
    if _STATS is None:
        from torch._dynamo.utils import counters

        _STATS = counters["stats"]
    return _STATS["unique_graphs"]


# --- replaying ------------------------------------------------------------------------------------------------
def replay(entries: list[dict], device: torch.device) -> tuple[int, int]:
    """Call each recorded function on empty tensors of the recorded specs: Dynamo traces it and Inductor loads
    its kernel from the cache, as the first real call would. Returns (graphs compiled, entries skipped)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device is per thread
    before = graphs_compiled()
    _REPLAYING.on = True
    try:
        skipped = _replay_entries(entries, device)
    finally:
        _REPLAYING.on = False
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return graphs_compiled() - before, skipped


def _replay_entries(entries: list[dict], device: torch.device) -> int:
    skipped, warned = 0, False
    for e in entries:
        fn = REGISTRY.get(e.get("fn"))
        if fn is None:
            skipped += 1
            continue
        try:
            args = [_build(s, device) for s in e["args"]]
            with _STATE_LOCK, torch.inference_mode(e.get("inference", True)), \
                    torch.set_grad_enabled(e.get("grad", False)):
                now, recorded = global_state(), e.get("state") or {}
                differ = _differing(recorded, now)
                if differ and not warned:
                    log.warning("prewarm: global state differs from the recording (%s): graphs replayed now will "
                                "not match calls made under the recorded state",
                                "; ".join(f"{k} recorded {recorded[k]}, now {now[k]}" for k in differ))
                    warned = True
                fn(*args)
        except Exception as exc:  # noqa: BLE001 - a stale entry; the real call compiles what it needs
            skipped += 1
            log.debug("prewarm entry %s skipped: %s", e.get("fn"), exc)
    return skipped


class Prewarm:
    """The replay of this rank's manifest on a thread, started before the weights load; `join` before the
    first chunk. Recording into the same manifest starts either way (when `enabled`)."""

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1, path: Path | None = None) -> None:
        self.thread: threading.Thread | None = None
        self.result: tuple[int, int] | None = None
        entries = RECORDER.open(path or manifest_path(device, rank, world))
        if not entries:
            return
        RECORDER.replayed = True
        self.state, self._default_dtype = global_state(), torch.get_default_dtype()
        import worker.models.fp8  # noqa: F401 - registers the fused chains by name (fp8 imports fused)

        def run() -> None:
            t = time.perf_counter()
            # Tracing holds the GIL for long stretches; the loader's threads need it briefly per tensor. Python
            # hands it over after the switch interval, 5 ms by default: ~1300 tensors would wait seconds.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, 0.001))
            try:
                self.result = replay(entries, device)
            finally:
                sys.setswitchinterval(interval)
            log.info("prewarm: %d fused graphs traced from %s while the weights loaded (%d entries skipped) in "
                     "%.1f s", self.result[0], RECORDER.path.name if RECORDER.path else "?", self.result[1],
                     time.perf_counter() - t)

        self.thread = threading.Thread(target=run, name="lingbot-prewarm", daemon=True)
        self.thread.start()

    def join(self) -> None:
        if self.thread is None:
            return
        t = time.perf_counter()
        self.thread.join()
        if time.perf_counter() - t > 0.5:
            log.info("waited %.1f s for the prewarm after the weights loaded", time.perf_counter() - t)
        self.thread = None
        now = global_state()
        differ = _differing(self.state, now)
        if differ:  # something changed process state outside `exclusive` while a trace ran
            log.warning("prewarm: process state changed while loading (%s); the default dtype is put back",
                        "; ".join(f"{k} {self.state[k]} -> {now[k]}" for k in differ))
            torch.set_default_dtype(self._default_dtype)
