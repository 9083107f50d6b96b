"""Ulysses sequence parallelism: the collectives the DiT needs, and nothing else.

Every linear layer runs on a 1/N slice of the chunk's tokens. Self-attention needs all tokens, so q/k/v go
through one all-to-all from "tokens split, all heads" to "all tokens, heads split", and the attention output
comes back the same way. Each rank therefore caches K/V only for its own heads. With N == 1 every method is
the identity, so the single-GPU path pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceParallel:
    rank: int = 0
    world: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup; None = the default group

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # --- token sharding -------------------------------------------------------------------------------
    def padded_len(self, n: int) -> int:
        return -(-n // self.world) * self.world

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of the token axis, zero-padded so every rank gets the same length."""
        if not self.enabled:
            return x
        n = x.shape[dim]
        pad = self.padded_len(n) - n
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.chunk(self.world, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, true_len: int, dim: int = 1) -> torch.Tensor:
        """Inverse of shard: every rank gets the full token axis."""
        if not self.enabled:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, true_len)

    # --- Ulysses all-to-all -----------------------------------------------------------------------------
    def seq_to_heads(self, x: torch.Tensor, true_len: int) -> torch.Tensor:
        """[..., S/N, H, D] (all heads) -> [..., S, H/N, D] (this rank's heads), padding removed.

        Leading dims are kept, so k and v stacked as [2, B, S/N, H, D] travel in one collective.
        """
        return self.seq_to_heads_async(x, true_len)()

    def seq_to_heads_async(self, x: torch.Tensor, true_len: int) -> Callable[[], torch.Tensor]:
        """Start seq_to_heads; the returned function waits for it. Lets the caller overlap the exchange of q
        with the k/v projections (NCCL runs on its own stream)."""
        if not self.enabled:
            return lambda: x
        *lead, s, h, d = x.shape
        n = self.world
        # [n(dst), *lead, s, h/n, d]: the head groups become the exchange axis.
        send = x.reshape(*lead, s, n, h // n, d).movedim(-3, 0).contiguous()
        recv = torch.empty_like(send)
        work = dist.all_to_all_single(recv, send, group=self.group, async_op=True)

        def finish() -> torch.Tensor:
            work.wait()
            # recv[src] holds the src rank's tokens for our heads: concatenate along the token axis.
            out = recv.movedim(0, -4).reshape(*lead, n * s, h // n, d)
            return out.narrow(-3, 0, true_len)

        return finish

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """[..., S, H/N, D] -> [..., S/N, H, D]; pads the token axis back to a multiple of N."""
        if not self.enabled:
            return x
        *lead, s, hl, d = x.shape
        n = self.world
        sp = self.padded_len(s)
        if sp != s:
            x = torch.cat([x, x.new_zeros(*lead, sp - s, hl, d)], dim=-3)
        send = x.reshape(*lead, n, sp // n, hl, d).movedim(-4, 0).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        # recv[src] = our tokens, src's heads: heads are ordered by rank.
        return recv.movedim(0, -3).reshape(*lead, sp // n, n * hl, d)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.enabled:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def head_slice(self, num_heads: int) -> slice:
        per = num_heads // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


SINGLE = SequenceParallel()
