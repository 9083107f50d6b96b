"""The self-attention projections at one rank's share of a chunk, as the sequence-parallel path runs them and as
plain GEMMs with a layout copy instead (docs/PERFORMANCE.md, "What is left" after v18).

    python3 scripts/sp_projections.py [--ranks 2 4 8] [--decode-cost ...]

Per rank count, at the largest rank's token share (the followers set the pace) of a 832x480 chunk (4680 tokens),
bf16, model dim 5120, 40 heads of 128:
- `groups` (worker/models/dit.py today): q and k as GEMMs of 5120 columns, v as one GEMM per head group writing
  the send layout, the output projection split-K over the head groups as they arrive;
- `plain`: v as one GEMM, then a copy into the send layout; the head groups copied back into one [s, H*D] tensor,
  then one output GEMM;
- `fused`: q, k and v as one GEMM of 15360 columns (v copied into the send layout), the output as in `plain`.
Prints microseconds per block-forward for each and what the difference is worth per chunk (199 block-forwards).
q's and k's norm+RoPE kernel is left out: it reads the same bytes either way (strided in `fused`).
"""
import argparse
import statistics
import time

import torch

from worker.bench import gpu_ms
from worker.parallel.sp import SequenceParallel, consecutive_slices, default_decode_cost, leader_share_for

TOKENS, BLOCK_FORWARDS = 4680, 199
REPEAT = 20  # calls per timed sample: one projection is ~0.1 ms, too short to time alone with events


def timed_us(fn, dev: torch.device) -> float:
    def many():
        for _ in range(REPEAT):
            fn()
    if dev.type != "cuda":  # a smoke run of the arithmetic; CPU timings say nothing about the GPU
        t = time.perf_counter()
        many()
        return (time.perf_counter() - t) * 1e6 / REPEAT
    return statistics.median(gpu_ms(many, n=15)) * 1e3 / REPEAT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--decode-cost", type=float, default=None, help="default: sp.default_decode_cost per rank count")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--heads", type=int, default=40, help="40 heads of 128: the real model (smaller for a CPU check)")
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args()
    HEADS, HEAD_DIM = a.heads, a.head_dim
    DIM = HEADS * HEAD_DIM
    dev, dt = torch.device(a.device), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    w_q, w_k, w_v, w_o = (torch.randn(DIM, DIM, generator=g, device=dev, dtype=dt) * DIM**-0.5 for _ in range(4))
    w_qkv = torch.cat([w_q, w_k, w_v])
    b_qkv = torch.zeros(3 * DIM, device=dev, dtype=dt)
    b = b_qkv[:DIM]
    print(f"{'ranks':>5} {'tokens':>6} {'groups us':>10} {'plain us':>9} {'fused us':>9}  per chunk vs groups")
    for world in a.ranks:
        cost = default_decode_cost(world) if a.decode_cost is None else a.decode_cost
        sp = SequenceParallel(0, world, leader_share=leader_share_for(world, cost))
        s = max(sp.split_tokens(TOKENS))
        heads = sp.split_heads(HEADS)
        x = torch.randn(s, DIM, generator=g, device=dev, dtype=dt)
        attn_parts = [torch.randn(s, h, HEAD_DIM, generator=g, device=dev, dtype=dt) for h in heads]
        send = torch.empty(s * DIM, device=dev, dtype=dt)

        def v_groups():
            off = 0
            for hs in consecutive_slices(heads):
                rows = slice(hs.start * HEAD_DIM, hs.stop * HEAD_DIM)
                n = s * (rows.stop - rows.start)
                torch.addmm(b[rows], x, w_v[rows].t(), out=send[off:off + n].view(s, -1))
                off += n

        def v_plain(v=None):
            v = torch.addmm(b, x, w_v.t()) if v is None else v
            off = 0
            for hs in consecutive_slices(heads):
                n = s * (hs.stop - hs.start) * HEAD_DIM
                send[off:off + n].view(s, -1).copy_(v[:, hs.start * HEAD_DIM:hs.stop * HEAD_DIM])
                off += n

        def o_groups():
            y, col = None, 0
            for part in attn_parts:
                width = part.shape[1] * HEAD_DIM
                w = w_o[:, col:col + width].t()
                p = part.reshape(s, width)
                y = torch.addmm(b, p, w) if y is None else y.addmm_(p, w)
                col += width
            return y

        def o_plain():
            return torch.addmm(b, torch.cat(attn_parts, dim=1).view(s, DIM), w_o.t())

        def groups():
            torch.addmm(b, x, w_q.t())
            torch.addmm(b, x, w_k.t())
            v_groups()
            o_groups()

        def plain():
            torch.addmm(b, x, w_q.t())
            torch.addmm(b, x, w_k.t())
            v_plain()
            o_plain()

        def fused():
            qkv = torch.addmm(b_qkv, x, w_qkv.t())
            v_plain(qkv[:, 2 * DIM:])
            o_plain()

        t = [timed_us(fn, dev) for fn in (groups, plain, fused)]
        print(f"{world:>5} {s:>6} {t[0]:>10.1f} {t[1]:>9.1f} {t[2]:>9.1f}  plain {(t[1] - t[0]) * BLOCK_FORWARDS / 1e3:+.1f} ms, "
              f"fused {(t[2] - t[0]) * BLOCK_FORWARDS / 1e3:+.1f} ms")
        # the same numbers whichever way: the variants differ in layout, not in arithmetic
        ref = o_groups().float()
        assert ((o_plain().float() - ref).norm() / ref.norm()).item() < 1e-2


if __name__ == "__main__":
    main()
