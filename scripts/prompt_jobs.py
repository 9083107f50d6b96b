"""Jobs with new and repeated prompts on one warm worker: time to the first chunk with the text encoder in the path.

    python3 scripts/prompt_jobs.py [--chunks 7] [--jobs 3]

`bench` leaves the 11 GB UMT5 encoder out (a fixed random context). This loads what a worker serves, the
full-size random model with its encoder (on one 80 GB GPU kept in host RAM and lent per prompt,
worker/models/host_weights.py), then runs jobs back to back: each with a new prompt after a job that filled the
K/V span (so the encoder's upload meets a GPU whose allocator holds the last job's blocks), and a last one that
repeats the first prompt (the prompt cache). Prints each job's time to its first chunk, its chunk times and the
peak GPU memory.
"""
import argparse
import time

import torch

from worker.config import DEFAULT_KV_SINK, DEFAULT_KV_WINDOW, DEFAULT_SIZE
from worker.parallel.pool import load_generator
from worker.rollout import RolloutJob

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--chunks", type=int, default=7, help="per job; 6+ fill the 18-frame span at the default size")
ap.add_argument("--jobs", type=int, default=3, help="jobs with new prompts; one more repeats the first prompt")
ap.add_argument("--model", default="lingbot-world-fast")
ap.add_argument("--device", default="cuda")
a = ap.parse_args()

t = time.perf_counter()
gen = load_generator(a.model, a.device, 1)
engine = getattr(gen, "engine", gen)
enc = engine.text_encoder
where = "in host RAM, lent per prompt" if enc.offloaded else "on the GPU"
print(f"ready in {time.perf_counter() - t:.1f} s; text encoder {where}")
w, h = DEFAULT_SIZE
prompts = [f"a lighthouse on a cliff in a storm, take {i}" for i in range(a.jobs)]
prompts.append(prompts[0])  # the prompt cache
cuda = a.device.startswith("cuda")
for i, prompt in enumerate(prompts):
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    g = torch.Generator().manual_seed(i)
    job = RolloutJob(prompt=prompt, image=torch.rand(3, h, w, generator=g) * 2 - 1, num_chunks=a.chunks, width=w,
                     height=h, seed=i, kv_window=DEFAULT_KV_WINDOW, kv_sink=DEFAULT_KV_SINK)
    hits = enc.hits
    t = time.perf_counter()
    marks = []
    for chunk in gen.rollout(job):
        marks.append(time.perf_counter() - t)
    gaps = [round((b - c) * 1e3) for c, b in zip(marks, marks[1:])]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    kind = "cached prompt" if enc.hits > hits else "new prompt"
    print(f"job {i} ({kind}): first chunk {marks[0]:.2f} s, then {gaps} ms; peak {peak:.1f} GiB")
getattr(gen, "close", lambda: None)()
