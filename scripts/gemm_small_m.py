"""The DiT's GEMMs at one rank's share of a chunk's tokens: cuBLAS against Inductor's autotuned kernels.

    python3 scripts/gemm_small_m.py [--ranks 1 2 4] [--autotune]

Why: at 4 ranks a rank's 1170 tokens make GEMMs of M=1170 whose output tiles fill the GPU's SMs in 1.5 waves
(N=5120 with 128x256 tiles: 10 x 20 = 200 tiles on 132 SMs), and the v19 probe measured the q/k/v/o projections at
~594 TFLOP/s against ~770 at M=4680. The 4-GPU DiT is 528 ms where a quarter of one GPU's DiT alone would be ~467
ms; these GEMMs are ~45% of it. This prints, per shape, cuBLAS (F.linear), the same through PyTorch's cuBLASLt path and, with --autotune, the best kernel
torch.compile(mode="max-autotune-no-cudagraphs") finds (Triton persistent/TMA templates on Hopper), both as
median ms of 50 calls and TFLOP/s, with the error against cuBLAS.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F

from worker.bench import gpu_ms
from worker.config import FULL

ap = argparse.ArgumentParser()
ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
ap.add_argument("--autotune", action="store_true", help="also Inductor's max-autotune GEMM (minutes of tuning)")
a = ap.parse_args()

cfg = FULL.dit
tokens = 3 * (480 // 16) * (832 // 16)  # one chunk: 3 latent frames of 30 x 52 patches = 4680
d, f = cfg.dim, cfg.ffn_dim


def shapes(ranks: int) -> dict[str, tuple[int, int]]:
    """(K, N) of each GEMM kind at this rank count."""
    return {"q/k/v/o, cross q/o, camera (N=K=dim)": (d, d), "FFN up (N=ffn)": (d, f), "FFN down (K=ffn)": (f, d),
            "v per head group (N=dim/ranks)": (d, d // ranks)}


dev = torch.device("cuda")
torch.manual_seed(0)

with torch.inference_mode():
    for ranks in a.ranks:
        m = -(-tokens // ranks)
        for name, (k, n) in shapes(ranks).items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
            flops = 2 * m * n * k
            ref = F.linear(x, w)
            t_blas = statistics.median(gpu_ms(lambda: F.linear(x, w), n=50))
            torch.backends.cuda.preferred_blas_library("cublaslt")  # PyTorch's other path: its own heuristics
            t_lt = statistics.median(gpu_ms(lambda: F.linear(x, w), n=50))
            torch.backends.cuda.preferred_blas_library("cublas")
            line = f"ranks {ranks} M={m:5d} {name:38s} N={n:5d} K={k:5d} | cuBLAS {t_blas:6.3f} ms " \
                   f"{flops / t_blas / 1e9:4.0f} TFLOP/s | cuBLASLt {t_lt:6.3f} ms {flops / t_lt / 1e9:4.0f}"
            if a.autotune:
                fn = torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs", dynamic=False)
                out = fn(x, w)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                t_tuned = statistics.median(gpu_ms(lambda: fn(x, w), n=50))
                line += f" | autotuned {t_tuned:6.3f} ms {flops / t_tuned / 1e9:4.0f} TFLOP/s " \
                        f"({t_blas / t_tuned:.2f}x) rel err {err:.1e}"
            print(line, flush=True)
