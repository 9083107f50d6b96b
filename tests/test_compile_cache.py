"""LINGBOT_COMPILE_CACHE (worker/compile_cache.py): importing the worker points torch's kernel caches at one folder.

Whether a warm folder shortens a GPU start is measured on a GPU (docs/PERFORMANCE.md v16); here: that the
libraries see the folder when the worker is imported first, that the operator's own settings win, and that a bad
folder is reported instead of failing the start.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from worker import compile_cache


def _inductor_dirs(env: dict[str, str]) -> dict[str, str]:
    code = ("import json, worker, torch\n"
            "from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir\n"
            "import os\n"
            "print(json.dumps({'inductor': cache_dir(), 'triton': triton_cache_dir(0),"
            " 'fa4': os.environ.get('FLASH_ATTENTION_CUTE_DSL_CACHE_DIR')}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in compile_cache.variables("/x") and k != "LINGBOT_COMPILE_CACHE"}
    return {**env, **extra}


def test_importing_the_worker_points_torchs_caches_at_the_folder(tmp_path) -> None:
    root = tmp_path / "cache"
    dirs = _inductor_dirs(_env(LINGBOT_COMPILE_CACHE=str(root)))
    assert dirs == {"inductor": str(root / "inductor"), "triton": str(root / "triton"), "fa4": str(root / "fa4")}
    assert root.is_dir()
    # without the setting torch keeps its own defaults
    plain = _inductor_dirs(_env())
    assert not plain["inductor"].startswith(str(tmp_path)) and plain["fa4"] is None


def test_the_operators_own_settings_win(tmp_path) -> None:
    env = {"LINGBOT_COMPILE_CACHE": str(tmp_path), "TRITON_CACHE_DIR": "/elsewhere/triton"}
    assert compile_cache.configure(env) == tmp_path
    assert env["TRITON_CACHE_DIR"] == "/elsewhere/triton"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert compile_cache.configure({}) is None


def test_a_folder_that_cannot_be_made_is_reported_not_fatal(tmp_path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    env = {"LINGBOT_COMPILE_CACHE": str(blocker / "cache")}
    with caplog.at_level(logging.WARNING, logger="worker.compile_cache"):
        assert compile_cache.configure(env) is None
    assert "TORCHINDUCTOR_CACHE_DIR" not in env
    assert "LINGBOT_COMPILE_CACHE" in caplog.text and "kernels compile in every process" in caplog.text
