"""A decoder conv's input behind its cached frames: ways to build it, timed at the full-resolution stage's shapes.

    python3 scripts/behind_probe.py
bf16, 480x832, 96 channels, 4 new frames (2 pairs) behind 2 cached frames (1 pair), channels-last-3d. For the
decoder's norm chains on frames and on pairs, per call (the chain, the concatenation, the cache's copy; no conv):
  cat:    the chain's output, then torch.cat([front, out]) and a clone of its last frames (v29, LINGBOT_VAE_BEHIND=0);
  behind: the chain with `front`, one compiled graph: Inductor's concatenation and the last frames (v30a);
  into:   an empty input, the cached frames copied to its front, the chain compiled to write into the rest (its
          `out`, a mutated graph input), then a clone of the last frames (not for pairs2, the norm after conv1).
Each with the time axis symbolic (as fusable marks it) and static; H and W symbolic.
"""
import torch

from worker.models import frame_pairs, fused

dev = "cuda"
C = 96


def cl(t):
    return t.contiguous(memory_format=torch.channels_last_3d)


def frames_into(x, gamma, scale, bias, silu, out):
    out.copy_(fused._wan_rms(x, gamma, scale, bias, silu, 1))


def pairs_into(x, gamma, scale, bias, silu, out):
    y = frame_pairs.frames_in_pairs_order(x)
    frame_pairs.pairs_view(out).copy_(fused._wan_rms(y, fused._last(gamma), scale, fused._last(bias), silu, -1))


def timed(fn, n=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n * 1e3


def kernels(fn):
    """CUDA kernels (and memcpys) one call launches, with their total time."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(evs), sum(e.device_time for e in evs)


x0 = cl(torch.randn(1, C, 4, 480, 832, device=dev, dtype=torch.bfloat16))
gamma = torch.randn(C, 1, 1, 1, device=dev, dtype=torch.bfloat16)
frames_front = cl(torch.randn(1, C, 2, 480, 832, device=dev, dtype=torch.bfloat16))
bias = torch.randn(C, device=dev, dtype=torch.bfloat16)
for kind, chain, into, front0 in (
    ("frames", fused.wan_rms_norm.eager, frames_into, frames_front),
    ("pairs", fused.wan_rms_norm_to_pairs.eager, pairs_into, frame_pairs.to_pairs(frames_front)),
    ("pairs2", fused.conv_bias_rms_norm_pairs.eager, None, frame_pairs.to_pairs(frames_front)),
):
    k = front0.shape[2]
    new = x0.shape[2] // 2 if kind != "frames" else x0.shape[2]
    for dynamic_t in (True, False):
        dims = (2, 3, 4) if dynamic_t else (3, 4)
        results = {}
        for variant in ("cat", "behind", "into") if into else ("cat", "behind"):
            torch._dynamo.reset()
            x, front = (t.clone(memory_format=torch.channels_last_3d) for t in (x0, front0))
            if kind == "pairs2":  # norm2 of a paired block: packed conv output in, the conv's bias first
                x = frame_pairs.to_pairs(x)
            args = (x, gamma, C**0.5, 0.0, True) if kind != "pairs2" else (x, bias, gamma, C**0.5, 0.0, True)
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(x, d)
            for d in (3, 4):
                torch._dynamo.maybe_mark_dynamic(front, d)
            if variant == "cat":
                c = torch.compile(chain, fullgraph=True)

                def run():
                    ext = torch.cat([front, c(*args)], 2)
                    return ext, ext[:, :, -k:].clone()
            elif variant == "behind":
                c = torch.compile(chain, fullgraph=True)

                def run():
                    return c(*args, front)
            else:
                c = torch.compile(into, fullgraph=True)

                def run():
                    ext = torch.empty((1, front.shape[1], k + new, 480, 832), device=dev, dtype=torch.bfloat16,
                                      memory_format=torch.channels_last_3d)
                    ext[:, :, :k].copy_(front)
                    out = ext[:, :, k:]
                    for d in (3, 4):
                        torch._dynamo.maybe_mark_dynamic(out, d)
                    c(*args, out)
                    return ext, ext[:, :, -k:].clone()
            out = run()
            n, dev_us = kernels(run)
            results[variant] = out
            same = all(torch.equal(a, b) for a, b in zip(out, results["cat"]))
            print(f"{kind:6s} T {'symbolic' if dynamic_t else 'static  '} {variant:6s}: {timed(run):6.0f} us a call, "
                  f"{n} kernels {dev_us:6.0f} us | equal to cat: {same}")
