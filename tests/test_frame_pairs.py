"""The decoder's small residual blocks on frame pairs (worker/models/frame_pairs.py, vae._paired_residual_blocks)
against the same blocks on frames, on the tiny random VAE (8 channels, so every decoder block is paired)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

from tiny_vae import patched_tiny_vae
from worker.config import VAE_Z_DIM
from worker.models import frame_pairs, fused
from worker.models import vae as vae_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHUNKS = 3


def _frames(c: int, t: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, c, t, 5, 7, generator=g, dtype=torch.float32).to(dtype).contiguous(
        memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("pairs", [1, 2, 3])
def test_paired_conv_is_the_causal_conv(pairs: int) -> None:
    """The packed 2-tap conv over pairs gives the 3-tap conv over frames (2 frames in front, 2n new), and a tap
    laid in the wrong block does not."""
    c, o = 6, 4
    x = _frames(c, 2 + 2 * pairs, 0)
    w = torch.randn(o, c, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    want = F.conv3d(x, w, None, 1, (0, 1, 1))
    got = frame_pairs.from_pairs(F.conv3d(frame_pairs.to_pairs(x), frame_pairs.pair_weight(w), None, 1, (0, 1, 1)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    wrong = frame_pairs.pair_weight(w)
    wrong[:o, :c, 0], wrong[:o, c:, 0] = wrong[:o, c:, 0].clone(), wrong[:o, :c, 0].clone()  # taps 0 and 1 swapped
    bad = frame_pairs.from_pairs(F.conv3d(frame_pairs.to_pairs(x), wrong, None, 1, (0, 1, 1)))
    assert not torch.allclose(bad, want, atol=1e-2)


def test_pairs_round_trip_and_layout() -> None:
    x = _frames(3, 4, 2)
    p = frame_pairs.to_pairs(x)
    assert p.shape == (1, 6, 2, 5, 7) and p.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(p[:, :3, 1], x[:, :, 2]) and torch.equal(p[:, 3:, 1], x[:, :, 3])  # pair 1 = frames 2, 3
    assert torch.equal(frame_pairs.from_pairs(p), x)


@pytest.mark.parametrize("cache_frames", [None, 1, 2])
def test_front_pair_is_the_frames_before(cache_frames: int | None) -> None:
    """The pair in front of the new frames: the cached frames behind zeros, as WanCausalConv3d pads them."""
    a = frame_pairs.to_pairs(_frames(3, 4, 3))
    cache = None if cache_frames is None else _frames(3, cache_frames, 4)
    front = frame_pairs.from_pairs(frame_pairs.front_pair(cache, 3, a))
    want = torch.zeros(1, 3, 2, 5, 7)
    if cache is not None:
        want[:, :, 2 - cache_frames:] = cache
    assert torch.equal(front, want)
    cached_pair = frame_pairs.to_pairs(want)
    assert frame_pairs.front_pair(cached_pair, 3, a) is cached_pair  # a cached pair is used as it is


def _count_paired_convs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = frame_pairs.paired_conv_behind_cache
    monkeypatch.setattr(frame_pairs, "paired_conv_behind_cache",
                        lambda *a, **kw: calls.append(a[3].shape[2]) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paired_blocks_decode_like_frames(monkeypatch, dtype: torch.dtype) -> None:
    """Streamed decode with the decoder's blocks on pairs: the frames of the same blocks on frames, to fp32 rounding
    (bf16: its rounding); every block's two convs ran on pairs except where a call has an odd frame count (the
    stream's first latent frame), and the encoder's blocks are untouched."""
    calls = _count_paired_convs(monkeypatch)
    plain, paired = patched_tiny_vae(False, dtype), patched_tiny_vae(True, dtype)
    decoder_blocks = [m for m in paired.vae.decoder.modules() if isinstance(m, WanResidualBlock)]
    assert all(m.forward.func is vae_mod._paired_residual_forward for m in decoder_blocks)
    assert not any(getattr(m.forward, "func", None) is vae_mod._paired_residual_forward
                   for m in paired.vae.encoder.modules())
    z = torch.randn(VAE_Z_DIM, 3 * CHUNKS, 8, 8, generator=torch.Generator().manual_seed(3))
    for s in (plain, paired):
        s.start_decode()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for k in range(CHUNKS):
        calls.clear()
        part = z[:, 3 * k : 3 * k + 3]
        want, got = plain.decode_chunk(part), paired.decode_chunk(part)
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        assert got.shape == want.shape
        # a block runs on pairs where it sees an even frame count: both convs of every block after the first
        # temporal upsampler (before it a latent frame is 1 frame), in every latent frame but the stream's first
        # (1 frame all the way: the upsamplers pass it through)
        at_one_frame = [*paired.vae.decoder.mid_block.modules(), *paired.vae.decoder.up_blocks[0].modules()]
        on_pairs = [m for m in decoder_blocks if not any(m is n for n in at_one_frame)]
        assert on_pairs and len(calls) == 2 * (3 if k else 2) * len(on_pairs), (k, len(calls))


def test_paired_decode_detects_a_wrong_tap(monkeypatch) -> None:
    """The comparison above can fail: the same decode with one tap block of the paired weights misplaced."""
    plain, paired = patched_tiny_vae(False, torch.float32), patched_tiny_vae(True, torch.float32)
    real = frame_pairs.pair_weight

    def misplaced(w):
        p = real(w)
        o, i = w.shape[:2]
        p[:o, i:, 0] = 0  # output frame 2s loses its tap on frame 2s - 1
        return p

    monkeypatch.setattr(frame_pairs, "pair_weight", misplaced)
    paired = patched_tiny_vae(True, torch.float32)
    z = torch.randn(VAE_Z_DIM, 6, 8, 8, generator=torch.Generator().manual_seed(3))
    for s in (plain, paired):
        s.start_decode()
    plain.decode_chunk(z[:, :3]), paired.decode_chunk(z[:, :3])
    assert not torch.allclose(paired.decode_chunk(z[:, 3:]), plain.decode_chunk(z[:, 3:]), atol=1e-3)


def test_odd_frame_count_after_pairs_unpacks_the_cache() -> None:
    """A block called with 4 frames (pairs), then 1 frame (frames), then 2 (pairs), gives what the block on
    frames gives for the same calls: the cached pair goes back to diffusers' 2 frames and back."""
    c = 8
    torch.manual_seed(0)
    plain = WanResidualBlock(c, c).eval()
    paired = WanResidualBlock(c, c).eval()
    paired.load_state_dict(plain.state_dict())
    for m in (plain, paired):
        for conv in (m.conv1, m.conv2):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    vae_mod._fuse_residual_blocks(paired)
    vae_mod._paired_residual_blocks(_Holder(paired))
    caches = ([None, None], [None, None])
    with torch.no_grad():
        for t, seed in ((4, 5), (1, 6), (2, 7), (4, 8)):
            x = _frames(c, t, seed)
            want = plain(x, feat_cache=caches[0], feat_idx=[0])
            got = paired(x, feat_cache=caches[1], feat_idx=[0])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert frame_pairs.is_pair(caches[1][0], c) == (t % 2 == 0), t


class _Holder(torch.nn.Module):
    """A stand-in AutoencoderKLWan whose decoder is one residual block."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = torch.nn.ModuleList([block])


@pytest.mark.parametrize("bands", [[(0, 24), (24, 48)], [(0, 7), (7, 31), (31, 48)]])
def test_paired_blocks_in_bands(bands: list[tuple[int, int]]) -> None:
    """Bands decoded with paired blocks stack to the whole frames of the same model."""
    z = torch.randn(VAE_Z_DIM, 3 * CHUNKS, 6, 8, generator=torch.Generator().manual_seed(4))
    whole = patched_tiny_vae(True, torch.float32)
    whole.start_decode()
    ref = torch.cat([whole.decode_chunk(z[:, 3 * k : 3 * k + 3]) for k in range(CHUNKS)], 1)
    parts = []
    for rows in bands:
        v = patched_tiny_vae(True, torch.float32)
        v.rows = rows
        v.start_decode()
        parts.append(torch.cat([v.decode_chunk(z[:, 3 * k : 3 * k + 3]) for k in range(CHUNKS)], 1))
    torch.testing.assert_close(torch.cat(parts, 2), ref, rtol=0, atol=1e-5)


@pytest.mark.usefixtures("dynamo_eager")
def test_pair_chains_trace_whole_and_match_eager() -> None:
    """The three chains trace as whole graphs with the frame axes symbolic, equal their eager math, and write the
    layouts their readers expect: pairs channels-last-3d, the block's output channels-last-3d."""
    c = 8
    g = torch.Generator().manual_seed(9)
    gamma, bias = torch.randn(c, 1, 1, 1, generator=g), torch.randn(c, generator=g)
    for t in (2, 4, 6):
        x = _frames(c, t, t)
        p = fused.wan_rms_norm_to_pairs(x, gamma, c**0.5, 0.0, True)
        assert torch.equal(p, fused.wan_rms_norm_to_pairs.eager(x, gamma, c**0.5, 0.0, True))
        torch.testing.assert_close(p, frame_pairs.to_pairs(fused.wan_rms_norm.eager(x, gamma, c**0.5, 0.0, True)))
        assert p.is_contiguous(memory_format=torch.channels_last_3d)
        q = fused.conv_bias_rms_norm_pairs(p, bias, gamma, c**0.5, 0.0, True)
        want = frame_pairs.to_pairs(fused.conv_bias_rms_norm.eager(frame_pairs.from_pairs(p), bias, gamma, c**0.5,
                                                                     0.0, True))
        torch.testing.assert_close(q, want)
        assert q.is_contiguous(memory_format=torch.channels_last_3d)
        out = fused.conv_bias_residual_from_pairs(q, bias, x)
        torch.testing.assert_close(out, fused.conv_bias_residual.eager(frame_pairs.from_pairs(q), bias, x))
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
