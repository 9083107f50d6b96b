"""JobRunner end to end on the tiny model (CPU) with a real S3 server on loopback (rclone serve s3)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import urllib.request
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch
from PIL import Image

from worker.parallel.pool import load_generator
from worker.service import JobRunner


@pytest.fixture(scope="module")
def engine():
    return load_generator("tiny", "cpu", 1)


def _image_b64(w: int = 64, h: int = 48) -> str:
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((w, h)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _req(**kw) -> dict:
    base = {"prompt": "a stone corridor", "image": _image_b64(), "size": "64x48", "num_chunks": 1, "seed": 11,
            "camera_actions": [[], ["w"], ["w", "l"]]}
    return {**base, **kw}


def _runner(engine, env: dict) -> JobRunner:
    return JobRunner.from_env(engine, engine.preset, env)


@pytest.fixture
def local_runner(engine, tmp_path):
    return _runner(engine, {"LINGBOT_OUTPUT_DIR": str(tmp_path)})


def _frames(items: list[dict]) -> list[str]:
    return [f for it in items if it.get("type") == "chunk" for f in it["frames"]]


def test_end_to_end_upload_presign_and_decode(engine, s3_server, tmp_path):
    runner = _runner(engine, s3_server.env(LINGBOT_OUTPUT_DIR=str(tmp_path), LINGBOT_S3_PREFIX="e2e"))
    items = list(runner.run(_req(size="128x96", num_chunks=2, image=_image_b64(128, 96)), job_id="e2e-job"))
    assert [i.get("type") for i in items] == ["chunk", "chunk", "video"], items[-1]
    chunks, video = items[:2], items[-1]

    # Streamed frames: valid JPEGs of the requested size, 9 then 12 frames, contiguous.
    assert [(c["frame_start"], c["num_frames"]) for c in chunks] == [(0, 9), (9, 12)]
    for c in chunks:
        assert c["content_type"] == "image/jpeg" and c["width"] == 128 and c["height"] == 96
        assert len(c["frames"]) == c["num_frames"]
        assert set(c["stats"]) >= {"dit_ms", "decode_ms", "encode_ms", "chunk_ms"}
        for f in c["frames"]:
            img = Image.open(io.BytesIO(base64.b64decode(f)))
            assert img.format == "JPEG" and img.size == (128, 96)
            img.load()

    # The MP4 is in S3 (the local working copy is gone) and the presigned URL serves it.
    assert video["s3_uri"] == f"s3://{s3_server.bucket}/e2e/e2e-job.mp4"
    assert video["path"] is None and video["upload_error"] is None
    assert not list(Path(tmp_path).rglob("*.mp4"))
    assert (s3_server.root / s3_server.bucket / "e2e" / "e2e-job.mp4").is_file()
    assert "X-Amz-Signature=" in video["url"]
    data = urllib.request.urlopen(video["url"], timeout=10).read()
    assert len(data) == video["bytes"] and hashlib.sha256(data).hexdigest() == video["sha256"]

    # Decoded with PyAV: 9 + 12k frames at 16 fps and the requested size.
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f for f in container.decode(stream)]
        assert stream.average_rate == Fraction(16) and stream.codec_context.name == "h264"
    assert len(frames) == 21 == video["num_frames"]
    assert (frames[0].width, frames[0].height) == (128, 96) == (video["width"], video["height"])
    assert video["fps"] == 16 and video["stats"]["chunks"] == 2 and video["stats"]["seed"] == 11


def test_webp_frames_and_progress_only(local_runner):
    items = list(local_runner.run(_req(stream={"format": "webp", "quality": 70})))
    assert [i.get("type") for i in items] == ["chunk", "video"]
    assert items[0]["content_type"] == "image/webp"
    for f in items[0]["frames"]:
        img = Image.open(io.BytesIO(base64.b64decode(f)))
        assert img.format == "WEBP" and img.size == (64, 48)

    items = list(local_runner.run(_req(num_chunks=2, stream={"format": "none"})))
    assert [i.get("type") for i in items] == ["progress", "progress", "video"]
    assert all("frames" not in i for i in items)
    assert [(i["chunk_index"], i["frame_start"], i["num_frames"]) for i in items[:2]] == [(0, 0, 9), (1, 9, 12)]
    assert items[-1]["num_frames"] == 21 and Path(items[-1]["path"]).is_file()


def test_upload_failure_keeps_the_video_and_leaks_no_secret(engine, s3_server, tmp_path):
    bad_secret = "wrong-" + s3_server.secret_key[6:]
    env = s3_server.env(LINGBOT_OUTPUT_DIR=str(tmp_path), AWS_SECRET_ACCESS_KEY=bad_secret,
                        LINGBOT_S3_MAX_ATTEMPTS="1")
    items = list(_runner(engine, env).run(_req(stream={"format": "none"}), job_id="no-upload"))
    video = items[-1]
    assert video["type"] == "video" and video["url"] is None and video["s3_uri"] is None
    kept = Path(video["path"])
    assert kept.is_file() and kept.parent == tmp_path.resolve() and kept.stat().st_size == video["bytes"]
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == video["sha256"]
    assert f"s3://{s3_server.bucket}/no-upload.mp4" in video["upload_error"]
    assert "failed" in video["upload_error"]
    text = json.dumps(items)
    assert bad_secret not in text and s3_server.secret_key not in text


def test_seed_determinism(local_runner):
    a = list(local_runner.run(_req(seed=123)))
    b = list(local_runner.run(_req(seed=123)))
    c = list(local_runner.run(_req(seed=124)))
    assert a[-1]["type"] == b[-1]["type"] == c[-1]["type"] == "video"
    assert _frames(a) and _frames(a) == _frames(b)
    assert _frames(a) != _frames(c)
    assert a[-1]["stats"]["seed"] == 123


def test_cancel_after_first_chunk_then_next_job_matches_a_fresh_run(local_runner, tmp_path):
    req = _req(num_chunks=2, seed=5)
    reference = list(local_runner.run(req))
    assert [i["type"] for i in reference] == ["chunk", "chunk", "video"]

    gen = local_runner.run(req, job_id="cancelled")
    first = next(gen)
    assert first["type"] == "chunk" and first["frames"] == reference[0]["frames"]
    gen.close()  # the consumer went away (RunPod cancel / client disconnect)
    leftovers = [p.name for p in tmp_path.rglob("*") if "cancelled" in p.name or p.name.endswith(".part.mp4")]
    assert leftovers == []

    again = list(local_runner.run(req))
    assert _frames(again) == _frames(reference)
    assert again[-1]["num_frames"] == reference[-1]["num_frames"] == 21


def test_out_of_memory_mid_chunk_is_a_clear_error_and_the_worker_recovers(engine, local_runner, monkeypatch):
    dit = engine.dit
    real_forward = dit.forward
    state = {"calls": 0, "raised": 0}

    def flaky_forward(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == 6:  # chunk 0 takes 5 forwards (4 steps + refresh): this is mid-rollout, mid-chunk 1
            state["raised"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(dit, "forward", flaky_forward)
    items = list(local_runner.run(_req(num_chunks=3), job_id="oom"))
    assert state["raised"] == 1
    assert len(dit.camera_memo) == 0  # chunk 0's frames were in it: the memo is freed with the other caches
    # chunk 0 was finished before the failure: it still reaches the caller, then the error
    assert [i.get("type") for i in items[:-1]] == ["chunk"]
    err = items[-1]
    assert set(err) == {"error", "field"} and "out of GPU memory" in err["error"]
    assert "smaller size" in err["error"] and "kv_window" in err["error"]
    monkeypatch.undo()

    items = list(local_runner.run(_req(num_chunks=2)))
    assert [i.get("type") for i in items] == ["chunk", "chunk", "video"]
