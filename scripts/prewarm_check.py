"""Does replaying the prewarm manifest make the warm-up's calls trace nothing? One process, random weights.

    LINGBOT_COMPILE_CACHE=/tmp/cc python3 scripts/prewarm_check.py [--device cuda] [--model lingbot-world-fast]

Runs the start-up warm-up recording the manifest (worker/models/prewarm.py), forgets every traced graph
(torch._dynamo.reset, what a new process starts from), replays the manifest, then runs the warm-up again
with Dynamo's recompile log on: every graph the second warm-up traces is a replay that missed, and the log says
which guard failed. On the CPU (tests' tiny model) the chains are traced with Dynamo's eager backend.
"""
import argparse
import json
import os
import time

import worker  # noqa: F401  - applies LINGBOT_COMPILE_CACHE before torch is imported

import torch

from worker.models import fused, prewarm

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--device", default="cuda")
ap.add_argument("--model", default="lingbot-world-fast")
a = ap.parse_args()
dev = torch.device(a.device)
if dev.type == "cpu":
    real = torch.compile
    torch.compile = lambda fn, fullgraph=True, options=None: real(fn, fullgraph=fullgraph, backend="eager")
    fused._COMPILE_ON_CPU = True

from worker.engine import Engine  # noqa: E402
from worker.parallel.pool import warmup  # noqa: E402

os.environ["LINGBOT_PREWARM"] = "0"  # no replay at load: this process starts from nothing traced
eng = Engine.load(a.model, device=a.device, text_encoder=False)
os.environ["LINGBOT_PREWARM"] = "1"
path = prewarm.manifest_path(eng.device, 0, 1) if dev.type == "cuda" else None
if path is None:
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "manifest.json"
path.unlink(missing_ok=True)
prewarm.RECORDER.open(path)
g = prewarm.graphs_compiled()
t = warmup(eng)
print(f"first warm-up: {t:.1f} s, {prewarm.graphs_compiled() - g} graphs traced, "
      f"{len(json.loads(path.read_text())['entries'])} manifest entries", flush=True)
torch._dynamo.reset()
t = time.perf_counter()
print(f"replay: (graphs, skipped) = {prewarm.replay(prewarm.RECORDER.open(path), eng.device)} in "
      f"{time.perf_counter() - t:.1f} s", flush=True)
torch._logging.set_logs(recompiles=True)
g = prewarm.graphs_compiled()
t = warmup(eng)
print(f"second warm-up: {t:.1f} s, {prewarm.graphs_compiled() - g} graphs traced (0 = every replay hit)")
