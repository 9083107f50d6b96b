"""The tiny random VAE with the decoder patches StreamingVAE installs on CUDA, installed on the CPU for tests."""

from __future__ import annotations

import torch

from worker.config import PRESETS
from worker.models import vae as vae_mod
from worker.models.vae import StreamingVAE, build_vae


def patched_tiny_vae(paired: bool, dtype: torch.dtype) -> StreamingVAE:
    """Channels-last conv weights, the fused norms and residual blocks, padding inside the convs; with `paired`
    the residual blocks on frame pairs (all of the tiny decoder's: 8 channels)."""
    m = build_vae(PRESETS["tiny"].vae, dtype, "cpu", seed=0)
    vae_mod._conv3d_weights_channels_last(m)
    vae_mod._fuse_norm_passes(m)
    vae_mod._pad_inside_convs(m)
    if paired:
        vae_mod._paired_residual_blocks(m)
    return StreamingVAE(m)
