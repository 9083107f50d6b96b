"""The offloaded text encoder's load: from_pretrained then packing into host RAM, against a read of its files
straight into the host buffer (worker/models/host_weights.py). Full-width UMT5-XXL layers, random bf16 weights,
the embedding stored once as transformers stores a tied weight; each run in a fresh process, page cache warm.

    python3 scripts/text_encoder_read.py [--layers 8] [--dir /tmp/te_read] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def write(folder: Path, layers: int) -> None:
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from worker.config import FULL

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**{**FULL.text_encoder, "num_layers": layers})).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.encoder.embed_tokens.weight = model.shared.weight  # to_empty unties them; the real encoder shares one
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=g)
    model.save_pretrained(folder)


def load(mode: str, folder: Path) -> None:
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from worker.models.host_weights import HostWeights

    t = time.perf_counter()
    if mode == "from_pretrained":
        host = HostWeights(UMT5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16, local_files_only=True))
    else:
        with torch.device("meta"):
            model = UMT5EncoderModel(UMT5Config.from_pretrained(folder, local_files_only=True)).to(torch.bfloat16)
        host = HostWeights(model, sorted(folder.glob("*.safetensors")))
    seconds = time.perf_counter() - t
    print(f"{mode:16s} {seconds:6.2f} s for {host.nbytes / 1e9:.2f} GB (checksum {host.host[::4096].sum().item()})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/te_read"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--load", choices=("from_pretrained", "direct"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    folder = a.dir / "text_encoder"
    if a.load:
        return load(a.load, folder)
    if not any(folder.glob("*.safetensors")):
        write(folder, a.layers)
    for path in folder.glob("*.safetensors"):  # warm the page cache: the comparison is of the copies, not the disk
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass
    for _ in range(a.runs):
        for mode in ("from_pretrained", "direct"):
            subprocess.run([sys.executable, __file__, "--dir", str(a.dir), "--load", mode], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})


if __name__ == "__main__":
    main()
