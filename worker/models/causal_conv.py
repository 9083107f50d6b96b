"""The Wan VAE's causal 3D conv and its frame cache, as diffusers runs them, without their copies.

diffusers' WanCausalConv3d concatenates the frames cached for it in front of its input, then F.pads all three
axes (a full copy of every conv's input), and every caller of a conv clones the input's last frames for the next
call. Here the spatial padding happens inside the conv, and the cache keeps a view where nothing can overwrite it.
Used by the decoder's patched residual blocks (worker/models/vae.py) and by the streamed condition encode
(worker/models/condition_stream.py).

Behind a residual block's norm (conv_behind_cache) even the time axis' concatenation goes: the norm's kernel
writes its output behind a copy of the cached frames, in the pass that computes it (docs/PERFORMANCE.md v30a).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanCausalConv3d


def causal_conv3d(
    m: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None, bias: bool = True
) -> torch.Tensor:
    """WanCausalConv3d.forward with the spatial padding inside the conv; bias=False leaves m.bias for the caller."""
    pw, _, ph, _, pt, _ = m._padding  # (w, w, h, h, 2 * t_pad, 0): causal in time, symmetric in space
    if cache_x is not None and pt > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        pt -= cache_x.shape[2]
    if pt > 0:
        x = F.pad(x, (0, 0, 0, 0, pt, 0))
    return conv_in_time(m, x, m.weight, m.bias if bias else None)


def conv_in_time(m: WanCausalConv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The conv on x, whose frames already include the cached ones in front: no time padding, spatial padding
    inside cuDNN (WanCausalConv3d's _padding is (w, w, h, h, 2 * t, 0))."""
    pw, _, ph, _, _, _ = m._padding
    return F.conv3d(x, weight, bias, m.stride, (0, ph, pw), m.dilation, m.groups)


def cached_causal_conv(
    conv: WanCausalConv3d, x: torch.Tensor, feat_cache: list | None, feat_idx: list[int] | None, bias: bool = True
) -> torch.Tensor:
    """conv(x) behind the frames cached for it (feat_cache[feat_idx[0]]); then cache x's last CACHE_T frames by
    diffusers' rule: when x is shorter, the previous cache's last frame goes in front. bias=True runs the
    module's own forward (whatever it is patched to); bias=False runs causal_conv3d without the bias."""
    if feat_cache is None:
        return conv(x) if bias else causal_conv3d(conv, x, bias=False)
    idx = feat_idx[0]
    cache_x = x[:, :, -CACHE_T:]
    if cache_x.shape[2] < CACHE_T and feat_cache[idx] is not None:
        cache_x = torch.cat([feat_cache[idx][:, :, -1:].to(x.device), cache_x], dim=2)
    elif x.shape[2] > CACHE_T:
        cache_x = cache_x.clone()  # a view would keep all of x alive until the next call
    # else the cache is all of x, which nothing writes to: diffusers' clone of it would be a copy for nothing
    out = conv(x, feat_cache[idx]) if bias else causal_conv3d(conv, x, feat_cache[idx], bias=False)
    feat_cache[idx] = cache_x
    feat_idx[0] += 1
    return out


# Off (0) for A/Bs: the chain's output concatenated behind the cache by a copy of its own, as before v30a.
BEHIND = os.environ.get("LINGBOT_VAE_BEHIND", "1") != "0"


def conv_behind_cache(conv: WanCausalConv3d, chain: Callable, *args, feat_cache: list | None,
                      feat_idx: list[int] | None, bias: bool = False) -> torch.Tensor:
    """cached_causal_conv(conv, chain(*args), feat_cache, feat_idx, bias), for a chain of worker.models.fused
    that takes `front`: where CACHE_T frames are cached for the conv and the chain's output has as many or more
    (every call of a stream after its first two latent frames), `chain(*args, front)` writes its output behind
    them and returns its last CACHE_T frames for the cache; the conv reads that. Elsewhere the plain path, whose
    cache rule for shorter calls differs."""
    cache = feat_cache[feat_idx[0]] if feat_cache is not None else None
    if not (BEHIND and isinstance(cache, torch.Tensor) and cache.shape[2] == CACHE_T and args[0].shape[2] >= CACHE_T):
        return cached_causal_conv(conv, chain(*args), feat_cache, feat_idx, bias)
    ext, last = chain(*args, cache)
    feat_cache[feat_idx[0]] = last
    feat_idx[0] += 1
    return conv_in_time(conv, ext, conv.weight, conv.bias if bias else None)
