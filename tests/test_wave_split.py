"""FA4's last wave filled by a few heads' split keys (worker/models/wave_split.py): the plan, the merge of the parts,
and who asks for it. The split itself runs FA4 on two CUDA streams, so its speed and its outputs are measured on a
GPU (scripts/attention_waves.py, docs/PERFORMANCE.md v29a); here the parts that do not need one."""

from __future__ import annotations

import pytest
import torch

from worker.models import attention as attn
from worker.models import wave_split


def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, H, D] attention and its natural-log sum-exp [B, H, L], as FA4 returns them."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v), scores.logsumexp(-1)


def test_plan_splits_where_the_last_wave_is_mostly_idle() -> None:
    """One H100's 40 heads x 37 query tiles are 11.2 waves of 132 SMs: one head's keys in 4 parts. A rank's share on
    2 or 4 GPUs (20, 10 heads) gains less than MIN_GAIN by the model, so it runs as one call."""
    assert wave_split.predicted_waves(40, 0, 1, 132, 4680) == 12
    assert wave_split.plan(40, 4680, 132) == (1, 4)
    assert wave_split.predicted_waves(40, 1, 4, 132, 4680) < 0.95 * 12
    assert wave_split.plan(20, 4680, 132) is None
    assert wave_split.plan(10, 4680, 132) is None
    assert wave_split.plan(1, 4680, 132) is None  # nothing to run beside


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_parts_merged_by_their_sum_exps_are_the_whole_attention(parts: int) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g) * 3 for n in (9, 12, 12))
    want, _ = _attention_with_lse(q, k, v)
    # the split heads' form: the same queries against consecutive runs of keys, as a batch of `parts`
    ks, vs = (t[0].unflatten(0, (parts, -1)) for t in (k, v))
    o, lse = _attention_with_lse(q.expand(parts, -1, -1, -1), ks, vs)
    out = torch.empty_like(q)
    wave_split.merge_parts(o, lse, out)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    wave_split.merge_parts(o, torch.zeros_like(lse), out)  # equal weights: a merge that ignores the sums is wrong
    assert not torch.allclose(out, want, atol=1e-3)


def test_setting_is_checked(monkeypatch) -> None:
    monkeypatch.setenv("LINGBOT_ATTENTION_SPLIT", "yes")
    with pytest.raises(ValueError, match="LINGBOT_ATTENTION_SPLIT"):
        wave_split.setting()
    monkeypatch.setenv("LINGBOT_ATTENTION_SPLIT", "0")
    assert wave_split.setting() == "0"
    monkeypatch.delenv("LINGBOT_ATTENTION_SPLIT")
    assert wave_split.setting() == "auto"


def test_only_a_caller_that_asks_gets_the_split(monkeypatch) -> None:
    """attention() offers FA4's long-key calls to wave_split only with wave_split=True, and runs the one call when
    it declines (here: CPU tensors, so it always declines)."""
    offered, calls = [], []

    def use_fa4(*key):
        return True

    use_fa4.cache_clear = lambda: None
    monkeypatch.setattr(attn, "_use_fa4", use_fa4)
    monkeypatch.setattr(attn, "_fa4_call", lambda: lambda q, k, v: (calls.append(1) or torch.zeros_like(q), None))
    real = wave_split.attention
    monkeypatch.setattr(wave_split, "attention", lambda *a: offered.append(1) or real(*a))
    q, k, v = (torch.randn(1, n, 2, 8) for n in (4, attn.SHORT_KEYS + 8, attn.SHORT_KEYS + 8))
    attn.attention(q, k, v)
    assert offered == [] and calls == [1]
    attn.attention(q, k, v, wave_split=True)
    assert offered == [1] and calls == [1, 1]

