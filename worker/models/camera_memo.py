"""A latent frame's camera modulation, computed once per distinct camera condition and reused.

Every block turns a chunk's camera condition into a per-token scale and shift with four d x d GEMMs: about 4% of
a chunk's FLOPs (~60 ms a chunk on one H100, docs/PERFORMANCE.md v33). A token's modulation depends only on its
frame's condition and its position in the frame, and a frame's condition only on the frame's motion relative to
the one before (camera.relative_poses). Camera actions are a few keys with fixed steps, so motions repeat: a held
key gives every frame the same condition, and a whole job has only as many distinct ones as key combinations it
uses. This keeps each distinct frame's modulation, keyed by what the frame's condition is made from (its relative
pose, the intrinsics and the size: camera.CameraChunk.frame_keys, so a hit is the computation a miss would repeat
on equal inputs), in least recently used order within a byte budget (LINGBOT_CAMERA_MEMO_GB).

A rank of a sequence-parallel group holds a span of the chunk's tokens, which can start or end inside a frame; an
entry holds the positions it was computed for and serves any span inside them.
"""
from __future__ import annotations

import itertools
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# (scales, shifts): one [B, rows, dim] tensor per block each.
Modulation = tuple[list[torch.Tensor], list[torch.Tensor]]

DEFAULT_BUDGET_GB = 8.0
HEADROOM = 3 << 30  # device memory the memo leaves free beyond the process's peak (see CameraMemo._cap)


def memo_budget_setting(env=os.environ) -> int:
    """LINGBOT_CAMERA_MEMO_GB (default 8): bytes of device memory the kept modulations may hold; 0 turns the memo
    off (every chunk computes its own, as the official code does). One full 832x480 frame of the 14B model holds
    1.28 GB (1560 tokens x 5120 x 2 bytes x 40 blocks x scale and shift). Read when the model is built."""
    raw = env.get("LINGBOT_CAMERA_MEMO_GB", str(DEFAULT_BUDGET_GB)).strip()
    try:
        gb = float(raw)
    except ValueError:
        raise ValueError(f"LINGBOT_CAMERA_MEMO_GB={raw!r}: must be a number of GB >= 0") from None
    if not gb >= 0:
        raise ValueError(f"LINGBOT_CAMERA_MEMO_GB={raw!r}: must be a number of GB >= 0")
    return int(gb * 1e9)


@dataclass
class _Entry:
    lo: int  # the frame positions [lo, hi) its tensors hold
    hi: int
    scales: list[torch.Tensor]  # per block [B, hi - lo, dim]
    shifts: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.scales, *self.shifts))


class CameraMemo:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        # Over the memo's life, per chunk and distinct frame condition: served from an entry, or computed.
        self.reused = 0
        self.computed = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def modulation(
        self,
        keys: Sequence[bytes],
        frame_tokens: int,
        span: slice,
        rows: Callable[[int, int, int], torch.Tensor],
        compute: Callable[[torch.Tensor], Modulation],
        row_bytes: int,
        device: torch.device,
    ) -> Modulation:
        """The modulation of the chunk's tokens `span` (frame-major, `frame_tokens` per frame, frame j keyed by
        keys[j]). rows(j, lo, hi): the camera tokens [B, hi - lo, C] of frame j's positions [lo, hi). compute:
        their modulation, row_bytes per row, on `device`. The frames that miss are computed in one call, so that
        its GEMMs keep their rows."""
        pieces = []  # (frame, key, lo, hi): the span cut at frame boundaries, in token order
        for j, key in enumerate(keys):
            lo, hi = max(span.start - j * frame_tokens, 0), min(span.stop - j * frame_tokens, frame_tokens)
            if lo < hi:
                pieces.append((j, key, lo, hi))
        wanted: dict[bytes, tuple[int, int, int]] = {}  # key -> (lo, hi) covering its pieces, and one frame with it
        for j, key, lo, hi in pieces:
            wlo, whi, wj = wanted.get(key, (lo, hi, j))
            wanted[key] = (min(lo, wlo), max(hi, whi), wj)
        misses = []
        for key, (lo, hi, j) in wanted.items():
            entry = self._entries.get(key)
            if entry is not None and entry.lo <= lo and hi <= entry.hi:
                self._entries.move_to_end(key)
                self.reused += 1
                continue
            if entry is not None:  # a wider span of a frame seen before: cover both
                lo, hi = min(lo, entry.lo), max(hi, entry.hi)
                self._drop(key)
            misses.append((key, lo, hi, j))
        cap = self._cap(device)
        if misses:
            # Room first, from frames this chunk does not use: the memo never holds more than its cap.
            needed = sum(hi - lo for _, lo, hi, _ in misses) * row_bytes
            current = {key for _, key, _, _ in pieces}
            for key in [k for k in self._entries if k not in current]:
                if self._bytes + needed <= cap:
                    break
                self._drop(key)
            self.computed += len(misses)
            scales, shifts = compute(torch.cat([rows(j, lo, hi) for _, lo, hi, j in misses], dim=1))
            ends = list(itertools.accumulate(hi - lo for _, lo, hi, _ in misses))
            parts = [slice(end - (hi - lo), end) for (_, lo, hi, _), end in zip(misses, ends)]
            for (key, lo, hi, _), s_own, t_own in zip(misses, _split(scales, parts), _split(shifts, parts)):
                self._entries[key] = entry = _Entry(lo, hi, s_own, t_own)
                self._bytes += entry.nbytes
        used = [(self._entries[key], lo, hi) for _, key, lo, hi in pieces]
        out = _assemble([(e.scales, e.lo, lo, hi) for e, lo, hi in used]), \
            _assemble([(e.shifts, e.lo, lo, hi) for e, lo, hi in used])
        # The chunk's own frames, just used, go too if they alone exceed the cap: the chunk has its numbers.
        while self._entries and self._bytes > cap:
            self._drop(next(iter(self._entries)))
        return out

    def _cap(self, device: torch.device) -> int:
        """The budget, or less on a GPU whose memory would not hold it beside the rest: the process's peak
        allocation so far without the memo's own bytes stands for what the chunks need besides, and HEADROOM is
        left for the allocator's fragmentation and for needs the peak has not seen yet (a first job's later,
        longer-span chunks)."""
        if device.type != "cuda":
            return self.budget
        total = torch.cuda.get_device_properties(device).total_memory
        others = torch.cuda.max_memory_allocated(device) - self._bytes
        return max(0, min(self.budget, total - HEADROOM - others))

    def _drop(self, key: bytes) -> None:
        self._bytes -= self._entries.pop(key).nbytes


def _split(outs: list[torch.Tensor], parts: list[slice]) -> list[list[torch.Tensor]]:
    """Per part, its rows of every block's batch [B, rows, dim]. With several parts each is a copy of its own, so
    that evicting one frame frees its memory, and each block's batch is released as soon as it is copied."""
    if len(parts) == 1:
        return [list(outs)]
    own: list[list[torch.Tensor]] = [[] for _ in parts]
    for layer in range(len(outs)):
        batch, outs[layer] = outs[layer], None
        for dst, part in zip(own, parts):
            dst.append(batch[:, part].clone())
    return own


def _assemble(pieces: list[tuple[list[torch.Tensor], int, int, int]]) -> list[torch.Tensor]:
    """Per block, the pieces' rows side by side in a tensor of its own (the chunk's graphs and fused kernels take
    tensors without a storage offset). A piece: (an entry's per-block tensors, the entry's first position, the
    positions [lo, hi) wanted)."""
    layers = len(pieces[0][0]) if pieces else 0
    return [torch.cat([ts[layer][:, lo - first : hi - first] for ts, first, lo, hi in pieces], dim=1)
            for layer in range(layers)]
