"""Wan2.1 VAE glue: latent normalisation, streamed condition encode and streamed decode.

Both directions drive `diffusers.AutoencoderKLWan`'s encoder/decoder with its causal feature cache exactly the way
its own `_encode` / `_decode` loops do (encoder: frame 0 alone, then groups of 4 pixel frames, in
worker/models/condition_stream.py; decoder: one latent frame at a time, `first_chunk=True` only for latent frame
0). Because we make the same per-call invocations, in the same order, on the same cache, a streamed run
reproduces the one-shot result: the decode bit for bit (tested with
torch.equal), the encode up to the 1x1x1 `quant_conv`, which diffusers applies to the whole clip at once and we apply
per chunk (a pointwise conv; equal bit for bit in practice: checked on CPU fp32 and on an H200 in fp32 and bf16 with
the full-size VAE at 480x832, both directions torch.equal).

The cache lives in the wrapped model's `_feat_map` / `_enc_feat_map` lists (`clear_cache()` resets them); a
StreamingVAE owns one model, so only one streamed encode and one streamed decode may be in flight at a time.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    WanCausalConv3d,
    WanDecoder3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
    WanUpsample,
)

from worker.config import MASK_CHANNELS, VAE_Z_DIM, pixel_frames_for_chunk
from worker.models import frame_pairs
from worker.models.causal_conv import causal_conv3d, conv_behind_cache
from worker.models.condition_stream import ConditionStream, encoder_layer_count
from worker.models.fused import (
    conv_bias_residual,
    conv_bias_residual_from_pairs,
    conv_bias_rms_norm,
    conv_bias_rms_norm_pairs,
    wan_rms_norm,
    wan_rms_norm_to_pairs,
)
from worker.models.vae_rows import activation_format, decode_rows

# Latent channels of the DiT's condition y: 4 mask channels then the 16-channel image latent.
CONDITION_CHANNELS = MASK_CHANNELS + VAE_Z_DIM


def build_vae(
    preset_vae_kwargs: dict, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0
) -> AutoencoderKLWan:
    """Random-init AutoencoderKLWan (for tiny presets / tests). Seeded so every rank and every test gets the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**preset_vae_kwargs)
    # nn.Module.to: AutoencoderKLWan keeps no module in fp32, so ModelMixin's cast warning does not apply.
    torch.nn.Module.to(vae, device=device, dtype=dtype)
    return vae.eval().requires_grad_(False)


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKLWan:
    """Load `folder/vae` (diffusers layout) from local files only."""
    vae = AutoencoderKLWan.from_pretrained(Path(folder) / "vae", torch_dtype=dtype, local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


class StreamingVAE:
    """Wraps an AutoencoderKLWan: normalised latents in/out, chunk-wise causal encode of the condition and decode.

    Normalisation follows the official Wan2_1_VAE: z = (mu - mean) * (1/std), x = z / (1/std) + mean, using the posterior
    mean (no sampling). Tensors are unbatched ([C, T, H, W]) at this API; a batch dim of 1 is added internally.
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae.eval().requires_grad_(False)
        p = next(vae.parameters())
        self.dtype, self.device = p.dtype, p.device
        if self.device.type == "cuda":
            _conv3d_weights_channels_last(vae)
            if os.environ.get("LINGBOT_VAE_FUSED_NORM", "1") != "0":
                _fuse_norm_passes(vae)
                if os.environ.get("LINGBOT_VAE_PAIRS", "1") != "0":
                    _paired_residual_blocks(vae)
            if os.environ.get("LINGBOT_VAE_CONV_PAD", "1") != "0":
                _pad_inside_convs(vae)
            _upsample_in_own_dtype(vae)
            if os.environ.get("LINGBOT_VAE_SUBPIXEL", "1") != "0":
                _subpixel_upsamplers(vae)
            if os.environ.get("LINGBOT_VAE_TIME_LAYOUT", "1") != "0":
                _time_upsamplers_in_layout(vae)
        z = vae.config.z_dim
        if z != VAE_Z_DIM:
            raise ValueError(f"VAE z_dim {z} != {VAE_Z_DIM} (the DiT's latent space)")
        # fp32 stats; the reciprocal is taken once like the official `scale = [mean, 1.0 / std]`.
        self._mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32, device=self.device).view(z, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32, device=self.device).view(z, 1, 1, 1)
        self._cond: ConditionStream | None = None  # the job's condition encode, None = not started
        self._dec_chunk: int | None = None
        # The output rows [a, b) this instance decodes (worker/models/vae_rows.py: with the decode split in bands,
        # every rank decodes its own); None: whole frames. Set per job by Engine.decoder.
        self.rows: tuple[int, int] | None = None
        self.reset()

    # ---- state ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop all streaming state (call between jobs; also safe after an exception mid-stream)."""
        self.vae.clear_cache()
        self._cond = None
        self._dec_chunk = None

    # ---- normalisation ------------------------------------------------------------------------------------
    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """[16, T, h, w] posterior mean -> DiT latent (fp32)."""
        return (mu.float() - self._mean) * self._inv_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """DiT latent -> VAE latent, in the VAE's dtype."""
        return (z.float() / self._inv_std + self._mean).to(self.dtype)

    # ---- condition encode ---------------------------------------------------------------------------------
    def start_condition(self, image: torch.Tensor) -> None:
        """Begin a streamed encode of the clip [image, 0, 0, ...] (worker/models/condition_stream.py).

        image: [3, H, W] in [-1, 1], H and W multiples of 8 (already resized to the output size).
        """
        self._cond = ConditionStream(self, image)

    @torch.no_grad()
    def next_condition_chunk(self) -> torch.Tensor:
        """Next 3 latent frames of y = cat(mask[4], normalised latent[16]) -> [20, 3, H/8, W/8] fp32
        (ConditionStream.next: the encoder layers at their fixed point are skipped)."""
        if self._cond is None:
            raise RuntimeError("next_condition_chunk() before start_condition()")
        return self._cond.next()

    @property
    def condition_at_fixed_point(self) -> bool:
        """True when the last condition chunk was served from the fixed point (the encoder did not run for it)."""
        return self._cond is not None and self._cond.served_fixed

    @property
    def condition_layers_run(self) -> tuple[int, int]:
        """(encoder layers the last condition chunk ran, layers in all): less than all once its first layers
        reached their fixed point, 0 when the chunk was served from the whole encoder's fixed point."""
        if self._cond is not None:
            return self._cond.layers_run, self._cond.num_layers
        return 0, encoder_layer_count(self.vae.encoder)

    @torch.no_grad()
    def encode_condition(self, image: torch.Tensor, num_chunks: int) -> torch.Tensor:
        """One-shot reference (official semantics): diffusers' own encode of the whole clip -> [20, 3*num_chunks, h, w]."""
        f = sum(pixel_frames_for_chunk(i) for i in range(num_chunks))
        clip = torch.zeros(1, 3, f, *image.shape[1:], dtype=self.dtype, device=self.device)
        clip[0, :, 0] = image.to(device=self.device, dtype=self.dtype)
        mu = self.vae.encode(clip).latent_dist.mean
        lat = self.normalize(mu[0])
        mask = torch.zeros(MASK_CHANNELS, *lat.shape[1:], dtype=lat.dtype, device=lat.device)
        mask[:, 0] = 1.0
        return torch.cat([mask, lat], 0)

    # ---- decode ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def start_decode(self) -> None:
        self.vae._conv_num = self.vae._cached_conv_counts["decoder"]
        self.vae._feat_map = [None] * self.vae._conv_num
        self._dec_chunk = 0

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [16, T, h, w] (T = 3 per chunk) -> pixels [3, T', H, W] in [-1, 1], in the VAE dtype
        (only rows a..b-1 of H when self.rows is (a, b)).

        T' = 1 + 4 (T - 1) for the first chunk of a stream, 4 T afterwards.
        """
        if self._dec_chunk is None:
            raise RuntimeError("decode_chunk() before start_decode()")
        x = self.vae.post_quant_conv(self.denormalize(latents)[None])
        outs = []
        for i in range(x.shape[2]):
            # Same call as diffusers' _decode loop (decode_rows: its decoder forward, on a band of rows or all of
            # them); `first_chunk` only for the very first latent frame of the stream.
            self.vae._conv_idx = [0]
            first = self._dec_chunk == 0 and i == 0
            outs.append(decode_rows(self.vae.decoder, x[:, :, i : i + 1], self.rows, self.vae._feat_map,
                                    self.vae._conv_idx, first_chunk=first))
        self._dec_chunk += 1
        return torch.clamp(torch.cat(outs, 2), min=-1.0, max=1.0)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """One-shot reference: diffusers' own decode of normalised latents [16, T, h, w] -> [3, F, H, W]."""
        out = self.vae.decode(self.denormalize(latents)[None]).sample[0]
        self.vae.clear_cache()
        return out


def _conv3d_weights_channels_last(vae: AutoencoderKLWan) -> None:
    """Every Conv3d weight in NDHWC: cuDNN's implicit-GEMM conv3d is faster on them, 273 -> 226 ms per 12-frame
    chunk at 832x480 on an H200 (docs/PERFORMANCE.md v1), and its outputs are NDHWC too. The same modules serve
    the streamed and the one-shot decode, so they still match."""
    for m in vae.modules():
        if isinstance(m, torch.nn.Conv3d):
            m.weight.data = m.weight.data.to(memory_format=torch.channels_last_3d)


def _fuse_norm_passes(vae: AutoencoderKLWan) -> None:
    """Both norm fusions, in the one order that works: the residual blocks are recognised by their SiLU, which
    _fuse_rms_norms then removes from the modules the blocks no longer own."""
    _fuse_residual_blocks(vae)
    _fuse_rms_norms(vae)


def _fuse_rms_norms(vae: AutoencoderKLWan) -> None:
    """Route every channel-first WanRMS_norm through one fused kernel (worker.models.fused.wan_rms_norm).

    In the residual blocks and the decoder's head the norm is always followed by the module's SiLU, so there the
    SiLU moves into the norm's kernel and the module's own becomes the identity: one pass over the activation
    instead of two."""
    for m in vae.modules():
        if isinstance(m.forward, functools.partial):  # a block _fuse_residual_blocks owns keeps its SiLU module
            continue
        if isinstance(m, (WanResidualBlock, WanDecoder3d)) and isinstance(m.nonlinearity, torch.nn.SiLU):
            norms = (m.norm1, m.norm2) if isinstance(m, WanResidualBlock) else (m.norm_out,)
            for norm in norms:
                norm.forward = functools.partial(_fused_rms_forward, norm, True)
            m.nonlinearity = torch.nn.Identity()
            if isinstance(m, WanDecoder3d):  # the streamed decode's head (vae_rows.decode_rows)
                m.fused_head = functools.partial(_fused_head_forward, m)
    for m in vae.modules():
        if isinstance(m, WanRMS_norm) and m.channel_first and not isinstance(m.forward, functools.partial):
            m.forward = functools.partial(_fused_rms_forward, m, False)


def _fused_rms_forward(m: WanRMS_norm, silu: bool, x: torch.Tensor) -> torch.Tensor:
    return wan_rms_norm(x, m.gamma, m.scale, m.bias, silu)


def _fused_head_forward(m: WanDecoder3d, x: torch.Tensor, feat_cache: list, feat_idx: list[int]) -> torch.Tensor:
    """The decoder's head as diffusers runs it (norm_out, SiLU, conv_out behind its cache), the fused norm + SiLU
    writing behind conv_out's cached frames (causal_conv.conv_behind_cache)."""
    n = m.norm_out
    return conv_behind_cache(m.conv_out, wan_rms_norm, x, n.gamma, n.scale, n.bias, True, feat_cache=feat_cache,
                             feat_idx=feat_idx, bias=True)


def _pad_inside_convs(vae: AutoencoderKLWan) -> None:
    """Let cuDNN zero-pad H and W inside every causal conv instead of materialising a padded copy with F.pad.

    diffusers' WanCausalConv3d concatenates the cached frames in front (time) and then F.pads all three axes,
    which writes a full copy of every conv's input; only the time axis needs the concatenation. Same zeros,
    same products: only the order cuDNN sums them in may differ."""
    for m in vae.modules():
        if isinstance(m, WanCausalConv3d):
            m.forward = functools.partial(causal_conv3d, m)


def _upsample_in_own_dtype(vae: AutoencoderKLWan) -> None:
    """Nearest-exact upsampling in the activation's dtype, not via fp32 like diffusers' WanUpsample.

    Nearest sampling only picks input values, so the result is the same bits either way; the fp32 round trip
    (cast up, upsample 4x the bytes, cast back) was 5x the memory traffic of the upsample itself, at the
    decoder's largest resolutions."""
    for m in vae.modules():
        if isinstance(m, WanUpsample):
            m.forward = functools.partial(torch.nn.Upsample.forward, m)


def _subpixel_upsamplers(vae: AutoencoderKLWan) -> None:
    """Each decoder upsampler's "nearest 2x, then 3x3 conv" as one 3x3 conv on the low-resolution input with four
    times the output channels, one set per output phase (row parity a, column parity b), then one interleaving copy.

    After nearest upsampling, output row 2i + a of the conv sees input rows i - 1 + a and i + a only (a = 0: the
    kernel's top row alone on row i - 1, its two lower rows summed on row i; a = 1: the upper two summed on row i,
    the bottom row on row i + 1), and likewise the columns: each phase is a 2x2 conv with summed weights, laid into
    a 3x3 kernel. Same products per output pixel, but the conv runs on a quarter of the pixels with four times the
    outputs (96 -> 384 at the last stage: cuDNN has no Hopper kernel for 96 output channels, docs/PERFORMANCE.md
    v21), and the 4x upsampled activation is never written (1 x H100: 0.4-5.7 ms off a 156 ms decode, v27b). The weights are summed in fp32 once, here; at bf16 their sums are
    rounded once where the upsampled conv rounded each product, so frames differ at the bf16 level (in fp32 by
    ~1e-6). The module keeps its weights and structure (state_dict, band cost model)."""
    for m in vae.modules():
        if isinstance(m, WanResample) and m.mode in ("upsample2d", "upsample3d"):
            conv = m.resample[1]
            if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1):
                continue
            weight, bias = _subpixel_weights(conv.weight, conv.bias)
            m.resample.forward = functools.partial(_subpixel_forward, weight, bias)


# Rows (and columns) of the 3x3 kernel applied to the low-resolution input for output parity a, from the rows of the
# original kernel applied after upsampling: _PHASE[a][new][old].
_PHASE = torch.tensor([[[1, 0, 0], [0, 1, 1], [0, 0, 0]],
                       [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], dtype=torch.float32)


def _subpixel_weights(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[C, Cin, 3, 3] -> [4C, Cin, 3, 3], output channel 4c + 2a + b for channel c at row parity a, column parity b."""
    r = _PHASE.to(weight.device)
    w = torch.einsum("aky,ciyx,blx->cabikl", r, weight.float(), r)
    w = w.reshape(-1, *weight.shape[1:]).to(weight.dtype)
    return w, None if bias is None else bias.repeat_interleave(4)


def _subpixel_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    y = torch.nn.functional.conv2d(x, weight, bias, padding=1)  # [N, 4C, h, w]
    n, c4, h, w = y.shape
    fmt = torch.channels_last if y.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((n, c4 // 4, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=fmt)
    out.unflatten(3, (w, 2)).unflatten(2, (h, 2)).copy_(y.unflatten(1, (c4 // 4, 2, 2)).permute(0, 1, 4, 2, 5, 3))
    return out


def _time_upsamplers_in_layout(vae: AutoencoderKLWan) -> None:
    """Each temporal upsampler's frame interleave as one copy in the activation's own memory format.

    diffusers' WanResample ("upsample3d") interleaves the time conv's two channel halves into twice the frames with
    torch.stack, which writes a channels-first tensor even when the activation is channels-last (NDHWC, as on CUDA,
    where the conv weights are); its [b*t, c, h, w] frames for the 2D resample (a second copy, or a view the conv
    copies) are then not channels-last either, and the next residual block's norms, cache and convs run on
    channels-first tensors that cuDNN converts back. Here the interleave writes straight into a tensor of the time
    conv's output format, so those frames are a channels-last view and stay channels-last through the 2D resample
    (whatever it is patched to) and after it. The same calls on the same cache entries and the same values, up to
    the order of the convs' sums where cuDNN picks another kernel for the other layout (bit for bit in the CPU tests).
    A call that only passes one frame through (the streamed decode's first) keeps diffusers' views, whose size-1
    time dims get strides that PyTorch (and so cuDNN) reads as channels-first: once per stream. On 2 x H200 a rank's
    band of a chunk went 84 -> 81 ms (docs/PERFORMANCE.md v28b)."""
    for m in vae.modules():
        if isinstance(m, WanResample) and m.mode == "upsample3d":
            m.forward = functools.partial(_upsample3d_in_layout, m)


def _upsample3d_in_layout(
    m: WanResample, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] | None = None
) -> torch.Tensor:
    # diffusers' WanResample.forward for "upsample3d" step for step: the stream's first call ("Rep") and calls
    # without a cache let the frames through; every later one runs the time conv behind the cached frames and keeps
    # the input's last CACHE_T frames (behind the previous cache's last frame, or a zero frame after "Rep", when
    # shorter). Only the interleave's copy is ours.
    b, c, t, h, w = x.shape
    if feat_cache is not None:
        idx = feat_idx[0]
        prev = feat_cache[idx]
        if prev is None:
            feat_cache[idx] = "Rep"
        else:
            rep = isinstance(prev, str)  # "Rep": no frames before this call's
            cache_x = x[:, :, -CACHE_T:].clone()
            if cache_x.shape[2] < CACHE_T:
                front = torch.zeros_like(cache_x) if rep else prev[:, :, -1:].to(cache_x.device)
                cache_x = torch.cat([front, cache_x], dim=2)
            y = m.time_conv(x) if rep else m.time_conv(x, prev)
            x = frame_pairs.from_pairs(y, activation_format(y))  # its two channel halves are two frames
            feat_cache[idx] = cache_x
        feat_idx[0] += 1
    t = x.shape[2]
    x = m.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # a view of a channels-last x
    return x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def _fuse_residual_blocks(vae: AutoencoderKLWan) -> None:
    """Own the forward of every WanResidualBlock (with diffusers' SiLU) so its convs' biases cost no pass of their own.

    PyTorch's cuDNN path runs a conv without bias and then adds the bias in a separate in-place pass over the
    whole output (16 of the 171 ms of GPU time of a decode chunk on an H100, over all convs, most of it over these
    ones). Here both 3x3x3 convs run without bias: conv1's bias is added inside the norm2+SiLU kernel, conv2's in
    one "conv2 + bias + shortcut" kernel, which also replaces the block's residual add. Same sums in the same order
    as cuDNN's path: (conv + bias), then the rest; CPU convs start their sums from the bias instead, so there this
    is not bit for bit diffusers (tests/test_vae.py compares the two under cuDNN's order).
    The convs pad inside cuDNN (causal_conv3d) whatever LINGBOT_VAE_CONV_PAD says. Runs before _fuse_rms_norms
    (_fuse_norm_passes), which then leaves these blocks' SiLU as it is (their norm1/norm2 are no longer called)."""
    for m in vae.modules():
        if isinstance(m, WanResidualBlock) and isinstance(m.nonlinearity, torch.nn.SiLU):
            m.forward = functools.partial(_fused_residual_forward, m)


def _fused_residual_forward(
    m: WanResidualBlock, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] | None = None
) -> torch.Tensor:
    # diffusers' WanResidualBlock.forward step for step; only where the convs' biases are added changes (and
    # which cache copies are made: conv_behind_cache). No dropout: the VAE only runs in eval mode here.
    h = m.conv_shortcut(x)  # 1x1x1 conv (keeps its bias) or the identity
    x = conv_behind_cache(m.conv1, wan_rms_norm, x, m.norm1.gamma, m.norm1.scale, m.norm1.bias, True,
                          feat_cache=feat_cache, feat_idx=feat_idx)
    x = conv_behind_cache(m.conv2, conv_bias_rms_norm, x, m.conv1.bias, m.norm2.gamma, m.norm2.scale, m.norm2.bias,
                          True, feat_cache=feat_cache, feat_idx=feat_idx)
    return conv_bias_residual(x, m.conv2.bias, h)


# cuDNN has Hopper conv kernels for the decoder's 128 (padded), 192 and 384 output channels, not for its 96
# (docs/PERFORMANCE.md v21, v29b): blocks below this width run their convs on frame pairs.
PAIRED_BELOW = 128


def _paired_residual_blocks(vae: AutoencoderKLWan) -> None:
    """The decoder's residual blocks of fewer than PAIRED_BELOW channels run their two 3x3x3 convs on frame pairs
    (worker/models/frame_pairs.py): at 832x480 the last stage's six convs per latent frame, the largest part of a
    decode. Their norms write the pairs and the residual add reads them back, in the kernels they already were
    (worker.models.fused). Calls with an odd frame count (the stream's first latent frame) run the blocks as
    before. Same products as the unpaired convs, in sums of another order. Runs after _fuse_residual_blocks,
    whose forward is the odd-count path; the encoder is left as it is."""
    for m in vae.decoder.modules():
        if isinstance(m, WanResidualBlock) and isinstance(m.forward, functools.partial) and m.out_dim < PAIRED_BELOW:
            weights = (frame_pairs.pair_weight(m.conv1.weight), frame_pairs.pair_weight(m.conv2.weight))
            m.forward = functools.partial(_paired_residual_forward, m, weights)


def _paired_residual_forward(
    m: WanResidualBlock, weights: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
    feat_cache: list | None = None, feat_idx: list[int] | None = None,
) -> torch.Tensor:
    if feat_cache is None or x.shape[2] % 2:
        if feat_cache is not None:
            frame_pairs.unpair_caches(feat_cache, feat_idx[0], (m.conv1.in_channels, m.conv2.in_channels))
        return _fused_residual_forward(m, x, feat_cache, feat_idx)
    h = m.conv_shortcut(x)
    a = frame_pairs.paired_conv_behind_cache(m.conv1, weights[0], wan_rms_norm_to_pairs, x, m.norm1.gamma,
                                             m.norm1.scale, m.norm1.bias, True, feat_cache=feat_cache,
                                             feat_idx=feat_idx)
    a = frame_pairs.paired_conv_behind_cache(m.conv2, weights[1], conv_bias_rms_norm_pairs, a, m.conv1.bias,
                                             m.norm2.gamma, m.norm2.scale, m.norm2.bias, True,
                                             feat_cache=feat_cache, feat_idx=feat_idx)
    return conv_bias_residual_from_pairs(a, m.conv2.bias, h)


__all__ = ["StreamingVAE", "build_vae", "load_vae", "CONDITION_CHANNELS"]
