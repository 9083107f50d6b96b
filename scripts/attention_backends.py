"""The DiT's self-attention at its real shapes, under each backend of worker/models/attention.py.

    python3 scripts/attention_backends.py [--heads 40 21 19] [--spans 3 9 18]
One chunk's queries (3 latent frames of 1560 tokens at 832x480) against spans of cached frames, for the full head
count (1 GPU) and each rank's share at 2 GPUs. For each shape: cuDNN through SDPA, SDPA's own choice, and
FlashAttention-4 (first call = kernel compile, timed apart), as ms and TFLOP/s, and each output's error against
an fp32 reference on two heads. A last check runs FA4 on a side stream right behind a long kernel that writes
its input: a kernel launched on any other stream reads stale q and fails it.
"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from worker.bench import gpu_ms

FRAME_TOKENS, QUERY_FRAMES, HEAD_DIM = 1560, 3, 128
dev = torch.device("cuda")


def timed(fn) -> float:
    return statistics.median(gpu_ms(fn, n=20))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[40, 21, 19])
    ap.add_argument("--spans", type=int, nargs="+", default=[3, 9, 18], help="latent frames of keys")
    args = ap.parse_args()
    os.environ["LINGBOT_ATTENTION"] = "fa4"
    from worker.models.attention import attention  # noqa: E402 - after the setting

    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    lq = QUERY_FRAMES * FRAME_TOKENS
    with torch.inference_mode():
        for heads in args.heads:
            for span in args.spans:
                lk = span * FRAME_TOKENS
                q, k, v = (torch.randn(1, n, heads, HEAD_DIM, device=dev, dtype=torch.bfloat16) for n in (lq, lk, lk))
                flops = 4 * lq * lk * HEAD_DIM * heads

                def sdpa():
                    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                          v.transpose(1, 2)).transpose(1, 2)

                def cudnn():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return sdpa()

                t0 = time.perf_counter()
                fa = attention(q, k, v)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ref = F.scaled_dot_product_attention(*(t[:, :, :2].transpose(1, 2).float() for t in (q, k, v)))
                ref = ref.transpose(1, 2)
                errs = [rel_err(o[:, :, :2], ref) for o in (cudnn(), sdpa(), fa)]
                ms = [timed(cudnn), timed(sdpa), timed(lambda: attention(q, k, v))]
                tf = [flops / m / 1e9 for m in ms]
                print(f"heads {heads:2d} span {span:2d} ({lq}x{lk}): cuDNN {ms[0]:6.3f} ms {tf[0]:4.0f} TFLOP/s | "
                      f"SDPA {ms[1]:6.3f} ms {tf[1]:4.0f} | FA4 {ms[2]:6.3f} ms {tf[2]:4.0f} "
                      f"(first call {first:5.1f} s) | FA4/cuDNN {ms[2] / ms[0]:.3f} | "
                      f"rel err vs fp32: cuDNN {errs[0]:.2e} SDPA {errs[1]:.2e} FA4 {errs[2]:.2e}")

        # Stream check: q is written by a long chain of matmuls on a side stream, then read by FA4 on it.
        side = torch.cuda.Stream()
        heads, lk = 40, 18 * FRAME_TOKENS
        k, v = (torch.randn(1, lk, heads, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16) / 90.5
        src = torch.randn(lq, heads * HEAD_DIM, device=dev, dtype=torch.bfloat16)
        q = torch.zeros(1, lq, heads, HEAD_DIM, device=dev, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            for _ in range(40):  # ~50 ms of GPU work before q is final; the products stay finite
                b = a @ a
            q.copy_((src + 0 * b[0, 0]).view(1, lq, heads, HEAD_DIM))
            out = attention(q, k, v)
        side.synchronize()
        want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        err = rel_err(out, want.float())
        print(f"FA4 on a side stream behind a long producer: rel diff to SDPA {err:.2e} -> "
              f"{'OK (runs on the current stream)' if err < 2e-2 else 'WRONG STREAM'}")


if __name__ == "__main__":
    main()
