"""The frames of one job under several decode splits (sp.decode_split), each compared with the first (full size,
random weights).

    python3 scripts/decode_split_frames.py [--ranks 4] [--chunks 4] [--splits leader,bands]

The jobs run in one pool with the same token split (decode cost 0) and eager forwards (LINGBOT_CUDA_GRAPHS=0), so
their latents should agree and any difference in the frames is the decode's: cuDNN may pick other conv algorithms
for a band than for the whole frame, so bf16 sums can round differently.
"""
import argparse
import os

os.environ.setdefault("LINGBOT_CUDA_GRAPHS", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from worker.bench import _bench_job  # noqa: E402
from worker.parallel.pool import load_generator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--splits", default="leader,bands", help="comma-separated; each later one against the first")
    a = ap.parse_args()
    splits = a.splits.split(",")
    gen = load_generator("lingbot-world-fast", "cuda", a.ranks, text_encoder=False)
    try:
        runs = {}
        for split in splits:
            gen.configure(decode_split=split, decode_cost=0.0)
            runs[split] = list(gen.rollout(_bench_job(832, 480, a.chunks, 15, 3, seed=3)))
        for split, lead, band in ((s, a, b) for s in splits[1:] for a, b in zip(runs[splits[0]], runs[s])):
            diff = np.abs(lead.frames.astype(np.int16) - band.frames.astype(np.int16))
            mse = float((diff.astype(np.float64) ** 2).mean())
            psnr = float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)
            same = torch.equal(lead.latents, band.latents)
            print(f"{split} chunk {lead.index}: frames {lead.frames.shape}, latents equal {same}; frames max |diff| "
                  f"{diff.max()}, mean {diff.mean():.4f}, values differing {(diff > 0).mean():.4%}, PSNR {psnr:.1f} dB; "
                  f"band decode {band.stats.get('band_decode_ms', float('nan')):.1f} ms")
    finally:
        gen.close()


if __name__ == "__main__":
    main()
