"""Streamed VAE decode cost at 832x480 (full-size Wan2.1 VAE, random weights, bf16), and where it goes.

    python3 scripts/profile_vae.py [--save FRAMES.pt] [--compare FRAMES.pt] [--kernels N]
LINGBOT_VAE_FUSED_NORM=0 / LINGBOT_VAE_CONV_PAD=0 / LINGBOT_VAE_SUBPIXEL=0 / LINGBOT_VAE_PAIRS=0 /
LINGBOT_VAE_TIME_LAYOUT=0 switch off the decoder patches of worker/models/vae.py, LINGBOT_VAE_BEHIND=0 the norms
writing behind their conv's cached frames (worker/models/causal_conv.py).
Prints ms per steady 12-frame chunk (3 latent frames) and the top kernels of one such chunk; --compare reports the
relative L2 distance of this run's frames from frames saved by another run (same seed, same latents).
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from worker.config import FULL
from worker.models.vae import StreamingVAE, build_vae

ap = argparse.ArgumentParser()
ap.add_argument("--save", help="write this run's decoded frames here")
ap.add_argument("--compare", help="frames saved by another run: report the relative L2 distance")
ap.add_argument("--kernels", type=int, default=25, help="rows of the kernel table (0: none)")
a = ap.parse_args()

dev = torch.device("cuda")
vae = StreamingVAE(build_vae(FULL.vae, torch.bfloat16, dev))
lat = torch.randn(16, 12, 60, 104, device=dev, generator=torch.Generator(dev).manual_seed(0))

with torch.inference_mode():
    for _ in range(2):  # the first pass compiles the fused kernels
        vae.start_decode()
        frames = [vae.decode_chunk(lat[:, :3])]  # chunk 0 (9 frames) is not the steady shape
        times = []
        for i in (1, 2, 3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            frames.append(vae.decode_chunk(lat[:, 3 * i: 3 * i + 3]))
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
    print(f"decode: {min(times):.1f} ms per steady 12-frame chunk (runs {', '.join(f'{t:.1f}' for t in times)})")
    out = torch.cat(frames, 1).float().cpu()
    if a.save:
        torch.save(out, a.save)
    if a.compare:
        ref = torch.load(a.compare)
        rel = ((out - ref).norm() / ref.norm()).item()
        print(f"frames vs {a.compare}: relative L2 {rel:.4%}, max |diff| {(out - ref).abs().max().item():.4f}")
    if a.kernels:
        vae.start_decode()
        vae.decode_chunk(lat[:, :3])
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            vae.decode_chunk(lat[:, 3:6])
            torch.cuda.synchronize()
        rows = prof.key_averages()
        print(rows.table(sort_by="self_cuda_time_total", row_limit=a.kernels, max_name_column_width=70))
        # which aten ops launched that GPU time (device time of each op including its kernels)
        ops = sorted((r for r in rows if r.key.startswith("aten::")), key=lambda r: -r.device_time_total)
        for r in ops[: a.kernels]:
            print(f"{r.key:40s} {r.device_time_total / 1e3:8.2f} ms  {r.count:5d} calls")
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
