"""The image condition y, streamed chunk by chunk through the Wan VAE's causal encoder.

The official model encodes the clip [image, 0, 0, ...] once for the whole video; streaming it through the
encoder's feature cache the way diffusers' `_encode` loop does (frame 0 alone, then groups of 4 pixel frames)
gives the same latents chunk by chunk (tested against the one-shot encode). Every chunk after the first encodes
zero frames, and the image's influence leaves the cache layer by layer, the first layers first; the layers that
have reached their fixed point are skipped (`ConditionStream.next`). docs/MODEL.md, docs/PERFORMANCE.md v15a.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

from worker.config import MASK_CHANNELS, VAE_STRIDE, VAE_Z_DIM, pixel_frames_for_chunk
from worker.models.causal_conv import cached_causal_conv

if TYPE_CHECKING:
    from worker.models.vae import StreamingVAE


class ConditionStream:
    """One job's streamed encode of [image, 0, 0, ...] (pixel values in [-1, 1]; 0 = mid-grey) through the
    encoder of a StreamingVAE. All per-job state lives here and goes with the object."""

    def __init__(self, svae: StreamingVAE, image: torch.Tensor) -> None:
        """image: [3, H, W], H and W multiples of 8 (already resized to the output size)."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"condition image must be [3, H, W], got {tuple(image.shape)}")
        h, w = image.shape[1:]
        if h % VAE_STRIDE[1] or w % VAE_STRIDE[2]:
            raise ValueError(f"image size {w}x{h} is not a multiple of {VAE_STRIDE[2]}x{VAE_STRIDE[1]}")
        self._svae, self.vae = svae, svae.vae
        self.vae._enc_conv_num = self.vae._cached_conv_counts["encoder"]
        self.vae._enc_feat_map = [None] * self.vae._enc_conv_num
        self.vae._enc_conv_idx = [0]
        self._image = image.to(device=svae.device, dtype=svae.dtype)
        self._h, self._w = h, w
        self._k = 0  # next chunk
        enc = self.vae.encoder
        # Layers whose outputs are kept to restart from: the downsamplers and the mid block, where activations
        # are small (a quarter of the full-resolution ones or less).
        self._cuts = frozenset(1 + i for i, m in enumerate(enc.down_blocks) if isinstance(m, WanResample))
        self._cuts |= {len(enc.down_blocks) + 1}
        self.num_layers = encoder_layer_count(enc)
        self._segments = self._encoder_segments()
        self._slots: list[tuple[int, int]] = []  # cache slots [first, end) of each encoder layer, learnt in chunk 0
        self._start = 0  # first layer a zero-frame chunk runs; the ones before are at their fixed point
        self._cut_out: dict[int, list] = {}  # layer -> its output per group of the last chunk it ran
        self._prev_state: list | None = None  # the cache the previous zero-frame chunk left
        self._check = None  # (slot-equal flags, their event, that chunk's y): the comparison in flight
        self._fixed: torch.Tensor | None = None  # the chunk's y once the whole cache reached a fixed point
        self.served_fixed = False  # the last chunk came from that fixed point (the encoder did not run)
        self.layers_run = 0  # encoder layers the last chunk ran

    def _encoder_segments(self) -> list:
        """The encoder's forward as a list of steps x -> x, each advancing the shared conv index over its own
        cache slots: diffusers' WanEncoder3d.forward cut at its top-level layers (conv_in, each down block, the
        mid block, the head), so a run can start at any layer with that layer's input."""
        enc = self.vae.encoder
        cache, idx = self.vae._enc_feat_map, self.vae._enc_conv_idx

        def head(x):
            return cached_causal_conv(enc.conv_out, enc.nonlinearity(enc.norm_out(x)), cache, idx)

        return [functools.partial(cached_causal_conv, enc.conv_in, feat_cache=cache, feat_idx=idx),
                *(functools.partial(layer, feat_cache=cache, feat_idx=idx) for layer in enc.down_blocks),
                functools.partial(enc.mid_block, feat_cache=cache, feat_idx=idx),
                head]

    def _run_encoder(self, groups: list, start: int = 0, keep_cuts: bool = False) -> torch.Tensor:
        """Each group of frames through the encoder's layers from `start` on, in diffusers' order (group by
        group, every layer on the same cache). start > 0 takes the saved output of layer start-1 per group
        instead of `groups` (see next); keep_cuts saves the cut layers' outputs for that."""
        segments = self._segments
        outs, cut_out = [], {}
        for g, x in enumerate(groups):
            if start > 0:
                x = self._cut_out[start - 1][g]
            self.vae._enc_conv_idx[0] = self._slots[start][0] if start > 0 else 0
            for i in range(start, len(segments)):
                first = self.vae._enc_conv_idx[0]
                x = segments[i](x)
                span = (first, self.vae._enc_conv_idx[0])
                if len(self._slots) <= i:
                    self._slots.append(span)
                elif self._slots[i] != span:
                    raise RuntimeError(f"encoder layer {i} used cache slots {span}, before {self._slots[i]}")
                if keep_cuts and i in self._cuts:
                    cut_out.setdefault(i, []).append(x)
            outs.append(x)
        self._cut_out.update(cut_out)
        return torch.cat(outs, 2)

    @torch.no_grad()
    def next(self) -> torch.Tensor:
        """Next 3 latent frames of y = cat(mask[4], normalised latent[16]) -> [20, 3, H/8, W/8] fp32.

        Every chunk after the first encodes zero frames, and the encoder's causal receptive field is finite, so
        its feature cache stops changing once the image has left it, layer by layer from the first: the image's
        influence leaves the full-resolution layers after 2 chunks and the last layer after about 10
        (docs/MODEL.md). After each chunk the cache is compared with the one the chunk before left
        (bit for bit, every slot). Where the slots of the first layers came out unchanged, those layers are at a
        fixed point: fed zeros again from the same state, they compute the same outputs again. So the next chunk
        starts at the first layer that is still changing, from the input that layer got last time (saved at the
        encoder's downsampling layers, where activations are small). When the whole cache is unchanged the whole
        output repeats and the encoder does not run at all. The check needs no assumption about the weights.

        The comparison is queued on the GPU and read at the next chunk, so it never stalls the caller's stream.
        """
        k = self._k
        self._resolve_check()
        self.served_fixed = self._fixed is not None
        if self.served_fixed:
            self._k = k + 1
            self.layers_run = 0
            return self._fixed.clone()
        y = self._encode_chunk(k, self._start if k >= 1 else 0)
        if k >= 1:  # chunk 0 has the image in it: its state cannot be a fixed point of zero-frame chunks
            self._queue_check(y)
        return y

    def _queue_check(self, y: torch.Tensor) -> None:
        """Compare the cache this chunk left with the last one, slot by slot, without a host sync."""
        skipped = self._slots[self._start - 1][1] if self._start else 0
        state = _snapshot(self.vae._enc_feat_map, skipped)
        prev, self._prev_state = self._prev_state, state
        if prev is None:
            return
        same = _same_slots(state, prev)
        if same.device.type == "cuda":
            host = torch.empty(same.shape, dtype=same.dtype, pin_memory=True)
            host.copy_(same, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._check = (host, done, y)
        else:
            self._check = (same, None, y)

    def _resolve_check(self) -> None:
        """Read the last comparison: move the start layer past every layer whose slots did not change."""
        if self._check is None:
            return
        same, done, y = self._check
        self._check = None
        if done is not None:
            done.synchronize()  # queued a whole chunk of DiT work ago: in practice already done
        same = same.tolist()
        if all(same):
            self._fixed = y.clone()
            self._prev_state = None
            return
        first_changed = same.index(False)
        fixed = [i for i in self._cuts if self._slots[i][1] <= first_changed]
        self._start = max(self._start, max(fixed, default=-1) + 1)
        for i in [c for c in self._cut_out if c != self._start - 1 and c < self._start]:
            del self._cut_out[i]  # outputs of layers that no chunk starts after any more

    def _encode_chunk(self, k: int, start: int = 0) -> torch.Tensor:
        n = pixel_frames_for_chunk(k)
        t = VAE_STRIDE[0]
        if start > 0:  # the first layers are at their fixed point: their saved outputs stand in for the frames
            groups = [None] * (n // t)
        else:
            clip = torch.zeros(1, 3, n, self._h, self._w, dtype=self._svae.dtype, device=self._svae.device)
            if k == 0:
                clip[0, :, 0] = self._image
                # latent frame 0 <- pixel frame 0 alone, then groups of 4
                groups = [clip[:, :, :1], *(clip[:, :, 1 + t * i : 1 + t * (i + 1)] for i in range((n - 1) // t))]
            else:
                groups = [clip[:, :, t * i : t * (i + 1)] for i in range(n // t)]
        if k == 0:  # diffusers' first call: frame 0 alone, with the cache still empty
            out = torch.cat([self._run_encoder(groups[:1]), self._run_encoder(groups[1:])], 2)
        else:
            out = self._run_encoder(groups, start, keep_cuts=True)
        self.layers_run = self.num_layers - start
        moments = self.vae.quant_conv(out)
        mu = moments[:, :VAE_Z_DIM]  # DiagonalGaussianDistribution.mean = first half of the channels
        lat = self._svae.normalize(mu[0])
        mask = torch.zeros(MASK_CHANNELS, *lat.shape[1:], dtype=lat.dtype, device=lat.device)
        if k == 0:
            mask[:, 0] = 1.0  # official msk: latent frame 0 (the given image) is known
        self._k = k + 1
        return torch.cat([mask, lat], 0)


def encoder_layer_count(encoder) -> int:
    """Top-level layers of a WanEncoder3d as the stream runs them: conv_in, each down block, the mid block, the head."""
    return len(encoder.down_blocks) + 3


_SKIPPED = object()  # a snapshot slot no longer compared (its layer is already at its fixed point)


def _snapshot(feat_map: list, skip: int = 0) -> list:
    """A copy of the cache; the first `skip` slots (layers at their fixed point, no longer run) are left out."""
    return [_SKIPPED if i < skip else x.clone() if isinstance(x, torch.Tensor) else x for i, x in enumerate(feat_map)]


def _same_slots(a: list, b: list) -> torch.Tensor:
    """Per cache slot: equal bit for bit (tensors), or the same None / diffusers "Rep" marker. One bool tensor on
    the cache's device, computed there, so the caller decides when to wait for it. Skipped slots count as equal."""
    flags = []
    device = next((x.device for x in a if isinstance(x, torch.Tensor)), torch.device("cpu"))
    for x, y in zip(a, b):
        if x is _SKIPPED or y is _SKIPPED:
            flags.append(torch.ones((), dtype=torch.bool, device=device))
        elif isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            same = x.shape == y.shape and x.dtype == y.dtype
            flags.append((x == y).all() if same else torch.zeros((), dtype=torch.bool, device=device))
        else:
            plain = not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and x == y
            flags.append(torch.full((), plain, dtype=torch.bool, device=device))
    if len(a) != len(b):
        flags.append(torch.zeros((), dtype=torch.bool, device=device))
    return torch.stack(flags)
