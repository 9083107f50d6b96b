"""Streamed VAE decode cost at 832x480 (full-size Wan2.1 VAE, random weights), under cuDNN settings.

    python3 scripts/profile_vae.py [FRAMES.pt]
(LINGBOT_VAE_FUSED_NORM=0 times diffusers' own RMSNorm instead of the fused one.)
Prints ms per 12-frame chunk (3 latent frames) for: default, cudnn.benchmark, channels_last_3d, both.
"""
import sys
import time

import torch

from worker.config import FULL
from worker.models.vae import StreamingVAE, build_vae

dev = torch.device("cuda")
vae = StreamingVAE(build_vae(FULL.vae, torch.bfloat16, dev))
lat = torch.randn(16, 9, 60, 104, device=dev)


def run(tag: str) -> torch.Tensor:
    outs = []
    vae.start_decode()
    vae.decode_chunk(lat[:, :3])  # chunk 0 (9 frames) is not the steady shape
    times = []
    for i in (1, 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs.append(vae.decode_chunk(lat[:, 3 * i: 3 * i + 3]))
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    vae.reset()
    print(f"{tag:>28}: {min(times):7.1f} ms per 12-frame chunk")
    return torch.cat(outs, 1)


with torch.inference_mode():
    ref = run("default (warm-up)")
    ref = run("default")
    torch.backends.cudnn.benchmark = True
    run("cudnn.benchmark (tuning)")
    b = run("cudnn.benchmark")
    for m in vae.vae.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.to(memory_format=torch.channels_last_3d)
    run("+channels_last_3d (tuning)")
    c = run("+channels_last_3d")
    if len(sys.argv) > 1:  # save the default run's frames for a comparison across runs
        torch.save(ref.float().cpu(), sys.argv[1])
    print("max |diff| benchmark vs default", (b.float() - ref.float()).abs().max().item(),
          "channels_last vs default", (c.float() - ref.float()).abs().max().item())
