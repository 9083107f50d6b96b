"""What FP8 linears could be worth at the DiT's shapes: bf16 GEMMs against `torch._scaled_mm` (row-wise scales).

    python3 scripts/fp8_gemm_probe.py [--rows 4680 2340] [--loops 7]

For each (rows, out, in) of a block's linears, in one process, the forms in turn per loop (CUDA graphs of
`--calls` calls, medians): the bf16 nn.Linear; the worker's Fp8Linear (worker/models/fp8.py: `_scaled_mm` with
its bias in the epilogue) on an input already quantised, i.e. the GEMM alone; and the same Fp8Linear on the bf16
input, which it quantises per row first (the compiled kernel the DiT uses). Prints ms and TFLOP/s of each, the
ratio to bf16 and the relative error. Rows need not be a multiple of 16: the script says where `_scaled_mm`
refuses them. (v32b's figures came from this script's first form, with its own compiled quantisation and
`_scaled_mm` call in place of Fp8Linear's: the same operations.)
"""
import argparse
import copy
import statistics

import torch

SHAPES = [(5120, 5120), (13824, 5120), (5120, 13824)]  # (out, in): the square projections, FFN up, FFN down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[4680, 2340])
    ap.add_argument("--loops", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    from worker.models.fp8 import Fp8Linear, quantize_input

    dev, bf = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    with torch.inference_mode():
        for m in args.rows:
            for n, k in SHAPES:
                x = torch.randn(m, k, device=dev, dtype=bf)
                lin = torch.nn.Linear(k, n, device=dev, dtype=bf)
                ref_lin = copy.deepcopy(lin)
                lin8 = Fp8Linear(lin)  # takes the weight away from `lin`
                xin = quantize_input(x)
                forms = {
                    "bf16": lambda: ref_lin(x),
                    "fp8 gemm": lambda: lin8(xin),
                    "fp8 quant+gemm": lambda: lin8(x),
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


if __name__ == "__main__":
    main()
