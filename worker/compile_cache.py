"""Where compiled kernels are kept between processes: LINGBOT_COMPILE_CACHE=<dir>.

A fresh container compiles the fused norm/RoPE/gate kernels (Inductor -> Triton) and FA4's attention kernels
(CuTe DSL) before its first chunk; on one H100 that is most of the warm-up chunk (53.6 s in a fresh process vs
19.2 s in a second one on the same machine, docs/PERFORMANCE.md v16). Pointing the three libraries' caches at one
directory on the model volume lets every later container reuse them. Each library keys its entries by source,
GPU architecture and its own version, so one directory serves any mix of GPUs and images.

The libraries read these variables when torch is first imported (Inductor's worker processes inherit them then),
so `configure` runs from `worker/__init__.py`, before any module of the worker imports torch. Variables already
set by the operator win.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("worker.compile_cache")


def variables(root: str | os.PathLike) -> dict[str, str]:
    """The environment that puts every kernel cache under `root`."""
    root = Path(root)
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TRITON_CACHE_DIR": str(root / "triton"),
        "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1",
        "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(root / "fa4"),
    }


def configure(environ: dict[str, str] | None = None) -> Path | None:
    """Apply LINGBOT_COMPILE_CACHE to the environment (os.environ by default); returns the directory or None."""
    env = os.environ if environ is None else environ
    raw = env.get("LINGBOT_COMPILE_CACHE", "").strip()
    if not raw:
        return None
    root = Path(raw).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("LINGBOT_COMPILE_CACHE=%s cannot be created (%s): kernels compile in every process", raw, e)
        return None
    for key, value in variables(root).items():
        env.setdefault(key, value)
    if environ is None and "torch" in sys.modules:
        log.warning("LINGBOT_COMPILE_CACHE was applied after torch was imported: Inductor's worker processes may "
                    "not see it; import worker before torch")
    return root
