"""The Ulysses exchanges as copy-engine writes into the peers' memory, instead of NCCL all-to-alls.

NCCL moves data with kernels. Beside the DiT's GEMMs, which take every SM, an NCCL all-to-all hardly overlaps:
on 2 x H200 a 12 MB exchange (one rank's q at 2 ranks) took 83-110 us alone and added 97-120 us to a ~100 us GEMM
on another stream, while copy-engine writes of the same bytes took 45-48 us (64-81 us with the barrier) and added
26-51 us to the GEMM (`scripts/exchange_probe.py`, three runs; docs/PERFORMANCE.md v25). In the rollout that is
1094 -> 1074 ms per 2-GPU chunk. So every rank here holds one receive buffer in symmetric
memory (mapped into every peer's address space, torch.distributed._symmetric_memory) and, on a side stream, writes
each peer's block straight into that peer's buffer with `copy_`, which is one cudaMemcpyAsync: the copy engines do
it over NVLink, no SM is taken. A stream barrier over the ranks then says every block has landed.

The receive layouts are exactly those of NCCL's `all_to_all_single` in worker/parallel/sp.py, so everything around
the exchange is unchanged. The buffer holds four regions, one per exchange of a block-forward (q, k, v and the
attention output's return), so the three exchanges of q, k and v can be in flight together. It is set up when
the rank pool starts (`setup`), sized for the largest request, so it never grows under a job: on 2 x H200 with
PyTorch 2.11 a second growth from a thread other than the first's, as the leader's rollout runs, never completed
(scripts/symm_growth_probe.py), and a follower's second growth failed an internal assert of the caching allocator
(docs/PERFORMANCE.md v26). Where any rank cannot set it up, every rank agrees on NCCL (worker/parallel/pool.py).

Why one barrier per exchange is enough: a rank writes a peer's region only after its own side stream has passed
the barrier of the exchange before it, which the peer reached only after its side stream had waited for its
compute stream up to the point where that exchange's data was made, and that point comes after the peer's last
read of the region (its attention reads q, k and v before it makes the attention output; its output projection
reads the returned parts before it makes the next q). On two H200s every exchange equals NCCL's bit for bit
(scripts/exchange_probe.py), and so do a 12-chunk rollout's latents. CPUs have no symmetric memory: there
tests/test_copy_exchange.py checks the copy plans and this class's methods, with CUDA's streams stubbed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from worker.parallel.sp import consecutive_slices

REGIONS = ("q", "k", "v", "o")

# One copy of an exchange: (the rank it goes to, offset in the sender's buffer, offset in that rank's receive
# region, elements). The plans below are the whole layout; CopyExchange only carries them out.
Block = tuple[int, int, int, int]


def seq_to_heads_blocks(rank: int, tokens: Sequence[int], heads: Sequence[int], d: int, b: int = 1) -> list[Block]:
    """Rank `rank`'s copies of a tokens-split -> heads-split exchange, one per rank j in head order: from its packed
    send buffer (SequenceParallel.pack_heads: its tokens with rank j's heads, j by j), to rank j's region after the
    blocks of the ranks before it, which is NCCL's all_to_all_single receive layout: every token with j's heads."""
    before, src, blocks = sum(tokens[:rank]), 0, []
    for j, hj in enumerate(heads):
        n = b * tokens[rank] * hj * d
        blocks.append((j, src, b * before * hj * d, n))
        src += n
    return blocks


def heads_to_seq_blocks(rank: int, tokens: Sequence[int], heads: Sequence[int], d: int) -> list[Block]:
    """Rank `rank`'s copies of the way back, one per rank j: from its token-major [S, h_rank, D] buffer, rank j's
    tokens, to rank j's region after the head groups of the ranks before this one (j's tokens with every group,
    group by group in head order: heads_to_seq_offsets)."""
    before, src, blocks = sum(heads[:rank]), 0, []
    for j, tj in enumerate(tokens):
        n = tj * heads[rank] * d
        blocks.append((j, src, tj * before * d, n))
        src += n
    return blocks


def heads_to_seq_offsets(rank: int, tokens: Sequence[int], heads: Sequence[int], d: int) -> list[tuple[int, int]]:
    """Where each head group's part [s, h_j, D] starts in rank `rank`'s region after the way back."""
    return [(j, tokens[rank] * sum(heads[:j]) * d) for j in range(len(heads))]


def region_elems(tokens: Sequence[int], heads: Sequence[int], d: int, b: int = 1) -> int:
    """Elements a region must hold for exchanges of these token and head splits, either way."""
    return b * d * max(sum(tokens) * max(heads), max(tokens) * sum(heads))


class CopyExchange:
    """One rank's side of the copy-engine exchanges: its symmetric buffer, the peers' buffers mapped here, and the
    side stream the copies and barriers run on."""

    def __init__(self, rank: int, world: int, device: torch.device | str, group=None) -> None:
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.group = group
        self.stream = torch.cuda.Stream(self.device)
        self._region_elems = 0
        self._dtype: torch.dtype | None = None
        self._local: torch.Tensor | None = None
        self._peers: list[torch.Tensor] = []
        self._handle = None
        self._retired: list[tuple[torch.Tensor, object]] = []  # outgrown buffers, with their handles
        # The peers from the next rank on, so that not every rank writes to the same peer at once.
        self._peers_in_turn = [(rank + k) % world for k in range(1, world)]

    def setup(self, elems: int) -> None:
        """The buffer, `elems` per region (region_elems of the largest exchange to come): collective, so that a GPU
        or container that cannot share memory between processes shows at start-up, where the pool can still
        choose NCCL. A larger exchange later grows it (`_ensure`), which is what the size here avoids."""
        self._ensure(elems, torch.bfloat16)

    def _ensure(self, elems: int, dtype: torch.dtype) -> None:
        """(Re)allocate the symmetric buffer when a region must hold more. Collective: every rank asks for the same
        sizes at the same exchange, since every rank runs the same forwards on the same token and head counts."""
        if elems <= self._region_elems and dtype == self._dtype:
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the copy exchange's buffer must grow to {elems} elements per region inside a CUDA "
                               "graph capture: run one eager forward of this size first")
        if self._local is not None:  # graphs captured on it still write there: never freed
            self._retired.append((self._local, self._handle))
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        torch.cuda.current_stream(self.device).synchronize()
        self.stream.synchronize()
        total = elems * len(REGIONS)
        buf = symm_mem.empty(total, dtype=dtype, device=self.device)
        handle = symm_mem.rendezvous(buf, self.group if self.group is not None else dist.group.WORLD)
        self._peers = [handle.get_buffer(j, (total,), dtype) for j in range(self.world)]
        self._local, self._handle = buf, handle
        self._region_elems, self._dtype = elems, dtype

    def region(self, tag: str, elems: int) -> torch.Tensor:
        """The first `elems` of this rank's receive region `tag`."""
        start = REGIONS.index(tag) * self._region_elems
        return self._local[start : start + elems]

    def _push(self, send: torch.Tensor, blocks: Sequence[tuple[int, int, int, int]], tag: str) -> None:
        """On the side stream, after everything queued so far on the caller's stream: copy send[src : src + n] to
        rank j's region `tag` at dst, for each (j, src, dst, n). The caller keeps `send` alive until it has waited
        for the barrier (`_barrier`): its memory then is only reused after the copies on the caller's stream."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        base = REGIONS.index(tag) * self._region_elems
        with torch.cuda.stream(self.stream):
            for j, src, dst, n in blocks:
                self._peers[j][base + dst : base + dst + n].copy_(send[src : src + n])

    def _barrier(self) -> torch.cuda.Event:
        """Every rank's pushes so far have landed once the returned event has passed."""
        with torch.cuda.stream(self.stream):
            self._handle.barrier(channel=0)
        done = torch.cuda.Event()
        done.record(self.stream)
        return done

    def _finisher(self, done: torch.cuda.Event, send: torch.Tensor, tag: str, lead: Sequence[int],
                  tokens: Sequence[int], mine: int, d: int, out: torch.Tensor | None) -> Callable[[], torch.Tensor]:
        """The caller's wait for an exchange into region `tag`: every rank's tokens with this rank's `mine` heads,
        [*lead, S, mine, d] (a view of the region, or copied into `out`). Holds `send` until then."""

        def finish() -> torch.Tensor:
            nonlocal send
            torch.cuda.current_stream(self.device).wait_event(done)
            send = None  # freed after the wait: reused only behind the copies
            b, total = math.prod(lead), sum(tokens)
            recv = self.region(tag, b * total * mine * d)
            if b == 1:
                result = recv.view(*lead, total, mine, d)
            else:
                sizes = [b * t * mine * d for t in tokens]
                result = torch.cat([p.view(*lead, t, mine, d) for p, t in zip(recv.split(sizes), tokens)], dim=-3)
            return result if out is None else out.copy_(result)

        return finish

    def seq_to_heads(self, send: torch.Tensor, lead: Sequence[int], tokens: Sequence[int], heads: Sequence[int],
                     d: int, tag: str, out: torch.Tensor | None) -> Callable[[], torch.Tensor]:
        """As SequenceParallel.seq_to_heads_async: send is packed (for each rank j, this rank's tokens with rank
        j's heads); each rank receives every rank's tokens with its own heads, rank by rank."""
        b, mine = math.prod(lead), heads[self.rank]
        self._ensure(region_elems(tokens, heads, d, b), send.dtype)
        blocks = seq_to_heads_blocks(self.rank, tokens, heads, d, b)
        self._push(send, [blocks[self.rank]] + [blocks[j] for j in self._peers_in_turn], tag)
        return self._finisher(self._barrier(), send, tag, lead, tokens, mine, d, out)

    def linear_to_heads(self, x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tokens: Sequence[int],
                        heads: Sequence[int], d: int, tag: str, out: torch.Tensor | None
                        ) -> Callable[[], torch.Tensor]:
        """seq_to_heads of x2 @ weight.T + bias ([s, H*D], one leading element), projected one head group at a time:
        the peers' groups first, each pushed as soon as it is made, then this rank's own group straight into its
        own rows of the receive region, while the peers' blocks travel. Same GEMMs, so the same numbers."""
        mine, s = heads[self.rank], x2.shape[0]
        self._ensure(region_elems(tokens, heads, d), x2.dtype)
        before = sum(tokens[: self.rank])
        groups, blocks = consecutive_slices(heads), seq_to_heads_blocks(self.rank, tokens, heads, d)
        send = x2.new_empty(s * (sum(heads) - mine) * d)
        src = 0
        for j in self._peers_in_turn:  # the same copies as seq_to_heads, from a buffer of the peers' groups only
            rows = slice(groups[j].start * d, groups[j].stop * d)
            _, _, dst, n = blocks[j]
            torch.addmm(bias[rows], x2, weight[rows].t(), out=send[src : src + n].view(s, -1))
            self._push(send, [(j, src, dst, n)], tag)
            src += n
        done = self._barrier()
        own = slice(groups[self.rank].start * d, groups[self.rank].stop * d)
        rows = self.region(tag, (before + s) * mine * d)[before * mine * d :]
        torch.addmm(bias[own], x2, weight[own].t(), out=rows.view(s, -1))
        return self._finisher(done, send, tag, (1,), tokens, mine, d, out)

    def heads_to_seq(self, x: torch.Tensor, tokens: Sequence[int], heads: Sequence[int]
                     ) -> Iterator[tuple[int, torch.Tensor]]:
        """SequenceParallel.heads_to_seq_ordered with one leading element: x [1, S, h, D] (every rank's tokens, this
        rank's heads) -> (j, this rank's tokens with rank j's heads [1, s, h_j, D]): this rank's own group at once
        (a view of x: nothing to move), then, once they have landed, the peers'."""
        d = x.shape[-1]
        s, before = tokens[self.rank], sum(tokens[: self.rank])
        self._ensure(region_elems(tokens, heads, d), x.dtype)
        x = x.contiguous()  # token-major (an attention backend may return a transposed view)
        blocks = heads_to_seq_blocks(self.rank, tokens, heads, d)
        self._push(x.view(-1), [blocks[j] for j in self._peers_in_turn], "o")
        done = self._barrier()
        yield self.rank, x[:, before : before + s]
        torch.cuda.current_stream(self.device).wait_event(done)
        recv = self.region("o", s * sum(heads) * d)
        for j, start in heads_to_seq_offsets(self.rank, tokens, heads, d):
            if j != self.rank:
                yield j, recv[start : start + s * heads[j] * d].view(1, s, heads[j], d)

