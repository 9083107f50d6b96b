"""The decoder's norms writing their output behind the frames cached for the conv that reads it
(causal_conv.conv_behind_cache, frame_pairs.paired_conv_behind_cache, the `front` of worker.models.fused's chains)
against the concatenating path they replace (LINGBOT_VAE_BEHIND=0)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanResidualBlock

from tiny_vae import patched_tiny_vae
from worker.config import VAE_Z_DIM
from worker.models import causal_conv, frame_pairs, fused
from worker.models import vae as vae_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHUNKS = 3
CHAINS = ("wan_rms_norm", "conv_bias_rms_norm", "wan_rms_norm_to_pairs", "conv_bias_rms_norm_pairs")


def _count_fronts(monkeypatch) -> list[bool]:
    """Every residual-block norm call: whether it was handed the frames to write behind."""
    calls: list[bool] = []
    for name in CHAINS:
        real = getattr(vae_mod, name)
        monkeypatch.setattr(vae_mod, name, lambda *a, _real=real: calls.append(isinstance(a[-1], torch.Tensor))
                            or _real(*a))
    return calls


@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_behind_the_cache_equals_the_concatenation(monkeypatch, paired: bool, dtype: torch.dtype) -> None:
    """Streamed decode, bit for bit the same frames with the norms writing behind the cache as with the cache
    concatenated in front by a copy; and the norms did write behind it wherever the cache rule allows: every conv of
    a block after the first temporal upsampler (before it a latent frame is 1 frame), from the stream's third
    latent frame on (frames: the first two leave 1-frame caches) or its second (pairs: a pair is built from them),
    and the head's conv."""
    fronts = _count_fronts(monkeypatch)
    behind = patched_tiny_vae(paired, dtype)
    copying = patched_tiny_vae(paired, dtype)
    blocks = [m for m in behind.vae.decoder.modules() if isinstance(m, WanResidualBlock)]
    at_one_frame = [*behind.vae.decoder.mid_block.modules(), *behind.vae.decoder.up_blocks[0].modules()]
    later = [m for m in blocks if not any(m is n for n in at_one_frame)]
    assert later and len(later) < len(blocks)
    z = torch.randn(VAE_Z_DIM, 3 * CHUNKS, 8, 8, generator=torch.Generator().manual_seed(5)).to(dtype)
    for s in (behind, copying):
        s.start_decode()
    for k in range(CHUNKS):
        part = z[:, 3 * k : 3 * k + 3]
        monkeypatch.setattr(causal_conv, "BEHIND", False)
        fronts.clear()
        want = copying.decode_chunk(part)
        assert not any(fronts)
        monkeypatch.setattr(causal_conv, "BEHIND", True)
        fronts.clear()
        got = behind.decode_chunk(part)
        assert torch.equal(got, want), k
        latent_frames = 3 if k else (2 if paired else 1)
        head = 3 if k else 1  # the decoder's head (on frames): from the stream's third latent frame
        assert fronts.count(True) == 2 * latent_frames * len(later) + head, (k, fronts.count(True))


def test_decode_behind_a_wrong_front_differs(monkeypatch) -> None:
    """The comparison above can fail: the same decode with the cached frames' order swapped in front."""
    behind, copying = patched_tiny_vae(False, torch.float32), patched_tiny_vae(False, torch.float32)
    z = torch.randn(VAE_Z_DIM, 6, 8, 8, generator=torch.Generator().manual_seed(5))
    for s in (behind, copying):
        s.start_decode()
    behind.decode_chunk(z[:, :3]), copying.decode_chunk(z[:, :3])
    real = fused._behind
    monkeypatch.setattr(fused, "_behind", lambda front, out: real(front.flip(1), out))  # time: dim 1
    got = behind.decode_chunk(z[:, 3:])
    monkeypatch.setattr(causal_conv, "BEHIND", False)
    assert not torch.allclose(got, copying.decode_chunk(z[:, 3:]), atol=1e-3)


def _frames(c: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, c, t, 5, 7, generator=g).contiguous(memory_format=torch.channels_last_3d)


def _chain_cases(c: int, t: int):
    """(chain, its arguments, its front, the output it writes behind the front) for each of the four chains."""
    g = torch.Generator().manual_seed(t)
    gamma, bias = torch.randn(c, 1, 1, 1, generator=g), torch.randn(c, generator=g)
    x = _frames(c, t, t)
    p = frame_pairs.to_pairs(x)
    norm = (gamma, c**0.5, 0.0, True)
    return [
        (fused.wan_rms_norm, (x, *norm), _frames(c, 2, 1), fused.wan_rms_norm.eager(x, *norm)),
        (fused.conv_bias_rms_norm, (x, bias, *norm), _frames(c, 2, 2),
         fused.conv_bias_rms_norm.eager(x, bias, *norm)),
        (fused.wan_rms_norm_to_pairs, (x, *norm), frame_pairs.to_pairs(_frames(c, 2, 3)),
         frame_pairs.to_pairs(fused.wan_rms_norm.eager(x, *norm))),
        (fused.conv_bias_rms_norm_pairs, (p, bias, *norm), frame_pairs.to_pairs(_frames(c, 2, 4)),
         frame_pairs.to_pairs(fused.conv_bias_rms_norm.eager(x, bias, *norm))),
    ]


@pytest.mark.usefixtures("dynamo_eager")
def test_chains_with_a_front_trace_whole_and_match_eager() -> None:
    """Each chain with `front` traces as one graph with the frame axes symbolic and returns the concatenation and
    its last frames (a pair for the packed chains), both channels-last-3d as the conv and the next call read them."""
    c = 8
    for t in (2, 4, 6):
        for chain, args, front, out in _chain_cases(c, t):
            ext, last = chain(*args, front)
            want = torch.cat([front, out], 2)
            torch.testing.assert_close(ext, want)
            assert torch.equal(last, ext[:, :, -front.shape[2]:])
            for y in (ext, last):
                assert y.is_contiguous(memory_format=torch.channels_last_3d), chain.__name__
            assert torch.equal(chain(*args), chain.eager(*args))  # the chain without a front: as before


@pytest.mark.parametrize("case", [0, 1, 2, 3])
def test_inductor_writes_the_norm_into_its_slot(case: int) -> None:
    """Compiled by Inductor (its CPU backend here) with the axes fusable leaves symbolic, the chain's output is not
    a buffer of its own copied into the concatenation: Inductor realises it into its slot there, an alias of the
    concatenation's buffer. (The chain's own compiled wrapper may be bound to Dynamo's eager backend by another
    test here, so this compiles its function afresh.)"""
    from torch._inductor.utils import run_and_get_code

    chain, args, front, out = _chain_cases(8, 4)[case]
    torch._dynamo.reset()
    try:
        for t, dims in ((args[0], (3, 4)), (front, (3, 4))):
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(t, d)
        (ext, last), code = run_and_get_code(torch.compile(chain.eager, fullgraph=True), *args, front)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(ext, torch.cat([front, out], 2))
    assert torch.equal(last, ext[:, :, -front.shape[2]:])
    call = code[-1][code[-1].index("def call("):]
    # two slots alias the concatenation, the front's (offset 0) and the norm's (behind the 2 cached frames), and
    # nothing else is allocated but the norms' statistics, the concatenation and the last frames: the chain's
    # output realised on its own (say, also returned) would be a fourth buffer, copied into its slot
    assert call.count("# alias") == 2 and call.count("empty_strided") == 3, call
