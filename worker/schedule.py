"""The 4-step DMD schedule of LingBot-World Fast, with the official sigma lookups reproduced exactly.

Official: FlowUniPCMultistepScheduler(1000, shift=1).set_timesteps(1000, shift=10), then the timesteps at
indices [0, 179, 358, 679]. The integer timesteps repeat (int truncation), and the official code looks the
sigma up two different ways: x0 conversion takes the FIRST index with that timestep (argmin), add_noise takes
the SECOND one (diffusers' index_for_timestep). They differ by 1e-4..7e-4; we keep the quirk so our frames
match the official ones (fast_rollout.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from worker.config import DENOISING_STEP_INDICES, NUM_TRAIN_TIMESTEPS, SAMPLE_SHIFT


@dataclass(frozen=True)
class Schedule:
    timesteps: tuple[int, ...]  # fed to the DiT: (999, 978, 947, 825)
    x0_sigmas: tuple[float, ...]  # sigma used in x0 = x_t - sigma * v, per step
    renoise_sigmas: tuple[float, ...]  # sigma used to re-noise x0 for the NEXT step (len = steps - 1)


@lru_cache(maxsize=None)
def dmd_schedule(shift: float = SAMPLE_SHIFT, indices: tuple[int, ...] = DENOISING_STEP_INDICES) -> Schedule:
    n = NUM_TRAIN_TIMESTEPS
    sigma_max = 1.0 - 1.0 / n  # 1 - linspace(1, 1/n, n)[::-1] ends at 0.999
    s = np.linspace(sigma_max, 0.0, n + 1)[:-1]
    sig = shift * s / (1 + (shift - 1) * s)
    timesteps = (sig * n).astype(np.int64)
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
    ts = [int(timesteps[i]) for i in indices]

    def first(t: int) -> float:
        return float(sigmas[int(np.argmin(np.abs(timesteps - t)))])

    def second(t: int) -> float:
        hits = np.nonzero(timesteps == t)[0]
        return float(sigmas[hits[1] if len(hits) > 1 else hits[0]])

    return Schedule(tuple(ts), tuple(first(t) for t in ts), tuple(second(t) for t in ts[1:]))
