"""The q/k RMSNorm + RoPE kernel against Inductor's fused chain at the real shapes (docs/PERFORMANCE.md v27).

For each rank count's share of one 832x480 chunk (4680 tokens on 1 GPU, 2340 on 2, 1170 on 4), bf16, the model's
40 heads of 128: both versions' outputs compared (bit-identical fraction, max difference, relative L2; and the kernel's
against PyTorch's eager ops, whose roundings it follows) and timed
as CUDA graphs of 20 calls each (GPU time: eager calls would time the host's launches, slower than these
kernels; medians of 20 replays), against the memory floor (one read and one write of [tokens, 5120] at the copy
bandwidth measured here).

    python3 scripts/qk_kernel_probe.py
"""
import torch

from worker.bench import gpu_ms
from worker.config import FULL
from worker.models import fused
from worker.models.qk_norm_rope import _launch


def _graph_us(fn, calls: int = 20) -> float:
    """Microseconds per call of fn, from replays of a CUDA graph of `calls` calls (median of 20 replays)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return sorted(gpu_ms(graph.replay, n=20))[10] * 1e3 / calls


def _copy_bandwidth(dev: torch.device) -> float:
    """Bytes read + written per second by a 1 GiB device copy."""
    src, dst = torch.empty(2, 1024**3, dtype=torch.uint8, device=dev).unbind()
    return 2 * 1024**3 / (min(gpu_ms(lambda: dst.copy_(src), n=10)) * 1e-3)


def main() -> None:
    cfg, dev = FULL.dit, torch.device("cuda")
    heads, hd = cfg.num_heads, cfg.head_dim
    bandwidth = _copy_bandwidth(dev)
    print(f"device copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    print("| ranks | tokens | groups | Inductor us | Triton us (4 / 8 / 16 warps) | floor us | speed-up "
          "| bit-identical | max diff | rel L2 | Triton = eager PyTorch |")
    for ranks in (1, 2, 4):
        tokens = 4680 // ranks
        groups = tuple([heads // ranks] * ranks)
        g = torch.Generator(device=dev).manual_seed(ranks)
        x = torch.randn(1, tokens, cfg.dim, device=dev, generator=g).bfloat16()
        w = (1 + 0.1 * torch.randn(cfg.dim, device=dev, generator=g)).bfloat16()
        angles = 100 * torch.rand(tokens, hd // 2, device=dev, generator=g)
        cos, sin = angles.cos(), angles.sin()
        chain = fused.rms_norm_rope if ranks == 1 else fused.rms_norm_rope_packed
        last = heads if ranks == 1 else groups

        def inductor():
            return chain(x, w, 1e-6, cos, sin, last).reshape(-1)

        def triton(num_warps=None):
            return _launch(x, w, 1e-6, cos, sin, groups, None, num_warps=num_warps)

        a, b = inductor(), triton()
        eager_same = (chain.eager(x, w, 1e-6, cos, sin, last).reshape(-1) == b).float().mean().item()
        same = (a == b).float().mean().item()
        diff = (a.float() - b.float()).abs().max().item()
        rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
        t_ind = _graph_us(inductor)
        warps = {n: _graph_us(lambda n=n: triton(n)) for n in (4, 8, 16)}
        t_tri = warps[4]  # the default
        floor = 2 * x.numel() * 2 / bandwidth * 1e6
        print(f"| {ranks} | {tokens} | {groups[0]}x{len(groups)} | {t_ind:.1f} | "
              f"{' / '.join(f'{t:.1f}' for t in warps.values())} | {floor:.1f} | "
              f"{t_ind / t_tri:.2f}x | {same:.4f} | {diff:.3g} | {rel:.2e} | {eager_same:.4f} |")


if __name__ == "__main__":
    main()
