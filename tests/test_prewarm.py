"""The start-up prewarm (worker/models/prewarm.py): a call that made Dynamo trace a fused chain is written to a
manifest, and replaying the manifest in a new process makes the real call's guards hit, so it traces nothing.

CPU runs the chains eagerly, so these tests let fusable compile on the CPU with Dynamo's eager backend: the
tracing and guards are Dynamo's own, only Inductor's code generation is left out."""

import json
import logging

import pytest
import torch
from torch import nn

from worker.models import prewarm
from worker.models.fused import fusable


@pytest.fixture
def dynamo_on_cpu(dynamo_eager):
    yield
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


def _recorded_one_call(tmp_path, tokens: int):
    """A manifest holding one traced call of _chain, as a previous process leaves it; then a 'new process'."""
    path = tmp_path / "manifest.json"
    prewarm.RECORDER.open(path)
    args = _args(tokens)
    with torch.inference_mode():
        _chain(*args)
    _new_process()
    return path


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
    assert set(names) == {f"{__name__}._chain"}


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
    env = {"LINGBOT_COMPILE_CACHE": str(tmp_path), "LINGBOT_PREWARM": "1"}
    path = prewarm.manifest_path(cuda, 2, 4, env)
    assert path.parent == tmp_path / "prewarm"
    assert path.name.endswith("_NVIDIA-H100-80GB-HBM3_r2of4.json") and torch.__version__.split("+")[0] in path.name
    assert prewarm.manifest_path(cuda, 0, 1, {"LINGBOT_PREWARM": "1"}) is None  # no cache folder
    assert prewarm.manifest_path(cuda, 0, 1, {"LINGBOT_COMPILE_CACHE": str(tmp_path)}) == path.with_name(
        path.name.replace("r2of4", "r0of1"))  # on by default where there is a cache folder
    assert prewarm.manifest_path(cuda, 0, 1, dict(env, LINGBOT_PREWARM="0")) is None
    assert prewarm.manifest_path(torch.device("cpu"), 0, 1, env) is None


def test_a_replay_under_other_global_state_is_reported_and_its_miss_logged(tmp_path, dynamo_on_cpu, caplog):
    """Dynamo guards every graph on process-wide settings; a replay made while one of them differs (here the
    default dtype, which transformers changes while it builds a model) traces graphs the real call cannot use.
    The replay says so, and the real call's trace is logged as one the replay should have covered."""
    path = _recorded_one_call(tmp_path, tokens=5)
    entries = prewarm.RECORDER.open(path)
    prewarm.RECORDER.replayed = True
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with caplog.at_level(logging.INFO, logger="worker.prewarm"):
            assert prewarm.replay(entries, torch.device("cpu")) == (1, 0)
    finally:
        torch.set_default_dtype(old)
    assert "global state differs from the recording (default_dtype recorded" in caplog.text
    assert len(json.loads(path.read_text())["entries"]) == 1  # what the replay traced is not recorded again
    args = _args(5)
    before = prewarm.graphs_compiled()
    with caplog.at_level(logging.INFO, logger="worker.prewarm"), torch.inference_mode():
        _chain(*args)
    assert prewarm.graphs_compiled() == before + 1  # the replayed graph did not match
    assert "_chain traced a graph after the replay (its entry was replayed: a guard differed)" in caplog.text



def test_the_replay_waits_while_a_library_load_holds_the_process_state(tmp_path, dynamo_on_cpu):
    """diffusers and transformers change the default dtype while they build a model (Engine.load runs them under
    prewarm.exclusive): no entry is replayed meanwhile."""
    path = _recorded_one_call(tmp_path, tokens=4)
    with prewarm.exclusive():
        warm = prewarm.Prewarm(torch.device("cpu"), path=path)
        warm.thread.join(timeout=0.5)
        assert warm.thread.is_alive() and warm.result is None
    warm.join()
    assert warm.result == (1, 0)


def test_a_replay_beside_real_library_loads_leaves_the_process_state_alone(tmp_path, dynamo_on_cpu):
    """The replay runs while Engine.load loads the VAE (diffusers) and the text encoder (transformers) in bf16,
    which set the process's default dtype while they build. Under `exclusive` (what Engine.load does) no trace
    straddles a load: afterwards the default dtype is float32 and every replayed graph serves its real call."""
    from tests.checkpoints import write_components
    from worker.models.loading import ModelSource, load_text_encoder_for, load_vae_for

    write_components(tmp_path / "ckpt")
    source = ModelSource(spec=str(tmp_path / "ckpt"), kind="local", components=tmp_path / "ckpt")
    path = tmp_path / "manifest.json"
    prewarm.RECORDER.open(path)
    # each output dtype and tuple length is its own graph
    variants = [(dt, (1,) * n) for dt in (torch.bfloat16, torch.float16, torch.float32) for n in (1, 2)]
    x, w, eps, _, _ = _args(6)
    with torch.inference_mode():
        for dt, groups in variants:
            _chain(x, w, eps, dt, groups)
    assert len(json.loads(path.read_text())["entries"]) == len(variants)
    _new_process()
    warm = prewarm.Prewarm(torch.device("cpu"), path=path)
    loads = 0
    while warm.thread.is_alive() or loads == 0:
        with prewarm.exclusive():
            load_text_encoder_for(source, torch.bfloat16, "cpu")
            load_vae_for(source, torch.bfloat16, "cpu")
        loads += 1
    warm.join()
    assert warm.result == (len(variants), 0)
    assert torch.get_default_dtype() == torch.float32
    before = prewarm.graphs_compiled()
    with torch.inference_mode():
        for dt, groups in variants:
            _chain(x, w, eps, dt, groups)
    assert prewarm.graphs_compiled() == before


def test_join_puts_back_a_default_dtype_changed_while_loading(tmp_path, dynamo_on_cpu, caplog):
    path = _recorded_one_call(tmp_path, tokens=4)
    warm = prewarm.Prewarm(torch.device("cpu"), path=path)
    warm.thread.join()  # (a trace running across the change below would put float32 back itself)
    torch.set_default_dtype(torch.float64)  # a load outside `exclusive` that never put it back
    with caplog.at_level(logging.WARNING, logger="worker.prewarm"):
        warm.join()
    assert torch.get_default_dtype() == torch.float32
    assert "default_dtype 6 -> 7" in caplog.text
