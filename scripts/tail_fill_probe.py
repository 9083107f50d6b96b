"""Can the self-attention's last wave be filled with work the DiT does not wait for? (one GPU, a rank's shapes)

    python3 scripts/tail_fill_probe.py [--heads 20] [--blocks 40] [--loops 5]

A rank's block-forward on 2 GPUs, eager, on one stream: q, k, v (GEMMs of a rank's 2340 rows), FA4 against
28080 keys with the rank's 20 heads (740 CTAs = 5.6 waves of 132 SMs, paid as 6), the output projection,
cross-attention's q and o, the FFN. The next chunk's camera modulation (one [2340, 5120] x [5120, 5120] GEMM per
block here; 160 a chunk in the DiT against 199 attention calls) is the candidate filler:
- none:   no camera GEMM (the floor);
- inline: on the DiT's stream, as prepare_chunk runs it now;
- tail:   on a lower-priority stream, launched right after the attention, so that its CTAs get SMs only once the
          attention's last wave is dispatched;
- start:  on the lower-priority stream, launched at the block's start (any free SM, as v28a's band decode did).
Prints ms per block for each mode (the modes in turn per loop, medians) and what the filler costs against inline.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

FRAME_TOKENS, HEAD_DIM, DIM, FFN = 1560, 128, 5120, 13824


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2, help="rows per rank = 4680 / ranks")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--loops", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["none", "inline", "tail", "start"])
    args = ap.parse_args()
    from flash_attn.cute.interface import _flash_attn_fwd

    dev, bf = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    lq, lk, rows = 3 * FRAME_TOKENS, 18 * FRAME_TOKENS, 3 * FRAME_TOKENS // args.ranks
    main_s = torch.cuda.Stream(priority=-2)
    side_s = torch.cuda.Stream(priority=-1)

    def w(*shape):
        return torch.randn(*shape, device=dev, dtype=bf) * 0.02

    wq, wk, wv, wo, wcq, wco, wcam = (w(DIM, DIM) for _ in range(7))
    w1, w2 = w(FFN, DIM), w(DIM, FFN)
    x = torch.randn(rows, DIM, device=dev, dtype=bf)
    cam_in = torch.randn(rows, DIM, device=dev, dtype=bf)
    cam_out = [torch.empty(rows, DIM, device=dev, dtype=bf) for _ in range(args.blocks)]
    q4 = torch.randn(1, lq, args.heads, HEAD_DIM, device=dev, dtype=bf)
    k4, v4 = (torch.randn(1, lk, args.heads, HEAD_DIM, device=dev, dtype=bf) for _ in range(2))
    attn_out = torch.empty_like(q4)
    o_rows = attn_out.view(-1)[: rows * DIM].view(rows, DIM)

    def camera(i):
        torch.mm(cam_in, wcam.t(), out=cam_out[i])

    def block(i, mode):
        if mode == "inline":
            camera(i)
        if mode == "start":
            side_s.wait_stream(main_s)
            with torch.cuda.stream(side_s):
                camera(i)
        q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)
        _flash_attn_fwd(q4, k4, v4, out=attn_out)
        if mode == "tail":
            side_s.wait_stream(main_s)
            with torch.cuda.stream(side_s):
                camera(i)
        h = F.linear(o_rows, wo) + q + k + v
        h = F.linear(F.linear(h, wcq), wco)
        return F.linear(F.gelu(F.linear(h, w1), approximate="tanh"), w2)

    times: dict[str, list[float]] = {m: [] for m in args.modes}
    with torch.inference_mode(), torch.cuda.stream(main_s):
        for m in args.modes:  # compile FA4, warm cuBLAS
            block(0, m)
        torch.cuda.synchronize()
        for _ in range(args.loops):
            for m in args.modes:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(main_s)
                for i in range(args.blocks):
                    block(i, m)
                main_s.wait_stream(side_s)
                end.record(main_s)
                end.synchronize()
                times[m].append(start.elapsed_time(end) / args.blocks)
    med = {m: statistics.median(t) for m, t in times.items()}
    cam_cost = med.get("inline", 0) - med.get("none", 0)
    for m in args.modes:
        extra = med[m] - med.get("none", med[m])
        share = f"  camera costs {extra * 1e3:6.1f} us ({extra / cam_cost:.2f} of inline's)" if cam_cost > 0 else ""
        print(f"{m:<7} {med[m]:.4f} ms per block  (min {min(times[m]):.4f} max {max(times[m]):.4f}){share}",
              flush=True)


if __name__ == "__main__":
    main()
