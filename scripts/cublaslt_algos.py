"""Every cuBLASLt algorithm its heuristic offers for the DiT's GEMMs, timed against the one PyTorch runs.

    python3 scripts/cublaslt_algos.py [--ranks 2 1 4] [--count 64] [--bias]

Why: at a rank's share of a chunk (2340 rows on 2 GPUs) the square 5120 x 5120 GEMMs run at ~619 TFLOP/s against
~709 at 4680 rows (v22a), ~30 ms a chunk on 2 GPUs. PyTorch runs cuBLAS's first heuristic choice; cuBLASLt's
heuristic lists others (other tiles, split-K, cluster shapes) that it ranks by a model, not by timing. This asks
for up to --count of them per shape through ctypes on the cuBLASLt library PyTorch itself loaded, checks each
one's output against F.linear's, and times each (median of 50 calls, CUDA events) beside F.linear.
"""
import argparse
import ctypes
import statistics

import torch
import torch.nn.functional as F

from worker.bench import gpu_ms
from worker.config import FULL

ap = argparse.ArgumentParser()
ap.add_argument("--ranks", type=int, nargs="+", default=[2, 1, 4])
ap.add_argument("--count", type=int, default=64, help="algorithms to ask the heuristic for, per shape")
ap.add_argument("--bias", action="store_true", help="with the bias epilogue, as the DiT's linears run")
a = ap.parse_args()


def loaded_lib(stem: str) -> ctypes.CDLL:
    """The copy of a CUDA library this process already mapped (PyTorch's own), not another on the path."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if f"/{stem}.so" in path:
                return ctypes.CDLL(path)
    raise RuntimeError(f"{stem} is not loaded; run a GEMM first")


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heuristic(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


COMPUTE_32F, R_32F, R_16BF = 68, 0, 14
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_BIAS_POINTER = 3, 4, 7, 8
EPILOGUE_BIAS, OP_N, OP_T = 4, 0, 1
PREF_MAX_WORKSPACE = 1
CFG_ID, CFG_TILE, CFG_SPLITK, CFG_STAGES, CFG_CLUSTER = 0, 1, 2, 6, 8
WORKSPACE = 64 << 20

dev = torch.device("cuda")
torch.manual_seed(0)
F.linear(torch.ones(8, 8, device=dev, dtype=torch.bfloat16), torch.ones(8, 8, device=dev, dtype=torch.bfloat16))
lt = loaded_lib("libcublasLt")
print("cuBLASLt:", lt._name, "version", lt.cublasLtGetVersion(), flush=True)
handle = ctypes.c_void_p()
assert lt.cublasLtCreate(ctypes.byref(handle)) == 0
workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device=dev)


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what}: cublasStatus {status}")


def set_attr(fn, obj, attr: int, value) -> None:
    check(fn(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"attribute {attr}")


def layout(rows: int, cols: int, ld: int) -> ctypes.c_void_p:
    out = ctypes.c_void_p()
    check(lt.cublasLtMatrixLayoutCreate(ctypes.byref(out), R_16BF, ctypes.c_uint64(rows), ctypes.c_uint64(cols),
                                        ctypes.c_int64(ld)), "layout")
    return out


def algo_config(algo: Algo) -> str:
    def get(attr: int) -> int:
        v, written = ctypes.c_int32(), ctypes.c_size_t()
        lt.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v), 4, ctypes.byref(written))
        return v.value
    return f"id {get(CFG_ID):3d} tile {get(CFG_TILE):3d} stages {get(CFG_STAGES):3d} splitK {get(CFG_SPLITK):2d} " \
           f"cluster {get(CFG_CLUSTER):2d}"


def lt_algos(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor, count: int):
    """(heuristic results, a launcher for one of them) for out = x @ w.T (+ b), in column-major terms."""
    m, k = x.shape
    n = w.shape[0]
    desc = ctypes.c_void_p()
    check(lt.cublasLtMatmulDescCreate(ctypes.byref(desc), COMPUTE_32F, R_32F), "desc")
    set_attr(lt.cublasLtMatmulDescSetAttribute, desc, DESC_TRANSA, ctypes.c_int32(OP_T))
    set_attr(lt.cublasLtMatmulDescSetAttribute, desc, DESC_TRANSB, ctypes.c_int32(OP_N))
    if b is not None:
        set_attr(lt.cublasLtMatmulDescSetAttribute, desc, DESC_EPILOGUE, ctypes.c_int32(EPILOGUE_BIAS))
        set_attr(lt.cublasLtMatmulDescSetAttribute, desc, DESC_BIAS_POINTER, ctypes.c_void_p(b.data_ptr()))
    a_l, b_l, d_l = layout(k, n, k), layout(k, m, k), layout(n, m, n)
    pref = ctypes.c_void_p()
    check(lt.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
    set_attr(lt.cublasLtMatmulPreferenceSetAttribute, pref, PREF_MAX_WORKSPACE, ctypes.c_uint64(WORKSPACE))
    results, returned = (Heuristic * count)(), ctypes.c_int()
    check(lt.cublasLtMatmulAlgoGetHeuristic(handle, desc, a_l, b_l, d_l, d_l, pref, count, results,
                                            ctypes.byref(returned)), "heuristic")
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def launch(h: Heuristic) -> None:
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        check(lt.cublasLtMatmul(handle, desc, ctypes.byref(alpha), ctypes.c_void_p(w.data_ptr()), a_l,
                                ctypes.c_void_p(x.data_ptr()), b_l, ctypes.byref(beta),
                                ctypes.c_void_p(out.data_ptr()), d_l, ctypes.c_void_p(out.data_ptr()), d_l,
                                ctypes.byref(h.algo), ctypes.c_void_p(workspace.data_ptr()),
                                ctypes.c_size_t(WORKSPACE), stream), "matmul")
    return [r for r in results[:returned.value] if r.state == 0], launch


cfg = FULL.dit
tokens = 3 * (480 // 16) * (832 // 16)
d, f = cfg.dim, cfg.ffn_dim
with torch.inference_mode():
    for ranks in a.ranks:
        m = -(-tokens // ranks)
        for name, (k, n) in {"square": (d, d), "q+k": (d, 2 * d), "FFN up": (d, f), "FFN down": (f, d)}.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
            b = torch.randn(n, device=dev, dtype=torch.bfloat16) if a.bias else None
            flops = 2 * m * n * k
            ref = F.linear(x, w, b)
            t_ref = statistics.median(gpu_ms(lambda: F.linear(x, w, b), n=50))
            out = torch.empty_like(ref)
            algos, launch = lt_algos(x, w, b, out, a.count)
            rows = []
            for i, h in enumerate(algos):
                try:
                    launch(h)
                    torch.cuda.synchronize()
                except RuntimeError as e:
                    rows.append((float("inf"), i, f"failed: {e}"))
                    continue
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                t = statistics.median(gpu_ms(lambda: launch(h), n=50))
                rows.append((t, i, f"{algo_config(h.algo)} ws {h.workspace >> 10:6d} KiB waves {h.waves:5.2f} "
                                   f"err {err:.1e}"))
            rows.sort()
            print(f"ranks {ranks} M={m:5d} {name:8s} N={n:5d} K={k:5d} bias={b is not None}: F.linear {t_ref:6.3f} ms "
                  f"{flops / t_ref / 1e9:4.0f} TFLOP/s; {len(algos)} algorithms", flush=True)
            for t, i, desc in rows[:6]:
                print(f"    #{i:2d} {t:6.3f} ms {flops / t / 1e9:4.0f} TFLOP/s ({t_ref / t:.3f}x) {desc}", flush=True)
            first = next((r for r in rows if r[1] == 0), None)
            if first:
                print(f"    heuristic's first: {first[0]:6.3f} ms ({t_ref / first[0]:.3f}x)", flush=True)
