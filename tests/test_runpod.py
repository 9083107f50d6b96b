"""handler.py through runpod-python's own worker loop, with a loopback HTTP server standing in for RunPod's API.

The SDK path under test is the production one: rp_scale.JobScaler (job queue, per-job tasks, refresh_worker ->
kill_worker) -> rp_job.handle_job (generator streaming, return_aggregate_stream, error short-cut, stopPod) ->
rp_http (JSON-serialise, aiohttp POST with retries) -> our server. Only the job *source* is replaced, through the
SDK's documented local-test hook (config["jobs_fetcher"], honoured when RUNPOD_WEBHOOK_GET_JOB is unset), and the
two POST URLs point at 127.0.0.1. (`--test_input` would not run a generator handler: rp_local calls run_job.)
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import inspect
import io
import json
import os
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runpod.serverless.modules import rp_http, rp_scale  # noqa: E402
from runpod.serverless.modules.rp_handler import is_generator  # noqa: E402
from runpod.serverless.modules.worker_state import IS_LOCAL_TEST  # noqa: E402

from worker import service  # noqa: E402
from worker.parallel.pool import RankFailure  # noqa: E402

RUNPOD_ITEM_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    """Import handler.py the way the container does: the environment decides the model (tiny, CPU)."""
    env = {"LINGBOT_MODEL": "tiny", "LINGBOT_DEVICE": "cpu", "LINGBOT_NUM_GPUS": "1",
           "LINGBOT_OUTPUT_DIR": str(tmp_path_factory.mktemp("runpod-out"))}
    saved = {k: os.environ.get(k) for k in [*env, "LINGBOT_S3_BUCKET"]}
    os.environ.update(env)
    os.environ.pop("LINGBOT_S3_BUCKET", None)
    try:
        sys.modules.pop("handler", None)
        module = importlib.import_module("handler")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return module


def _image_b64(w: int = 64, h: int = 48) -> str:
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((w, h)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _job(job_id: str, **inp) -> dict:
    base = {"prompt": "a corridor", "image": _image_b64(), "size": "64x48", "num_chunks": 1, "seed": 7}
    return {"id": job_id, "input": {**base, **inp}}


class FakeRunPodAPI:
    """Records what the SDK POSTs: stream items (/stream/<id>) and final results (/done/<id>)."""

    def __init__(self) -> None:
        self.posts: list[dict] = []

    async def _record(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.posts.append({
            "kind": request.match_info["kind"], "job_id": request.match_info["job_id"], "raw": raw,
            "body": json.loads(raw), "query": parse_qs(urlsplit(str(request.url)).query),
        })
        return web.json_response({})

    def of(self, kind: str, job_id: str) -> list[dict]:
        return [p for p in self.posts if p["kind"] == kind and p["job_id"] == job_id]


def run_worker(config: dict, jobs: list[dict], monkeypatch) -> tuple[FakeRunPodAPI, list[str]]:
    """Run the SDK's JobScaler over `jobs` (one at a time, as RunPod does) until they are done or it stops."""
    assert IS_LOCAL_TEST, "RUNPOD_WEBHOOK_GET_JOB must be unset for the SDK's local job-source hook"
    api = FakeRunPodAPI()
    pending = list(jobs)
    taken: list[str] = []
    holder: dict = {}

    async def fetch(session, num_jobs):
        if not pending:
            holder["scaler"].kill_worker()
            return None
        job = pending.pop(0)
        taken.append(job["id"])
        return [job]

    async def main() -> None:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/{kind}/{job_id}", api._record)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        monkeypatch.setattr(rp_http, "JOB_STREAM_URL", f"{base}/stream/$ID?gpu=test")
        monkeypatch.setattr(rp_http, "JOB_DONE_URL", f"{base}/done/$ID?gpu=test")
        try:
            scaler = rp_scale.JobScaler(config)
            holder["scaler"] = scaler
            await asyncio.wait_for(scaler.run(), timeout=120)
        finally:
            await runner.cleanup()

    monkeypatch.setitem(config, "jobs_fetcher", fetch)
    monkeypatch.setitem(config, "jobs_fetcher_timeout", 5)
    asyncio.run(main())
    return api, taken


def _outputs(api: FakeRunPodAPI, job_id: str) -> list[dict]:
    return [p["body"]["output"] for p in api.of("stream", job_id)]


def test_handler_is_a_generator_function(handler):
    assert inspect.isgeneratorfunction(handler.handler) and is_generator(handler.handler)
    assert handler.CONFIG["handler"] is handler.handler
    assert handler.CONFIG["return_aggregate_stream"] is True
    assert not handler.CONFIG.get("refresh_worker")


def test_stream_errors_and_aggregate_through_the_sdk(handler, monkeypatch):
    monkeypatch.setitem(handler.CONFIG, "refresh_worker", False)
    jobs = [
        _job("good-1", num_chunks=2),
        _job("bad-size", size="100x50"),
        _job("bad-action", camera_actions=[["w"], ["fly"]]),
        _job("good-2", seed=8),
    ]
    api, taken = run_worker(handler.CONFIG, jobs, monkeypatch)
    assert taken == [j["id"] for j in jobs]

    # good-1: two chunks streamed in order, then the video; every POSTed item under RunPod's 1 MB.
    stream = _outputs(api, "good-1")
    assert [o["type"] for o in stream] == ["chunk", "chunk", "video"]
    assert [o["chunk_index"] for o in stream[:2]] == [0, 1]
    assert [(o["frame_start"], o["num_frames"]) for o in stream[:2]] == [(0, 9), (9, 12)]
    for post in api.of("stream", "good-1"):
        assert len(post["raw"]) < RUNPOD_ITEM_LIMIT
        assert len(json.dumps(post["body"]["output"]).encode()) < RUNPOD_ITEM_LIMIT
    video = stream[-1]
    assert video["num_frames"] == 21 and video["fps"] == 16 and Path(video["path"]).is_file()
    # The aggregate (/done, what /status and webhooks return) holds every streamed item, in order.
    (done,) = api.of("done", "good-1")
    assert done["query"]["isStream"] == ["true"]
    assert done["body"]["output"] == stream
    assert "stopPod" not in done["body"] and "error" not in done["body"]

    # Bad inputs: nothing streamed, the job result is an error naming the field and the rule.
    for job_id, field in (("bad-size", "size"), ("bad-action", "camera_actions[1]")):
        assert api.of("stream", job_id) == []
        (done,) = api.of("done", job_id)
        assert set(done["body"]) == {"error"}
        assert done["body"]["error"].startswith(f"{field}: "), done["body"]
        assert "Traceback" not in done["body"]["error"]
    assert "multiple of 16" in api.of("done", "bad-size")[0]["body"]["error"]

    # The worker stayed warm: the next job in the same process succeeds.
    stream2 = _outputs(api, "good-2")
    assert [o["type"] for o in stream2] == ["chunk", "video"]
    assert api.of("done", "good-2")[0]["body"]["output"] == stream2


def test_chunk_over_the_item_budget_is_split_into_parts(handler, monkeypatch):
    monkeypatch.setitem(handler.CONFIG, "refresh_worker", False)
    # Frames of this job are ~1-2 KB as JPEG: a 6 KB budget forces several parts per chunk, exactly as frames
    # over 1 MB would at full size.
    monkeypatch.setattr(service, "STREAM_FRAME_BUDGET", 6_000)
    api, _ = run_worker(handler.CONFIG, [_job("split", stream={"format": "jpeg", "quality": 95})], monkeypatch)
    stream = _outputs(api, "split")
    parts = [o for o in stream if o["type"] == "chunk"]
    assert len(parts) > 1 and stream[-1]["type"] == "video"
    assert [p["part"] for p in parts] == list(range(len(parts)))
    assert all(p["num_parts"] == len(parts) and p["chunk_index"] == 0 for p in parts)
    start = 0
    for p in parts:  # contiguous, in order, nothing dropped
        assert p["frame_start"] == start and p["num_frames"] == len(p["frames"])
        assert sum(len(f) + 3 for f in p["frames"]) <= 6_000
        start += p["num_frames"]
    assert start == 9 == stream[-1]["num_frames"]
    for p in parts:
        Image.open(io.BytesIO(base64.b64decode(p["frames"][0]))).verify()


class _DyingPool:
    """A rank pool whose rank 1 dies in the middle of a chunk (what RankPool does when a rank exits)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.unhealthy_reason = None

    @property
    def healthy(self) -> bool:
        return self.unhealthy_reason is None

    def rollout(self, job):
        for chunk in self.engine.rollout(job):
            self.unhealthy_reason = "rank 1 exited with code -9"
            raise RankFailure(f"multi-GPU rollout failed: {self.unhealthy_reason}")
            yield chunk


def test_dead_rank_fails_the_job_and_refreshes_the_worker(handler, monkeypatch):
    monkeypatch.setitem(handler.CONFIG, "refresh_worker", False)
    pool = _DyingPool(handler.RUNNER.generator)
    monkeypatch.setattr(handler.RUNNER, "generator", pool)
    api, taken = run_worker(handler.CONFIG, [_job("doomed"), _job("never-taken")], monkeypatch)

    (done,) = api.of("done", "doomed")
    assert "rank 1 exited" in done["body"]["error"]
    assert done["body"]["stopPod"] is True  # RunPod stops this pod and starts a fresh worker
    assert handler.CONFIG["refresh_worker"] is True
    # The SDK's loop stopped after the job (JobScaler.kill_worker): the next job went to another worker.
    assert taken == ["doomed"]


def test_unhealthy_worker_refuses_jobs_and_asks_for_replacement(handler, monkeypatch):
    monkeypatch.setitem(handler.CONFIG, "refresh_worker", False)
    pool = _DyingPool(handler.RUNNER.generator)
    pool.unhealthy_reason = "rank 2 did not answer within 300 s"
    monkeypatch.setattr(handler.RUNNER, "generator", pool)
    items = list(handler.handler(_job("late")))
    assert len(items) == 1 and "rank 2 did not answer" in items[0]["error"]
    assert handler.CONFIG["refresh_worker"] is True


def test_rank_processes_do_not_reload_the_model(handler, monkeypatch):
    """multiprocessing "spawn" re-runs the entry script as __mp_main__ in every rank: it must not load a pool there."""
    import runpy

    from worker.parallel import pool as cli

    def boom(*a, **k):
        raise AssertionError("a rank process re-imported handler.py and tried to load the model")

    monkeypatch.setattr(cli, "load_generator", boom)
    ns = runpy.run_path(str(ROOT / "handler.py"), run_name="__mp_main__")
    assert ns["RUNNER"] is None


def test_handler_spawns_the_other_ranks_before_it_imports_the_worker(tmp_path):
    """With LINGBOT_NUM_GPUS=2 the container's `python handler.py` spawns rank 1 before torch is imported, so the
    rank's imports run beside the entry point's (docs/PERFORMANCE.md v24d), and that rank serves the pool."""
    script = tmp_path / "entry.py"
    script.write_text(
        "import multiprocessing.context as ctx, sys\n"
        "spawned = []\n"
        "real = ctx.SpawnProcess._Popen\n"
        "def popen(process):\n"
        "    spawned.append(('torch' in sys.modules, process.name))\n"
        "    return real(process)\n"
        "ctx.SpawnProcess._Popen = staticmethod(popen)\n"
        "if __name__ == '__main__':\n"
        "    import handler\n"
        "    pool = handler.RUNNER.generator\n"
        "    print('SPAWNED', spawned, 'POOL', [p.name for p in pool.procs], pool.healthy, flush=True)\n"
        "    pool.close()\n"
    )
    env = {**os.environ, "LINGBOT_MODEL": "tiny", "LINGBOT_DEVICE": "cpu", "LINGBOT_NUM_GPUS": "2",
           "LINGBOT_OUTPUT_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("LINGBOT_S3_BUCKET", None)
    import subprocess

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("SPAWNED"))
    assert line == "SPAWNED [(False, 'lingbot-rank1')] POOL ['lingbot-rank1'] True", line
