"""Streaming Wan VAE: streamed condition encode / decode vs diffusers' one-shot calls, on the tiny random VAE."""

from __future__ import annotations

import pytest
import torch

from worker.config import CHUNK_LATENT_FRAMES, MASK_CHANNELS, PRESETS, VAE_STRIDE, VAE_Z_DIM, pixel_frames_for_chunk
from worker.models.vae import CONDITION_CHANNELS, StreamingVAE, build_vae, load_vae

H, W = 48, 64  # pixels; latent 6x8
NUM_CHUNKS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def svae() -> StreamingVAE:
    return StreamingVAE(build_vae(PRESETS["tiny"].vae, torch.float32, "cpu", seed=0))


def _image(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, H, W, generator=g) * 2 - 1


def _latents(seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VAE_Z_DIM, CHUNK_LATENT_FRAMES * NUM_CHUNKS, H // VAE_STRIDE[1], W // VAE_STRIDE[2], generator=g)


def test_streamed_condition_equals_one_shot_encode(svae: StreamingVAE) -> None:
    img = _image()
    ref = svae.encode_condition(img, NUM_CHUNKS)  # diffusers' own encode over the whole [image, 0...] clip
    svae.start_condition(img)
    chunks = [svae.next_condition_chunk() for _ in range(NUM_CHUNKS)]
    for c in chunks:
        assert c.shape == (CONDITION_CHANNELS, CHUNK_LATENT_FRAMES, H // 8, W // 8)
    streamed = torch.cat(chunks, 1)
    # Only quant_conv (1x1x1) runs on a different frame count; pointwise, so equal on CPU in practice.
    torch.testing.assert_close(streamed, ref, rtol=0, atol=1e-6)


def _streamed_condition(svae: StreamingVAE, img: torch.Tensor, n: int) -> tuple[list, list[int]]:
    svae.start_condition(img)
    chunks, layers_run = [], []
    for _ in range(n):
        chunks.append(svae.next_condition_chunk())
        layers_run.append(svae.condition_layers_run[0])
        assert svae.condition_at_fixed_point == (layers_run[-1] == 0)
    return chunks, layers_run


def test_condition_encode_skips_the_layers_at_their_fixed_point(svae: StreamingVAE) -> None:
    """Past the encoder's receptive field the zero-frame chunks repeat, the first layers first: those layers are
    skipped, then the whole encoder, and every chunk still equals diffusers' one-shot encode of the whole clip."""
    n = 12
    img = _image(5)
    ref = svae.encode_condition(img, n)
    chunks, layers_run = _streamed_condition(svae, img, n)
    total = svae.condition_layers_run[1]
    torch.testing.assert_close(torch.cat(chunks, 1), ref, rtol=0, atol=1e-6)
    assert layers_run[:3] == [total] * 3, layers_run  # chunk 2 is the first that can be compared with one
    assert layers_run == sorted(layers_run, reverse=True), layers_run  # a layer once skipped stays skipped
    assert any(0 < r < total for r in layers_run), layers_run  # the first layers went before the whole encoder
    frozen_from = layers_run.index(0)  # first chunk served from the whole encoder's fixed point
    assert 3 <= frozen_from < n, layers_run
    # the chunks just before the freeze still differed: the image's influence had to die out first
    assert not torch.equal(chunks[1], chunks[frozen_from])
    # a new job starts from scratch: the image is encoded again, not served from the old fixed point
    svae.start_condition(_image(6))
    assert not torch.equal(svae.next_condition_chunk(), chunks[0])
    assert svae.condition_layers_run == (total, total)


def test_condition_encode_skips_only_what_the_comparison_proves(svae: StreamingVAE, monkeypatch) -> None:
    """The reference comparison above can fail: a comparison that calls every cache slot unchanged from the
    first check on makes later chunks come out wrong."""
    import worker.models.condition_stream as condition_stream

    n = 8
    img = _image(5)
    ref = svae.encode_condition(img, n)
    monkeypatch.setattr(condition_stream, "_same_slots", lambda a, b: torch.ones(len(a), dtype=torch.bool))
    chunks, layers_run = _streamed_condition(svae, img, n)
    assert layers_run[3:] == [0] * (n - 3), layers_run
    assert not torch.allclose(torch.cat(chunks, 1), ref, rtol=0, atol=1e-6)


def test_condition_mask_and_normalisation(svae: StreamingVAE) -> None:
    img = _image(3)
    svae.start_condition(img)
    c0, c1 = svae.next_condition_chunk(), svae.next_condition_chunk()
    mask0, mask1 = c0[:MASK_CHANNELS], c1[:MASK_CHANNELS]
    assert torch.equal(mask0[:, 0], torch.ones_like(mask0[:, 0]))
    assert not mask0[:, 1:].any() and not mask1.any()
    # latent = (posterior mean - latents_mean) / latents_std, per channel; frame 0 sees only the image.
    cfg = svae.vae.config
    mu = svae.vae.encode(img[None, :, None]).latent_dist.mean[0]
    mean = torch.tensor(cfg.latents_mean).view(-1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(-1, 1, 1, 1)
    torch.testing.assert_close(c0[MASK_CHANNELS:, :1], (mu - mean) / std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(svae.denormalize(svae.normalize(mu)), mu, rtol=1e-6, atol=1e-6)


def test_streamed_decode_bit_identical(svae: StreamingVAE) -> None:
    z = _latents()
    ref = svae.decode(z)
    svae.start_decode()
    outs = []
    for k in range(NUM_CHUNKS):
        o = svae.decode_chunk(z[:, k * CHUNK_LATENT_FRAMES : (k + 1) * CHUNK_LATENT_FRAMES])
        assert o.shape == (3, pixel_frames_for_chunk(k), H, W)
        outs.append(o)
    streamed = torch.cat(outs, 1)
    assert streamed.shape == ref.shape
    assert torch.equal(streamed, ref)
    assert streamed.min() >= -1 and streamed.max() <= 1


def test_no_state_leaks_between_jobs(svae: StreamingVAE) -> None:
    z1, z2 = _latents(5), _latents(6)
    ref2 = svae.decode(z2)
    # Job 1 abandoned mid-stream (both directions), then reset.
    svae.start_decode()
    svae.decode_chunk(z1[:, :3])
    svae.start_condition(_image(7))
    svae.next_condition_chunk()
    svae.reset()
    with pytest.raises(RuntimeError):
        svae.decode_chunk(z2[:, :3])
    svae.start_decode()
    out = torch.cat([svae.decode_chunk(z2[:, 3 * k : 3 * k + 3]) for k in range(NUM_CHUNKS)], 1)
    assert torch.equal(out, ref2)
    img = _image(8)
    ref_c = svae.encode_condition(img, 2)
    svae.start_condition(img)
    torch.testing.assert_close(torch.cat([svae.next_condition_chunk() for _ in range(2)], 1), ref_c, rtol=0, atol=1e-6)


def test_bf16_streamed_decode_bit_identical() -> None:
    v = StreamingVAE(build_vae(PRESETS["tiny"].vae, torch.bfloat16, "cpu", seed=0))
    z = _latents(9)[:, :6]
    ref = v.decode(z)
    v.start_decode()
    out = torch.cat([v.decode_chunk(z[:, :3]), v.decode_chunk(z[:, 3:])], 1)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)


def test_build_is_seeded_and_load_roundtrip(tmp_path, svae: StreamingVAE) -> None:
    again = build_vae(PRESETS["tiny"].vae, torch.float32, "cpu", seed=0)
    for (n, a), b in zip(svae.vae.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    svae.vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path, torch.float32, "cpu")
    sd = svae.vae.state_dict()
    for n, t in loaded.state_dict().items():
        assert torch.equal(t, sd[n]), n


def test_bad_image_size(svae: StreamingVAE) -> None:
    with pytest.raises(ValueError):
        svae.start_condition(torch.zeros(3, 50, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("images", [False, True])
def test_fused_rms_norm_math_is_diffusers_rms_norm(dtype: torch.dtype, images: bool) -> None:
    """The chain that CUDA compiles into one kernel is, run eagerly, bit for bit diffusers' WanRMS_norm."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    from worker.models.fused import wan_rms_norm

    g = torch.Generator().manual_seed(7)
    m = WanRMS_norm(24, images=images).to(dtype)
    with torch.no_grad():
        m.gamma.copy_(torch.randn(m.gamma.shape, generator=g))
    x = torch.randn((3, 24, 5, 7) if images else (1, 24, 3, 5, 7), generator=g).to(dtype)
    assert torch.equal(wan_rms_norm(x, m.gamma, m.scale, m.bias), m(x))


def _plain_and_patched(dtype: torch.dtype, *patches) -> tuple[StreamingVAE, StreamingVAE]:
    """The tiny VAE twice from the same seed: as diffusers builds it, and with `patches` (vae.py's CUDA patches)
    applied in the order StreamingVAE applies them on CUDA."""
    plain = StreamingVAE(build_vae(PRESETS["tiny"].vae, dtype, "cpu", seed=0))
    patched_model = build_vae(PRESETS["tiny"].vae, dtype, "cpu", seed=0)
    for patch in patches:
        patch(patched_model)
    return plain, StreamingVAE(patched_model)


def _assert_streamed_decode_equal(plain: StreamingVAE, patched: StreamingVAE, check_patched_chunk) -> None:
    """Streamed decode over NUM_CHUNKS chunks, torch.equal chunk by chunk; check_patched_chunk(k, decode) runs each
    of the patched model's chunks (so that it can watch them)."""
    z = torch.randn(VAE_Z_DIM, 3 * NUM_CHUNKS, 8, 8, generator=torch.Generator().manual_seed(3))
    for s in (plain, patched):
        s.start_decode()
    for k in range(NUM_CHUNKS):
        part = z[:, 3 * k : 3 * k + 3]
        ref = plain.decode_chunk(part)
        out = check_patched_chunk(k, lambda: patched.decode_chunk(part))
        assert torch.equal(out, ref), k


def _assert_streamed_condition_equal(plain: StreamingVAE, patched: StreamingVAE) -> None:
    img = _image(5)
    for s in (plain, patched):
        s.start_condition(img)
    for k in range(2):
        assert torch.equal(patched.next_condition_chunk(), plain.next_condition_chunk()), k


def test_patched_decoder_equals_diffusers(monkeypatch) -> None:
    """The CUDA patches (norm+SiLU in one kernel, spatial padding inside the conv), run eagerly, leave the streamed
    decode and encode bit for bit equal to diffusers' own modules, and no conv materialises a padded copy."""
    from worker.models import vae as vae_mod

    plain, patched = _plain_and_patched(torch.float32, vae_mod._fuse_rms_norms, vae_mod._pad_inside_convs)
    assert not any(isinstance(m, torch.nn.SiLU) for m in patched.vae.decoder.modules())

    real_pad = torch.nn.functional.pad

    def counting_pads(k: int, decode):
        pads = []
        monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **kw: pads.append(1) or real_pad(*a, **kw))
        out = decode()
        monkeypatch.setattr(torch.nn.functional, "pad", real_pad)
        if k > 0:  # every causal conv has cached frames after the first chunk: nothing left to pad in time
            assert not pads, f"chunk {k}: {len(pads)} F.pad calls"
        return out

    _assert_streamed_decode_equal(plain, patched, counting_pads)
    _assert_streamed_condition_equal(plain, patched)


def _conv3d_bias_as_on_cuda(monkeypatch) -> list[bool]:
    """conv3d adds its bias the way PyTorch does on CUDA (the conv without bias, then `output.add_(bias)`); returns
    a list that gets, per call, whether the caller handed the conv its bias."""
    real_conv3d = torch.nn.functional.conv3d
    with_bias: list[bool] = []

    def conv3d(x, weight, bias=None, *args, **kwargs):
        with_bias.append(bias is not None)
        out = real_conv3d(x, weight, None, *args, **kwargs)
        return out if bias is None else out.add_(bias.view(-1, 1, 1, 1))

    monkeypatch.setattr(torch.nn.functional, "conv3d", conv3d)
    return with_bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_blocks_with_conv_bias_folded_equal_diffusers(monkeypatch, dtype: torch.dtype) -> None:
    """All the CUDA patches, with the residual blocks' convs run without bias and their biases added inside the
    kernels that follow, leave the streamed decode and encode bit for bit equal to diffusers' modules.

    Both models' conv3d add the bias the way PyTorch does on CUDA (cudnn_convolution without bias, then
    `output.add_(bias)`), the only path these patches run on: the CPU kernels start their sums from the bias
    (slow_conv3d's GEMM accumulates into a bias-filled output, oneDNN likewise), so on CPU no bias-free conv
    plus an add reproduces them bit for bit."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

    from worker.models import vae as vae_mod

    with_bias = _conv3d_bias_as_on_cuda(monkeypatch)
    plain, patched = _plain_and_patched(dtype, vae_mod._fuse_norm_passes, vae_mod._pad_inside_convs)
    blocks = [m for m in patched.vae.decoder.modules() if isinstance(m, WanResidualBlock)]
    assert any(not isinstance(m.conv_shortcut, torch.nn.Identity) for m in blocks)  # both shortcut kinds covered

    def counting_convs(k: int, decode):
        with_bias.clear()
        out = decode()
        # exactly the two 3x3x3 convs of every residual block, for each of the chunk's 3 latent frames, ran
        # without bias; every other conv (conv_in/out, time convs, 1x1x1 shortcuts) still adds its own
        assert with_bias.count(False) == 2 * len(blocks) * 3, (k, with_bias.count(False))
        assert with_bias.count(True) > 0
        return out

    _assert_streamed_decode_equal(plain, patched, counting_convs)
    _assert_streamed_condition_equal(plain, patched)


def test_upsampling_in_bf16_is_bit_identical(monkeypatch) -> None:
    """The decoder's nearest-exact upsamplers run in bf16 instead of diffusers' fp32 round trip: same bits, and no
    upsample sees an fp32 tensor any more."""
    from worker.models import vae as vae_mod

    plain, patched = _plain_and_patched(torch.bfloat16, vae_mod._upsample_in_own_dtype)
    real_interpolate = torch.nn.functional.interpolate
    dtypes: list[torch.dtype] = []

    def recording(x, *a, **kw):
        dtypes.append(x.dtype)
        return real_interpolate(x, *a, **kw)

    def watch(k: int, decode):
        dtypes.clear()
        monkeypatch.setattr(torch.nn.functional, "interpolate", recording)
        out = decode()
        monkeypatch.setattr(torch.nn.functional, "interpolate", real_interpolate)
        assert dtypes and set(dtypes) == {torch.bfloat16}, (k, dtypes)
        return out

    _assert_streamed_decode_equal(plain, patched, watch)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_subpixel_upsample_conv_is_upsample_then_conv(memory_format) -> None:
    """One upsampler's conv on the low-resolution input (four phases, interleaved) against nearest 2x + 3x3 conv,
    in the input's memory format (channels-last on CUDA); every output value written (poisoned otherwise)."""
    from worker.models import vae as vae_mod

    g = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    x = torch.randn(2, 6, 7, 9, generator=g).contiguous(memory_format=memory_format)
    want = conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
    real_empty = torch.empty

    def poisoned(*a, **kw):
        return real_empty(*a, **kw).fill_(float("nan"))

    weight, bias = vae_mod._subpixel_weights(conv.weight.detach(), conv.bias.detach())
    torch.empty = poisoned
    try:
        got = vae_mod._subpixel_forward(weight, bias, x)
    finally:
        torch.empty = real_empty
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=memory_format)
    # the phases matter: swapping two of them breaks it
    swapped = weight.view(5, 4, 6, 3, 3)[:, [1, 0, 2, 3]].reshape(20, 6, 3, 3)
    assert not torch.allclose(vae_mod._subpixel_forward(swapped, bias, x), want, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subpixel_upsamplers_decode_like_diffusers(dtype: torch.dtype) -> None:
    """All CUDA patches with the upsamplers as low-resolution convs: the streamed decode matches diffusers' modules
    to fp32 rounding (the phases' weights are summed once), at bf16 to bf16 rounding; the weights and state_dict
    are untouched."""
    from worker.models import vae as vae_mod

    patches = (vae_mod._fuse_norm_passes, vae_mod._pad_inside_convs, vae_mod._upsample_in_own_dtype)
    plain, patched = _plain_and_patched(dtype, *patches, vae_mod._subpixel_upsamplers)
    reference = _plain_and_patched(dtype, *patches)[1]  # the same patches without this one
    assert patched.vae.state_dict().keys() == reference.vae.state_dict().keys()
    z = torch.randn(VAE_Z_DIM, 3 * NUM_CHUNKS, 8, 8, generator=torch.Generator().manual_seed(3))
    for s in (plain, patched, reference):
        s.start_decode()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for k in range(NUM_CHUNKS):
        part = z[:, 3 * k : 3 * k + 3]
        ref, out, without = plain.decode_chunk(part), patched.decode_chunk(part), reference.decode_chunk(part)
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
        if dtype == torch.float32:
            assert not torch.equal(out, without)  # the patch ran
        assert out.shape == ref.shape


@pytest.mark.parametrize("bands", [[(0, 24), (24, 48)], [(0, 7), (7, 31), (31, 48)]])
def test_row_bands_with_subpixel_upsamplers(bands: list[tuple[int, int]]) -> None:
    """Bands decoded with the low-resolution upsampler convs stack to the whole frames of the same model: the band
    margins hold for them too (an output row's phase reads the same input rows the upsampled conv did)."""
    from worker.models import vae as vae_mod

    def model():
        m = build_vae(PRESETS["tiny"].vae, torch.float32, "cpu", seed=0)
        vae_mod._subpixel_upsamplers(m)
        return StreamingVAE(m)

    z = _latents(4)
    whole = model()
    whole.start_decode()
    ref = torch.cat([whole.decode_chunk(z[:, 3 * k : 3 * k + 3]) for k in range(NUM_CHUNKS)], 1)
    parts = []
    for rows in bands:
        v = model()
        v.rows = rows
        v.start_decode()
        parts.append(torch.cat([v.decode_chunk(z[:, 3 * k : 3 * k + 3]) for k in range(NUM_CHUNKS)], 1))
    torch.testing.assert_close(torch.cat(parts, 2), ref, rtol=0, atol=1e-5)


def _conv3d_layout_as_on_cuda(monkeypatch) -> None:
    """CPU conv3d returns a channels-first result whatever its operands' layout; cuDNN's is channels-last (NDHWC)
    when the weight is, as StreamingVAE makes every Conv3d weight on CUDA. Here conv3d's result is copied into
    NDHWC where the weight is: the same values, CUDA's layout."""
    real_conv3d = torch.nn.functional.conv3d

    def conv3d(x, weight, *args, **kwargs):
        out = real_conv3d(x, weight, *args, **kwargs)
        if weight.is_contiguous(memory_format=torch.channels_last_3d):
            out = out.contiguous(memory_format=torch.channels_last_3d)
        return out

    monkeypatch.setattr(torch.nn.functional, "conv3d", conv3d)


def _watch_resample(m: torch.nn.Module, seen: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Record (input, output) of m.resample, whatever its forward is by now (diffusers' or the subpixel conv)."""
    inner = m.resample.forward

    def watched(x: torch.Tensor) -> torch.Tensor:
        out = inner(x)
        seen.append((x, out))
        return out

    m.resample.forward = watched


def _upsample3d_pair(dtype: torch.dtype, channels_last: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random temporal upsampler as diffusers builds it (with NDHWC conv weights where channels_last) and a copy."""
    import copy

    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    from worker.models import vae as vae_mod

    g = torch.Generator().manual_seed(5)
    plain = WanResample(6, "upsample3d", upsample_out_dim=5)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    plain = plain.to(dtype).eval().requires_grad_(False)
    if channels_last:
        vae_mod._conv3d_weights_channels_last(plain)
    return plain, copy.deepcopy(plain)


def _in_format(x: torch.Tensor, memory_format) -> bool:
    """x has the strides of a new tensor in memory_format. Stricter than is_contiguous(memory_format), which lets
    size-1 dims have any stride: with odd ones there PyTorch (cuDNN's choice of layout included) takes a
    channels-last tensor for channels-first."""
    return x.stride() == torch.empty(x.shape, memory_format=memory_format).stride()


def _stream_upsample3d(plain, patched, batch: int, frames: tuple[int, ...], memory_format, dtype) -> list:
    """Consecutive streamed calls of both upsamplers on the same inputs (t frames each), torch.equal outputs and
    caches call by call; returns the patched outputs."""
    g = torch.Generator().manual_seed(sum(frames))
    caches: tuple[list, list] = ([None], [None])
    outs = []
    for k, t in enumerate(frames):
        x = torch.randn(batch, 6, t, 5, 7, generator=g).to(dtype).contiguous(memory_format=memory_format)
        idx = ([0], [0])
        want = plain(x, feat_cache=caches[0], feat_idx=idx[0])
        got = patched(x, feat_cache=caches[1], feat_idx=idx[1])
        assert got.shape == want.shape == (batch, 5, t if k == 0 else 2 * t, 10, 14), (k, got.shape)
        assert torch.equal(got, want), (frames, k)
        assert idx[0] == idx[1] == [1]
        if k == 0:
            assert caches[0] == caches[1] == ["Rep"]
        else:
            assert torch.equal(caches[1][0], caches[0][0]) and caches[1][0].stride() == caches[0][0].stride(), k
        outs.append(got)
    return outs


# Streamed frame counts per call: the stream's first call passes its frames through ("Rep"); one frame at a time as
# the streamed decode runs (after "Rep": a zero frame in front of the cache, then the previous cache's last frame);
# and longer calls, as one-shot decodes of other shapes would make. Batch 1 as in the decode, and 2.
_UPSAMPLE3D_STREAMS = [(b, frames) for b in (1, 2) for frames in [(1, 1, 1, 1), (1, 3, 1, 2), (3, 2, 1)]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_upsample3d_in_layout_equals_diffusers(monkeypatch, dtype: torch.dtype, memory_format) -> None:
    """The temporal upsampler with its frame interleave in the activation's memory format: bit for bit diffusers'
    forward, call by call through a stream, and with channels-last (NDHWC) activations it keeps them channels-last:
    the 2D resample reads a channels-last view and the output is NDHWC. With channels-first ones the interleave
    writes diffusers' own layout, as does a call that passes one frame through (the streamed decode's first)."""
    from worker.models import vae as vae_mod

    channels_last = memory_format == torch.channels_last_3d
    if channels_last:
        _conv3d_layout_as_on_cuda(monkeypatch)
    plain, patched = _upsample3d_pair(dtype, channels_last)
    vae_mod._time_upsamplers_in_layout(patched)
    seen: list = []
    seen_plain: list = []
    _watch_resample(patched, seen)
    _watch_resample(plain, seen_plain)
    for batch, frames in _UPSAMPLE3D_STREAMS:
        seen.clear()
        seen_plain.clear()
        outs = _stream_upsample3d(plain, patched, batch, frames, memory_format, dtype)
        for out, (x, _), (x_plain, _) in zip(outs, seen, seen_plain, strict=True):
            if channels_last and out.shape[2] > 1:
                assert _in_format(x, torch.channels_last) and _in_format(out, torch.channels_last_3d)
            else:
                assert x.stride() == x_plain.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout_first", [False, True])
def test_upsample3d_in_layout_with_subpixel_conv(monkeypatch, dtype: torch.dtype, layout_first: bool) -> None:
    """With the 2D resample also patched (the low-resolution subpixel conv), in either order: the same values as
    the subpixel conv alone on diffusers' interleave, and channels-last from the time conv to the output, the
    subpixel conv's own output included (but where one frame passes through, which keeps diffusers' views)."""
    from worker.models import vae as vae_mod

    _conv3d_layout_as_on_cuda(monkeypatch)
    plain, patched = _upsample3d_pair(dtype, True)
    vae_mod._subpixel_upsamplers(plain)
    patches = [vae_mod._time_upsamplers_in_layout, vae_mod._subpixel_upsamplers]
    for patch in patches if layout_first else patches[::-1]:
        patch(patched)
    assert patched.resample.forward.func is vae_mod._subpixel_forward
    assert patched.forward.func is vae_mod._upsample3d_in_layout
    seen: list = []
    _watch_resample(patched, seen)
    for batch, frames in _UPSAMPLE3D_STREAMS:
        seen.clear()
        outs = _stream_upsample3d(plain, patched, batch, frames, torch.channels_last_3d, dtype)
        for out, (x, y) in zip(outs, seen, strict=True):
            if out.shape[2] > 1:
                assert _in_format(x, torch.channels_last) and _in_format(y, torch.channels_last)
                assert _in_format(out, torch.channels_last_3d)


def _time_layout_pair(dtype: torch.dtype, channels_last: bool, *patches) -> tuple[StreamingVAE, StreamingVAE]:
    """_plain_and_patched with `patches` on both models and the time layout patch on the second, and with
    channels_last, both models' Conv3d weights in NDHWC as StreamingVAE makes them on CUDA."""
    from worker.models import vae as vae_mod

    plain = build_vae(PRESETS["tiny"].vae, dtype, "cpu", seed=0)
    patched = build_vae(PRESETS["tiny"].vae, dtype, "cpu", seed=0)
    for model in (plain, patched):
        if channels_last:
            vae_mod._conv3d_weights_channels_last(model)
        for patch in patches:
            patch(model)
    vae_mod._time_upsamplers_in_layout(patched)
    return StreamingVAE(plain), StreamingVAE(patched)


def _count_interleaves(monkeypatch, seen: list) -> None:
    from worker.models import frame_pairs

    real = frame_pairs.from_pairs
    monkeypatch.setattr(frame_pairs, "from_pairs", lambda y, *fmt: seen.append(y) or real(y, *fmt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_time_layout_streamed_decode_equals_diffusers(monkeypatch, dtype: torch.dtype, channels_last: bool) -> None:
    """A streamed decode over three chunks with the temporal upsamplers' interleave in the activation's layout:
    chunk for chunk bit for bit the unpatched decode, also with NDHWC conv weights and activations as on CUDA, where
    the upsamplers' outputs then stay NDHWC."""
    if channels_last:
        _conv3d_layout_as_on_cuda(monkeypatch)
    plain, patched = _time_layout_pair(dtype, channels_last)
    ups = [m for m in patched.vae.decoder.modules() if getattr(m, "mode", None) == "upsample3d"]
    assert len(ups) == 2
    seen: list = []
    for up in ups:
        _watch_resample(up, seen)
    interleaved: list = []
    _count_interleaves(monkeypatch, interleaved)

    def watch(k: int, decode):
        seen.clear()
        interleaved.clear()
        out = decode()
        # 3 latent frames, 2 temporal upsamplers: all interleaved but the stream's very first frame's ("Rep")
        assert len(seen) == 6 and len(interleaved) == (4 if k == 0 else 6), (k, len(seen), len(interleaved))
        if channels_last:  # all but the stream's first frame, passed through in diffusers' views (batch 1)
            assert all(_in_format(y, torch.channels_last_3d) for y in interleaved)
            frames = [(x, y) for x, y in seen if x.shape[0] > 1]
            assert len(frames) == (4 if k == 0 else 6)
            assert all(_in_format(x, torch.channels_last) and _in_format(y, torch.channels_last) for x, y in frames)
        return out

    _assert_streamed_decode_equal(plain, patched, watch)


@pytest.mark.parametrize("layout_first", [False, True])
def test_time_layout_with_all_cuda_patches_equals_without(monkeypatch, layout_first: bool) -> None:
    """Every CUDA patch, with the convs adding their bias as cuDNN does (the residual blocks' bias test says why),
    and NDHWC activations: the time layout patch, installed before or after the subpixel upsamplers, leaves the
    streamed decode bit for bit what it was without it (fp32)."""
    from worker.models import vae as vae_mod

    _conv3d_bias_as_on_cuda(monkeypatch)
    _conv3d_layout_as_on_cuda(monkeypatch)  # on top: NDHWC results
    patches = [vae_mod._fuse_norm_passes, vae_mod._pad_inside_convs, vae_mod._upsample_in_own_dtype]
    if not layout_first:
        patches.append(vae_mod._subpixel_upsamplers)
    plain, patched = _time_layout_pair(torch.float32, True, *patches)
    if layout_first:
        for model in (plain.vae, patched.vae):
            vae_mod._subpixel_upsamplers(model)
    interleaved: list = []
    _count_interleaves(monkeypatch, interleaved)

    def watch(k: int, decode):
        interleaved.clear()
        out = decode()
        assert len(interleaved) == (4 if k == 0 else 6), k
        return out

    _assert_streamed_decode_equal(plain, patched, watch)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bands", [[(0, 24), (24, 48)], [(0, 7), (7, 31), (31, 48)]])
def test_row_bands_with_time_layout(monkeypatch, bands: list[tuple[int, int]], channels_last: bool) -> None:
    """Row bands (worker/models/vae_rows.py runs each upsampler as the module) take the time layout path: each band
    bit for bit the band without it, and stacked, the whole frames of diffusers' modules."""
    if channels_last:
        _conv3d_layout_as_on_cuda(monkeypatch)
    z = _latents(4)
    whole = _time_layout_pair(torch.float32, channels_last)[0]
    whole.start_decode()
    ref = torch.cat([whole.decode_chunk(z[:, 3 * k : 3 * k + 3]) for k in range(NUM_CHUNKS)], 1)
    interleaved: list = []
    _count_interleaves(monkeypatch, interleaved)
    parts = []
    for rows in bands:
        plain, patched = _time_layout_pair(torch.float32, channels_last)
        for v in (plain, patched):
            v.rows = rows
            v.start_decode()
        outs = []
        for k in range(NUM_CHUNKS):
            part = z[:, 3 * k : 3 * k + 3]
            interleaved.clear()
            out = patched.decode_chunk(part)
            assert len(interleaved) == (4 if k == 0 else 6), (rows, k)
            assert torch.equal(out, plain.decode_chunk(part)), (rows, k)
            outs.append(out)
        parts.append(torch.cat(outs, 1))
    torch.testing.assert_close(torch.cat(parts, 2), ref, rtol=0, atol=1e-5)


def test_full_size_encoder_skips_its_first_stages_early() -> None:
    """The full-size architecture (random weights, 16x16 pixels, fp32 CPU): the schedule docs/MODEL.md gives, and
    still diffusers' one-shot encode chunk for chunk."""
    svae = StreamingVAE(build_vae(PRESETS["lingbot-world-fast"].vae, torch.float32, "cpu", seed=0))
    n = 13
    img = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ref = svae.encode_condition(img, n)
    chunks, layers_run = _streamed_condition(svae, img, n)
    torch.testing.assert_close(torch.cat(chunks, 1), ref, rtol=0, atol=1e-5)
    assert svae.condition_layers_run[1] == 14
    # 14 layers in chunks 0-2; the full-resolution stage (conv_in, two blocks, the downsampler) skipped from chunk 3,
    # every stage but the last from chunk 5, the whole encoder from chunk 11
    assert layers_run == [14, 14, 14, 7, 7, 4, 4, 4, 4, 4, 1, 0, 0], layers_run


@pytest.mark.parametrize("bands", [[(0, 48)], [(0, 24), (24, 48)], [(0, 8), (8, 30), (30, 31), (31, 48)]])
def test_row_bands_give_the_full_decode(bands: list[tuple[int, int]]) -> None:
    """Each band decoded by its own streaming VAE (as each rank does), over three chunks, then stacked: diffusers'
    frames. Bands down to one pixel row and bands that cut latent rows in two."""
    z = _latents(4)
    ref = StreamingVAE(build_vae(PRESETS["tiny"].vae, torch.float32, "cpu", seed=0)).decode(z)
    parts = []
    for rows in bands:
        v = StreamingVAE(build_vae(PRESETS["tiny"].vae, torch.float32, "cpu", seed=0))
        v.rows = rows
        v.start_decode()
        out = torch.cat([v.decode_chunk(z[:, 3 * k : 3 * k + 3]) for k in range(NUM_CHUNKS)], 1)
        assert out.shape == (3, ref.shape[1], rows[1] - rows[0], W)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 2), ref, rtol=0, atol=1e-5)


def test_row_band_windows_grow_by_each_ops_radius() -> None:
    from worker.models.vae_rows import band_windows

    dec = build_vae(PRESETS["lingbot-world-fast"].vae, torch.float32, "meta").decoder
    # 832x480: 60 latent rows; the second of four bands, rows 120-240. Backwards from the head (radius 1): three
    # residual blocks (2 each) at 480 rows, then the upsampler's conv (1) and its halving to 240 rows, and so on.
    w = band_windows(dec, 60, (120, 240))
    assert w[-4:] == [(113, 247), (115, 245), (117, 243), (119, 241)]
    assert w[-5] == (56, 124)  # the last upsampler's input: (112, 248) minus its conv's radius, halved outwards
    assert band_windows(dec, 60, (0, 480))[0] == (0, 60)  # the whole frame needs no more than the whole frame
    with pytest.raises(ValueError, match="outside the decoded height 480"):
        band_windows(dec, 60, (400, 481))


def test_balanced_bands_even_out_the_conv_work() -> None:
    """Bands at the image's edges need a margin on one side only, so they get more rows; the largest band's work
    is within a row's worth of the smallest's, and well under an even row split's largest."""
    from worker.models.vae_rows import balanced_bands, band_work

    dec = build_vae(PRESETS["lingbot-world-fast"].vae, torch.float32, "meta").decoder
    bands = balanced_bands(dec, 60, 4)
    assert bands[0][0] == 0 and bands[-1][1] == 480
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    heights = [b - a for a, b in bands]
    assert heights[0] > heights[1] and heights[3] > heights[2]
    work = [band_work(dec, 60, b) for b in bands]
    full = band_work(dec, 60, (0, 480))
    assert max(work) - min(work) < 0.01 * full
    assert max(work) < max(band_work(dec, 60, (120 * i, 120 * i + 120)) for i in range(4)) - 0.01 * full
    assert max(work) / full < 0.31  # what a rank of four decodes at 832x480, against 0.25 with no margins
    assert balanced_bands(dec, 60, 1) == [(0, 480)]


def test_band_work_counts_the_decoders_conv_flops() -> None:
    """The plan's cost model against PyTorch's FLOP counter on the full-size decoder (a small frame, CPU): a steady
    chunk's conv FLOPs are the middle part's (the same on every band) plus band_work of all rows, for every latent
    column and frame."""
    from torch.utils.flop_counter import FlopCounterMode

    from worker.models.vae_rows import band_work

    svae = StreamingVAE(build_vae(PRESETS["lingbot-world-fast"].vae, torch.float32, "cpu", seed=0))
    rows, cols = 2, 3
    z = torch.randn(VAE_Z_DIM, 6, rows, cols, generator=torch.Generator().manual_seed(0))
    svae.start_decode()
    svae.decode_chunk(z[:, :3])  # the stream's first chunk skips the temporal upsamplers' convs on its first frame
    with FlopCounterMode(display=False) as counter:
        svae.decode_chunk(z[:, 3:])
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    dec = svae.vae.decoder
    whole_frame = [svae.vae.post_quant_conv, dec.conv_in] + [
        m for m in dec.mid_block.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    per_latent_pixel = sum(m.weight.numel() for m in whole_frame)
    expected = 2 * CHUNK_LATENT_FRAMES * cols * (rows * per_latent_pixel + band_work(dec, rows, (0, rows * 8)))
    assert counted == expected
