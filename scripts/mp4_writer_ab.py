"""The consumer's time per chunk for JPEG encode + MP4 write, an old worker/media.py against the working tree's.

    python3 scripts/mp4_writer_ab.py [--old REV] [--rounds 2] [--period 0.7]

Frames: a moving gradient with noise at 832x480, 9 then 12 per chunk, one chunk every --period seconds (the
model's chunk time), as the service sees them. Both versions run in one process, alternating, so they share the
machine's state. docs/PERFORMANCE.md v18d.
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from worker import media as new  # noqa: E402


def load_old(rev: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:worker/media.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "media_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("media_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["media_old"] = mod
    spec.loader.exec_module(mod)
    return mod


def chunks(n_chunks: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:832]
    out, t0 = [], 0
    for c in range(n_chunks):
        n = 9 if c == 0 else 12
        fr = np.stack([np.stack([(xx + 7 * (t0 + i)) % 256, (yy + 3 * (t0 + i)) % 256, (xx + yy + i) % 256], -1)
                       for i in range(n)])
        out.append((fr + rng.integers(0, 12, fr.shape)).clip(0, 255).astype(np.uint8))
        t0 += n
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default="HEAD~1", help="the revision whose worker/media.py is the baseline")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--period", type=float, default=0.7)
    a = ap.parse_args()
    old, frames = load_old(a.old), chunks()
    for _ in range(a.rounds):
        for name, mod in (("old", old), ("new", new)):
            with tempfile.TemporaryDirectory() as d:
                w = mod.Mp4Writer(Path(d) / "a.mp4", 832, 480)
                ms = []
                for fr in frames:
                    t = time.perf_counter()
                    w.write(fr)
                    mod.encode_frames(fr, "jpeg", 85)
                    ms.append((time.perf_counter() - t) * 1e3)
                    time.sleep(a.period)
                t = time.perf_counter()
                info = w.close()
                print(f"{name}: chunk 0 {ms[0]:.0f} ms; chunks 1+ {[round(x) for x in ms[1:]]} ms; "
                      f"close {(time.perf_counter() - t) * 1e3:.0f} ms; {info.num_frames} frames")


if __name__ == "__main__":
    main()
