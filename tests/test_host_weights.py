"""HostWeights (worker/models/host_weights.py): every parameter and buffer packed once into one host buffer, lent
to a device for a call and pointed back afterwards. On the CPU the lent copy is a second host buffer, which is
enough to see where every weight points."""

import pytest
import torch
from torch import nn

from worker.models.host_weights import _ALIGN, HostWeights


class Mixed(nn.Module):
    """Mixed dtypes, a bias-free layer, a buffer, and one weight tied under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.proj = nn.Linear(6, 5).to(torch.bfloat16)
        self.register_buffer("steps", torch.arange(7))  # int64
        self.register_buffer("absent", None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids + self.steps[: ids.shape[0]] % 2)
        return self.head(h) + self.proj(h.to(torch.bfloat16)).float().sum(-1, keepdim=True)


def _inside(buf: torch.Tensor, t: torch.Tensor) -> bool:
    return buf.data_ptr() <= t.data_ptr() < buf.data_ptr() + buf.numel()


def _weights(m: nn.Module) -> list[torch.Tensor]:
    return [t for _, t in m.named_parameters(remove_duplicate=False)] + [t for _, t in m.named_buffers()]


def test_packs_every_weight_once_aligned_and_unchanged() -> None:
    torch.manual_seed(0)
    m = Mixed()
    before = {n: t.clone() for n, t in m.state_dict(keep_vars=True).items()}
    ids = torch.tensor([1, 4, 9])
    want = m(ids)
    hw = HostWeights(m)
    unique = {id(t): t for t in _weights(m)}
    sizes = [t.numel() * t.element_size() for t in unique.values()]
    assert sum(sizes) <= hw.nbytes <= sum(-(-n // _ALIGN) * _ALIGN for n in sizes)  # the tied weight once
    assert len({t.data_ptr() for t in _weights(m)}) == len(unique) == 4  # emb (= head), proj w and b, steps
    for t in _weights(m):
        assert _inside(hw.host, t) and (t.data_ptr() - hw.host.data_ptr()) % _ALIGN == 0
    assert m.head.weight is m.emb.weight and m.absent is None
    for n, t in m.state_dict(keep_vars=True).items():
        assert t.dtype == before[n].dtype and torch.equal(t, before[n]), n
    assert not hw.page_locked  # no CUDA here
    assert torch.equal(m(ids), want)


def test_lent_points_every_weight_at_the_copy_and_back() -> None:
    torch.manual_seed(0)
    m = Mixed()
    ids = torch.tensor([2, 3])
    want = m(ids)
    hw = HostWeights(m)
    with hw.lent("cpu") as upload_s:
        assert upload_s >= 0
        assert not any(_inside(hw.host, t) for t in _weights(m))
        assert m.head.weight is m.emb.weight and m.head.weight.data_ptr() == m.emb.weight.data_ptr()
        assert torch.equal(m(ids), want)
        m.proj.weight.data.zero_()  # a write to the lent copy ...
    assert all(_inside(hw.host, t) for t in _weights(m))
    assert torch.equal(m(ids), want)  # ... is dropped with it: the host copy is the master

    with pytest.raises(ValueError), hw.lent("cpu"):
        raise ValueError("a failing call")
    assert all(_inside(hw.host, t) for t in _weights(m))


@pytest.mark.parametrize("tied_names", [("emb.weight",), ("emb.weight", "head.weight")])
def test_reads_a_meta_built_module_straight_from_its_files(tmp_path, tied_names) -> None:
    """files=: the module built on the meta device, every weight read from safetensors files into its place (a
    parameter, an int64 buffer, a bf16 weight stored as fp32 and cast), the tied weight under one or both names
    one tensor, and the result the module's forward as the original's."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = Mixed()
    state = {n: t.clone() for n, t in m.state_dict().items() if n != "head.weight" or n in tied_names}
    state["proj.weight"] = state["proj.weight"].float()  # another dtype on disk: cast on the way in
    save_file({n: state[n] for n in list(state)[:2]}, tmp_path / "a.safetensors")
    save_file({n: state[n] for n in list(state)[2:]}, tmp_path / "b.safetensors")
    with torch.device("meta"):
        meta = Mixed()
    hw = HostWeights(meta, sorted(tmp_path.glob("*.safetensors")))
    assert meta.head.weight is meta.emb.weight and all(_inside(hw.host, t) for t in _weights(meta))
    want = m.state_dict()
    assert all(torch.equal(t, want[n]) for n, t in meta.state_dict().items())
    ids = torch.tensor([1, 4, 9])
    assert torch.equal(meta(ids), m(ids))
    with hw.lent("cpu"):
        assert torch.equal(meta(ids), m(ids))
