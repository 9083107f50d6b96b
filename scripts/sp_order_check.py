"""Does the o projection's summation order show on a GPU? 2 ranks, tiny model, bf16: latents to argv[1]; and
the two orders of a split-K addmm at a real shape."""
import sys

import torch

from worker.parallel.pool import RankPool
from worker.rollout import RolloutJob

if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    job = RolloutJob(prompt="a corridor", image=torch.rand(3, 48, 64, generator=g) * 2 - 1, num_chunks=3, width=64,
                     height=48, seed=1, kv_window=6, kv_sink=3, camera_actions=[["w"]] * 9, decode=False)
    pool = RankPool.start("tiny", ranks=2, device="cuda", dtype=torch.bfloat16, timeout_s=120)
    try:
        lat = torch.cat([c.latents for c in pool.rollout(job)], 1)
    finally:
        pool.close()
    torch.save(lat.cpu(), sys.argv[1])
    if len(sys.argv) > 2:
        b = torch.zeros(5120, dtype=torch.bfloat16, device="cuda")
        p0, p1 = (torch.randn(2340, 2560, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        w0, w1 = (torch.randn(2560, 5120, dtype=torch.bfloat16, device="cuda") / 50 for _ in range(2))
        a = torch.addmm(b, p0, w0).addmm_(p1, w1)
        c = torch.addmm(b, p1, w1).addmm_(p0, w0)
        print("addmm orders equal on the GPU:", torch.equal(a, c), (a.float() - c.float()).abs().max().item())
