"""The self-attention's last wave: one FA4 call against the same attention with a few heads' keys split.

    python3 scripts/attention_waves.py [--heads 40 20 10] [--loops 15] [--calls 20]

FA4's Hopper forward runs one CTA per (query tile, head) on each SM, one at a time, all of equal length here (no
mask): a chunk's 4680 queries are 37 tiles of 128, so 40 heads are 1480 CTAs = 11.2 waves of 132 SMs, 20 heads
(a rank's share on 2 GPUs) 5.6 waves, 10 heads 2.8 waves, and each call takes as long as the next whole wave.
Split: H - h heads run as before (stream A, high priority); the other h heads run on stream B with their keys cut
into s parts, as a batch of s (the queries broadcast, stride 0), and the parts' outputs are merged by their
log-sum-exps. Stream B's short CTAs fill the SMs that stream A's last wave leaves idle. Prints, per setting, ms
per call (a CUDA graph of `--calls` calls, replayed `--loops` times with the settings in turn; median), TFLOP/s
of the attention's own FLOPs, the waves a greedy schedule predicts, and the largest difference from the one-call
output. The split is worker/models/wave_split.py's, with the setting given instead of its plan's (the v29a figures
came from this script's first form, with its own copy of the split and the side stream at the lowest priority).
Here each split setting also copies its output into the timed buffer, ~20 us a call that the DiT does not pay.
"""
import argparse
import functools
import statistics

import torch

from worker.models import wave_split

FRAME_TOKENS, QUERY_FRAMES, HEAD_DIM = 1560, 3, 128
SETTINGS = {  # heads on the rank -> (heads split, parts) to try: the best few of predicted_waves, and neighbours
    40: [(1, 4), (1, 3), (1, 6), (2, 3), (2, 4), (4, 4)],
    20: [(3, 3), (4, 3), (3, 4), (4, 4), (5, 3), (2, 4)],
    10: [(1, 3), (1, 6), (2, 4), (3, 6)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, nargs="+", default=[40, 20, 10])
    ap.add_argument("--span", type=int, default=18, help="latent frames of keys")
    ap.add_argument("--loops", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--settings", nargs="*", metavar="H:h,s", default=[],
                    help="replace the built-in settings for H heads, e.g. 40:1,4 40:1,3")
    args = ap.parse_args()
    chosen: dict[int, list[tuple[int, int]]] = {}
    for item in args.settings:
        heads, rest = item.split(":")
        chosen.setdefault(int(heads), []).append(tuple(int(x) for x in rest.split(",")))
    from flash_attn.cute.interface import _flash_attn_fwd  # the entry point that takes `out`

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "SMs", sms, flush=True)
    lq, lk = QUERY_FRAMES * FRAME_TOKENS, args.span * FRAME_TOKENS
    hi = torch.cuda.Stream(priority=-2)  # the DiT's stream; wave_split's side stream runs one level lower

    def one_call(q, k, v, out):
        _flash_attn_fwd(q, k, v, out=out)

    def split_call(q, k, v, out, split, parts):
        out.copy_(wave_split.attention(q, k, v, lambda: _flash_attn_fwd, split=(split, parts)))

    with torch.inference_mode(), torch.cuda.stream(hi):
        for heads in args.heads:
            q, k, v = (torch.randn(1, n, heads, HEAD_DIM, device=dev, dtype=torch.bfloat16) for n in (lq, lk, lk))
            flops = 4 * lq * lk * HEAD_DIM * heads
            ref = torch.empty_like(q)
            one_call(q, k, v, ref)
            settings = [(0, 1)] + [st for st in chosen.get(heads, SETTINGS.get(heads, [])) if st[0] < heads]
            graphs = {}
            for split, parts in settings:
                out = torch.empty_like(q)
                fn = functools.partial(one_call, q, k, v, out) if split == 0 else \
                    functools.partial(split_call, q, k, v, out, split, parts)
                fn()  # compiles; the graph below replays `--calls` calls with no host work between them
                torch.cuda.synchronize()
                diff = (out.float() - ref.float()).abs().max().item()
                rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=hi):
                    for _ in range(args.calls):
                        fn()
                graphs[split, parts] = (graph, diff, rel, [], fn)  # fn holds `out`, which the graph writes
            for _ in range(args.loops):  # every setting once per loop, in turn, so drifts in clock hit all alike
                for split, parts in settings:
                    graph, _, _, times, _ = graphs[split, parts]
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(hi)
                    graph.replay()
                    end.record(hi)
                    end.synchronize()
                    times.append(start.elapsed_time(end) / args.calls)
            base = statistics.median(graphs[0, 1][3])
            for (split, parts), (_, diff, rel, times, _) in graphs.items():
                ms = statistics.median(times)
                label = "one call" if split == 0 else f"{split} heads' keys in {parts}"
                waves = wave_split.predicted_waves(heads, split, parts, sms, lq)
                print(f"heads {heads:>2} {label:<22} {ms:7.3f} ms ({ms / base:.3f}x) {flops / ms / 1e9:6.0f} TFLOP/s  "
                      f"waves (model) {waves:5.2f}  max|diff| {diff:.2e} rel L2 {rel:.1e}  "
                      f"min {min(times):.3f} max {max(times):.3f}", flush=True)
            del graphs


if __name__ == "__main__":
    main()
