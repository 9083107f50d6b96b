"""Does the copy exchange's symmetric buffer survive growing more than once? (2 GPUs; a follower rank hit an
internal assert of PyTorch's allocator at a buffer's second growth, docs/PERFORMANCE.md v26.)

    python3 scripts/symm_growth_probe.py [--ranks 2] [--grows 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def run(rank: int, a) -> None:
    from exchange_probe import init_rank
    from worker.parallel.copy_exchange import CopyExchange
    from worker.parallel.sp import SequenceParallel

    dev = init_rank(rank, a.ranks)
    copies = CopyExchange(rank, a.ranks, dev)
    copies.setup(1 << 16)  # small, so that every exchange below grows it
    plain, fast = SequenceParallel(rank, a.ranks), SequenceParallel(rank, a.ranks, copies=copies)
    errors = []

    def grow() -> None:
        try:
            for i in range(a.grows):
                total, heads = 4680 * 2**i, 40
                s = plain.split_tokens(total)[rank]
                x = torch.randn(1, s, heads, 128, device=dev).to(torch.bfloat16)
                want = plain.seq_to_heads_async(plain.pack_heads(x), x.shape, total)()
                got = fast.seq_to_heads_async(fast.pack_heads(x), x.shape, total)()
                assert torch.equal(want, got), f"growth {i}: differs"
                print(f"rank {rank}: growth {i} ({copies._region_elems} elements per region) ok", flush=True)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    if a.thread:
        t = threading.Thread(target=grow)
        t.start()
        t.join()
    else:
        grow()
    dist.destroy_process_group()
    if errors:
        raise errors[0]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--grows", type=int, default=4)
    ap.add_argument("--thread", action="store_true", help="grow from a second thread, as the leader's rollout does")
    mp.spawn(run, args=(ap.parse_args(),), nprocs=ap.parse_args().ranks)
