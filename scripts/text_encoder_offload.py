"""The offloaded UMT5 encoder's cost per new prompt, the old way against host-resident weights, in one process.

    python3 scripts/text_encoder_offload.py [--prompts 3]

Full-size UMT5-XXL encoder (5.7 B params, bf16, random weights) on one GPU. `old` is what the worker did before
worker/models/host_weights.py: the model moved to the GPU for a prompt and `model.to("cpu")` afterwards, each
time. `new` is `TextEncoder(offload=True)`: one page-locked host buffer, uploaded per prompt and
dropped. Every prompt is new (the prompt cache is off); both sides' embeddings must be identical.
"""
import argparse
import time

import torch

from worker.config import PRESETS
from worker.models.text_encoder import TextEncoder, build_text_encoder

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--prompts", type=int, default=3)
ap.add_argument("--preset", default="lingbot-world-fast", help="tiny with --device cpu: a check of the script")
ap.add_argument("--device", default="cuda")
a = ap.parse_args()
dev = torch.device(a.device)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
empty_cache = torch.cuda.empty_cache if dev.type == "cuda" else (lambda: None)
prompts = [f"a quiet harbour at dawn, scene {i}" for i in range(a.prompts)]


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


with torch.device(dev):
    built = build_text_encoder(PRESETS[a.preset].text_encoder, torch.bfloat16, dev, seed=0, cache_size=0)
model, tok = built.model, built.tokenizer
gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
print(f"UMT5 encoder: {gb:.2f} GB of bf16 parameters")
plain = TextEncoder(model, tok, device=dev, cache_size=0)  # runs wherever the model is; the old offload around it
plain.encode("warm the kernels up")  # cuBLAS handles and the like, for both sides
_, t0 = timed(lambda: model.to("cpu"))
print(f"old: first model.to('cpu') {t0:.2f} s")
old = []
for p in prompts:
    _, up = timed(lambda: model.to(dev))
    out, enc_s = timed(lambda: plain.encode(p))
    _, down = timed(lambda: (model.to("cpu"), empty_cache()))
    old.append(out)
    print(f"old: upload {up:.2f} s, encode {enc_s * 1e3:.0f} ms, back to host {down:.2f} s: {up + enc_s + down:.2f} s")

new, t_pack = timed(lambda: TextEncoder(model, tok, device=dev, cache_size=0, offload=True))
print(f"new: packed into one host buffer in {t_pack:.2f} s, page-locked: {new.host_weights.page_locked}")
for p, ref in zip(prompts, old):
    out, s = timed(lambda: new.encode(p))
    assert torch.equal(out, ref), "host-resident weights gave different embeddings"
    print(f"new: {s:.2f} s per prompt (upload and encode), identical embeddings")
if dev.type == "cuda":
    print(f"GPU memory allocated after the last prompt: {torch.cuda.memory_allocated(dev) / 2**30:.2f} GiB")
