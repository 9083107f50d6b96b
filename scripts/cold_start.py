"""Cold start: weight-load throughput from local safetensors shards to the GPU, extrapolated to the full DiT.

The full fp32 checkpoint (74 GB) does not fit the lent machine's disk next to everything else, so this saves the
first --blocks blocks of a full-size random DiT as fp32 shards in the official layout (about 1.8 GB per block),
times `load_state_dict_streaming` into a meta-built model of that depth on cuda:0 (the production path: parallel
shard reads, per-tensor fp32 -> bf16, straight to the GPU), and scales by parameter count. Also times the
random-weight engine start (imports + build + init) as a lower bound on process-start-to-ready.

    python3 scripts/cold_start.py --blocks 4 --dir /tmp/ckpt
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from worker.config import FULL
from worker.models.dit import build_dit
from worker.models.loading import find_shards, load_state_dict_streaming

ap = argparse.ArgumentParser()
ap.add_argument("--blocks", type=int, default=4)
ap.add_argument("--dir", type=Path, default=Path("/tmp/ckpt"))
ap.add_argument("--threads", type=int, default=8)
a = ap.parse_args()
cfg = dataclasses.replace(FULL.dit, num_layers=a.blocks)
a.dir.mkdir(parents=True, exist_ok=True)
src = build_dit(cfg, device="cuda", dtype=torch.float32, seed=0)
sd = src.state_dict()
names = sorted(sd)
# shards of ~2 GB like the real index (one per block plus the top-level tensors)
groups: dict[str, list[str]] = {}
for n in names:
    key = n.split(".")[1] if n.startswith("blocks.") else "top"
    groups.setdefault(key, []).append(n)
weight_map, total = {}, 0
for i, (key, ns) in enumerate(sorted(groups.items())):
    fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    save_file({n: sd[n].contiguous().cpu() for n in ns}, str(a.dir / fname))
    weight_map.update({n: fname for n in ns})
    total += sum(sd[n].numel() * 4 for n in ns)
(a.dir / "diffusion_pytorch_model.safetensors.index.json").write_text(
    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
(a.dir / "config.json").write_text(json.dumps(cfg.to_dict()))
del src, sd
torch.cuda.empty_cache()
subprocess.run(["sync"])
# drop the page cache if we may (root on the lent machine), so the read is from disk
try:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    cache_note = "page cache dropped"
except OSError:
    cache_note = "page cache NOT dropped (reads may be from RAM)"
model = build_dit(cfg, dtype=torch.bfloat16, seed=None)
torch.cuda.synchronize()
t = time.perf_counter()
load_state_dict_streaming(model, find_shards(a.dir), torch.bfloat16, "cuda:0", a.threads)
torch.cuda.synchronize()
dt = time.perf_counter() - t
gb = total / 1e9
full_gb = 18_544_332_864 * 4 / 1e9
print(f"loaded {gb:.2f} GB fp32 ({a.blocks} blocks + top) in {dt:.2f} s = {gb / dt:.2f} GB/s ({cache_note}); "
      f"full 74.18 GB fp32 -> about {full_gb / (gb / dt):.0f} s at this rate")
t = time.perf_counter()
out = subprocess.run([sys.executable, "-c",
                      "import time,torch; t=time.perf_counter(); from worker.engine import Engine; "
                      "e=Engine.load('lingbot-world-fast', device='cuda', text_encoder=False); torch.cuda.synchronize(); "
                      "print(f'in-process {time.perf_counter()-t:.1f} s')"], capture_output=True, text=True,
                     env=os.environ)
print(f"random-weight engine ready: {time.perf_counter() - t:.1f} s from process start ({out.stdout.strip()})")
