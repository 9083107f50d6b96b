"""Cold start measured, not extrapolated: a full-size random model on local disk, then process start to ready.

    python3 scripts/cold_start_full.py write --dir /tmp/lw          # ~86 GB of disk; builds the fp32 DiT (74 GB) on an H200
    python3 scripts/cold_start_full.py write --dir /tmp/lw16 --dtype bf16   # ~49 GB: what `worker convert` makes
    python3 scripts/cold_start_full.py start --dir /tmp/lw --ranks 1,4

`write` saves a full-size random LingBot-World Fast in the diffusers layout the worker loads
(robbyant/lingbot-world-fast-diffusers): transformer/ as fp32 safetensors shards of ~5 GB with the official tensor
names and an index (74.2 GB, as the real repo; with --dtype bf16 the 37.1 GB copy `python -m worker convert` writes,
which fits a one-GPU machine's 64 GB disk), vae/ (fp32) and text_encoder/ (the UMT5-XXL encoder, bf16, 11.4
GB) through save_pretrained, and the in-code tiny tokenizer (the real one is a few MB: its load time is not what
this measures). Then `sync`.

`start` drops the page cache (root only; says so if it cannot), starts a fresh process that runs exactly what the
workers run at start-up (`load_generator(dir, "cuda", ranks)`: every rank streams the DiT shards to its GPU, loads
the VAE, the leader the text encoder, then the warm-up chunk(s)), and reports the seconds from process start to
ready with the engine's own per-part log lines. Kernel caches (`LINGBOT_COMPILE_CACHE`) are whatever the
environment says: a production worker keeps them on its volume.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

def write(root: Path, preset: str, device: str, dtype_name: str) -> None:
    import torch

    from tests.checkpoints import MODEL_INDEX, diffusers_transformer_config
    from worker.config import PRESETS
    from worker.models.convert import ShardWriter
    from worker.models.dit import build_dit
    from worker.models.text_encoder import build_text_encoder
    from worker.models.vae import build_vae

    full = PRESETS[preset]
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    tdir = root / "transformer"
    tdir.mkdir(exist_ok=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    dit = build_dit(full.dit, device=device, dtype=dtype, seed=0)
    shards = ShardWriter(tdir)
    for name, t in dit.state_dict().items():
        shards.add(name, t)
    count, total = shards.close(), shards.total_bytes
    (tdir / "config.json").write_text(json.dumps(diffusers_transformer_config(full.dit), indent=2))
    del dit
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"transformer: {total / 1e9:.2f} GB {dtype_name} in {count} shards, {time.perf_counter() - t0:.0f} s so far")
    build_vae(full.vae, torch.float32, "cpu", seed=0).save_pretrained(root / "vae")
    with torch.device(device):  # initialising 5.7 B parameters on the CPU takes minutes
        te = build_text_encoder(full.text_encoder, torch.bfloat16, device, seed=0)
    te.model.save_pretrained(root / "text_encoder")
    te.tokenizer.save_pretrained(root / "tokenizer")
    del te
    subprocess.run(["sync"], check=True)
    du = subprocess.run(["du", "-sh", *(str(p) for p in sorted(root.iterdir()))], capture_output=True, text=True)
    print(du.stdout.strip())
    print(f"written and synced in {time.perf_counter() - t0:.0f} s")


CHILD = """
import time; t0 = time.perf_counter()
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(name)s: %(message)s")
if sys.argv[4] == "on":  # as handler.py does: the follower ranks import beside this process
    from worker.parallel import early
    early.start(int(sys.argv[2]))
from worker.parallel.pool import load_generator
from worker.models.prewarm import graphs_compiled
t_import = time.perf_counter() - t0
gen = load_generator(sys.argv[1], sys.argv[3], int(sys.argv[2]))
print(f"READY imports {t_import:.1f} s, process start to ready {time.perf_counter() - t0:.1f} s; "
      f"graphs traced by the leader {graphs_compiled()}", flush=True)
getattr(gen, "close", lambda: None)()
"""


def start(root: Path, ranks: int, device: str, log_to: Path | None = None, early: str = "on") -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        note = "page cache dropped"
    except OSError:
        note = "page cache NOT dropped: reads may come from RAM"
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(ranks), device, early], capture_output=True,
                         text=True, env=os.environ)
    wall = time.perf_counter() - t
    lines = [ln for ln in (out.stdout + out.stderr).splitlines()
             if "READY" in ln or " in " in ln and ("worker." in ln) or "Error" in ln or "rank pool" in ln
             or "worker.prewarm" in ln]
    print(f"--- {ranks} rank(s), early followers {early}, {note}: wall {wall:.1f} s (exit {out.returncode})")
    if log_to is not None:
        log_to.write_text(out.stdout + out.stderr)
        print(f"whole log: {log_to}")
    print("\n".join(lines[-40:]))
    if out.returncode:
        print((out.stdout + out.stderr)[-3000:])


ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("what", choices=["write", "start"])
ap.add_argument("--dir", type=Path, default=Path("/tmp/lw"))
ap.add_argument("--preset", default="lingbot-world-fast", help="write: the model's size (tiny: a quick check)")
ap.add_argument("--device", default="cuda")
ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="write: the DiT shards' dtype")
ap.add_argument("--ranks", default="1", help="start: comma-separated rank counts, one fresh process each")
ap.add_argument("--log", type=Path, help="start: also write each process's whole log to LOG_<ranks>[_<early>].log")
ap.add_argument("--early", default="on", help="start: follower ranks spawned before the imports (worker/parallel/early.py, "
                "as handler.py does), `off` (spawned by RankPool.start after them), or a comma-separated list of both")
a = ap.parse_args()
if a.what == "write":
    write(a.dir, a.preset, a.device, a.dtype)
else:
    for r in a.ranks.split(","):
        for e in a.early.split(","):
            tag = f"_{e}" if "," in a.early else ""
            start(a.dir, int(r), a.device, a.log and a.log.with_name(f"{a.log.name}_{r}{tag}.log"), early=e)
