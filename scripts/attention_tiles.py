"""FlashAttention-4's Hopper forward at the DiT's steady shape, under several tile configurations.

    python3 scripts/attention_tiles.py [--heads 40 21 19] [--span 18]

FA4 picks (tile_m, tile_n) = (128, 128) with the P@V GEMM from registers and intra-warpgroup overlap for head
dim 128 on SM90. Our queries are one chunk (4680 tokens = 36.6 tiles of 128) against 28080 keys, so each head is
37 CTAs and 40 heads are 1480 CTAs, 11.2 waves of 132 SMs: the tile shape sets both the kernel's efficiency
and how full its last wave is. Prints ms, TFLOP/s and the largest difference from the default's output for
each configuration that compiles (first call = compile, timed apart).
"""
import argparse
import statistics
import time

import torch

from worker.bench import gpu_ms

FRAME_TOKENS, QUERY_FRAMES, HEAD_DIM = 1560, 3, 128
CONFIGS = [  # (tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap, num_threads)
    (128, 128, True, True, 384),  # FA4's own choice
    (128, 176, True, True, 384),  # FA3's C++ choice for non-causal head dim 128
    (128, 144, True, True, 384),
    (128, 208, True, True, 384),
    (64, 128, True, True, 256),
    (64, 176, True, True, 256),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[40, 21, 19])
    ap.add_argument("--span", type=int, default=18, help="latent frames of keys")
    ap.add_argument("--repeat", type=int, default=1, help="time every configuration this many times, in turn")
    args = ap.parse_args()
    from flash_attn.cute.interface import _flash_attn_fwd

    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
    lq, lk = QUERY_FRAMES * FRAME_TOKENS, args.span * FRAME_TOKENS
    with torch.inference_mode():
        for heads in args.heads:
            q, k, v = (torch.randn(1, n, heads, HEAD_DIM, device=dev, dtype=torch.bfloat16) for n in (lq, lk, lk))
            flops = 4 * lq * lk * HEAD_DIM * heads
            ref = None
            for tm, tn, rs, ol, nt in CONFIGS * args.repeat:
                def call():
                    return _flash_attn_fwd(q, k, v, tile_mn=(tm, tn), mma_pv_is_rs=rs, intra_wg_overlap=ol,
                                           num_threads=nt)[0]
                t0 = time.perf_counter()
                try:
                    out = call()
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - a configuration the kernel does not take
                    print(f"heads {heads:>2} tile {tm}x{tn} rs={rs:d} ol={ol:d} threads {nt}: failed ({type(e).__name__}: {str(e)[:120]})")
                    continue
                compile_s = time.perf_counter() - t0
                ref = out if ref is None else ref
                diff = (out.float() - ref.float()).abs().max().item()
                ms = statistics.median(gpu_ms(call, n=30))
                print(f"heads {heads:>2} tile {tm}x{tn} rs={rs:d} ol={ol:d} threads {nt}: {ms:7.3f} ms "
                      f"{flops / ms / 1e9:6.0f} TFLOP/s  compile {compile_s:5.1f} s  max|diff| {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
