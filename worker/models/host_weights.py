"""A module's weights kept in host RAM and lent to a GPU for one call at a time.

On one 80 GB GPU the UMT5 encoder (11.4 GB in bf16) cannot stay beside the DiT and the K/V span, so it lives in
host RAM between prompts. Moving it with `module.to("cpu")` copies 11 GB back into freshly allocated pageable
memory after every prompt, although the weights never change. Here the master copy is one host buffer,
page-locked where CUDA allows (so the upload is one DMA at the link's speed), and the GPU copy is simply dropped
after the call. The buffer is filled either from the module's own tensors or, for a module built on the meta
device, straight from its safetensors files (each tensor copied from the mapped file into its place).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from worker.models.loading import WeightsError

log = logging.getLogger("worker.host_weights")

_ALIGN = 256  # bytes: every tensor's view starts where a GPU vector load may start


def _page_lock(buf: torch.Tensor) -> bool:
    """Register `buf`'s pages with the CUDA driver (exact size; `pin_memory()` would round 11.4 GB up to 16)."""
    if not torch.cuda.is_available() or buf.numel() == 0:
        return False
    ptr, size = buf.data_ptr(), buf.numel()
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 0))
    if err != 0:
        log.warning("could not page-lock %.1f GB of host weights (cudaError %d): uploads stay pageable",
                    size / 1e9, err)
        return False
    weakref.finalize(buf, _unlock, ptr)
    return True


def _unlock(ptr: int) -> None:
    with contextlib.suppress(Exception):  # at interpreter exit the CUDA runtime may be gone first
        torch.cuda.cudart().cudaHostUnregister(ptr)


class HostWeights:
    """Every parameter and buffer of `module`, packed into one host buffer that `lent(device)` uploads.

    files: safetensors files holding the module's state dict (each tied weight under any of its names), read
    straight into the buffer; the module may then be built on the meta device. None: copy the module's tensors.
    """

    def __init__(self, module: nn.Module, files: Sequence[str | Path] | None = None) -> None:
        self._slots: list[tuple[int, int, torch.dtype, torch.Size]] = []  # offset, nbytes, dtype, shape
        self._users: list[list[tuple[nn.Module, str, bool]]] = []  # (owner, attribute, is a parameter) per slot
        self._names: dict[str, int] = {}  # state-dict name -> slot; tied weights: several names, one slot
        self._first: list[str] = []  # per slot, the name the module registers first
        seen: dict[int, int] = {}  # tied weights are one tensor: one slot, several users
        total = 0
        for prefix, mod in module.named_modules(remove_duplicate=False):
            for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    if id(t) not in seen:
                        seen[id(t)] = len(self._slots)
                        offset = -(-total // _ALIGN) * _ALIGN
                        total = offset + t.numel() * t.element_size()
                        self._slots.append((offset, total - offset, t.dtype, t.shape))
                        self._users.append([])
                        self._first.append(f"{prefix}.{name}" if prefix else name)
                    i = seen[id(t)]
                    self._names[f"{prefix}.{name}" if prefix else name] = i
                    if not any(m is mod and n == name for m, n, _ in self._users[i]):  # a module met twice
                        self._users[i].append((mod, name, is_param))
        self.nbytes = total
        self.host = torch.empty(total, dtype=torch.uint8)
        if files is not None:
            self._read(files)
            for i in range(len(self._slots)):  # in place of the meta tensors: new objects, one per tied weight
                self._point_slot_at(i, self.host, replace=True)
        else:
            for i, (offset, nbytes, _, _) in enumerate(self._slots):
                self.host[offset:offset + nbytes].copy_(self._current(i).detach().reshape(-1).view(torch.uint8))
                self._point_slot_at(i, self.host)  # the original goes as soon as it is copied: no second full copy
        self.page_locked = _page_lock(self.host)

    def _read(self, files: Sequence[str | Path]) -> None:
        """Every slot from the files, mapped: each tensor copied (or cast) from the page cache into its place.
        Strict: every slot once, no unknown name, the right shapes and sizes. A tied weight stored under several
        names is read from the name the module registers first, and the other copies must be equal to it:
        transformers unties them where they are not (TiedWeightsDiffer; the caller loads such a checkpoint its
        way)."""
        found: dict[int, tuple[str, Path, int, dict]] = {}  # slot -> (name, file, where its data starts, entry)
        copies: list[tuple[str, Path, int, dict, int]] = []  # a tied weight's other names, checked after
        for path in map(Path, files):
            start, header = _safetensors_header(path)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                i = self._names.get(name)
                if i is None:
                    raise WeightsError(f"unexpected tensor {name!r} in {path} (the model has no such parameter)")
                if i in found and name != self._first[i]:
                    copies.append((name, path, start, entry, i))
                    continue
                if i in found:
                    copies.append((*found[i], i))
                found[i] = (name, path, start, entry)
        missing = [self._first[i] for i in range(len(self._slots)) if i not in found]
        if missing:
            more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise WeightsError(f"{len(missing)} tensor(s) missing from {', '.join(map(str, files))}: "
                               f"{', '.join(map(repr, missing[:8]))}{more}")
        maps = {path: _mapped(path) for _, path, _, _ in found.values()}
        for i, (name, path, start, entry) in found.items():
            self._slot(i).copy_(self._stored(maps[path], name, path, start, entry, i))
        for name, path, start, entry, i in copies:
            stored = self._stored(maps[path] if path in maps else _mapped(path), name, path, start, entry, i)
            if not torch.equal(stored.to(self._slots[i][2]), self._slot(i)):
                raise TiedWeightsDiffer(f"{name!r} and {self._first[i]!r} are one tied weight in the model but differ "
                                        f"in {path}")

    def _slot(self, i: int) -> torch.Tensor:
        offset, nbytes, dtype, shape = self._slots[i]
        return self.host[offset:offset + nbytes].view(dtype).view(shape)

    def _stored(self, data: torch.Tensor, name: str, path: Path, start: int, entry: dict, i: int) -> torch.Tensor:
        """The tensor `name` as stored in the mapped file `data`, checked against slot i."""
        shape = self._slots[i][3]
        src = _ST_DTYPES.get(entry.get("dtype"))
        a, b = entry["data_offsets"]
        if tuple(entry["shape"]) != tuple(shape):
            raise WeightsError(f"shape mismatch for {name!r} in {path}: model expects {list(shape)}, "
                               f"file has {entry['shape']}")
        if src is None or b - a != shape.numel() * src.itemsize:
            raise WeightsError(f"tensor {name!r} in {path} has dtype {entry.get('dtype')} and {b - a} bytes "
                               f"for shape {list(shape)}")
        if start + b > data.numel():
            raise WeightsError(f"{path} ends {start + b - data.numel()} bytes before tensor {name!r} does "
                               "(truncated?)")
        return data[start + a : start + b].view(src).view(shape)

    def _current(self, i: int) -> torch.Tensor:
        mod, name, is_param = self._users[i][0]
        return (mod._parameters if is_param else mod._buffers)[name]

    def _point_at(self, buf: torch.Tensor) -> None:
        for i in range(len(self._slots)):
            self._point_slot_at(i, buf)

    def _point_slot_at(self, i: int, buf: torch.Tensor, replace: bool = False) -> None:
        """Every user of slot i reads it from `buf`. replace: give the users a new Parameter (a meta tensor's data
        cannot be set to a real one)."""
        offset, nbytes, dtype, shape = self._slots[i]
        view = buf[offset:offset + nbytes].view(dtype).view(shape)
        param = None
        for mod, name, is_param in self._users[i]:
            if is_param and replace:
                if param is None:
                    param = nn.Parameter(view, requires_grad=mod._parameters[name].requires_grad)
                mod._parameters[name] = param
            elif is_param:
                mod._parameters[name].data = view
            else:
                mod._buffers[name] = view

    @contextlib.contextmanager
    def lent(self, device: torch.device | str) -> Iterator[float]:
        """The weights on `device` for the body, back on the host copy afterwards (also on an exception); yields
        the seconds the upload took. Not re-entrant: one lender at a time (the caller holds its own lock)."""
        device = torch.device(device)
        t = time.perf_counter()
        on_device = self.host.to(device, non_blocking=self.page_locked, copy=True)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the upload's time is reported, not hidden in the call
        self._point_at(on_device)
        try:
            yield time.perf_counter() - t
        finally:
            self._point_at(self.host)
            del on_device


class TiedWeightsDiffer(WeightsError):
    """A weight the module ties is stored under two names with different values."""


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the header's tensor table) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100 << 20:
                raise ValueError(f"header length {n}")
            return 8 + n, json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read the safetensors header of {path} (corrupt or truncated?): {e}") from e


def _mapped(path: Path) -> torch.Tensor:
    """The file's bytes, memory-mapped read-only (copying from the page cache this way ran at twice the speed of
    pread into the same fresh buffer: 2.4 against 4.5 s for 5.2 GB on a 2-core machine, docs/PERFORMANCE.md v26)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return torch.empty(0, dtype=torch.uint8)
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # read-only on purpose: nothing writes through it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)
