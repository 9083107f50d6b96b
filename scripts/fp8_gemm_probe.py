"""What FP8 linears could be worth at the DiT's shapes: bf16 GEMMs against `torch._scaled_mm` (row-wise scales).

    python3 scripts/fp8_gemm_probe.py [--rows 4680 2340] [--loops 7]

For each (rows, out, in) of a block's linears, in one process, the forms in turn per loop (CUDA graphs of
`--calls` calls, medians): bf16 `addmm`; FP8 `_scaled_mm` with its bias in the epilogue, on inputs already
quantised (the GEMM alone); and the same plus quantising the bf16 input per row first (what Fp8Linear pays when
no earlier kernel writes FP8). Prints ms and TFLOP/s of each, and the ratio to bf16. Rows need not be a multiple
of 16: the script says where `_scaled_mm` refuses them.
"""
import argparse
import statistics

import torch

SHAPES = [(5120, 5120), (13824, 5120), (5120, 13824)]  # (out, in): the square projections, FFN up, FFN down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[4680, 2340])
    ap.add_argument("--loops", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    from worker.models.fp8 import quantize_rows

    quant = torch.compile(quantize_rows, dynamic=False)
    dev, bf = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    with torch.inference_mode():
        for m in args.rows:
            for n, k in SHAPES:
                x = torch.randn(m, k, device=dev, dtype=bf)
                w = torch.randn(n, k, device=dev, dtype=bf) * 0.02
                bias = torch.randn(n, device=dev, dtype=bf)
                wq, sw = quantize_rows(w)
                wt, sw = wq.t(), sw.t().contiguous()
                xq, sx = quantize_rows(x)
                forms = {
                    "bf16": lambda: torch.addmm(bias, x, w.t()),
                    "fp8 gemm": lambda: torch._scaled_mm(xq, wt, scale_a=sx, scale_b=sw, bias=bias,
                                                         out_dtype=bf),
                    "fp8 quant+gemm": lambda: _quant_gemm(quant, x, wt, sw, bias),
                }
                ref = forms["bf16"]().float()
                graphs, times = {}, {}
                for name, fn in list(forms.items()):
                    try:
                        out = fn()
                    except RuntimeError as e:
                        print(f"rows {m} {n}x{k} {name}: refused: {str(e).splitlines()[0]}", flush=True)
                        continue
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        for _ in range(args.calls):
                            fn()
                    graphs[name], times[name] = (g, err), []
                for _ in range(args.loops):
                    for name, (g, _) in graphs.items():
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        g.replay()
                        e.record()
                        e.synchronize()
                        times[name].append(s.elapsed_time(e) / args.calls)
                base = statistics.median(times["bf16"]) if "bf16" in times else None
                for name, t in times.items():
                    ms = statistics.median(t)
                    ratio = f"{ms / base:.3f}x" if base else ""
                    print(f"rows {m:>4} {n:>5}x{k:<5} {name:<15} {ms:7.4f} ms {2 * m * n * k / ms / 1e9:6.0f} TFLOP/s "
                          f"{ratio}  rel err {graphs[name][1]:.1e}", flush=True)
                del graphs


def _quant_gemm(quant, x, wt, sw, bias):
    xq, sx = quant(x)
    return torch._scaled_mm(xq, wt, scale_a=sx, scale_b=sw, bias=bias, out_dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
