"""The start-up prewarm (worker/models/prewarm.py): a call that made Dynamo trace a fused chain is written to a
manifest, and replaying the manifest in a new process makes the real call's guards hit, so it traces nothing.

CPU runs the chains eagerly, so these tests let fusable compile on the CPU with Dynamo's eager backend: the
tracing and guards are Dynamo's own, only Inductor's code generation is left out."""

import json
import logging

import pytest
import torch
from torch import nn

from worker.models import fused, prewarm
from worker.models.fused import fusable


@pytest.fixture
def dynamo_on_cpu(monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, fullgraph=True, options=None: real(fn, fullgraph=fullgraph,
                                                                                         backend="eager"))
    monkeypatch.setattr(fused, "_COMPILED_DEVICES", {"cpu", "cuda"})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    prewarm.RECORDER.open(None)


@fusable(tokens={0: 1})
def _chain(x, w, eps, dtype, groups):
    return (x.float() * w + eps).to(dtype) * len(groups)


def _args(tokens: int):
    """An activation made under inference mode (as in the rollout) and a parameter made outside it."""
    w = nn.Parameter(torch.randn(16), requires_grad=False)
    with torch.inference_mode():
        x = torch.randn(2, tokens, 24)[..., :16]  # a strided view: its strides are part of the guard
    return x, w, 1e-6, torch.bfloat16, (3, 5)


def _new_process():
    torch._dynamo.reset()  # what a new process starts from: nothing traced


def test_replaying_the_manifest_makes_the_real_call_trace_nothing(tmp_path, dynamo_on_cpu):
    path = tmp_path / "manifest.json"
    prewarm.RECORDER.open(path)
    first, second = _args(7), _args(7)
    with torch.inference_mode():
        _chain(*first)
        _chain(*second)  # no new graph: nothing more to note
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 1
    (e,) = entries
    assert e["fn"] == f"{__name__}._chain" and e["inference"] is True
    assert e["args"][0] == {"shape": [2, 7, 16], "stride": [168, 24, 1], "offset": 0, "dtype": "float32",
                            "param": False, "inference": True}
    assert e["args"][1]["param"] is True and e["args"][1]["inference"] is False
    assert e["args"][2:] == [{"value": 1e-6}, {"torch_dtype": "bfloat16"}, {"tuple": [3, 5]}]

    # Control: in a new process without the replay, the first real call traces a graph.
    _new_process()
    args = _args(7)
    before = prewarm.graphs_compiled()
    with torch.inference_mode():
        _chain(*args)
    assert prewarm.graphs_compiled() == before + 1

    # With the replay first (on another thread, as at start-up), the real calls trace nothing, at the recorded
    # token count and at another one (the token axis is symbolic).
    _new_process()
    warm = prewarm.Prewarm(torch.device("cpu"), path=path)
    warm.join()
    assert warm.result == (1, 0)
    same, longer = _args(7), _args(11)
    before = prewarm.graphs_compiled()
    with torch.inference_mode():
        out = _chain(*same)
        _chain(*longer)
    assert prewarm.graphs_compiled() == before
    assert out.dtype == torch.bfloat16 and out.shape == (2, 7, 16)


def test_stale_entries_are_skipped_and_kept_out_of_the_next_manifest(tmp_path, dynamo_on_cpu):
    path = tmp_path / "manifest.json"
    good = {"fn": f"{__name__}._chain", "inference": True, "grad": False,
            "args": [{"shape": [2, 5, 16], "stride": [80, 16, 1], "offset": 0, "dtype": "float32", "param": False,
                      "inference": True},
                     {"shape": [16], "stride": [1], "offset": 0, "dtype": "float32", "param": True,
                      "inference": False},
                     {"value": 1e-6}, {"torch_dtype": "bfloat16"}, {"tuple": [1]}]}
    gone = {"fn": "worker.models.fused.no_longer_here", "args": [], "inference": True, "grad": False}
    wrong_arity = dict(good, args=good["args"][:2])
    path.write_text(json.dumps({"entries": [good, gone, wrong_arity]}))
    entries = prewarm.RECORDER.open(path)
    assert prewarm.replay(entries, torch.device("cpu")) == (1, 2)
    # A new graph in this process rewrites the manifest: entries whose function is gone are dropped.
    args = _args(3)
    with torch.inference_mode():
        _chain(*args)
    names = [e["fn"] for e in json.loads(path.read_text())["entries"]]
    assert "worker.models.fused.no_longer_here" not in names and len(names) == 3


def test_unwritable_arguments_and_unreadable_manifests(tmp_path, dynamo_on_cpu, caplog):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="worker.prewarm"):
        assert prewarm.RECORDER.open(path) == []
    assert "unreadable prewarm manifest" in caplog.text
    prewarm.RECORDER.note("f", ([torch.zeros(1)],))  # a list of tensors: no spec, not recorded
    prewarm.RECORDER.note("f", (object(),))
    assert path.read_text() == "{not json"


def test_manifest_path_is_keyed_and_needs_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    env = {"LINGBOT_COMPILE_CACHE": str(tmp_path)}
    path = prewarm.manifest_path(cuda, 2, 4, env)
    assert path.parent == tmp_path / "prewarm"
    assert path.name.endswith("_NVIDIA-H100-80GB-HBM3_r2of4.json") and torch.__version__.split("+")[0] in path.name
    assert prewarm.manifest_path(cuda, 0, 1, {}) is None
    assert prewarm.manifest_path(cuda, 0, 1, dict(env, LINGBOT_PREWARM="0")) is None
    assert prewarm.manifest_path(torch.device("cpu"), 0, 1, env) is None
