"""The Ulysses exchange on its own: NCCL's all-to-all against copy-engine writes into symmetric memory.

    python3 scripts/exchange_probe.py [--ranks 2] [--tokens 4680] [--heads 40] [--iters 50]

One block-forward's exchange moves, per rank, its tokens x every other rank's heads (12 MB each way at 2 ranks,
bf16). The DiT's exchanges run as NCCL all-to-alls (SM kernels on NCCL's stream), and a profile of a 2-rank chunk
shows ~0.11 ms of each exposed where the NVLink bytes alone would take ~0.03 ms. This times, per exchange:
- nccl: `all_to_all_single`, as worker/parallel/sp.py runs it;
- ce: every rank writes each peer's block straight into that peer's receive buffer (symmetric memory, so the peer's
  buffer is mapped here and `copy_` is one cudaMemcpyAsync on a copy engine: no SM), with a stream barrier before
  (the peer is done reading the last exchange) and after (the data has landed);
and each beside a GEMM of the shape it would overlap (the v projection's head group, M = tokens / ranks), on two
streams: how much longer the pair takes than the GEMM alone. Needs CUDA and >= 2 GPUs.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def timed(fn, iters: int) -> float:
    """Median ms of fn() over iters, each between cuda events on the current stream, after a device-wide sync."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        dist.barrier()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def check_sequence_parallel(rank: int, w: int, dev: torch.device) -> None:
    """SequenceParallel's exchanges with the copy engine give NCCL's results exactly: even and uneven token and
    head splits, received into a given buffer or not, all three q/k/v exchanges in flight at once."""
    from worker.models.dit import _linear_head_groups
    from worker.parallel.copy_exchange import CopyExchange
    from worker.parallel.sp import SequenceParallel

    copies = CopyExchange(rank, w, dev)
    for total, heads, shares in ((4680, 40, (None, None)), (1001, 12, (0.3, 0.4))):
        plain = SequenceParallel(rank, w, leader_share=shares[0], leader_head_share=shares[1])
        fast = SequenceParallel(rank, w, leader_share=shares[0], leader_head_share=shares[1], copies=copies)
        s = plain.split_tokens(total)[rank]
        g = torch.Generator(device=dev).manual_seed(rank)
        xs = [torch.randn(1, s, heads, 128, device=dev, generator=g).to(torch.bfloat16) for _ in range(3)]
        want = [plain.seq_to_heads_async(plain.pack_heads(x), x.shape, total)() for x in xs]
        slot = torch.empty_like(want[1])
        pending = [fast.seq_to_heads_async(fast.pack_heads(x), x.shape, total, out=o, tag=t)
                   for x, t, o in zip(xs, "qkv", (None, slot, None))]
        got = [f() for f in pending]
        assert all(torch.equal(a, b) for a, b in zip(want, got)), "seq_to_heads differs"
        assert got[1].data_ptr() == slot.data_ptr()
        order = [(j, p.clone()) for j, p in fast.heads_to_seq_ordered(want[0], heads)]
        assert order[0][0] == rank, "the own head group does not come first"
        back = [p for _, p in sorted(order, key=lambda jp: jp[0])]
        assert all(torch.equal(a, b) for a, b in zip(plain.heads_to_seq_parts(want[0], heads), back)), "return"
        assert torch.equal(torch.cat(back, dim=-2), xs[0]), "the round trip is not the identity"
        # v: projected one head group at a time, the own group beside the transfer; the same GEMMs per group
        lin = torch.nn.Linear(256, heads * 128, device=dev, dtype=torch.bfloat16).requires_grad_(False)
        x = torch.randn(1, s, 256, device=dev, generator=g).to(torch.bfloat16)
        want_v = plain.seq_to_heads_async(_linear_head_groups(lin, x, plain, 128), (1, s, heads, 128), total)()
        got_v = fast.linear_to_heads_async(x, lin.weight, lin.bias, heads, total, tag="v")()
        assert torch.equal(want_v, got_v), "linear_to_heads differs"
    if rank == 0:
        print("SequenceParallel with copies == with NCCL (2 splits, q/k/v in flight, into a slot, v by head group, return)")


def init_rank(rank: int, ranks: int) -> torch.device:
    """This spawned process as rank `rank` of an NCCL group on GPU `rank` (multicast stays off: device_env.sh)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=ranks, device_id=dev)
    return dev


def run(rank: int, a) -> None:
    dev = init_rank(rank, a.ranks)
    import torch.distributed._symmetric_memory as symm_mem

    w, d = a.ranks, 128
    s, h = a.tokens // w, a.heads // w  # this rank's tokens, heads per rank
    block = s * h * d  # elements per (rank, peer) block
    send = torch.randn(w * block, device=dev, dtype=torch.bfloat16)
    recv = torch.empty(w * block, device=dev, dtype=torch.bfloat16)

    def nccl():
        dist.all_to_all_single(recv, send)

    sym = symm_mem.empty(w * block, device=dev, dtype=torch.bfloat16)
    handle = symm_mem.rendezvous(sym, dist.group.WORLD)
    peers = [handle.get_buffer(j, (w * block,), torch.bfloat16) for j in range(w)]

    def ce():
        handle.barrier(channel=0)
        for k in range(1, w):  # peers in turn, starting after this rank so no peer gets every write at once
            j = (rank + k) % w
            peers[j][rank * block : (rank + 1) * block].copy_(send[j * block : (j + 1) * block])
        sym[rank * block : (rank + 1) * block].copy_(send[rank * block : (rank + 1) * block])
        handle.barrier(channel=1)

    # correctness: both give the same received buffer
    nccl()
    ce()
    torch.cuda.synchronize()
    assert torch.equal(recv, sym), "copy-engine exchange differs from NCCL's"

    check_sequence_parallel(rank, w, dev)

    x = torch.randn(s, 5120, device=dev, dtype=torch.bfloat16)
    wt = torch.randn(5120, 5120 // w, device=dev, dtype=torch.bfloat16)
    y = torch.empty(s, 5120 // w, device=dev, dtype=torch.bfloat16)
    side = torch.cuda.Stream()

    def gemm():
        torch.mm(x, wt, out=y)

    def beside(fn):
        def both():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            gemm()
            torch.cuda.current_stream().wait_stream(side)
        return both

    def copies():
        for k in range(1, w):
            j = (rank + k) % w
            peers[j][rank * block : (rank + 1) * block].copy_(send[j * block : (j + 1) * block])

    def pull():
        handle.barrier(channel=0)
        for k in range(1, w):
            j = (rank + k) % w
            recv[j * block : (j + 1) * block].copy_(peers[j][rank * block : (rank + 1) * block])
        handle.barrier(channel=1)

    def barrier():
        handle.barrier(channel=0)

    def after(fn):
        def both():
            side.wait_stream(torch.cuda.current_stream())
            gemm()
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
        return both

    for f in (nccl, ce, gemm, pull):  # warm
        f()
    cases = [("nccl", nccl), ("ce", ce), ("ce pull", pull), ("copies only", copies), ("barrier", barrier),
             ("gemm", gemm), ("gemm+nccl", beside(nccl)), ("gemm+ce", beside(ce)), ("gemm+pull", beside(pull)),
             ("gemm+copies", beside(copies)), ("gemm+barrier", beside(barrier)), ("gemm then ce", after(ce))]
    res = {name: timed(f, a.iters) for name, f in cases}
    for carve in (8, 16):
        torch._C._set_sm_carveout_experimental(carve)
        res[f"gemm carve{carve}"] = timed(gemm, a.iters)
        res[f"gemm carve{carve}+nccl"] = timed(beside(nccl), a.iters)
        res[f"gemm carve{carve}+ce"] = timed(beside(ce), a.iters)
    torch._C._set_sm_carveout_experimental(None)
    if rank == 0:
        mb = block * 2 * (w - 1) / 1e6
        print(f"{w} ranks, {s} tokens x {h} heads per block, {mb:.1f} MB out of each rank per exchange")
        for k, v in res.items():
            print(f"  {k:10s} {v * 1e3:8.1f} us")
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4680)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    mp.spawn(run, args=(args,), nprocs=args.ranks)
