"""The copy-engine exchange on the CPU: its copy plans carried out between plain buffers give NCCL's all-to-all
layouts, and so do CopyExchange's own methods with CUDA's streams stubbed. (The transport itself, symmetric memory
and copy engines, needs GPUs: scripts/exchange_probe.py checks it against NCCL bit for bit on two of them,
docs/PERFORMANCE.md v25.)"""

from __future__ import annotations

import contextlib

import pytest
import torch

from worker.parallel.copy_exchange import (
    REGIONS,
    CopyExchange,
    heads_to_seq_blocks,
    heads_to_seq_offsets,
    region_elems,
    seq_to_heads_blocks,
)
from worker.parallel.sp import SequenceParallel, consecutive_slices

D = 4


def carry_out(plans: list[list[tuple[int, int, int, int]]], sends: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """Every rank's copies into every rank's region, as CopyExchange._push does across GPUs."""
    regions = [torch.full((size,), float("nan")) for _ in plans]
    for sender, blocks in enumerate(plans):
        for j, src, dst, n in blocks:
            regions[j][dst : dst + n] = sends[sender][src : src + n]
    return regions


@pytest.mark.parametrize("world, total, heads_total, shares", [
    (2, 4680, 40, (None, None)),
    (2, 37, 6, (0.3, 0.4)),
    (3, 50, 7, (0.2, None)),
    (4, 61, 40, (0.1, 0.3)),
])
def test_copy_plans_give_the_all_to_all_layouts(world: int, total: int, heads_total: int, shares):
    sps = [SequenceParallel(r, world, leader_share=shares[0], leader_head_share=shares[1]) for r in range(world)]
    tokens, heads = sps[0].split_tokens(total), sps[0].split_heads(heads_total)
    tok, hs = consecutive_slices(tokens), consecutive_slices(heads)
    x = torch.randn(total, heads_total, D)  # every token with every head

    # tokens split -> heads split: each rank sends its packed tokens; rank j gets every token with its heads
    plans = [seq_to_heads_blocks(r, tokens, heads, D) for r in range(world)]
    sends = [sps[r].pack_heads(x[None, tok[r]]) for r in range(world)]
    regions = carry_out(plans, sends, total * max(heads) * D)
    for j in range(world):
        got = regions[j][: total * heads[j] * D].view(total, heads[j], D)
        assert torch.equal(got, x[:, hs[j]])
    # every region element written once: the blocks into a rank tile its region exactly
    for j in range(world):
        spans = sorted((dst, dst + n) for plan in plans for k, _, dst, n in plan if k == j)
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][1] == total * heads[j] * D

    # and back: each rank sends every token with its heads; rank j gets its tokens with every head group
    plans = [heads_to_seq_blocks(r, tokens, heads, D) for r in range(world)]
    sends = [x[:, hs[r]].contiguous().view(-1) for r in range(world)]
    regions = carry_out(plans, sends, max(tokens) * heads_total * D)
    for j in range(world):
        for i, start in heads_to_seq_offsets(j, tokens, heads, D):
            part = regions[j][start : start + tokens[j] * heads[i] * D].view(tokens[j], heads[i], D)
            assert torch.equal(part, x[tok[j], hs[i]])


def test_a_batch_keeps_nccls_rank_by_rank_layout():
    """With two leading elements the blocks stay rank by rank, as SequenceParallel reassembles NCCL's."""
    world, total, heads_total, b = 2, 9, 4, 2
    sps = [SequenceParallel(r, world) for r in range(world)]
    tokens, heads = sps[0].split_tokens(total), sps[0].split_heads(heads_total)
    tok, hs = consecutive_slices(tokens), consecutive_slices(heads)
    x = torch.randn(b, total, heads_total, D)
    plans = [seq_to_heads_blocks(r, tokens, heads, D, b) for r in range(world)]
    regions = carry_out(plans, [sps[r].pack_heads(x[:, tok[r]]) for r in range(world)], b * total * 2 * D)
    for j in range(world):
        sizes = [b * t * heads[j] * D for t in tokens]
        blocks = regions[j][: sum(sizes)].split(sizes)
        got = torch.cat([blk.view(b, t, heads[j], D) for blk, t in zip(blocks, tokens)], dim=1)
        assert torch.equal(got, x[:, :, hs[j]])


class _Grew(Exception):
    pass


class _Stream:
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


class _Event:
    def record(self, stream=None):
        pass


class _Handle:
    def barrier(self, channel=0):
        pass


def _exchanges_on_the_cpu(world: int, monkeypatch, elems: int = 4096) -> list:
    """CopyExchange objects for `world` ranks in this process, their symmetric buffers plain CPU tensors that every
    rank's `_peers` maps, and CUDA's streams and events stubbed: every copy happens when it is queued, in call
    order. What is left is the class's own bookkeeping: regions, offsets, the own group's rows, what each wait
    returns."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    buffers = [torch.full((elems * len(REGIONS),), float("nan")) for _ in range(world)]
    exchanges = []
    for rank in range(world):
        x = CopyExchange(rank, world, "cpu")
        x._region_elems, x._dtype, x._local, x._handle, x._peers = elems, torch.float32, buffers[rank], _Handle(), buffers
        exchanges.append(x)
    return exchanges


@pytest.mark.parametrize("world", [2, 3])
def test_copy_exchange_methods_give_every_rank_its_share(world: int, monkeypatch):
    exchanges = _exchanges_on_the_cpu(world, monkeypatch)
    sps = [SequenceParallel(r, world, leader_share=0.3, leader_head_share=0.4) for r in range(world)]
    total, heads_total = 37, 7
    tokens, heads = sps[0].split_tokens(total), sps[0].split_heads(heads_total)
    tok, hs = consecutive_slices(tokens), consecutive_slices(heads)
    x = torch.randn(1, total, heads_total, D)

    # q/k: packed send buffers; one into a given slot
    slots = [torch.empty(1, total, heads[r], D) for r in range(world)]
    waits = [exchanges[r].seq_to_heads(sps[r].pack_heads(x[:, tok[r]]), (1,), tokens, heads, D, "k", slots[r])
             for r in range(world)]
    for r in range(world):
        got = waits[r]()
        assert got.data_ptr() == slots[r].data_ptr() and torch.equal(got, x[:, :, hs[r]])

    # v: projected group by group, the own group straight into the region
    lin = torch.nn.Linear(8, heads_total * D).requires_grad_(False)
    inp = torch.randn(1, total, 8)
    waits = [exchanges[r].linear_to_heads(inp[0, tok[r]], lin.weight, lin.bias, tokens, heads, D, "v", None)
             for r in range(world)]
    full_v = lin(inp).view(1, total, heads_total, D)
    for r in range(world):
        assert torch.allclose(waits[r](), full_v[:, :, hs[r]], atol=1e-6)

    # the way back: the own group first, then the peers' in head order
    gens = [exchanges[r].heads_to_seq(x[:, :, hs[r]].clone(), tokens, heads) for r in range(world)]
    firsts = [next(g) for g in gens]  # every rank pushes before any waits, as the ranks run side by side
    for r in range(world):
        assert firsts[r][0] == r
        parts = dict([firsts[r], *gens[r]])
        assert torch.equal(torch.cat([parts[j] for j in range(world)], dim=-2), x[:, tok[r]])


@pytest.mark.parametrize("shares", [(None, None), (0.3, 0.4), (0.7, 0.6)])
def test_a_buffer_of_region_elems_serves_every_exchange_without_growing(shares, monkeypatch):
    """RankPool sizes the buffer with region_elems for the largest request; every exchange of that size must then
    fit, since growing it under a job is what the size avoids (on the CPU a growth would fail: it needs CUDA)."""
    world, total, heads_total = 2, 37, 7
    sps = [SequenceParallel(r, world, leader_share=shares[0], leader_head_share=shares[1]) for r in range(world)]
    tokens, heads = sps[0].split_tokens(total), sps[0].split_heads(heads_total)
    exchanges = _exchanges_on_the_cpu(world, monkeypatch, region_elems(tokens, heads, D))
    tok, hs = consecutive_slices(tokens), consecutive_slices(heads)
    x = torch.randn(1, total, heads_total, D)
    waits = [exchanges[r].seq_to_heads(sps[r].pack_heads(x[:, tok[r]]), (1,), tokens, heads, D, "q", None)
             for r in range(world)]
    assert all(torch.equal(waits[r](), x[:, :, hs[r]]) for r in range(world))
    lin = torch.nn.Linear(8, heads_total * D).requires_grad_(False)
    inp = torch.randn(1, total, 8)
    waits = [exchanges[r].linear_to_heads(inp[0, tok[r]], lin.weight, lin.bias, tokens, heads, D, "v", None)
             for r in range(world)]
    assert all(torch.allclose(waits[r](), lin(inp).view(1, total, heads_total, D)[:, :, hs[r]], atol=1e-6)
               for r in range(world))
    gens = [exchanges[r].heads_to_seq(x[:, :, hs[r]].clone(), tokens, heads) for r in range(world)]
    firsts = [next(g) for g in gens]
    for r in range(world):
        parts = dict([firsts[r], *gens[r]])
        assert torch.equal(torch.cat([parts[j] for j in range(world)], dim=-2), x[:, tok[r]])
    # one element less and an exchange has to grow the buffer
    import torch.distributed._symmetric_memory as symm_mem

    def grow(*args, **kwargs):
        raise _Grew

    monkeypatch.setattr(symm_mem, "empty", grow)
    for x_ in exchanges:
        x_._region_elems -= 1
    with pytest.raises(_Grew):
        for r in range(world):
            exchanges[r].seq_to_heads(sps[r].pack_heads(x[:, tok[r]]), (1,), tokens, heads, D, "q", None)
            list(exchanges[r].heads_to_seq(x[:, :, hs[r]].clone(), tokens, heads))
