"""q and k after their projection: RMSNorm across all heads, RoPE, written where they go next, in one pass.

Per token row of `dim` values: one sum of squares, the norm (in fp32, rounded to the input dtype, times the weight),
then each head's interleaved pairs rotated by the token's angles; the result goes straight to its destination:
- one GPU: the chunk's K cache slot for k (no copy into the cache afterwards), [B, L, H, D] for q;
- sequence parallel: the exchange's send layout, each rank's head group [B, L, h_j, D] contiguous in rank order.

It is memory-bound: one read and one write of [tokens, dim]. Inductor's version of the same chain
(worker/models/fused.py rms_norm_rope_packed) made two kernels, a looped reduction that read each row twice and a
separate copy for the send layout; single-pass, its pair-swapping indexing ran slower still (v9). The Triton kernel
below reads a row as [pairs, 2] and splits it into the pairs' two halves, so the rotation needs no indexing at
all. On an H100 (scripts/qk_kernel_probe.py, docs/PERFORMANCE.md v27) it takes 42.5 / 25.2 / 11.4 us at one, two
and four GPUs' share of a chunk against Inductor's 78 / 69 / 186, with a floor of 32 / 16 / 8 us, and gives
PyTorch's eager results bit for bit. Elsewhere (CPU, no Triton) the fused chains run: fused._rms and fused._rope
are the reference, in the tests too.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os

import torch

from worker.models import fused, prewarm

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, or a CPU install without it): the fused chains run instead
    triton = None

log = logging.getLogger("worker.qk_norm_rope")
_ENABLED = os.environ.get("LINGBOT_QK_KERNEL", "triton") != "inductor"  # inductor: fused.py's chains (A/B)
_failed = False  # the kernel failed to build once: the process keeps to the fused chains

if _ENABLED and triton is not None:
    # On CUDA the kernel replaces these chains: a prewarm manifest written before it must not trace them at every
    # start (an entry whose function is not registered is skipped, and dropped when the manifest is next written).
    for _chain in (fused.rms_norm_rope, fused.rms_norm_rope_packed):
        prewarm.REGISTRY.pop(f"{_chain.__module__}.{_chain.__qualname__}", None)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 groups: tuple[int, ...], out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L, H*D] -> RMSNorm(x) * weight, roped per head with cos/sin [L, D/2], as a flat tensor of B*L*H*D
    values in the layout of `groups` (heads per rank; one group is plain [B, L, H, D]). out: where to write it
    (any contiguous tensor of that many values, e.g. a cache slot); returned."""
    global _failed
    heads = sum(groups)
    if _triton_runs(x):
        try:
            return _launch(x, weight, eps, cos, sin, groups, out)
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to build must not take a warm worker down
            if _interpreting() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
                raise
            _failed = True
            log.warning("the q/k norm+RoPE kernel failed, using the fused chains: %s", str(exc)[:500])
    if len(groups) == 1:
        y = fused.rms_norm_rope(x, weight, eps, cos, sin, heads)
    else:
        y = fused.rms_norm_rope_packed(x, weight, eps, cos, sin, groups)
    if out is None:
        return y.reshape(-1)
    out.view(-1).copy_(y.reshape(-1))
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_runs(x: torch.Tensor) -> bool:
    return _ENABLED and not _failed and triton is not None and (x.is_cuda or _interpreting())


if triton is not None:
    @triton.jit
    def _rotate_store(x, j, live, rstd, x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, first_head_ptr, group_heads_ptr,
                      row, t, rows, HALF_D: tl.constexpr):
        """Pairs j (live ones) of a row, x [len(j), 2] in fp32: normalised, weighted, rotated, stored."""
        offs = j[:, None] * 2 + tl.arange(0, 2)[None, :]
        mask = live[:, None]
        # The reference's roundings: normalised in fp32 and cast to x's dtype, times the weight in the promoted dtype.
        n = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a, b = tl.split((n * w).to(out_ptr.dtype.element_ty).to(tl.float32))
        angle = t * HALF_D + j % HALF_D
        c = tl.load(cos_ptr + angle, mask=live, other=0.0)
        s = tl.load(sin_ptr + angle, mask=live, other=0.0)
        y = tl.join(a * c - b * s, a * s + b * c).to(out_ptr.dtype.element_ty)
        # Head h of group g: that group's block starts after rows * D * (heads before g); inside it [row, h - h0, :].
        h = j // HALF_D
        h0 = tl.load(first_head_ptr + h, mask=live, other=0).to(tl.int64)
        hg = tl.load(group_heads_ptr + h, mask=live, other=1).to(tl.int64)
        dst = rows * (2 * HALF_D) * h0 + (row * hg + h - h0) * (2 * HALF_D) + 2 * (j % HALF_D)
        tl.store(out_ptr + dst[:, None] + tl.arange(0, 2)[None, :], y, mask=mask)

    @triton.jit
    def _norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, first_head_ptr, group_heads_ptr, rows, tokens,
                          eps, DIM: tl.constexpr, HALF_D: tl.constexpr, HEAD_PAIRS: tl.constexpr,
                          TAIL_PAIRS: tl.constexpr):
        # One row per program, as [pairs, 2], in two power-of-two tiles (5120 values: 2048 + 512 pairs) rather than
        # one padded to 4096 pairs: 37% fewer registers per row, so more rows in flight per SM.
        row = tl.program_id(0).to(tl.int64)  # b * tokens + t
        t = row % tokens
        j1 = tl.arange(0, HEAD_PAIRS)
        j2 = HEAD_PAIRS + tl.arange(0, TAIL_PAIRS)
        live1 = j1 < DIM // 2
        live2 = j2 < DIM // 2
        base = x_ptr + row * DIM
        x1 = tl.load(base + j1[:, None] * 2 + tl.arange(0, 2)[None, :], mask=live1[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(base + j2[:, None] * 2 + tl.arange(0, 2)[None, :], mask=live2[:, None], other=0.0).to(tl.float32)
        squares = tl.sum(tl.sum(x1 * x1, axis=1), axis=0) + tl.sum(tl.sum(x2 * x2, axis=1), axis=0)
        rstd = tl.math.rsqrt(squares / DIM + eps)
        _rotate_store(x1, j1, live1, rstd, x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, first_head_ptr,
                      group_heads_ptr, row, t, rows, HALF_D)
        _rotate_store(x2, j2, live2, rstd, x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, first_head_ptr,
                      group_heads_ptr, row, t, rows, HALF_D)


@functools.cache
def _head_tables(groups: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: the first head of its group and the group's head count (int32, on the device)."""
    first = [start for start, n in zip(itertools.accumulate((0, *groups)), groups) for _ in range(n)]
    sizes = [n for n in groups for _ in range(n)]
    return (torch.tensor(first, dtype=torch.int32, device=device),
            torch.tensor(sizes, dtype=torch.int32, device=device))


def _launch(x, weight, eps, cos, sin, groups, out, num_warps: int | None = None):
    b, tokens, dim = x.shape
    heads = sum(groups)
    half_d = dim // heads // 2
    if cos.shape != (tokens, half_d) or dim % (2 * heads):
        raise ValueError(f"q/k norm+RoPE: x {tuple(x.shape)} with {heads} heads and tables {tuple(cos.shape)}")
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.numel(), dtype=out_dtype, device=x.device)
    elif not out.is_contiguous() or out.numel() != x.numel() or out.dtype != out_dtype:
        raise ValueError(f"q/k norm+RoPE: out must be contiguous {out_dtype} with {x.numel()} values")
    first, sizes = _head_tables(tuple(groups), x.device)
    rows = b * tokens
    head = 1 << (dim // 2).bit_length() - 1  # the largest power of two of pairs, then the rest (padded)
    tail = 1 << max(dim // 2 - head - 1, 0).bit_length()
    _norm_rope_kernel[(rows,)](x.contiguous(), weight.contiguous(), cos.contiguous(), sin.contiguous(), out, first,
                               sizes, rows, tokens, eps, DIM=dim, HALF_D=half_d, HEAD_PAIRS=head, TAIL_PAIRS=tail,
                               num_warps=num_warps or 4)  # 4 beat 8 and 16 at every share (v27)
    return out
