"""The DiT's elementwise chains (norms, modulation, RoPE, gated residuals), fused into single kernels on CUDA.

Between its GEMMs and attention a block runs LayerNorm/modulation/RMSNorm/RoPE/gating over [tokens, 5120] fp32
tensors; as separate eager kernels that was ~30% of a block's GPU time (docs/PERFORMANCE.md, v0). Each chain
below is one function, compiled by Inductor on CUDA and run eagerly elsewhere (tests, the tiny model): same math.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from worker.models import frame_pairs, prewarm

if TYPE_CHECKING:
    from worker.models.fp8 import Fp8Input

log = logging.getLogger("worker.fused")
_COMPILE = os.environ.get("LINGBOT_COMPILE", "1") != "0"
_SINGLE_PASS = os.environ.get("LINGBOT_SINGLE_PASS_ROWS", "1") != "0"
_GELU_EPILOGUE = os.environ.get("LINGBOT_GELU_EPILOGUE", "1") != "0"
_COMPILE_ON_CPU = False  # the chains run eagerly off CUDA; tests set this to exercise the compiled path on the CPU


def fusable(*, tokens: dict[int, int | tuple[int, ...]], single_pass_rows: bool = True) -> Callable[[Callable], Callable]:
    """Compile `fn` on CUDA with only the token axes symbolic: tokens maps argument index -> its token dim(s).

    The token count changes with the request size (and the sequence-parallel split), so it must stay symbolic
    or every new size would stall a job for a recompile. Everything else (model dim, heads, head dim) is static:
    with those symbolic too (dynamic=True) Inductor emitted looped multi-pass reductions and div/mod indexing,
    and the LayerNorm and RoPE kernels ran at a third to a sixth of memory bandwidth (docs/PERFORMANCE.md, 2026-11-22).
    single_pass_rows: keep each reduction row in registers (see SinglePassRows); measured per chain.
    """

    def wrap(fn: Callable) -> Callable:
        compiled: tuple | None = None
        name = f"{fn.__module__}.{fn.__qualname__}"

        @functools.wraps(fn)
        def run(*args):
            nonlocal compiled
            if not (_COMPILE and (args[0].is_cuda or _COMPILE_ON_CPU)):
                return fn(*args)
            if compiled is None:
                from torch._inductor.virtualized import V

                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
                factory = _row_choices if single_pass_rows and _SINGLE_PASS else _default_choices
                # The config option keys Inductor's compile cache; the handler is what the compile consults
                # (Inductor keeps one heuristics object per thread after its first compile there).
                compiled = (torch.compile(fn, fullgraph=True, options={"inductor_choices_class": factory}),
                            functools.partial(V.set_choices_handler, factory()))
            fn_compiled, use_choices = compiled
            if fn_compiled is None:
                return fn(*args)
            for i, dims in tokens.items():
                if i >= len(args) or not isinstance(args[i], torch.Tensor):  # an optional tensor left out
                    continue
                for dim in (dims,) if isinstance(dims, int) else dims:
                    if dim < args[i].dim():
                        torch._dynamo.maybe_mark_dynamic(args[i], dim)
            try:
                # Only while a prewarm manifest is recorded (prewarm.enabled): nothing added to every call otherwise.
                graphs = prewarm.graphs_compiled() if prewarm.RECORDER.recording else None
                with use_choices():
                    out = fn_compiled(*args)
                if graphs is not None and prewarm.graphs_compiled() != graphs:  # this call traced a graph
                    prewarm.RECORDER.note(name, args)
                return out
            except torch._dynamo.exc.BackendCompilerFailed as exc:
                if torch.cuda.is_current_stream_capturing():
                    # A recompile inside a CUDA graph capture fails for reasons of its own (no host copies there):
                    # fail the capture, which leaves the job eager, and keep the kernel for every later call.
                    raise
                # Same math eagerly: a kernel that fails to build must not take a warm worker down.
                log.warning("fused %s failed to compile, running it eagerly: %s", fn.__name__, str(exc)[:500])
                compiled = (None, None)
                return fn(*args)

        run.eager = fn
        prewarm.REGISTRY[name] = run
        return run

    return wrap


ROW_IN_REGISTERS = 8192  # reductions over rows up to this many elements (the 5120 model dim) stay in registers


def _default_choices():
    from torch._inductor.choices import InductorChoices

    class Default(InductorChoices):
        def uuid(self) -> str:
            return "inductor-default"

    return Default()


def _row_choices():
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class SinglePassRows(InductorChoices):
        """Inductor keeps a reduction row in registers ("persistent") only up to 1024 elements; longer rows
        get a looped kernel that reads the row once for the statistics and again to normalise. For our
        5120-wide fp32 rows that second pass is a second trip to HBM (the rows do not stay in L2): the LayerNorm
        chains ran at about a third of memory bandwidth. A whole row in registers is 20 KB: cheap."""

        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
            default = InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)
            if cooperative_reduction:
                return default
            return default or bool(V.graph.sizevars.statically_known_leq(features.reduction_numel, ROW_IN_REGISTERS))

        def uuid(self) -> str:  # part of Inductor's cache key
            return f"lingbot-single-pass-rows-{ROW_IN_REGISTERS}"

    return SinglePassRows()


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).type_as(x)


@fusable(tokens={0: 1})
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Wan's RMSNorm over the full model dim (across heads): normalise in fp32, scale in the input dtype."""
    return _rms(x, weight, eps)


# Not single-pass: with the whole row in registers the pair-swapping RoPE indexing ran 1.7x slower (129 vs 77 us
# per call on an H200, docs/PERFORMANCE.md v9), more than the second read costs.
@fusable(tokens={0: 1, 3: 0, 4: 0}, single_pass_rows=False)
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                  heads: int) -> torch.Tensor:
    """[B, L, dim] -> RMSNorm across heads -> [B, L, H, D] rotated: one pass instead of two on one GPU."""
    return _rope(_rms(x, weight, eps).unflatten(-1, (heads, -1)), cos, sin)


@fusable(tokens={0: 1, 3: 0, 4: 0}, single_pass_rows=False)
def rms_norm_rope_packed(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                         groups: tuple[int, ...]) -> torch.Tensor:
    """rms_norm_rope over sum(groups) heads, written flat as the sequence-parallel exchange sends it: each rank's
    head group ([B, L, groups[j], D]) contiguous, in rank order (worker/parallel/sp.py). Inductor writes the groups
    straight into one buffer, so the norm, the rotation and the send layout are one pass over q or k."""
    y = _rope(_rms(x, weight, eps).unflatten(-1, (sum(groups), -1)), cos, sin)
    return torch.cat([part.reshape(-1) for part in y.split(list(groups), dim=2)])


@fusable(tokens={0: 1})
def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, dtype: torch.dtype):
    """LN(x) * (1 + scale) + shift, no affine, fp32 math, cast for the next matmul."""
    return (F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift).to(dtype)


@fusable(tokens={0: 1, 1: 1, 3: 1, 4: 1})
def attn_residual_camera_norm3(x, attn, gate, cam_scale, cam_shift, w3, b3, eps: float, dtype: torch.dtype):
    """x += gate * attn; camera modulation; then norm3 (affine LN) for the cross-attention query."""
    x = x + gate * attn.float()
    x = (1 + cam_scale) * x + cam_shift
    return x, F.layer_norm(x, (x.shape[-1],), w3.float(), b3.float(), eps).to(dtype)


@fusable(tokens={0: 1, 1: 1})
def residual_modulated_norm(x, y, shift, scale, eps: float, dtype: torch.dtype):
    """x += y (cross-attention out); then the FFN's LN(x) * (1 + scale) + shift."""
    x = x + y.float()
    return x, (F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift).to(dtype)


@fusable(tokens={0: 1, 1: 1})
def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x + gate * y.float()


@fusable(tokens={0: 1, 1: 1})
def gated_residual_modulated_norm(x, y, gate, shift, scale, eps: float, dtype: torch.dtype):
    """gated_residual, then modulated_norm of its result: a block's FFN residual and the next block's (or the
    head's) first norm. Apart they are two passes over the fp32 residual stream; here x is read once."""
    x = gated_residual.eager(x, y, gate)
    return x, modulated_norm.eager(x, shift, scale, eps, dtype)


def linear_gelu(linear: nn.Module, x: torch.Tensor) -> torch.Tensor | Fp8Input:
    """gelu_tanh(linear(x)); on CUDA the GELU runs in the GEMM's epilogue (cuBLASLt GELU_BIAS, the tanh form)
    instead of as a separate pass over the [tokens, 13824] activation. FP8 linears (worker.models.fp8) run the GELU
    in the pass that quantises it for the down projection, and return that quantised input."""
    if hasattr(linear, "forward_gelu"):
        return linear.forward_gelu(x)
    if x.is_cuda and _GELU_EPILOGUE and isinstance(linear, nn.Linear) and linear.bias is not None:
        out = torch._addmm_activation(linear.bias, x.reshape(-1, x.shape[-1]), linear.weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], -1)
    return F.gelu(linear(x), approximate="tanh")


def _wan_rms(x: torch.Tensor, gamma: torch.Tensor, scale: float, bias, silu: bool, dim: int) -> torch.Tensor:
    xf = x.float()
    n = (xf / xf.norm(2, dim, keepdim=True).clamp_min(1e-12)).to(x.dtype)
    y = n * scale * gamma + bias
    return F.silu(y) if silu else y


# A causal conv's input written behind the frames cached for it: with `front` (the conv's cached frames, or its
# cached pair) the chains below return (cat([front, out], 2), out's last front.shape[2] frames), the conv's input
# and what it caches next, computed in the chain's own pass: Inductor writes `out` straight into its slot of the
# concatenation, which would otherwise be a copy of the whole conv input (worker.models.causal_conv.conv_behind_cache).
def _behind(front: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenation and its last frames, both in memory order (time on dim 1, where a frame is one contiguous
    block). `out` must be in the iteration order of the chain's reduction (for the pairs [B, n, H, W, 2, C], not
    flattened to 2C): a view in between kept Inductor from computing the norm and writing it in one kernel
    (docs/PERFORMANCE.md v30a)."""
    ext = torch.cat([front, out], 1)
    return ext, ext[:, -front.shape[1]:].clone()


def _frames_memory_order(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 4, 1)


def _frames_from_memory_order(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 4, 1, 2, 3)


@fusable(tokens={0: (2, 3, 4), 5: (3, 4)}, single_pass_rows=False)  # T, H, W vary with the request and the stage
def wan_rms_norm(x: torch.Tensor, gamma: torch.Tensor, scale: float, bias, silu: bool = False,
                 front: torch.Tensor | None = None):
    """The Wan VAE's channel RMSNorm (diffusers' WanRMS_norm: F.normalize over channels in fp32, then
    * sqrt(C) * gamma + bias), and with silu the SiLU that follows it in every residual block, in one pass.
    Eagerly it is six passes over a [1, C, T, H, W] tensor, several of them broadcasting kernels that do not
    vectorise on channels-last activations: most of the decoder's non-conv time. With `front`: see _behind."""
    out = _wan_rms(x, gamma, scale, bias, silu, 1)
    if front is None:
        return out
    ext, last = _behind(_frames_memory_order(front), _frames_memory_order(out))
    return _frames_from_memory_order(ext), _frames_from_memory_order(last)


# The Wan VAE's residual blocks run their two 3x3x3 convs without bias (worker.models.vae._fuse_residual_blocks):
# PyTorch's cuDNN path adds a conv's bias as a separate in-place pass over the whole output (cudnn_convolution, then
# output.add_(bias)), which these two kernels absorb. Same order of operations as that path: (conv + bias) first.
def _channel_bias(bias: torch.Tensor) -> torch.Tensor:
    """A conv's [C] bias shaped to broadcast over dim 1 of [B, C, T, H, W], whatever the memory format."""
    return bias.view(-1, 1, 1, 1)


@fusable(tokens={0: (2, 3, 4), 6: (3, 4)}, single_pass_rows=False)
def conv_bias_rms_norm(x: torch.Tensor, conv_bias: torch.Tensor, gamma: torch.Tensor, scale: float, bias,
                       silu: bool = False, front: torch.Tensor | None = None):
    """wan_rms_norm(x + conv_bias): the previous conv's bias add inside the norm(+SiLU) kernel."""
    return wan_rms_norm.eager(x + _channel_bias(conv_bias), gamma, scale, bias, silu, front)


@fusable(tokens={0: (2, 3, 4), 2: (2, 3, 4)}, single_pass_rows=False)
def conv_bias_residual(x: torch.Tensor, conv_bias: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """(x + conv_bias) + shortcut, in that order: a residual block's last conv's bias add and its residual add."""
    return x + _channel_bias(conv_bias) + shortcut


# The same chains for the residual blocks that run their convs on frame pairs (worker/models/frame_pairs.py,
# worker.models.vae._paired_residual_blocks): each computes in the memory order of its output, where channels come
# last, and writes the layout the next op reads (pairs into the conv, frames out of the block) in the same pass.
def _last(t):
    """A norm's [C, 1, 1, 1] parameter (or its scalar 0.) for tensors with channels last."""
    return t.reshape(-1) if isinstance(t, torch.Tensor) else t


# The time axis static: always 4 frames (2 pairs) at the stage that runs on pairs, and with it symbolic Inductor
# could not tell that 2n frames are n pairs of 2 and copied the packed output once more (v30a).
@fusable(tokens={0: (3, 4), 5: (3, 4)}, single_pass_rows=False)
def wan_rms_norm_to_pairs(x: torch.Tensor, gamma: torch.Tensor, scale: float, bias, silu: bool = False,
                          front: torch.Tensor | None = None):
    """frame_pairs.to_pairs(wan_rms_norm(x)): [B, C, 2n, H, W] -> packed [B, 2C, n, H, W]; `front` a packed pair."""
    y = frame_pairs.frames_in_pairs_order(x)
    return _pairs_out(_wan_rms(y, _last(gamma), scale, _last(bias), silu, -1), front)


@fusable(tokens={0: (2, 3, 4), 6: (3, 4)}, single_pass_rows=False)
def conv_bias_rms_norm_pairs(p: torch.Tensor, conv_bias: torch.Tensor, gamma: torch.Tensor, scale: float, bias,
                             silu: bool = False, front: torch.Tensor | None = None):
    """conv_bias_rms_norm on packed frame pairs, packed in and out."""
    y = frame_pairs.pairs_view(p) + conv_bias
    return _pairs_out(_wan_rms(y, _last(gamma), scale, _last(bias), silu, -1), front)


def _pairs_out(out: torch.Tensor, front: torch.Tensor | None):
    """A pair chain's result [B, n, H, W, 2, C] as packed pairs, or behind the packed pair `front`."""
    if front is None:
        return frame_pairs.from_memory_order(out.contiguous())
    ext, last = _behind(frame_pairs.pairs_view(front), out)
    return frame_pairs.from_memory_order(ext), frame_pairs.from_memory_order(last)


@fusable(tokens={0: (2, 3, 4), 2: (2, 3, 4)}, single_pass_rows=False)
def conv_bias_residual_from_pairs(p: torch.Tensor, conv_bias: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """conv_bias_residual(frame_pairs.from_pairs(p), conv_bias, shortcut), channels-last-3d."""
    y = frame_pairs.pairs_in_frames_order(p)
    return ((y + conv_bias) + shortcut.permute(0, 2, 3, 4, 1)).contiguous().permute(0, 4, 1, 2, 3)
