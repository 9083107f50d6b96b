"""Attention backend choice (worker/models/attention.py): what runs where, and the errors when it cannot.

FA4's kernels need a Hopper/Blackwell GPU, so its speed and accuracy are measured on one
(scripts/attention_backends.py, docs/PERFORMANCE.md v14). Here: the choice logic, with the GPU facts and the
package replaced where the CPU cannot supply them, and the SDPA path's math.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.models import attention as attn


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    monkeypatch.delenv("LINGBOT_ATTENTION", raising=False)
    attn._fa4_unsupported.cache_clear()
    attn._use_fa4.cache_clear()
    yield
    attn._fa4_unsupported.cache_clear()
    attn._use_fa4.cache_clear()


def _qkv(lq=7, lk=11, heads=3, d=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, n, heads, d, generator=g, dtype=dtype) for n in (lq, lk, lk))


def test_cpu_runs_sdpa_in_blhd_layout() -> None:
    q, k, v = _qkv()
    out = attn.attention(q, k, v)
    assert out.shape == q.shape
    # the same math spelled out: softmax(q k^T / sqrt(d)) v per batch and head
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert attn.active_backend("cpu") == "sdpa"


def test_mask_goes_to_sdpa() -> None:
    q, k, v = _qkv()
    mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    torch.testing.assert_close(attn.attention(q, k, v, mask), want.transpose(1, 2))


def test_bad_setting_names_the_variable_and_choices(monkeypatch) -> None:
    monkeypatch.setenv("LINGBOT_ATTENTION", "flash3")
    with pytest.raises(ValueError, match=r"LINGBOT_ATTENTION='flash3'.*auto, sdpa, fa4"):
        attn.attention(*_qkv())


@pytest.mark.parametrize("variable", ["LINGBOT_ATTENTION", "LINGBOT_ATTENTION_SPLIT"])
@pytest.mark.parametrize("ranks", [1, 2])
def test_bad_setting_fails_before_any_model_load(monkeypatch, variable: str, ranks: int) -> None:
    from worker.parallel import pool

    def never(*a, **k):
        raise AssertionError("loaded a model with a bad setting")

    monkeypatch.setenv(variable, "nope")
    monkeypatch.setattr(pool.Engine, "load", never)
    monkeypatch.setattr(pool.RankPool, "start", never)
    with pytest.raises(ValueError, match=variable):
        pool.load_generator("tiny", "cpu", ranks)


def test_forcing_fa4_on_cpu_says_why(monkeypatch) -> None:
    monkeypatch.setenv("LINGBOT_ATTENTION", "fa4")
    with pytest.raises(RuntimeError, match="LINGBOT_ATTENTION=fa4 needs a CUDA device, not cpu"):
        attn.attention(*_qkv())


class FakeGPU:
    """Stands in for a CUDA device of a given compute capability, and for the FA4 package."""

    def __init__(self, monkeypatch, major: int, fa4=None, fa4_error: Exception | None = None) -> None:
        self.calls = 0
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major, 0))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

        def call():
            if fa4_error is not None:
                raise fa4_error
            return fa4 or self.exact_fa4

        monkeypatch.setattr(attn, "_fa4_call", call)
        monkeypatch.setattr(attn, "_test_device", lambda index: torch.device("cpu"))  # the smoke call's inputs

    def exact_fa4(self, q, k, v):
        self.calls += 1
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2), None


CUDA = torch.device("cuda", 0)


def test_auto_takes_fa4_on_hopper_once_it_passes_its_test_call(monkeypatch) -> None:
    gpu = FakeGPU(monkeypatch, major=9)
    assert attn._fa4_for(CUDA, torch.bfloat16, 128)
    assert gpu.calls == 1  # the smoke test
    assert attn._fa4_for(CUDA, torch.bfloat16, 128)
    assert gpu.calls == 1  # decided once per GPU and kind of input


@pytest.mark.parametrize(
    "major, dtype, head_dim, why",
    [
        (8, torch.bfloat16, 128, "compute capability 8.x"),
        (9, torch.float32, 128, "dtype torch.float32"),
        (9, torch.bfloat16, 100, "head dim 100"),
        (9, torch.bfloat16, 512, "head dim 512"),
    ],
)
def test_auto_falls_back_to_sdpa_where_fa4_cannot_run(monkeypatch, major, dtype, head_dim, why) -> None:
    FakeGPU(monkeypatch, major=major)
    assert not attn._fa4_for(CUDA, dtype, head_dim)
    attn._fa4_unsupported.cache_clear()
    monkeypatch.setenv("LINGBOT_ATTENTION", "fa4")
    with pytest.raises(RuntimeError, match=f"LINGBOT_ATTENTION=fa4 cannot run here: {why}"):
        attn._fa4_for(CUDA, dtype, head_dim)


def test_package_missing_falls_back_or_fails_loudly(monkeypatch) -> None:
    FakeGPU(monkeypatch, major=9, fa4_error=ModuleNotFoundError("No module named 'flash_attn'"))
    assert not attn._fa4_for(CUDA, torch.bfloat16, 128)
    assert attn.active_backend(CUDA) == "sdpa"
    attn._fa4_unsupported.cache_clear()
    monkeypatch.setenv("LINGBOT_ATTENTION", "fa4")
    with pytest.raises(RuntimeError, match="flash-attn-4 is not importable .*install the fa4 extra"):
        attn._fa4_for(CUDA, torch.bfloat16, 128)


def test_a_package_that_computes_wrong_is_not_used(monkeypatch) -> None:
    def broken(q, k, v):
        return torch.zeros_like(q), None

    FakeGPU(monkeypatch, major=9, fa4=broken)
    assert not attn._fa4_for(CUDA, torch.bfloat16, 128)
    attn._fa4_unsupported.cache_clear()
    monkeypatch.setenv("LINGBOT_ATTENTION", "fa4")
    with pytest.raises(RuntimeError, match="wrong test result"):
        attn._fa4_for(CUDA, torch.bfloat16, 128)


def test_sdpa_setting_never_touches_fa4(monkeypatch) -> None:
    FakeGPU(monkeypatch, major=9, fa4_error=AssertionError("FA4 touched"))
    monkeypatch.setenv("LINGBOT_ATTENTION", "sdpa")
    assert not attn._fa4_for(CUDA, torch.bfloat16, 128)


def test_auto_sends_short_key_sequences_to_cudnn_and_long_ones_to_fa4(monkeypatch) -> None:
    """The cross-attention's 512 text keys are faster on cuDNN than on FA4 (docs/PERFORMANCE.md v16)."""
    seen = []

    def use_fa4(*key):
        return True

    use_fa4.cache_clear = lambda: None  # the fixture clears the real cache around each test

    def fa4(q, k, v):
        seen.append(k.shape[1])
        return torch.full_like(q, 7.0), None  # recognisably not attention

    monkeypatch.setattr(attn, "_use_fa4", use_fa4)
    monkeypatch.setattr(attn, "_fa4_call", lambda: fa4)
    short = _qkv(lk=attn.SHORT_KEYS)
    want = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in short)).transpose(1, 2)
    torch.testing.assert_close(attn.attention(*short), want)
    assert seen == []
    assert torch.equal(attn.attention(*_qkv(lk=attn.SHORT_KEYS + 1)), torch.full((2, 7, 3, 16), 7.0))
    assert seen == [attn.SHORT_KEYS + 1]
    monkeypatch.setenv("LINGBOT_ATTENTION", "fa4")  # forced: every unmasked call, for A/B runs
    attn.attention(*short)
    assert seen == [attn.SHORT_KEYS + 1, attn.SHORT_KEYS]
