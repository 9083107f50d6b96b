"""A module's weights kept in host RAM and lent to a GPU for one call at a time.

On one 80 GB GPU the UMT5 encoder (11.4 GB in bf16) cannot stay beside the DiT and the K/V span, so it lives in
host RAM between prompts. Moving it with `module.to("cpu")` copies 11 GB back into freshly allocated pageable
memory after every prompt, although the weights never change. Here the master copy is one host buffer,
page-locked where CUDA allows (so the upload is one DMA at the link's speed), and the GPU copy is simply dropped
after the call.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Iterator

import torch
from torch import nn

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
    """Every parameter and buffer of `module`, packed into one host buffer that `lent(device)` uploads."""

    def __init__(self, module: nn.Module) -> None:
        self._slots: list[tuple[int, int, torch.dtype, torch.Size]] = []  # offset, nbytes, dtype, shape
        self._users: list[list[tuple[nn.Module, str, bool]]] = []  # (owner, attribute, is a parameter) per slot
        seen: dict[int, int] = {}  # tied weights are one tensor: one slot, several users
        total = 0
        for mod in module.modules():
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
                    self._users[seen[id(t)]].append((mod, name, is_param))
        self.nbytes = total
        self.host = torch.empty(total, dtype=torch.uint8)
        for i, (offset, nbytes, _, _) in enumerate(self._slots):
            self.host[offset:offset + nbytes].copy_(self._current(i).detach().reshape(-1).view(torch.uint8))
            self._point_slot_at(i, self.host)  # the original goes as soon as it is copied: no second full copy
        self.page_locked = _page_lock(self.host)

    def _current(self, i: int) -> torch.Tensor:
        mod, name, is_param = self._users[i][0]
        return (mod._parameters if is_param else mod._buffers)[name]

    def _point_at(self, buf: torch.Tensor) -> None:
        for i in range(len(self._slots)):
            self._point_slot_at(i, buf)

    def _point_slot_at(self, i: int, buf: torch.Tensor) -> None:
        offset, nbytes, dtype, shape = self._slots[i]
        view = buf[offset:offset + nbytes].view(dtype).view(shape)
        for mod, name, is_param in self._users[i]:
            if is_param:
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
