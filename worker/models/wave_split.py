"""FA4's last wave, filled: a few heads' keys split into parts that run beside the other heads.

FA4's Hopper forward gives each (query tile of 128, head) one CTA, one CTA per SM at a time, and without a mask
every CTA does the same work. A chunk's 4680 queries are 37 tiles, so one GPU's 40 heads are 1480 CTAs: 11.2
waves of 132 SMs, paid as 12. Here `split` of the heads run on a second stream with their keys cut into `parts`
(a batch of `parts` problems whose queries are one broadcast tensor), at a lower priority than the caller's
stream, so the other heads' CTAs are dispatched first and the short ones fill the SMs their last wave leaves idle.
The parts' outputs are merged by their log-sum-exps. Softmax over keys does not depend on their order, so any
cut is exact up to the merge's rounding (one bf16 rounding of each part: relative L2 ~5e-4 of the output).

`plan` picks the split from a greedy schedule of the CTAs and uses it only where it predicts at least MIN_GAIN.
Measured (docs/PERFORMANCE.md v29a) with `scripts/attention_waves.py` on one H100: 40 heads, 1 head's keys in 4
parts, 0.949x the one call's time over 60 interleaved graph replays (model: 0.940x); 20 heads (a rank's share on
2 GPUs), model 0.97x, measured 0.99-1.00x; 10 heads, model and measurement 1.0x. In the one-GPU rollout the
decode, which runs beside the DiT at low priority, had been filling those idle SMs: with the decode's convs on
frame pairs (v29b) the DiT took 11-19 ms less per chunk and the 14-chunk rollout 2% less time; before them,
0-17 ms of DiT and nothing end to end beyond the runs' spread. So the DiT asks for it on one rank only
(`attention(..., wave_split=True)`), the one setting measured to gain; LINGBOT_ATTENTION_SPLIT=0 turns it off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

Q_TILE = 128  # FA4's Hopper query tile for head dim 128
CTA_COST = 0.03  # a CTA's fixed cost (loading its queries, storing its output), in whole-CTA times; fitted above
MIN_GAIN = 0.05  # split only where the schedule predicts at least this much less time
CANDIDATES = ((1, 4), (1, 3), (2, 3), (2, 4))  # (heads split, parts), in order of preference on a tie


def setting() -> str:
    value = os.environ.get("LINGBOT_ATTENTION_SPLIT", "auto").strip().lower()
    if value not in ("auto", "0"):
        raise ValueError(f"LINGBOT_ATTENTION_SPLIT={value!r}: must be auto or 0")
    return value


def predicted_waves(heads: int, split: int, parts: int, sms: int, q_len: int, cta_cost: float = CTA_COST) -> float:
    """Time of one call in whole-CTA units: the first stream's CTAs (length 1) dispatched greedily to the SM that
    frees first, then the split heads' shorter ones (1/parts + cta_cost each)."""
    tiles = -(-q_len // Q_TILE)
    free = [0.0] * sms
    jobs = [1.0] * ((heads - split) * tiles) + [1.0 / parts + cta_cost] * (split * tiles * parts)
    for job in jobs:
        i = min(range(sms), key=free.__getitem__)
        free[i] += job
    return max(free)


@functools.lru_cache(maxsize=None)
def plan(heads: int, q_len: int, sms: int) -> tuple[int, int] | None:
    """(heads whose keys are split, parts), or None where no candidate saves MIN_GAIN of the one call's time."""
    base = predicted_waves(heads, 0, 1, sms, q_len)
    best = min(((predicted_waves(heads, h, p, sms, q_len), h, p) for h, p in CANDIDATES if h < heads),
               default=None)
    if best is None or best[0] > (1 - MIN_GAIN) * base:
        return None
    return best[1], best[2]


def merge_parts(o: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """Write into out [1, L, h, D] the attention of queries against all keys, from their attention against each
    of `parts` disjoint sets of keys: o [parts, L, h, D] and the natural-log sum-exps lse [parts, h, L]."""
    weights = torch.softmax(lse.float(), dim=0).transpose(1, 2).unsqueeze(-1)  # [parts, L, h, 1]
    out.copy_((o.float() * weights).sum(0, keepdim=True))


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device, priority: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device, priority=priority)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fa4_fwd: Callable[[], Callable],
              split: tuple[int, int] | None = None) -> torch.Tensor | None:
    """[1, Lq, H, D] x [1, Lk, H, D] -> [1, Lq, H, D] with the plan's heads split, by FA4's `_flash_attn_fwd`
    (fa4_fwd() returns it: it takes `out` and returns (out, lse, ...)); None where there is no plan (the caller
    runs one call). split: (heads, parts) instead of the plan's (scripts/attention_waves.py times several)."""
    if q.shape[0] != 1 or q.device.type != "cuda" or setting() == "0":
        return None
    heads = q.shape[2]
    chosen = split or plan(heads, q.shape[1], _sm_count(q.device.index if q.device.index is not None else 0))
    if chosen is None or k.shape[1] % chosen[1]:
        return None
    fwd = fa4_fwd()
    split, parts = chosen
    keep = heads - split
    out = torch.empty_like(q)
    main = torch.cuda.current_stream(q.device)
    least, _ = torch.cuda.Stream.priority_range()
    side = _side_stream(q.device, min(main.priority + 1, least))
    side.wait_stream(main)  # q, k, v are ready on the caller's stream
    fwd(q[:, :, :keep], k[:, :, :keep], v[:, :, :keep], out=out[:, :, :keep])
    with torch.cuda.stream(side):
        # The split heads as `parts` problems: the same queries (stride 0) against consecutive runs of keys.
        qs = q[:, :, keep:].expand(parts, -1, -1, -1)
        ks, vs = (t[0, :, keep:].unflatten(0, (parts, -1)) for t in (k, v))
        o, lse = fwd(qs, ks, vs, return_lse=True)[:2]
        merge_parts(o, lse, out[:, :, keep:])
    main.wait_stream(side)  # also keeps q, k, v and out alive for the side stream: only this stream reuses them
    return out
