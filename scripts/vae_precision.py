"""CPU: how far a bf16 streamed decode is from the fp32 one, with diffusers' eager RMSNorm vs the fused math.

The fused kernel (worker.models.fused.wan_rms_norm, CUDA only) computes in fp32 and rounds once; this emulates that
on the CPU with the full-size VAE architecture (random weights) at 64x64:  python3 scripts/vae_precision.py
"""
import functools, torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm
from worker.config import FULL
from worker.models.vae import StreamingVAE, build_vae
torch.manual_seed(0)
lat = torch.randn(16, 6, 8, 8)
def decode(dtype, fused):
    v = build_vae(FULL.vae, dtype, "cpu", seed=0)
    if fused:
        def fwd(m, x):
            xf = x.float()
            n = xf / xf.norm(2, 1, keepdim=True).clamp_min(1e-12)
            b = m.bias.float() if isinstance(m.bias, torch.Tensor) else m.bias
            return (n * m.scale * m.gamma.float() + b).to(x.dtype)
        for m in v.modules():
            if isinstance(m, WanRMS_norm) and m.channel_first:
                m.forward = functools.partial(fwd, m)
    s = StreamingVAE(v); s.start_decode()
    return torch.cat([s.decode_chunk(lat[:, :3]), s.decode_chunk(lat[:, 3:])], 1).float()
ref = decode(torch.float32, False)
r = lambda a: ((a - ref).norm() / ref.norm()).item()
a = decode(torch.bfloat16, False); b = decode(torch.bfloat16, True)
print("bf16 eager vs fp32:", r(a), " bf16 fused-math vs fp32:", r(b), " eager vs fused:", ((a-b).norm()/a.norm()).item())
