"""Self-attention K/V cache: `sink` latent frames kept forever plus a sliding window of recent frames.

The official rule (fast_rollout.md section 5) keeps, after a chunk is written, the sink frames and the most
recent `window` frames (the window includes the chunk being generated), and shifts the survivors left with a
copy. Attention has no mask and RoPE is applied before caching, so the order of keys in the cache does not
matter: a ring over the window slots keeps the same set of frames with no copy at all. Frame f lives in slot
f for f < sink, else in sink + (f - sink) % window.
"""

from __future__ import annotations

import torch

from worker.config import CHUNK_LATENT_FRAMES


class KVCache:
    def __init__(
        self,
        *,
        num_layers: int,
        frame_tokens: int,
        total_frames: int,
        sink: int,
        window: int,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        batch: int = 1,
    ) -> None:
        if window < CHUNK_LATENT_FRAMES:
            raise ValueError(f"kv_window: {window} latent frames is smaller than a chunk ({CHUNK_LATENT_FRAMES})")
        if sink < 0:
            raise ValueError(f"kv_sink: {sink} must be >= 0")
        self.frame_tokens = frame_tokens
        # Never allocate more than the rollout can fill: short rollouts get global attention for free.
        self.capacity_frames = min(sink + window, total_frames)
        self.sink = min(sink, self.capacity_frames)
        self.window = self.capacity_frames - self.sink
        shape = (batch, self.capacity_frames * frame_tokens, heads, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid_tokens = 0
        self._runs: list[tuple[int, int, int]] = []
        self._indexed = False  # index_slots() was called
        self._index: torch.Tensor | None = None  # the chunk's slot tokens on the device, once a chunk began

    @property
    def full(self) -> bool:
        """Every slot holds a frame: from here on every chunk attends to the same buffers."""
        return self.valid_tokens == self.capacity_frames * self.frame_tokens

    def index_slots(self) -> None:
        """Write through a device-side index of the chunk's slot tokens from now on, instead of slices chosen on
        the host: every chunk then runs the same kernels on the same buffers, which a CUDA graph needs
        (worker/models/chunk_graphs.py). The index is refilled by each begin_chunk, in place."""
        self._indexed = True
        if self._runs:
            self._fill_index()

    def _fill_index(self) -> None:
        tokens = torch.cat([torch.arange(dst, dst + n) for _, dst, n in self._runs])
        if self._index is None:
            self._index = torch.empty_like(tokens, device=self.k[0].device)
        if self._index.shape != tokens.shape:
            raise ValueError(f"a chunk of {tokens.numel()} tokens after chunks of {self._index.numel()}")
        if self._index.is_cuda:  # from pinned memory: queued, no wait for the stream
            self._index.copy_(tokens.pin_memory(), non_blocking=True)
        else:
            self._index.copy_(tokens)

    def slot(self, frame: int) -> int:
        if frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % self.window

    def begin_chunk(self, start_frame: int, num_frames: int) -> None:
        """Fix where this chunk's frames go; every forward of the chunk then overwrites the same slots."""
        ft = self.frame_tokens
        runs: list[tuple[int, int, int]] = []  # (src token offset, dst token offset, tokens): contiguous copies
        for i in range(num_frames):
            dst = self.slot(start_frame + i) * ft
            if runs and runs[-1][1] + runs[-1][2] == dst:
                s, d, n = runs[-1]
                runs[-1] = (s, d, n + ft)
            else:
                runs.append((i * ft, dst, ft))
        self._runs = runs
        self.valid_tokens = min(start_frame + num_frames, self.capacity_frames) * ft
        if self._indexed:
            self._fill_index()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's roped k/v ([B, L, H, D]) and return the keys/values attention should see."""
        ck, cv = self.k[layer], self.v[layer]
        if self._indexed:
            ck.index_copy_(1, self._index, k)
            cv.index_copy_(1, self._index, v)
            return self.visible(layer)
        for src, dst, n in self._runs:
            ck[:, dst : dst + n].copy_(k[:, src : src + n])
            cv[:, dst : dst + n].copy_(v[:, src : src + n])
        return self.visible(layer)

    def chunk_slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This chunk's K and V slots as one contiguous [B, L, H, D] view each, for a producer that writes them in
        place (the sequence-parallel exchange receives straight into them); None where the chunk's frames are
        not one run of slots (a window that is not a multiple of the chunk wraps inside a chunk) or B > 1, and
        where the slots are written through the device-side index (index_slots)."""
        if self._indexed or len(self._runs) != 1 or self._runs[0][0] != 0:
            return None
        _, dst, n = self._runs[0]
        k, v = self.k[layer][:, dst : dst + n], self.v[layer][:, dst : dst + n]
        return (k, v) if k.is_contiguous() else None

    def visible(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values attention sees once this chunk's slots are written."""
        return self.k[layer][:, : self.valid_tokens], self.v[layer][:, : self.valid_tokens]

    def frames_in_cache(self, end_frame: int) -> list[int]:
        """Which latent frames attention sees once frames [0, end_frame) are written (for tests and docs)."""
        held = {}
        for f in range(end_frame):
            held[self.slot(f)] = f
        return sorted(held.values())
