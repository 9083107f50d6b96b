"""Replay the prewarm manifest while the VAE and UMT5 load in bf16 (CPU, tiny model, Dynamo's eager backend).

    PYTHONPATH=. LINGBOT_COMPILE_CACHE=/tmp/pwcc python3 scripts/prewarm_beside_loads.py record --ckpt DIR
    PYTHONPATH=. LINGBOT_COMPILE_CACHE=/tmp/pwcc python3 scripts/prewarm_beside_loads.py {lock,nolock} --ckpt DIR

DIR is a tiny diffusers-layout checkpoint (`python3 scripts/cold_start_full.py write --preset tiny --device cpu
--dtype bf16 --dir DIR`). `record` runs the warm-up and writes the manifest. `lock` and `nolock` replay it
on a thread while the main thread loads the VAE and the text encoder in a loop, with and without
`prewarm.exclusive` around the loads. Each prints the default dtype afterwards and the graphs the warm-up
still traced (docs/PERFORMANCE.md v22d).
"""
import argparse
import contextlib
import json
from pathlib import Path

import torch

real_compile = torch.compile
torch.compile = lambda fn, fullgraph=True, options=None: real_compile(fn, fullgraph=fullgraph, backend="eager")

from worker.engine import Engine  # noqa: E402
from worker.models import fused, prewarm  # noqa: E402
from worker.models.loading import load_text_encoder_for, load_vae_for, resolve_model  # noqa: E402
from worker.parallel.pool import warmup  # noqa: E402

fused._COMPILE_ON_CPU = True
ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("mode", choices=["record", "lock", "nolock"])
ap.add_argument("--ckpt", type=Path, required=True)
ap.add_argument("--manifest", type=Path, default=Path("/tmp/prewarm_beside_loads.json"))
a = ap.parse_args()
engine = Engine.load("tiny", device="cpu", text_encoder=False)
if a.mode == "record":
    a.manifest.unlink(missing_ok=True)
    prewarm.RECORDER.open(a.manifest)
    warmup(engine)
    print("recorded", len(json.loads(a.manifest.read_text())["entries"]), "entries")
else:
    guard = prewarm.exclusive if a.mode == "lock" else contextlib.nullcontext
    source = resolve_model(str(a.ckpt))
    warm = prewarm.Prewarm(torch.device("cpu"), path=a.manifest)
    while warm.thread.is_alive():
        with guard():
            load_text_encoder_for(source, torch.bfloat16, "cpu")
            load_vae_for(source, torch.bfloat16, "cpu")
    warm.thread.join()  # not warm.join(): that would put a changed default dtype back
    dtype = torch.get_default_dtype()
    warm.join()
    before = prewarm.graphs_compiled()
    warmup(engine)
    print(f"{a.mode}: replay {warm.result}; default dtype after the loads {dtype}; the warm-up traced "
          f"{prewarm.graphs_compiled() - before} graphs")
