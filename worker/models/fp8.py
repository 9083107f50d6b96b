"""Optional FP8 (e4m3) linears for the DiT blocks, behind LINGBOT_FP8=1 / `bench --fp8`.

Weights are quantised once per output channel; activations per token at run time; the product runs in
`torch._scaled_mm` with row-wise scales and bf16 output. The FP8 weights replace the bf16 ones (18.5 GB
instead of 37 GB for the blocks), so this is a load-time choice, not a per-request switch. Off by default:
its error against bf16 is reported in docs/PERFORMANCE.md, not assumed away.
"""

from __future__ import annotations

import torch
from torch import nn

from worker.models.fused import fusable

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantisation: x ~= q * scale, scale [rows, 1] fp32."""
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).to(FP8), scale


quantize_rows_fused = fusable(tokens={0: 0})(quantize_rows)


class Fp8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        wq, sw = quantize_rows(linear.weight.data)  # per output channel
        self.register_buffer("weight_fp8", wq)  # [out, in]
        self.register_buffer("weight_scale", sw.t().contiguous())  # [1, out]
        self.bias = linear.bias
        self.out_features = linear.out_features
        linear.weight = None  # the bf16 copy goes away

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m = x2.shape[0]
        pad = -m % 16  # _scaled_mm wants every dimension a multiple of 16
        if pad:
            x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
        if x2.is_cuda:
            xq, sx = quantize_rows_fused(x2)
            y = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16)
        else:  # CPU: the same quantisation, emulated in fp32 (tests)
            xq, sx = quantize_rows(x2)
            y = ((xq.float() * sx) @ (self.weight_fp8.float() * self.weight_scale.t()).t()).to(x.dtype)
        y = y[:m]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


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
