"""CPU: how far a bf16 streamed decode is from the fp32 one, with diffusers' eager RMSNorm vs the fused math.

The fused kernel (worker.models.fused.wan_rms_norm, CUDA only) computes in fp32 and rounds once; this emulates that
on the CPU with the full-size VAE architecture (random weights) at 64x64:  python3 scripts/vae_precision.py
"""
import functools

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from worker.config import FULL
from worker.models.vae import StreamingVAE, build_vae


def fp32_once(m: WanRMS_norm, x: torch.Tensor) -> torch.Tensor:
    """The fused kernel's arithmetic: every step in fp32, one rounding at the end."""
    xf = x.float()
    n = xf / xf.norm(2, 1, keepdim=True).clamp_min(1e-12)
    bias = m.bias.float() if isinstance(m.bias, torch.Tensor) else m.bias
    return (n * m.scale * m.gamma.float() + bias).to(x.dtype)


def decode(latents: torch.Tensor, dtype: torch.dtype, fused_math: bool) -> torch.Tensor:
    vae = build_vae(FULL.vae, dtype, "cpu", seed=0)
    if fused_math:
        for m in vae.modules():
            if isinstance(m, WanRMS_norm) and m.channel_first:
                m.forward = functools.partial(fp32_once, m)
    s = StreamingVAE(vae)
    s.start_decode()
    return torch.cat([s.decode_chunk(latents[:, :3]), s.decode_chunk(latents[:, 3:])], 1).float()


def main() -> None:
    torch.manual_seed(0)
    lat = torch.randn(16, 6, 8, 8)
    ref = decode(lat, torch.float32, False)
    eager, fused = decode(lat, torch.bfloat16, False), decode(lat, torch.bfloat16, True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    print(f"relative L2 to the fp32 decode: bf16 with diffusers' norm {rel(eager, ref):.4f}, "
          f"bf16 with fp32-once norm {rel(fused, ref):.4f}; between the two {rel(fused, eager):.4f}")


if __name__ == "__main__":
    main()
