"""Ulysses sequence parallelism: the collectives the DiT needs, and nothing else.

Every linear layer runs on a slice of the chunk's tokens. Self-attention needs all tokens, so q, k and v each go
through an all-to-all from "tokens split, all heads" to "all tokens, heads split", and the attention output comes
back the same way. Each rank therefore caches K/V only for its own heads, and receives them straight into its
cache. With one rank every method is the identity, so the single-GPU path pays nothing. The exchanges are NCCL
all-to-alls, or with `copies` copy-engine writes into the peers' memory (worker/parallel/copy_exchange.py, the
default on 2 GPUs: NCCL's kernels cannot run beside the GEMMs, the copy engines can).

The split need not be even. By default every rank decodes a band of each chunk's frame rows between chunks
(`decode_split`: "bands"), so every rank does the same work. With "leader" rank 0 alone decodes whole frames, on a
second stream of the same GPU, and every other rank waits for it inside the next all-to-all; giving the leader a
smaller share of the tokens (`leader_share`) evens out the work per rank. Heads split evenly by default: the
attention kernel runs in whole waves of (query tile, head) programs over the GPU's SMs, so one head more than the
others can cost a whole wave (4 x H200: 11 heads took 259 ms per chunk where 10 took 189 and 9 took 181,
docs/PERFORMANCE.md v17), while a token more or less costs its share of the GEMMs. `leader_head_share` splits
heads unevenly too (tests use it to exercise uneven exchanges).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from worker.parallel.copy_exchange import CopyExchange

DECODE_SPLITS = ("bands", "leader")
EXCHANGES = ("nccl", "copy")


def exchange_kind(device: str, world: int) -> str:
    """How the Ulysses exchanges move their bytes: LINGBOT_SP_EXCHANGE, else "copy" on 2 GPUs that can map each
    other's memory and "nccl" elsewhere.
    nccl: all-to-alls (every device; gloo on CPUs).
    copy: copy-engine writes into the peers' symmetric memory (CUDA GPUs with peer access; worker/parallel/
      copy_exchange.py). On 2 x H200: 1074 ms per chunk against 1094 with nccl, the same latents bit for bit
      (docs/PERFORMANCE.md v25). Not yet measured on 4+ GPUs, so those keep nccl unless asked."""
    cuda = str(device).startswith("cuda")
    asked = exchange_asked()
    if world < 2:
        return "nccl"
    if asked == "copy" and not (cuda and _peers_reachable(world)):
        raise ValueError("LINGBOT_SP_EXCHANGE=copy needs CUDA GPUs with peer access to each other "
                         "(NVLink or PCIe P2P); set it to nccl")
    return asked or ("copy" if cuda and world == 2 and _peers_reachable(world) else "nccl")


def exchange_asked() -> str:
    """LINGBOT_SP_EXCHANGE as set ("" when unset): one of EXCHANGES."""
    asked = os.environ.get("LINGBOT_SP_EXCHANGE", "").strip().lower()
    if asked and asked not in EXCHANGES:
        raise ValueError(f"LINGBOT_SP_EXCHANGE={asked!r}: must be one of {', '.join(EXCHANGES)}")
    return asked


def _peers_reachable(world: int) -> bool:
    """Every pair of the first `world` GPUs can map each other's memory, which symmetric memory needs."""
    try:
        return all(torch.cuda.can_device_access_peer(i, j) for i in range(world) for j in range(world) if i != j)
    except (RuntimeError, AssertionError):  # no CUDA, or fewer GPUs than ranks
        return False


def decode_split(value: str | None = None) -> str:
    """Who decodes the frames of a multi-rank job: `value` (an engine's own setting), else LINGBOT_DECODE_SPLIT,
    else "bands".
    bands: every rank decodes its band of rows (worker/models/vae_rows.py) on its DiT stream right after the chunk,
      and the leader gathers the bands: on 4 x H200 each rank's band took ~57 ms of the decode's ~150
      (docs/PERFORMANCE.md v20).
    leader: the leader decodes whole frames on its decoder stream, beside the next chunk's DiT."""
    value = (value if value is not None else os.environ.get("LINGBOT_DECODE_SPLIT", "bands")).strip().lower()
    if value not in DECODE_SPLITS:
        raise ValueError(f"decode split {value!r}: must be one of {', '.join(DECODE_SPLITS)}")
    return value


# With decode_split "leader": the leader's frame decode as a fraction of one GPU's DiT time per chunk, by rank
# count (with "bands" every rank decodes the same share, so 0, an even split). Its stand-alone time
# (146 ms against ~2.1 s on an H200) would say 0.07, but the decoder's kernels partly fill the leader's idle gaps:
# on 2 x H200 (docs/PERFORMANCE.md, v13) 0.04 beat both an even split and 0.08; on 4 x H200 with the DiT as kept
# CUDA graphs (v18, one call) 0.12 beat 0.04, 0.2 and 0.28. 0 splits evenly.
DEFAULT_DECODE_COST = 0.04
DEFAULT_DECODE_COST_4_RANKS = 0.12


def default_decode_cost(world: int, split: str = "bands") -> float:
    if decode_split(split) == "bands":
        return 0.0
    return DEFAULT_DECODE_COST_4_RANKS if world >= 4 else DEFAULT_DECODE_COST


def leader_share_for(world: int, decode_cost: float) -> float:
    """The leader's fraction of the DiT work that leaves every rank equally busy.

    With one GPU's DiT time T per chunk and decode time d*T on the leader: f*T + d*T = (1 - f)*T / (world - 1),
    so f = (1 - d*(world - 1)) / world (never below 0: the split still gives every rank one head and one token).
    """
    if world < 1 or not 0 <= decode_cost < 1:
        raise ValueError(f"decode cost {decode_cost} must be in [0, 1) and world {world} >= 1")
    return max(0.0, (1 - decode_cost * (world - 1)) / world)


@functools.lru_cache(maxsize=256)
def _split_counts(total: int, world: int, share: float | None) -> tuple[int, ...]:
    """Per-rank counts of `total`: the leader's share (rounded, at least 1), the rest as evenly as integers
    allow. Cached: the exchanges ask for the same few splits hundreds of times per chunk."""
    if world == 1:
        return (total,)
    if total < world:
        raise ValueError(f"cannot split {total} tokens or heads over {world} ranks")
    share = 1 / world if share is None else share
    lead = min(max(round(total * share), 1), total - (world - 1))
    rest, extra = divmod(total - lead, world - 1)
    return (lead, *(rest + (i < extra) for i in range(world - 1)))


@dataclass(frozen=True)
class SequenceParallel:
    rank: int = 0
    world: int = 1
    group: object | None = None  # a torch.distributed ProcessGroup; None = the default group
    # A gloo group for the chunk boundary's go/stop (`agree`), so that agreeing never waits for the GPU; None:
    # agree over `group`, which then must be gloo (CPU ranks).
    control: object | None = None
    leader_share: float | None = None  # fraction of the tokens on rank 0; None = 1/world
    leader_head_share: float | None = None  # fraction of the heads on rank 0; None = as even as integers allow
    # Runs the Ulysses exchanges on the copy engines instead of NCCL (exchange_kind); None: NCCL (gloo on CPUs).
    copies: CopyExchange | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    # --- how things are split -------------------------------------------------------------------------
    def split_tokens(self, total: int) -> tuple[int, ...]:
        """Per-rank token counts; every rank computes the same tuple."""
        return _split_counts(total, self.world, self.leader_share)

    def split_heads(self, total: int) -> tuple[int, ...]:
        """Per-rank head counts; every rank computes the same tuple."""
        return _split_counts(total, self.world, self.leader_head_share)

    def local_heads(self, total: int) -> int:
        """This rank's count of `total` heads (the heads its K/V cache holds)."""
        return self.split_heads(total)[self.rank]

    # --- token sharding -------------------------------------------------------------------------------
    def token_span(self, total: int) -> slice:
        """This rank's tokens of `total`: the range `shard` cuts."""
        return consecutive_slices(self.split_tokens(total))[self.rank] if self.enabled else slice(0, total)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of the token axis."""
        if not self.enabled:
            return x
        mine = self.token_span(x.shape[dim])
        return x.narrow(dim, mine.start, mine.stop - mine.start)

    def gather(self, x: torch.Tensor, true_len: int, dim: int = 1, counts: Sequence[int] | None = None
               ) -> torch.Tensor:
        """Inverse of shard: every rank gets the full token axis (or the parts of `counts`, rank by rank)."""
        if not self.enabled:
            return x
        counts = self.split_tokens(true_len) if counts is None else counts
        longest = max(counts)
        if x.shape[dim] < longest:  # all_gather wants equal sizes: pad, then cut each part back
            shape = list(x.shape)
            shape[dim] = longest - x.shape[dim]
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat([p.narrow(dim, 0, c) for p, c in zip(parts, counts)], dim=dim)

    # --- Ulysses all-to-all -----------------------------------------------------------------------------
    # The send side of seq_to_heads_async is a flat buffer in "packed" order: for each rank j in turn, this rank's
    # tokens with rank j's heads ([*lead, s, heads[j], D], contiguous). The DiT's fused norm/RoPE kernel and its
    # head-split v projection write that order directly (worker/models/dit.py), so no copy is needed to send.
    def pack_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[..., s, H, D] -> the packed send buffer (one copy)."""
        *lead, s, h, d = x.shape
        send = x.new_empty(x.numel())
        heads = self.split_heads(h)
        for part, hs in zip(send.split([math.prod(lead) * s * hj * d for hj in heads]), consecutive_slices(heads)):
            part.view(*lead, s, hs.stop - hs.start, d).copy_(x[..., hs, :])
        return send

    def seq_to_heads_async(self, send: torch.Tensor, shape: torch.Size | tuple[int, ...], true_len: int,
                           out: torch.Tensor | None = None, tag: str = "q") -> Callable[[], torch.Tensor]:
        """Start the exchange of a packed send buffer holding a [..., s, H, D] tensor (`shape`); the returned
        function waits for it and gives [..., S, h, D]. NCCL runs on its own stream, so the caller can overlap
        it with compute.

        out: where the result should land, e.g. this chunk's slots in the K/V cache. With one leading element
        the received blocks already are [S, h, D] in token order, so NCCL writes straight into `out`.
        tag: which of a block-forward's exchanges this is ("q", "k" or "v"): with `copies` each lands in its own
        buffer, so all three can be in flight at once.
        """
        *lead, s, h, d = shape
        if not self.enabled:
            result = send.view(shape)
            return (lambda: result) if out is None else (lambda: out.copy_(result))
        b = math.prod(lead)
        tokens, heads = self.split_tokens(true_len), self.split_heads(h)
        if self.copies is not None:
            return self.copies.seq_to_heads(send, lead, tokens, heads, d, tag, out)
        mine = heads[self.rank]
        direct = out is not None and b == 1 and out.is_contiguous()
        recv = out.view(-1) if direct else send.new_empty(b * true_len * mine * d)
        recv_sizes = [b * tj * mine * d for tj in tokens]
        work = dist.all_to_all_single(recv, send, recv_sizes, [b * s * hj * d for hj in heads], group=self.group,
                                      async_op=True)

        def finish() -> torch.Tensor:
            work.wait()
            if direct:
                return out
            if b == 1:  # rank j's block holds tokens j in order: the buffer already is [S, h, d]
                result = recv.view(*lead, true_len, mine, d)
            else:
                result = torch.cat([p.view(*lead, tj, mine, d) for p, tj in zip(recv.split(recv_sizes), tokens)],
                                   dim=-3)
            return result if out is None else out.copy_(result)

        return finish

    def linear_to_heads_async(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_heads: int,
                              true_len: int, out: torch.Tensor | None = None, tag: str = "v"
                              ) -> Callable[[], torch.Tensor] | None:
        """seq_to_heads_async of x @ weight.T + bias ([1, s, dim] -> [1, S, h, D]), for a caller that has the
        weights: with `copies` each head group is projected and sent in turn, this rank's own group last, beside
        the others' transfer (CopyExchange.linear_to_heads). None where that does not apply (NCCL, a batch > 1):
        the caller projects, then calls seq_to_heads_async."""
        if self.copies is None or x.shape[0] != 1:
            return None
        d = weight.shape[0] // num_heads
        return self.copies.linear_to_heads(x.reshape(-1, x.shape[-1]), weight, bias, self.split_tokens(true_len),
                                           self.split_heads(num_heads), d, tag, out)

    def heads_to_seq_ordered(self, x: torch.Tensor, num_heads: int) -> Iterator[tuple[int, torch.Tensor]]:
        """heads_to_seq_parts as (head group j, part) in the order the parts can be used: with `copies` this rank's
        own group first (it needs no exchange) while the others travel; otherwise every group in head order."""
        if self.copies is not None and x.dim() == 4 and x.shape[0] == 1:
            return self.copies.heads_to_seq(x, self.split_tokens(x.shape[1]), self.split_heads(num_heads))
        return enumerate(self.heads_to_seq_parts(x, num_heads))

    def heads_to_seq_parts(self, x: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
        """[..., S, h, D] (all tokens, this rank's heads) -> this rank's tokens with every rank's head group, one
        [..., s, heads[j], D] tensor per rank j in head order. A caller that multiplies by a weight next can use
        the parts as they are (split-K) instead of copying them into one [..., s, H, D] tensor."""
        if not self.enabled:
            return [x]
        *lead, total, mine, d = x.shape
        b = math.prod(lead)
        tokens, heads = self.split_tokens(total), self.split_heads(num_heads)
        s = tokens[self.rank]
        # Token-major, so rank j's tokens are one contiguous block (a view when the batch is 1).
        send = x.movedim(-3, 0).contiguous().view(-1)
        recv = x.new_empty(s * b * num_heads * d)
        recv_sizes = [s * b * hj * d for hj in heads]
        dist.all_to_all_single(recv, send, recv_sizes, [tj * b * mine * d for tj in tokens], group=self.group)
        return [part.view(s, *lead, hj, d).movedim(0, -3) for part, hj in zip(recv.split(recv_sizes), heads)]

    def agree(self, value: int) -> int:
        """The leader's `value` on every rank, host to host: the caller's GPU keeps the work already queued, and the
        host queues the next chunk while the GPU runs this one. Over the control group (gloo; RankPool makes it),
        else over the data group, which must then be gloo too (CPU ranks)."""
        if not self.enabled:
            return value
        flag = torch.tensor([value], dtype=torch.int64)
        dist.broadcast(flag, src=0, group=self.control if self.control is not None else self.group)
        return int(flag.item())

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.enabled:
            dist.broadcast(x, src=src, group=self.group)
        return x


def consecutive_slices(counts: Sequence[int]) -> list[slice]:
    """Consecutive ranges of the given sizes: [2, 3, 3] -> [0:2, 2:5, 5:8] (heads or tokens per rank)."""
    ends = list(itertools.accumulate(counts))
    return [slice(e - c, e) for e, c in zip(ends, counts)]


SINGLE = SequenceParallel()
