"""Which kernel runs the DiT's attention.

At an 18-frame span self-attention is about half of a chunk's FLOPs (docs/PERFORMANCE.md), so its kernel matters
more than any other. Two implementations, same math ([B, L, H, D] in and out, no dropout, scale 1/sqrt(D)):

- `sdpa`: PyTorch's scaled_dot_product_attention, which picks cuDNN (Hopper) or FlashAttention-2 on the GPU and
  the math path on the CPU. Always there; the only one that takes a mask.
- `fa4`: FlashAttention-4 (the `flash-attn-4` package, kernels written in the CuTe DSL and compiled on first
  use), for Hopper and Blackwell. An optional extra: `pip install ".[fa4]"`.

LINGBOT_ATTENTION picks one: `auto` (default) takes fa4 where it is installed and the GPU and inputs suit it,
else sdpa; `sdpa` or `fa4` force one, and forcing fa4 where it cannot run is an error that says why.

Under `auto`, short key sequences (the cross-attention's 512 text tokens) go to cuDNN through SDPA even where FA4
runs: FA4's Hopper kernel pays a fixed cost per query tile that only long key sequences amortise. One H100, 4680
queries, 40 heads: 512 keys 0.209 ms FA4 vs 0.141 ms cuDNN; 9360 keys 1.464 vs 1.602 ms (docs/PERFORMANCE.md v16).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from worker.models import wave_split as waves

log = logging.getLogger("worker.attention")

BACKENDS = ("auto", "sdpa", "fa4")
_FA4_ARCHS = (9, 10)  # compute capability majors with FA4 forward kernels tuned for them (Hopper, Blackwell)
# Under `auto`, key sequences up to this long take cuDNN instead of FA4 (measured crossover between 512 and 9360).
SHORT_KEYS = 2048
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def backend_setting() -> str:
    value = os.environ.get("LINGBOT_ATTENTION", "auto").strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"LINGBOT_ATTENTION={value!r}: must be one of {', '.join(BACKENDS)}")
    return value


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *,
              wave_split: bool = False) -> torch.Tensor:
    """[B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D]. wave_split: FA4's last wave may be filled by a few heads'
    keys split beside the rest (worker/models/wave_split.py), where its plan predicts a gain."""
    setting = os.environ.get("LINGBOT_ATTENTION")
    if mask is None and _use_fa4(q.device, q.dtype, q.shape[-1], setting):
        if k.shape[1] > SHORT_KEYS:
            out = waves.attention(q, k, v, _fa4_fwd) if wave_split else None
            return out if out is not None else _fa4_call()(q, k, v)[0]
        if backend_setting() == "fa4":
            return _fa4_call()(q, k, v)[0]
        with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
            return _sdpa(q, k, v, None)
    return _sdpa(q, k, v, mask)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def active_backend(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128) -> str:
    """The backend `attention` uses for unmasked inputs like these with long key sequences (the self-attention),
    for logs and benchmark reports."""
    return "fa4" if _fa4_for(torch.device(device), dtype, head_dim) else "sdpa"


@functools.lru_cache(maxsize=None)
def _use_fa4(device: torch.device, dtype: torch.dtype, head_dim: int, setting: str | None) -> bool:
    """_fa4_for, decided once per device, kind of input and LINGBOT_ATTENTION value (the key): attention runs
    ~2000 times a chunk. Errors are not cached, so a forced fa4 that cannot run fails every call."""
    return _fa4_for(device, dtype, head_dim)


def _fa4_for(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    setting = backend_setting()
    if setting == "sdpa":
        return False
    if device.type != "cuda":
        if setting == "fa4":
            raise RuntimeError(f"LINGBOT_ATTENTION=fa4 needs a CUDA device, not {device.type}")
        return False
    index = torch.cuda.current_device() if device.index is None else device.index
    reason = _fa4_unsupported(index, dtype, head_dim)
    if reason is None:
        return True
    if setting == "fa4":
        raise RuntimeError(f"LINGBOT_ATTENTION=fa4 cannot run here: {reason}")
    return False


@functools.lru_cache(maxsize=None)
def _fa4_unsupported(device_index: int, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if FA4 runs these inputs on this GPU, else why not. Decided once per GPU and kind of input.

    Past the static checks, one small call (which compiles the kernel every later call of this kind reuses:
    sequence lengths are not part of FA4's compile key) is compared with SDPA, so a package that imports but
    does not work with this torch or driver falls back here instead of failing a job.
    """
    arch_major = torch.cuda.get_device_capability(device_index)[0]
    if arch_major not in _FA4_ARCHS:
        reason = f"compute capability {arch_major}.x has no FA4 forward kernel here (needs 9.x or 10.x)"
    elif dtype not in (torch.bfloat16, torch.float16):
        reason = f"dtype {dtype} (FA4 takes bf16 or fp16)"
    elif head_dim % 8 or not 8 <= head_dim <= 256:
        reason = f"head dim {head_dim} (FA4 takes multiples of 8 up to 256)"
    else:
        reason = _fa4_smoke_test(_test_device(device_index), dtype, head_dim)
    if reason is None:
        log.info("attention: FlashAttention-4 on cuda:%d (sm%d0, %s, head dim %d)",
                 device_index, arch_major, dtype, head_dim)
    else:
        log.info("attention: PyTorch SDPA on cuda:%d, not FA4: %s", device_index, reason)
    return reason


def _fa4_smoke_test(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    try:
        fa4 = _fa4_call()
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        return f"flash-attn-4 is not importable ({type(e).__name__}: {e}); install the fa4 extra"
    g = torch.Generator(device=device).manual_seed(0)
    # Lengths off the kernel's 128-row tiles, so the masked edges are checked too.
    q, k, v = (torch.randn(1, n, 2, head_dim, device=device, dtype=dtype, generator=g) for n in (200, 333, 333))
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        try:
            out = fa4(q, k, v)[0]
        except Exception as e:  # noqa: BLE001
            return f"flash-attn-4 failed a test call ({type(e).__name__}: {e})"
        ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v))).transpose(1, 2)
        err = ((out.float() - ref).norm() / ref.norm()).item()
    if not err < 2e-2:  # bf16 rounding gives ~3e-3
        return f"flash-attn-4 gave a wrong test result (relative error {err:.2e})"
    return None


def _test_device(index: int) -> torch.device:
    return torch.device("cuda", index)


@functools.lru_cache(maxsize=1)
def _fa4_call():
    from flash_attn.cute import flash_attn_func  # imports the CuTe DSL: seconds, so only on first use

    return flash_attn_func


@functools.lru_cache(maxsize=1)
def _fa4_fwd():
    # The function behind flash_attn_func, which also takes `out` (wave_split writes two head groups into one
    # output). Private, so the fa4 extra pins the package's version.
    from flash_attn.cute.interface import _flash_attn_fwd

    return _flash_attn_fwd
