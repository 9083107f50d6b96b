"""The decoder's full-resolution 96-channel 3x3x3 conv, with pairs of frames packed into 192 channels.

    python3 scripts/conv_pairs.py

cuDNN has no Hopper kernel for 96 output channels (docs/PERFORMANCE.md v21: an sm80 kernel, ~300 TFLOP/s), and
these convs are ~40% of a decode. Packed: frames (2s, 2s+1) become one frame of 192 channels, and the causal 3-tap
conv over frames becomes a 2-tap conv over pairs with 192 in and out channels (6 of its 8 [96, 96] tap blocks are
the original taps, 2 are zero): 4/3 of the FLOPs, at the rate of cuDNN's 192-channel Hopper kernel. Timed at the
steady shape (4 new frames + 2 cached, 480x832, bf16, channels-last): the conv as the decoder runs it, the packed
conv (and the packing copy on its own: a norm that writes the packed layout would not need it), the conv with 128
output channels, and the plain conv channels-first. Prints ms (mean of 20 calls), TFLOP/s of the plain conv's
FLOPs, and each output's relative difference from the plain conv's.
"""
import statistics

import torch
import torch.nn.functional as F

from worker.bench import gpu_ms

C, T, H, W = 96, 4, 480, 832
# (output frame of its pair a, input frame of its pair b, pair tap dt) -> the original time tap k
PAIR_TAPS = {(0, 0, 0): 0, (0, 1, 0): 1, (0, 0, 1): 2, (1, 1, 0): 0, (1, 0, 1): 1, (1, 1, 1): 2}


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """[C, C, 3, kh, kw] -> [2C, 2C, 2, kh, kw] for frame pairs (see PAIR_TAPS)."""
    c = w.shape[0]
    wp = w.new_zeros(2 * c, 2 * c, 2, *w.shape[3:])
    for (a, b, dt), k in PAIR_TAPS.items():
        wp[a * c:(a + 1) * c, b * c:(b + 1) * c, dt] = w[:, :, k]
    return wp


def pack(x: torch.Tensor) -> torch.Tensor:
    """[1, C, 2n, H, W] -> [1, 2C, n, H, W] channels-last: each pixel's channels are frame 2s's, then 2s+1's."""
    _, c, t, h, w = x.shape
    out = torch.empty(1, t // 2, h, w, 2, c, device=x.device, dtype=x.dtype)
    out.copy_(x.permute(0, 2, 3, 4, 1).unflatten(1, (t // 2, 2)).permute(0, 1, 3, 4, 2, 5))
    return out.flatten(4).permute(0, 4, 1, 2, 3)  # a view: channels-last-3d strides


def unpack(y: torch.Tensor) -> torch.Tensor:
    """[1, 2C, n, H, W] -> [1, C, 2n, H, W] (a copy; only for the comparison)."""
    _, c2, n, h, w = y.shape
    return y.unflatten(1, (2, c2 // 2)).permute(0, 2, 3, 1, 4, 5).reshape(1, c2 // 2, 2 * n, h, w)


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cuDNN", torch.backends.cudnn.version(), flush=True)
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(1, C, T + 2, H, W, device=dev, dtype=torch.bfloat16, generator=g).to(
        memory_format=torch.channels_last_3d)
    w = (torch.randn(C, C, 3, 3, 3, device=dev, generator=g) / (27 * C) ** 0.5).to(torch.bfloat16)
    w_cl = w.contiguous(memory_format=torch.channels_last_3d)
    wp = pack_weight(w).contiguous(memory_format=torch.channels_last_3d)
    w128 = torch.cat([w, w.new_zeros(128 - C, *w.shape[1:])]).contiguous(memory_format=torch.channels_last_3d)
    x_cf = x.contiguous()
    flops = 2 * 27 * C * C * T * H * W
    with torch.inference_mode():
        xp = pack(x)
        forms = {
            "conv3d, 96 channels (now)": lambda: F.conv3d(x, w_cl, None, 1, (0, 1, 1)),
            "pairs: conv3d 192 -> 192, 2 taps": lambda: F.conv3d(xp, wp, None, 1, (0, 1, 1)),
            "pairs: the packing copy alone": lambda: pack(x),
            "conv3d, 128 outputs": lambda: F.conv3d(x, w128, None, 1, (0, 1, 1)),
            "conv3d, channels-first": lambda: F.conv3d(x_cf, w, None, 1, (0, 1, 1)),
        }
        ref = forms["conv3d, 96 channels (now)"]().float()
        outs = {
            "pairs: conv3d 192 -> 192, 2 taps": unpack(forms["pairs: conv3d 192 -> 192, 2 taps"]()).float(),
            "conv3d, 128 outputs": forms["conv3d, 128 outputs"]()[:, :C].float(),
            "conv3d, channels-first": forms["conv3d, channels-first"]().float(),
        }
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            times = {name: [] for name in forms}
            for _ in range(3):  # the forms in turn, three times
                for name, fn in forms.items():
                    times[name] += gpu_ms(fn, n=20 // 3 + 1)
            for name, ts in times.items():
                ms = statistics.mean(ts)
                rel = ((outs[name] - ref).norm() / ref.norm()).item() if name in outs else float("nan")
                print(f"benchmark={bench:d} {name:<36} {ms:6.3f} ms  {flops / ms / 1e9:5.0f} TFLOP/s (plain conv's "
                      f"FLOPs)  rel diff {rel:.1e}", flush=True)


if __name__ == "__main__":
    main()
