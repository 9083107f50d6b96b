"""The VAE decoder's 3x3x3 causal convs at their steady 832x480 shapes, in the forms cuDNN could run them.

    python3 scripts/conv_forms.py
For each decoder stage (channels, frames in, resolution): conv3d on the time-concatenated input with spatial
padding inside the conv (what worker/models/vae.py runs), the same under cudnn.benchmark, the conv as one
conv2d over the three time taps stacked on the channel axis (the stacking copy is timed with it), and the conv as
one conv2d over the new frames with the three taps stacked on the OUTPUT axis (N = 3C for the GEMM; the shifted sum
of the three tap outputs, which a stream would keep two frames of, is timed with it). For C=96 also conv3d with the
output channels padded to 128.
"""
import statistics

import torch
import torch.nn.functional as F

from worker.bench import gpu_ms

dev = torch.device("cuda")
STAGES = [(384, 1, 60, 104), (384, 2, 120, 208), (192, 4, 240, 416), (96, 4, 480, 832)]


def timed(fn) -> float:
    return statistics.mean(gpu_ms(fn, n=10))


with torch.inference_mode():
    for c, t, h, w in STAGES:
        x = torch.randn(1, c, t + 2, h, w, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d)
        w3 = (torch.randn(c, c, 3, 3, 3, device=dev, dtype=torch.bfloat16) / (27 * c) ** 0.5).to(
            memory_format=torch.channels_last_3d)
        b = torch.zeros(c, device=dev, dtype=torch.bfloat16)
        flops = 2 * 27 * c * c * t * h * w
        # time taps on the channel axis: out[t] = sum_k W[:, :, k] * in[t + k]  ->  [T, 3C, H, W] x [C, 3C, 3, 3]
        w2 = w3.permute(0, 2, 1, 3, 4).reshape(c, 3 * c, 3, 3).contiguous(memory_format=torch.channels_last)

        def conv3d():
            return F.conv3d(x, w3, b, 1, (0, 1, 1))

        def conv2d_stacked():
            xs = torch.cat([x[:, :, k: k + t] for k in range(3)], 1)  # [1, 3C, T, H, W]
            xs = xs[0].transpose(0, 1)  # [T, 3C, H, W], channels-last when x is
            return F.conv2d(xs, w2, b, 1, 1)

        # time taps on the output axis: y[f, k] = W[:, :, k] * in[f]; out[t] = y[t-2, 0] + y[t-1, 1] + y[t, 2]
        wo = w3.permute(2, 0, 1, 3, 4).reshape(3 * c, c, 3, 3).contiguous(memory_format=torch.channels_last)
        xn = x[0, :, 2:].transpose(0, 1)  # the T new frames [T, C, H, W]
        y = torch.empty(t + 2, 3 * c, h, w, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        y[:2] = F.conv2d(x[0, :, :2].transpose(0, 1), wo, None, 1, 1)  # the two cached frames' tap outputs

        def conv2d_out_taps():
            y[2:] = F.conv2d(xn, wo, None, 1, 1)
            return y[:-2, :c] + y[1:-1, c: 2 * c] + y[2:, 2 * c:] + b[:, None, None]

        wp = torch.cat([w3, w3.new_zeros(max(128 - c, 0), *w3.shape[1:])]).contiguous(
            memory_format=torch.channels_last_3d)

        def conv3d_pad128():
            return F.conv3d(x, wp, None, 1, (0, 1, 1))

        ref = conv3d().float()
        err_out = ((conv2d_out_taps().float().transpose(0, 1)[None] - ref).norm() / ref.norm()).item()
        alt = conv2d_stacked().float().transpose(0, 1)[None]
        err = ((alt - ref).norm() / ref.norm()).item()
        res = []
        extra = []
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            res += [timed(conv3d), timed(conv2d_stacked)]
            extra += [timed(conv2d_out_taps)] + ([timed(conv3d_pad128)] if c == 96 else [])
        print(f"C={c:3d} T={t} {h}x{w}: {flops / 1e9:6.0f} GFLOP | conv3d {res[0]:6.2f} ms ({flops / res[0] / 1e9:4.0f} "
              f"TFLOP/s), benchmark {res[2]:6.2f} | conv2d stacked {res[1]:6.2f} ms, benchmark {res[3]:6.2f} "
              f"({flops / min(res[1], res[3]) / 1e9:4.0f} TFLOP/s) | rel diff {err:.2e}")
        best = min(extra[0], extra[len(extra) // 2])
        print(f"    conv2d output taps + sum {extra[0]:6.2f} ms, benchmark {extra[len(extra) // 2]:6.2f} "
              f"({flops / best / 1e9:4.0f} TFLOP/s useful) | rel diff {err_out:.2e}"
              + (f" | conv3d, 128 outputs {extra[1]:6.2f} ms, benchmark {extra[3]:6.2f}" if c == 96 else ""))
