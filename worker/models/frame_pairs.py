"""Pairs of frames side by side on the channel axis: the layout the decoder's 96-channel convs run in on CUDA.

cuDNN has no Hopper kernel for 96 output channels: the decoder's full-resolution 3x3x3 convs ran an sm80 kernel
at ~240-300 TFLOP/s, ~40% of a decode's GPU time (docs/PERFORMANCE.md v21, v29). Packed, frames 2s and 2s + 1 are
one frame of 2C channels, and the causal conv's 3 time taps over frames become 2 taps over pairs, 2C in and 2C
out: 6 of the packed kernel's 8 [C, C] tap blocks are the conv's own taps and 2 are zero, so 4/3 of the FLOPs, at
the rate of cuDNN's 192-channel Hopper kernel (`scripts/conv_pairs.py`, 1 x H100: 3.28 -> 1.92 ms a call).

The packed tensor [B, 2C, n, H, W] is channels-last-3d: in memory [B, n, H, W, 2, C], frame 2s's channels, then
frame 2s + 1's, at every pixel. The causal cache of a packed conv is the input's last pair, a [B, 2C, 1, H, W]
tensor in the same feature-cache slot where diffusers keeps its last 2 frames. The decoder's temporal upsamplers
produce the same layout (their time conv's two channel halves are two frames), and `from_pairs` interleaves both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from worker.models import causal_conv

# (output frame in its pair a, input frame in its pair b, tap over pairs d) -> the conv's own time tap k: output
# frame 2s + a reads input frame 2s + a - 2 + k, which is frame b of pair s - 1 + d.
PAIR_TAPS = {(0, 0, 0): 0, (0, 1, 0): 1, (0, 0, 1): 2, (1, 1, 0): 0, (1, 0, 1): 1, (1, 1, 1): 2}


def pair_weight(weight: torch.Tensor) -> torch.Tensor:
    """A causal conv's [O, I, 3, kh, kw] weight -> [2O, 2I, 2, kh, kw] for pairs (channels-last-3d, weight's dtype)."""
    o, i = weight.shape[:2]
    packed = weight.new_zeros(2 * o, 2 * i, 2, *weight.shape[3:])
    for (a, b, d), k in PAIR_TAPS.items():
        packed[a * o:(a + 1) * o, b * i:(b + 1) * i, d] = weight[:, :, k]
    return packed.contiguous(memory_format=torch.channels_last_3d)


def pairs_view(p: torch.Tensor) -> torch.Tensor:
    """Packed [B, 2C, n, H, W] -> its memory order [B, n, H, W, 2, C] (a view)."""
    return p.permute(0, 2, 3, 4, 1).unflatten(-1, (2, -1))


def from_memory_order(y: torch.Tensor) -> torch.Tensor:
    """[B, n, H, W, 2, C] -> packed [B, 2C, n, H, W] (a view when y is contiguous)."""
    return y.flatten(-2).permute(0, 4, 1, 2, 3)


def frames_in_pairs_order(x: torch.Tensor) -> torch.Tensor:
    """Frames [B, C, 2n, H, W] as [B, n, H, W, 2, C], the packed layout's memory order (a view, strided)."""
    return x.permute(0, 2, 3, 4, 1).unflatten(1, (x.shape[2] // 2, 2)).permute(0, 1, 3, 4, 2, 5)


def pairs_in_frames_order(p: torch.Tensor) -> torch.Tensor:
    """Packed [B, 2C, n, H, W] as [B, 2n, H, W, C], the frames' channels-last memory order (a copy, in general)."""
    return pairs_view(p).permute(0, 1, 4, 2, 3, 5).flatten(1, 2)


def to_pairs(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 2n, H, W] -> packed [B, 2C, n, H, W] (a copy)."""
    return from_memory_order(frames_in_pairs_order(x).contiguous())


def from_pairs(p: torch.Tensor, memory_format: torch.memory_format = torch.channels_last_3d) -> torch.Tensor:
    """Packed [B, 2C, n, H, W] -> [B, C, 2n, H, W]: frame 2s + a is channels [aC, (a + 1)C) of pair s. One copy,
    into a tensor of `memory_format` (the temporal upsamplers pass their activation's)."""
    b, c2, n, h, w = p.shape
    out = torch.empty((b, c2 // 2, 2 * n, h, w), dtype=p.dtype, device=p.device, memory_format=memory_format)
    out.unflatten(2, (n, 2)).copy_(p.unflatten(1, (2, c2 // 2)).permute(0, 2, 3, 1, 4, 5))
    return out


def is_pair(cache: object, channels: int) -> bool:
    """Whether a feature-cache entry of a conv with `channels` inputs is a packed pair (else frames, or None)."""
    return isinstance(cache, torch.Tensor) and cache.shape[1] == 2 * channels


def front_pair(cache: torch.Tensor | None, channels: int, like: torch.Tensor) -> torch.Tensor:
    """The 2 frames of `channels` channels before the packed input (of like's batch, rows, columns, dtype and
    device) as one pair: the cached pair, or the cached frames (diffusers' form: 1 or 2 of them, after a call with
    an odd frame count) behind zero frames, or zeros (the conv's causal padding)."""
    if is_pair(cache, channels):
        return cache
    frames = torch.empty(like.shape[0], channels, 2, *like.shape[3:], dtype=like.dtype, device=like.device,
                         memory_format=torch.channels_last_3d).zero_()
    if cache is not None:
        k = min(cache.shape[2], 2)
        frames[:, :, 2 - k:] = cache[:, :, -k:]
    return to_pairs(frames)


def unpair_caches(feat_cache: list, first: int, channels: tuple[int, ...]) -> None:
    """Put the packed pairs in feat_cache[first:first + len(channels)] back in diffusers' form (2 frames), for a
    call that runs the plain convs (an odd frame count) after packed ones."""
    for i, c in enumerate(channels):
        if is_pair(feat_cache[first + i], c):
            feat_cache[first + i] = from_pairs(feat_cache[first + i])


def paired_conv_behind_cache(conv: WanCausalConv3d, weight: torch.Tensor, chain: Callable, *args,
                             feat_cache: list, feat_idx: list[int]) -> torch.Tensor:
    """The causal conv (without its bias, packed `weight`) of `chain(*args)`, a packed input, behind the pair
    cached for it; caches the input's last pair. Same products as diffusers' WanCausalConv3d behind its cached
    frames, and the same 2 frames cached. The chain (worker.models.fused) writes its output behind the cached
    pair and returns its last pair itself (causal_conv.conv_behind_cache); with LINGBOT_VAE_BEHIND=0 both are
    copies here."""
    idx = feat_idx[0]
    front = front_pair(feat_cache[idx], conv.in_channels, args[0])
    if causal_conv.BEHIND:
        ext, last = chain(*args, front)
    else:
        a = chain(*args)
        ext, last = torch.cat([front, a], dim=2), a[:, :, -1:]
        if a.shape[2] > 1:
            last = last.clone()  # a view would keep all of a alive until the next call
    feat_cache[idx] = last
    feat_idx[0] += 1
    return causal_conv.conv_in_time(conv, ext, weight, None)
