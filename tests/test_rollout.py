"""The leader's pipeline order: the first chunk's decode is queued before the DiT of chunk 1 starts, and the host
queues at most two chunks ahead of the GPU."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from worker import rollout as rollout_mod
from worker.rollout import RolloutJob


def _job() -> RolloutJob:
    g = torch.Generator().manual_seed(0)
    return RolloutJob(prompt="a corridor", image=torch.rand(3, 48, 64, generator=g) * 2 - 1, num_chunks=2,
                      width=64, height=48, seed=1, kv_window=6, kv_sink=3, camera_actions=[["w"]] * 6)


def _events(engine, monkeypatch) -> list[tuple[str, int]]:
    """Run a 2-chunk job, recording (what, chunk) in order: DiT forwards and decode calls. The chunk-0 decode is
    slow to return, so anything that does not wait for it overtakes it."""
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    decodes = [0]
    real_forward = engine.dit.forward
    real_decode = engine.vae.decode_chunk

    def forward(x, y, t, text_kv, ctx, *args, **kwargs):
        with lock:
            events.append(("dit", ctx.start_frame // 3))
        return real_forward(x, y, t, text_kv, ctx, *args, **kwargs)

    def decode_chunk(latents):
        c = decodes[0]
        decodes[0] += 1
        out = real_decode(latents)
        if c == 0:
            time.sleep(0.3)
        with lock:
            events.append(("decoded", c))
        return out

    monkeypatch.setattr(engine.dit, "forward", forward)
    monkeypatch.setattr(engine.vae, "decode_chunk", decode_chunk)
    chunks = list(engine.rollout(_job()))
    assert [c.index for c in chunks] == [0, 1] and all(c.frames is not None for c in chunks)
    return events


@pytest.mark.parametrize("first_frames_first", [True, False])
def test_chunk1_dit_waits_for_the_first_decode(tiny_engine, monkeypatch, first_frames_first: bool) -> None:
    monkeypatch.setattr(rollout_mod, "FIRST_FRAMES_FIRST", first_frames_first)
    events = _events(tiny_engine, monkeypatch)
    first_decode = events.index(("decoded", 0))
    first_chunk1_dit = events.index(("dit", 1))
    # with the switch off the DiT runs ahead (and the order check fails): the test can tell the two apart
    assert (first_decode < first_chunk1_dit) == first_frames_first, events


def test_the_host_runs_at_most_two_chunks_ahead(tiny_engine, monkeypatch) -> None:
    """Before queueing chunk c the DiT thread waits for chunk c-2's end: the GPU always has the next chunk queued
    (no drain at the boundary), and a cancel never waits for more than the chunks already queued."""
    events: list = []
    marks: list = []
    real_mark, real_forward = rollout_mod._mark, tiny_engine.dit.forward

    def mark(device):
        m = real_mark(device)
        if threading.current_thread().name == "rollout-dit":
            marks.append(m)  # per chunk: its start, then its end
        return m

    def wait(m):
        if threading.current_thread().name == "rollout-dit":
            events.append(("wait for end of", marks.index(m) // 2))

    def forward(x, y, t, text_kv, ctx, *args, **kwargs):
        events.append(("dit", ctx.start_frame // 3))
        return real_forward(x, y, t, text_kv, ctx, *args, **kwargs)

    monkeypatch.setattr(rollout_mod, "_mark", mark)
    monkeypatch.setattr(rollout_mod, "_wait", wait)
    monkeypatch.setattr(tiny_engine.dit, "forward", forward)
    job = _job()
    job.num_chunks = 4
    job.camera_actions = [["w"]] * 12
    assert [c.index for c in tiny_engine.rollout(job)] == [0, 1, 2, 3]
    waits = [e for e in events if e[0] != "dit"]
    assert waits == [("wait for end of", 0), ("wait for end of", 1)], events
    for c, done in ((2, 0), (3, 1)):
        assert events.index(("wait for end of", done)) < events.index(("dit", c)), events


def test_a_cancelled_job_ends_after_its_queued_chunks(tiny_engine, monkeypatch) -> None:
    """Closing the rollout early (cancel) returns only once the DiT thread has waited for its stream: the chunks it
    queued ahead must not run on into the next job."""
    synced: list[str] = []
    real_sync = rollout_mod._sync
    monkeypatch.setattr(rollout_mod, "_sync", lambda device: (synced.append(threading.current_thread().name),
                                                              real_sync(device)))
    job = _job()
    job.num_chunks = 4
    job.camera_actions = [["w"]] * 12
    it = tiny_engine.rollout(job)
    assert next(it).index == 0
    it.close()
    assert "rollout-dit" in synced


@pytest.mark.parametrize("chunks", [1, 3])
def test_the_last_chunk_skips_the_cache_refresh(tiny_engine, monkeypatch, chunks: int) -> None:
    """Every chunk but the last writes its clean K/V (the refresh forward); the last one's would serve no chunk."""
    forwards: list[tuple[int, bool]] = []
    real_forward = tiny_engine.dit.forward

    def forward(x, y, t, text_kv, ctx, *args, cache_only=False, **kwargs):
        forwards.append((ctx.start_frame // 3, cache_only))
        return real_forward(x, y, t, text_kv, ctx, *args, cache_only=cache_only, **kwargs)

    monkeypatch.setattr(tiny_engine.dit, "forward", forward)
    job = _job()
    job.num_chunks = chunks
    job.camera_actions = [["w"]] * (3 * chunks)
    assert [c.index for c in tiny_engine.rollout(job)] == list(range(chunks))
    refreshes = [c for c, cache_only in forwards if cache_only]
    assert refreshes == list(range(chunks - 1)), forwards
    assert len(forwards) == 4 * chunks + chunks - 1


def test_a_chunk_is_handed_on_before_its_cache_refresh(tiny_engine, monkeypatch) -> None:
    """The refresh does not change a chunk's frames, so the chunk goes to its decode first and its refresh is queued
    when the next chunk starts; a job stopped after a chunk runs no refresh for it."""
    refreshes: list[int] = []
    real_forward = tiny_engine.dit.forward

    def forward(x, y, t, text_kv, ctx, *args, cache_only=False, **kwargs):
        if cache_only:
            refreshes.append(ctx.start_frame // 3)
        return real_forward(x, y, t, text_kv, ctx, *args, cache_only=cache_only, **kwargs)

    monkeypatch.setattr(tiny_engine.dit, "forward", forward)
    job = _job()
    job.num_chunks, job.camera_actions = 3, [["w"]] * 9
    with torch.inference_mode():
        chunks = rollout_mod._denoise_chunks(tiny_engine, job)
        seen = [(c, list(refreshes)) for c, *_ in chunks]
        assert seen == [(0, []), (1, [0]), (2, [0, 1])]
        refreshes.clear()
        chunks = rollout_mod._denoise_chunks(tiny_engine, job)
        next(chunks)
        chunks.close()
    assert refreshes == []
