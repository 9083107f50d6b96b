"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (s3server) importable without a package

import s3server  # noqa: E402


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
