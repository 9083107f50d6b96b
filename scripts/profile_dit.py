"""Where a chunk's DiT time goes, at real shapes: per-block forward under each SDPA backend, plus a kernel table.

Builds the full-size block config with 2 blocks (the per-block cost is what matters), a KV cache already holding
the steady-state span (sink 3 + window 15 latent frames), and times forward() per backend. Run on a GPU:
    python3 scripts/profile_dit.py [--layers 2] [--frames 18]
"""
import argparse
import dataclasses
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from worker.bench import gpu_ms
from worker.config import FULL
from worker.models import dit as dit_mod
from worker.models.kv_cache import KVCache

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--frames", type=int, default=18)
ap.add_argument("--width", type=int, default=832)
ap.add_argument("--height", type=int, default=480)
a = ap.parse_args()
dev = torch.device("cuda")
cfg = dataclasses.replace(FULL.dit, num_layers=a.layers)
model = dit_mod.build_dit(cfg, device=dev)
lh, lw = a.height // 8, a.width // 8
ft = (lh // 2) * (lw // 2)
cache = KVCache(num_layers=a.layers, frame_tokens=ft, total_frames=a.frames + 3, sink=3, window=a.frames - 3,
                heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=torch.bfloat16, device=dev)
for k in cache.k + cache.v:
    k.normal_()
start = a.frames - 3
text_kv = model.encode_text(torch.randn(1, 120, cfg.text_dim, device=dev))
x = torch.randn(1, 16, 3, lh, lw, device=dev)
y = torch.randn(1, 20, 3, lh, lw, device=dev)
cam = torch.randn(1, 384, 3, lh, lw, device=dev)
with torch.inference_mode():
    cache.begin_chunk(start - 3, 3)  # make every slot valid, then set up the steady chunk
    cache.valid_tokens = cache.capacity_frames * ft
    ctx = model.prepare_chunk(cam, start, cache)
    ctx.cache.valid_tokens = cache.capacity_frames * ft
    te = model.time_embedding_for(999)

    def fwd():
        return model(x, y, 999, text_kv, ctx, time_emb=te)

    def timed():
        return statistics.mean(gpu_ms(fwd, n=5, warmup=2)) / a.layers

    print(f"tokens/chunk {3 * ft}, kv tokens {cache.valid_tokens}")
    print(f"default SDPA: {timed():.2f} ms per block-forward")
    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel([be]):
                print(f"{name:>9}: {timed():.2f} ms per block-forward")
        except Exception as exc:  # noqa: BLE001
            print(f"{name:>9}: failed: {str(exc)[:200]}")
    # attention alone, contiguous vs the strided views the model passes
    q = torch.randn(1, 3 * ft, cfg.num_heads, cfg.head_dim, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, cache.valid_tokens, cfg.num_heads, cfg.head_dim, device=dev, dtype=torch.bfloat16)
    fl = 4 * q.shape[1] * k.shape[1] * cfg.dim
    for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
        for layout in ("strided", "contig"):
            qq, kk = (q.transpose(1, 2), k.transpose(1, 2)) if layout == "strided" else (
                q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous())
            try:
                with sdpa_kernel([be]):
                    ms = statistics.mean(gpu_ms(
                        lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, kk), n=10))
                print(f"attn {name} {layout}: {ms:.2f} ms = {fl / ms / 1e9:.0f} TFLOP/s")
            except Exception as exc:  # noqa: BLE001
                print(f"attn {name} {layout}: failed {str(exc)[:150]}")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90))
