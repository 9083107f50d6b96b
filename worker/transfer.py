"""Copies between the host and the GPU that never wait inside the driver.

A plain copy from or to pageable host memory makes the calling thread wait, inside the CUDA driver, for everything
queued on its stream before it. With the DiT as CUDA graph replays a stream holds a whole chunk of queued work. So
host-side waits go through a CUDA event and copies through pinned memory: the wait is where it belongs, visible,
and no driver-side staging of a pageable copy is held across a chunk. (On 4 x H200 the leader's decode stayed in
step with the DiT after this change too, docs/PERFORMANCE.md v18: it did not cause that.)
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host tensor -> device without a host sync: a copy from pageable memory waits for the whole stream (the
    GPU would drain at every chunk boundary); from pinned memory it is queued like a kernel."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return t.to(device=device, dtype=dtype)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Device tensor -> host, once this stream's work up to it is done: a copy into pinned memory, then an event
    wait (the wait a plain `.cpu()` would do inside the driver, done where other threads' calls are not held up)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host
