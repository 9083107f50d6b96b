"""The Wan2.1 decoder on a band of output rows, so that every rank of a pool decodes its own rows of each frame.

After the middle block every decoder layer is local in space: 3x3 convs, RMS norms over channels (per pixel),
nearest 2x upsampling. Output rows [a, b) therefore depend on a band of rows at each earlier layer, one conv
radius wider per 3x3 conv going back, and half as tall (rounded outwards) across each upsampling. The middle
block's attention is global over the frame, so conv_in and the middle block run on the whole frame, at latent
resolution, on every rank (1.5% of the decoder's conv work at 832x480). After it the band is cropped before every
residual block, upsampler and the head, so each op computes only the rows its output needs.

Rows cut at an interior band edge are zero-padded by the next conv, which the full decode would not do; the crops
are planned so those wrong values only ever reach rows that are later cut off. At the image's own top and bottom
the zero padding is the full decode's. The causal caches hold the cropped bands, the same rows at every call, so
streaming works unchanged. Results equal the full decode up to the order of the convs' sums (cuDNN may choose
another algorithm for a smaller input).
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanDecoder3d, WanUpBlock

from worker.models.causal_conv import cached_causal_conv

# Spatial radius, in rows of the op's own resolution: two 3x3 convs in a residual block, one in the upsampler
# (after its 2x nearest upsampling) and one in the head.
_RADIUS = {"res": 2, "up": 1, "head": 1}


def _ops(decoder: WanDecoder3d) -> list[tuple[str, torch.nn.Module | None]]:
    """The decoder after its middle block, in order: ("res", block), ("up", resample), ("head", None)."""
    ops: list[tuple[str, torch.nn.Module | None]] = []
    for block in decoder.up_blocks:
        if not isinstance(block, WanUpBlock):  # Wan2.2's residual up blocks mix rows in their shortcut
            raise TypeError(f"row bands need Wan2.1's WanUpBlock, got {type(block).__name__}")
        ops += [("res", r) for r in block.resnets]
        if block.upsamplers is not None:
            up = block.upsamplers[0]
            if up.mode not in ("upsample2d", "upsample3d"):
                raise TypeError(f"row bands cannot follow a {up.mode!r} resample")
            ops.append(("up", up))
    return ops + [("head", None)]


def band_windows(decoder: WanDecoder3d, latent_rows: int, rows: tuple[int, int]) -> list[tuple[int, int]]:
    """For each op of _ops (in order), the rows of its input, at its input's resolution, that output rows
    `rows` = [a, b) need. Worked backwards from the output: each op widens the band by its radius (clipped to the
    image: beyond it every conv pads with zeros, in the full decode too), an upsampler also halves it."""
    return _windows([kind for kind, _ in _ops(decoder)], latent_rows, rows)


def _height(kinds: list[str], latent_rows: int) -> int:
    """The decoded frame's rows: the latent rows, doubled by each upsampler."""
    return latent_rows * 2 ** kinds.count("up")


def _windows(kinds: list[str], latent_rows: int, rows: tuple[int, int]) -> list[tuple[int, int]]:
    height = _height(kinds, latent_rows)
    a, b = rows
    if not 0 <= a < b <= height:
        raise ValueError(f"rows {rows} outside the decoded height {height}")
    windows = []
    for kind in reversed(kinds):
        a, b = max(a - _RADIUS[kind], 0), min(b + _RADIUS[kind], height)
        if kind == "up":
            height //= 2
            a, b = a // 2, -(-b // 2)
        windows.append((a, b))
    return windows[::-1]


def band_work(decoder: WanDecoder3d, latent_rows: int, rows: tuple[int, int]) -> float:
    """The conv multiply-adds that output rows [a, b) take after the middle block, per latent column and latent
    frame decoded (the convs are nearly all of the decoder's work; the middle block, 1.5% of it at 832x480, is the
    same on every band)."""
    return _work(*_row_weights(decoder), latent_rows, rows)


def _work(kinds: list[str], weights: list[float], latent_rows: int, rows: tuple[int, int]) -> float:
    return sum(w * (b - a) for w, (a, b) in zip(weights, _windows(kinds, latent_rows, rows)))


def _row_weights(decoder: WanDecoder3d) -> tuple[list[str], list[float]]:
    """Each op's kind and its conv multiply-adds per row of its input (per latent column and latent frame decoded:
    an op at twice the resolution has twice the columns, and after a temporal upsampling twice the frames)."""
    kinds, weights, frames, columns = [], [], 1, 1
    for kind, module in _ops(decoder):
        if kind == "res":  # two 3x3x3 convs, and a 1x1x1 shortcut where the channels change
            convs = [module.conv1, module.conv2] + [module.conv_shortcut] * isinstance(module.conv_shortcut,
                                                                                        torch.nn.Conv3d)
            w = frames * columns * sum(c.weight.numel() for c in convs)
        elif kind == "up":
            w = 0
            if module.mode == "upsample3d":
                w += frames * columns * module.time_conv.weight.numel()
                frames *= 2
            columns *= 2
            conv = module.resample[1]  # after the 2x upsampling: twice the rows of the op's input
            w += frames * columns * 2 * conv.weight.numel()
        else:
            w = frames * columns * decoder.conv_out.weight.numel()
        kinds.append(kind)
        weights.append(float(w))
    return kinds, weights


def balanced_bands(decoder: WanDecoder3d, latent_rows: int, parts: int) -> list[tuple[int, int]]:
    """Output rows split into `parts` consecutive bands whose largest band_work is as small as whole rows allow.
    Bands at the image's edges need a margin on one side only, so they get more rows than the ones inside.
    Planned once per decoder and geometry (the search takes tens of milliseconds, at every job's start otherwise)."""
    return list(_balanced_bands(decoder, latent_rows, parts))


@functools.lru_cache(maxsize=32)
def _balanced_bands(decoder: WanDecoder3d, latent_rows: int, parts: int) -> tuple[tuple[int, int], ...]:
    kinds, weights = _row_weights(decoder)
    height = _height(kinds, latent_rows)
    if not 1 <= parts <= height:
        raise ValueError(f"cannot split {height} rows into {parts} bands")

    def work(a: int, b: int) -> float:
        return _work(kinds, weights, latent_rows, (a, b))

    def split(limit: float) -> list[tuple[int, int]] | None:
        """Greedy from the top: each band as tall as the limit allows; None if the last one exceeds it."""
        bands, a = [], 0
        for left in range(parts, 1, -1):
            b = a + 1
            while b < height - (left - 1) and work(a, b + 1) <= limit:
                b += 1
            bands.append((a, b))
            a = b
        bands.append((a, height))
        return bands if max(work(*band) for band in bands) <= limit else None

    lo, hi = 0.0, work(0, height)
    best = split(hi)
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        found = split(mid)
        lo, hi, best = (mid, hi, best) if found is None else (lo, mid, found)
    return tuple(best)


def activation_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a [B, C, T, H, W] activation: channels-last (NDHWC, as on CUDA) or channels-first."""
    return torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d) else torch.contiguous_format


def _crop(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a [B, C, T, H, W] activation, in the memory layout the convs want (a view of
    channels-last rows is not channels-last-contiguous, and cuDNN would copy it anyway)."""
    if start == 0 and stop == x.shape[3]:
        return x
    return x[:, :, :, start:stop].contiguous(memory_format=activation_format(x))


@functools.lru_cache(maxsize=32)
def _plan(decoder: WanDecoder3d, latent_rows: int, rows: tuple[int, int] | None) -> tuple[tuple, tuple[int, int]]:
    """((op, its input window) for each op of _ops, the output rows; rows None: all of them), per decoder and
    geometry: decode_rows runs once per latent frame."""
    ops = _ops(decoder)
    kinds = [kind for kind, _ in ops]
    rows = rows or (0, _height(kinds, latent_rows))
    return tuple(zip(ops, _windows(kinds, latent_rows, rows))), rows


def decode_rows(decoder: WanDecoder3d, x: torch.Tensor, rows: tuple[int, int] | None, feat_cache: list,
                feat_idx: list[int], first_chunk: bool = False) -> torch.Tensor:
    """WanDecoder3d.forward(x, feat_cache, feat_idx, first_chunk) restricted to output rows [a, b): [B, 3, T', b-a, W]
    (rows None: all of them, diffusers' forward itself).

    The same calls on the same cache entries as diffusers' forward, on cropped bands (see the module doc). Wan2.1's
    up blocks do not use `first_chunk` (its only effect is through the caches, which are the same here). The head
    is `decoder.fused_head` where worker.models.vae fused its norm and SiLU (and so can write behind its conv's
    cache)."""
    x = cached_causal_conv(decoder.conv_in, x, feat_cache, feat_idx)
    x = decoder.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
    steps, rows = _plan(decoder, x.shape[3], None if rows is None else tuple(rows))
    start = 0  # the first row of x, at x's resolution
    for (kind, module), (lo, hi) in steps:
        x, start = _crop(x, lo - start, hi - start), lo
        if kind == "res":
            x = module(x, feat_cache=feat_cache, feat_idx=feat_idx)
        elif kind == "up":
            x, start = module(x, feat_cache=feat_cache, feat_idx=feat_idx), 2 * start
        elif getattr(decoder, "fused_head", None) is not None:
            x = decoder.fused_head(x, feat_cache, feat_idx)
        else:
            x = decoder.nonlinearity(decoder.norm_out(x))
            x = cached_causal_conv(decoder.conv_out, x, feat_cache, feat_idx)
    return _crop(x, rows[0] - start, rows[1] - start)


__all__ = ["balanced_bands", "band_windows", "band_work", "decode_rows"]
