"""modal_app.py without Modal credentials: class methods through `.local()` (modal runs @enter on the first local
call of an instance), and the batch/webhook core (worker/webhook.py) against a callback server on 127.0.0.1."""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker import webhook  # noqa: E402

SECRET = "whsec-test-0123456789"


@pytest.fixture(scope="module")
def modal_app(tmp_path_factory):
    saved = dict(os.environ)
    for k in list(os.environ):
        if k.startswith("MODAL_"):
            del os.environ[k]  # no token, no profile: importing must not need them
    os.environ["HOME"] = str(tmp_path_factory.mktemp("home"))  # and no ~/.modal.toml
    try:
        sys.modules.pop("modal_app", None)
        yield importlib.import_module("modal_app")
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def tiny_env(monkeypatch, tmp_path):
    for k, v in {"LINGBOT_MODEL": "tiny", "LINGBOT_DEVICE": "cpu", "LINGBOT_NUM_GPUS": "1",
                 "LINGBOT_OUTPUT_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LINGBOT_S3_BUCKET", raising=False)
    warnings.filterwarnings("ignore", message=".*executing locally.*")


def _image_bytes() -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((64, 48)).save(buf, "PNG")
    return buf.getvalue()


def _req(**kw) -> dict:
    return {"prompt": "a quiet street", "image": _image_bytes(), "size": "64x48", "num_chunks": 1, "seed": 3, **kw}


def test_app_imports_without_credentials(modal_app):
    assert modal_app.app.name == "lingbot-worker"
    assert modal_app.GPU == "H100:4" and modal_app.NUM_GPUS == 4
    assert modal_app.RUNTIME_ENV["LINGBOT_NUM_GPUS"] == "4" and modal_app.RUNTIME_ENV["NCCL_NVLS_ENABLE"] == "0"
    assert modal_app.gpu_count("H200") == 1 and modal_app.gpu_count("H200:8") == 8
    import modal

    for name in ("submit", "result", "deliver", "download_model"):
        assert isinstance(getattr(modal_app, name), modal.Function)
    assert isinstance(modal_app.Worker, modal.Cls)


def test_methods_run_locally_on_the_tiny_model(modal_app, tiny_env, monkeypatch):
    from worker.parallel import pool as cli

    loads = []
    real_load = cli.load_generator
    monkeypatch.setattr(cli, "load_generator", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    worker = modal_app.Worker()
    items = list(worker.generate.local(_req()))  # raw bytes image, as a Modal caller passes it
    assert [i.get("type") for i in items] == ["chunk", "video"]
    assert items[0]["num_frames"] == 9 and len(items[0]["frames"]) == 9
    video = items[-1]
    assert video["num_frames"] == 9 and Path(video["path"]).is_file()

    result = worker.run.local(_req())  # non-generator: the final result only, same frames -> same video
    assert result["type"] == "video" and result["num_frames"] == 9
    assert result["sha256"] != "" and result["stats"]["seed"] == 3

    bad = worker.run.local(_req(size="65x48"))
    assert bad["field"] == "size" and "multiple of 16" in bad["error"]
    assert len(loads) == 1 and loads[0][:3] == ("tiny", "cpu", 1)  # @enter ran once for the instance


def test_unhealthy_pool_retires_the_container(modal_app, tiny_env, monkeypatch):
    stops = []
    monkeypatch.setattr(modal_app, "_stop_container", stops.append)
    worker = modal_app.Worker()
    worker.run.local(_req())  # enter
    obj = worker._cached_user_cls_instance()

    class Dead:
        healthy = False
        unhealthy_reason = "rank 3 exited with code -9"

    obj.runner.generator = Dead()
    out = worker.run.local(_req())
    assert "rank 3 exited" in out["error"]
    assert stops == ["rank 3 exited with code -9"]


# --- webhook signing and batch validation ---------------------------------------------------------------------


def test_signature_roundtrip_and_replay_protection():
    body = b'{"result":{"type":"video"}}'
    headers = webhook.signed_headers(body, SECRET, delivery_id="d1")
    sig, ts = headers[webhook.SIGNATURE_HEADER], headers[webhook.TIMESTAMP_HEADER]
    assert sig.startswith("sha256=") and len(sig) == 7 + 64
    assert webhook.verify(body, SECRET, sig, ts)
    assert not webhook.verify(body + b" ", SECRET, sig, ts)  # body tampered
    assert not webhook.verify(body, "other-secret", sig, ts)  # wrong secret
    assert not webhook.verify(body, SECRET, sig, str(int(ts) + 1))  # timestamp is signed
    assert not webhook.verify(body, SECRET, sig, ts, now=int(ts) + 3600)  # stale: replay refused
    assert not webhook.verify(body, SECRET, None, ts)


def test_batch_validation_and_callback_address_policy(monkeypatch):
    public = lambda host, port: ["93.184.215.14"]  # noqa: E731 - a resolver mapping every name to a public IP
    jobs, cb = webhook.parse_batch({"jobs": [_req(image="https://example.com/a.png")],
                                    "callback_url": "https://hooks.example.com/x"}, env={}, resolver=public)
    assert len(jobs) == 1 and cb == "https://hooks.example.com/x"

    for url in ("http://127.0.0.1:9/cb", "https://127.0.0.1/cb", "https://169.254.169.254/latest", "https://10.1.2.3/",
                "file:///etc/passwd"):
        with pytest.raises(webhook.BatchError) as e:
            webhook.parse_batch({"jobs": [_req(image="x" * 40)], "callback_url": url}, env={})
        assert e.value.field == "callback_url"
    # Private callbacks only where explicitly allowed (tests, on-prem).
    _, cb = webhook.parse_batch({"jobs": [_req(image="x" * 40)], "callback_url": "http://127.0.0.1:9/cb"},
                                env={"LINGBOT_ALLOW_PRIVATE_URLS": "1"})
    assert cb == "http://127.0.0.1:9/cb"

    with pytest.raises(webhook.BatchError) as e:
        webhook.parse_batch({"jobs": [_req(image="x" * 40), _req(image="x" * 40, size="100x50")]}, env={})
    assert e.value.field == "jobs[1].size"
    for body, field in (({"jobs": []}, "jobs"), ({"jobs": [{}], "extra": 1}, "extra"), ([], "request")):
        with pytest.raises(webhook.BatchError) as e:
            webhook.parse_batch(body, env={})
        assert e.value.field == field


class _Callback:
    """A callback receiver on 127.0.0.1 that answers `statuses` in turn (then 200) and verifies signatures."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.received: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append({
                    "body": body, "headers": dict(self.headers),
                    "valid": webhook.verify(body, SECRET, self.headers.get(webhook.SIGNATURE_HEADER),
                                            self.headers.get(webhook.TIMESTAMP_HEADER)),
                })
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/lingbot?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_delivery_retries_with_backoff_until_accepted(monkeypatch):
    monkeypatch.setenv("LINGBOT_ALLOW_PRIVATE_URLS", "1")
    sleeps: list[float] = []
    with _Callback([503, 500]) as cb:
        d = webhook.post_signed(cb.url, {"index": 0, "result": {"type": "video"}}, SECRET, allow_private=True,
                                backoff_s=0.01, sleep=lambda s: (sleeps.append(s), time.sleep(s)))
    assert d.ok and d.attempts == 3 and d.status == 200
    assert len(cb.received) == 3 and all(r["valid"] for r in cb.received)
    assert len({r["headers"][webhook.DELIVERY_HEADER] for r in cb.received}) == 1  # one id to de-duplicate on
    assert json.loads(cb.received[-1]["body"]) == {"index": 0, "result": {"type": "video"}}
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0]  # exponential backoff (with jitter)

    with _Callback([400]) as cb:  # a client error is final: no retry
        d = webhook.post_signed(cb.url, {"x": 1}, SECRET, allow_private=True, backoff_s=0.01)
    assert not d.ok and d.attempts == 1 and d.status == 400 and "token=abc" not in d.error

    with _Callback([503] * 10) as cb:  # bounded
        d = webhook.post_signed(cb.url, {"x": 1}, SECRET, allow_private=True, attempts=4, backoff_s=0.001)
    assert not d.ok and d.attempts == 4 and len(cb.received) == 4

    # Without the private-address allowance the loopback callback is never contacted.
    with _Callback([]) as cb:
        d = webhook.post_signed(cb.url, {"x": 1}, SECRET, allow_private=False)
    assert not d.ok and d.attempts == 1 and "callback_url" in d.error and cb.received == []


def test_batch_submit_and_signed_delivery_of_a_real_result(modal_app, tiny_env, monkeypatch):
    """The endpoint's core with Modal's spawn replaced by a local call; the result is POSTed, signed, to 127.0.0.1."""
    env = {"LINGBOT_ALLOW_PRIVATE_URLS": "1", "LINGBOT_WEBHOOK_SECRET": SECRET}
    worker = modal_app.Worker()
    results, delivered = {}, []

    def spawn(job):
        call_id = f"fc-{len(results)}"
        results[call_id] = worker.run.local(job)
        return call_id

    with _Callback([502]) as cb:
        def deliver(batch_id, call_ids, url):
            for i, call_id in enumerate(call_ids):
                delivered.append(modal_app.deliver_one(batch_id, i, call_id, lambda c=call_id: results[c], url, env,
                                                       backoff_s=0.01))

        out = modal_app.submit_batch({"jobs": [_req(stream={"format": "jpeg"})], "callback_url": cb.url}, env=env,
                                     spawn=spawn, deliver=deliver)
        assert out["call_ids"] == ["fc-0"] and out["callback_url"] is True
        assert delivered[0].ok and delivered[0].attempts == 2
        payload = json.loads(cb.received[-1]["body"])
        assert cb.received[-1]["valid"]
        assert payload["batch_id"] == out["batch_id"] and payload["call_id"] == "fc-0"
        assert payload["result"]["type"] == "video" and payload["result"]["num_frames"] == 9

        # A call that crashed is still reported to the callback.
        d = modal_app.deliver_one("b", 1, "fc-x", lambda: (_ for _ in ()).throw(RuntimeError("GPU fell off")),
                                  cb.url, env, backoff_s=0.01)
        assert d.ok and "GPU fell off" in json.loads(cb.received[-1]["body"])["result"]["error"]

    with pytest.raises(webhook.BatchError) as e:  # no secret configured: refuse callbacks rather than send unsigned
        modal_app.submit_batch({"jobs": [_req()], "callback_url": cb.url}, env={"LINGBOT_ALLOW_PRIVATE_URLS": "1"},
                               spawn=spawn, deliver=lambda *a: None)
    assert e.value.field == "callback_url"


def test_kernels_compiled_at_start_are_committed_to_the_volume(modal_app, monkeypatch, caplog):
    """The image points LINGBOT_COMPILE_CACHE into the model volume; a container's writes reach later containers
    only through a commit, and a failed commit must not fail the start."""
    assert modal_app.RUNTIME_ENV["LINGBOT_COMPILE_CACHE"].startswith(modal_app.MODELS_DIR + "/")
    commits = []

    class Volume:
        def __init__(self, error=None):
            self.error = error

        def commit(self):
            commits.append(1)
            if self.error:
                raise self.error

    monkeypatch.setattr(modal_app, "volume", Volume())
    monkeypatch.setenv("LINGBOT_COMPILE_CACHE", modal_app.RUNTIME_ENV["LINGBOT_COMPILE_CACHE"])
    modal_app._commit_compile_cache()
    assert commits == [1]
    monkeypatch.setenv("LINGBOT_COMPILE_CACHE", "/tmp/elsewhere")  # not on the volume: nothing to commit
    modal_app._commit_compile_cache()
    assert commits == [1]
    monkeypatch.setattr(modal_app, "volume", Volume(RuntimeError("volume busy")))
    monkeypatch.setenv("LINGBOT_COMPILE_CACHE", modal_app.RUNTIME_ENV["LINGBOT_COMPILE_CACHE"])
    modal_app._commit_compile_cache()
    assert commits == [1, 1] and "compile cache not committed to the volume: volume busy" in caplog.text


def test_download_writes_the_bf16_copy_the_workers_find_first(modal_app, tmp_path):
    """download_model's last step: the bf16 copy lands where resolve_model looks before the HF cache, so the
    workers (LINGBOT_MODEL_DIR=/models, HF_HOME=/models) load it; a second download keeps it."""
    import torch

    from tests.checkpoints import TINY, fake_hf_cache, write_tiny_checkpoint
    from worker.models.dit import build_dit
    from worker.models.loading import find_shards, resolve_model

    repo = "robbyant/lingbot-world-fast-diffusers"
    volume = tmp_path / "models"
    snap = fake_hf_cache(volume / "hub", repo)
    sd = build_dit(TINY.dit, device="cpu", dtype=torch.float32, seed=0).state_dict()
    write_tiny_checkpoint(snap, "diffusers", sd, TINY.dit)
    env = {"LINGBOT_MODEL_DIR": str(volume), "HF_HOME": str(volume)}
    assert resolve_model(repo, env=env).path == snap.resolve()  # before: the fp32 snapshot

    dst = modal_app._bf16_copy(str(snap), repo, root=str(volume))
    assert Path(dst) == volume / repo
    source = resolve_model(repo, env=env)
    assert source.path == Path(dst).resolve()
    from safetensors import safe_open

    with safe_open(str(find_shards(source.transformer_dir).files[0]), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    mtime = (Path(dst) / "transformer").stat().st_mtime_ns
    assert modal_app._bf16_copy(str(snap), repo, root=str(volume)) == dst
    assert (Path(dst) / "transformer").stat().st_mtime_ns == mtime
