"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (s3server) importable without a package

import s3server  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Triton chooses its interpreter once, when it is imported, so the tests of a Triton kernel run in a child
    pytest with TRITON_INTERPRET=1 (tests/test_qk_norm_rope.py starts it); here they are left out. The rest of
    the suite does not run interpreted: that would double its time."""
    keep = [item for item in items if INTERPRETED == ("triton_interpreted" in item.keywords)]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    """A real `rclone serve s3` on 127.0.0.1 with SigV4 auth and one bucket already created; stopped after."""
    server = s3server.start(workdir=tmp_path_factory.mktemp("s3server"))
    try:
        yield server
    finally:
        s3server.stop(server)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny-model tests run faster on one thread: on 2 shared cores OpenMP oversubscription costs ~30x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_engine():
    """One warm tiny-preset engine (random weights, CPU) shared by the tests that only run jobs through it."""
    from worker.engine import Engine

    return Engine.load("tiny", device="cpu")


@pytest.fixture
def dynamo_eager(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """fusable traces on the CPU too, with Dynamo's eager backend: the graph is Dynamo's own (fullgraph, symbolic
    token axis, guards), only Inductor's code generation is left out."""
    import torch

    from worker.models import fused

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, fullgraph=True, options=None: real(fn, fullgraph=fullgraph,
                                                                                         backend="eager"))
    monkeypatch.setattr(fused, "_COMPILE_ON_CPU", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
