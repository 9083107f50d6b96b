"""Optional FP8 (e4m3) linears for the DiT blocks, behind LINGBOT_FP8=1 / `bench --fp8`.

Weights are quantised once per output channel; activations per token at run time; the product runs in
`torch._scaled_mm` with row-wise scales, the bias in its epilogue and bf16 output. The FP8 weights replace the
bf16 ones (18.5 GB instead of 37 GB for the blocks), so this is a load-time choice, not a per-request switch.

What keeps the activations' quantisation from eating the GEMMs' gain (docs/PERFORMANCE.md v32): an input that
several linears read (q, k and v read the same normed tokens) is quantised once (`shared_input`), and the FFN's
GELU runs in the kernel that quantises the down-projection's input (`Fp8Linear.forward_gelu`).
Off by default: its error against bf16 is reported in docs/PERFORMANCE.md, not assumed away.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from worker.models.fused import fusable

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantisation: x ~= q * scale, scale [rows, 1] fp32."""
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


def gelu_quantize_rows(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(gelu_tanh(y)): the FFN's activation, quantised for its down projection in the same pass."""
    return quantize_rows(F.gelu(y, approximate="tanh"))


_quantize_rows_fused = fusable(tokens={0: 0})(quantize_rows)
_gelu_quantize_rows_fused = fusable(tokens={0: 0})(gelu_quantize_rows)


class Fp8Input(NamedTuple):
    """An activation quantised per row, for every FP8 linear that reads it."""

    data: torch.Tensor  # [rows, in] e4m3
    scale: torch.Tensor  # [rows, 1] fp32
    shape: torch.Size  # the activation's shape
    dtype: torch.dtype  # and its dtype: the linears' output dtype


def quantize_input(x: torch.Tensor, gelu: bool = False) -> Fp8Input:
    """x (or gelu_tanh(x)) as an Fp8Input: one compiled kernel on CUDA."""
    x2 = x.reshape(-1, x.shape[-1])
    if gelu:
        data, scale = _gelu_quantize_rows_fused(x2) if x.is_cuda else gelu_quantize_rows(x2)
    else:
        data, scale = _quantize_rows_fused(x2) if x.is_cuda else quantize_rows(x2)
    return Fp8Input(data, scale, x.shape, x.dtype)


def shared_input(x: torch.Tensor, linear: nn.Module) -> torch.Tensor | Fp8Input:
    """x for several linears of linear's kind: quantised once here if they are FP8, else x itself."""
    return quantize_input(x) if isinstance(linear, Fp8Linear) else x


class Fp8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        wq, sw = quantize_rows(linear.weight.data)  # per output channel
        self.register_buffer("weight_fp8", wq)  # [out, in]
        self.register_buffer("weight_scale", sw.t().contiguous())  # [1, out]
        self.bias = linear.bias
        self.out_features = linear.out_features
        linear.weight = None  # the bf16 copy goes away

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        xin = x if isinstance(x, Fp8Input) else quantize_input(x)
        if xin.data.is_cuda:
            # Any row count: torch's row-wise _scaled_mm wants only the inner and output widths in 16s.
            bias = self.bias if self.bias is not None and self.bias.dtype == xin.dtype else None
            y = torch._scaled_mm(xin.data, self.weight_fp8.t(), scale_a=xin.scale, scale_b=self.weight_scale,
                                 bias=bias, out_dtype=xin.dtype)
            if self.bias is not None and bias is None:
                y = y + self.bias
        else:  # CPU: the same quantisation, emulated in fp32 (tests)
            y = (xin.data.float() * xin.scale) @ (self.weight_fp8.float() * self.weight_scale.t()).t()
            if self.bias is not None:
                y = y + self.bias
            y = y.to(xin.dtype)
        return y.reshape(*xin.shape[:-1], self.out_features)

    def forward_gelu(self, x: torch.Tensor | Fp8Input) -> Fp8Input:
        """gelu_tanh(self(x)), quantised for the FP8 linear that reads it next (the FFN's down projection)."""
        return quantize_input(self(x), gelu=True)


def convert_blocks_to_fp8(dit: nn.Module) -> int:
    """Swap every nn.Linear inside the transformer blocks for an Fp8Linear; returns how many were swapped."""
    swapped = 0
    for block in dit.blocks:
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, child_name, Fp8Linear(child))
                    swapped += 1
    return swapped
