"""Storage faults: an S3 that answers 500, an S3 that never answers, a full local disk.

Covered elsewhere (tests/test_storage.py), not repeated here: refused credentials (test_wrong_credentials_keep_file),
an unreachable endpoint (test_unreachable_endpoint_bounded_retries) and the abort of a failed multipart upload
(test_failed_multipart_is_aborted, against rclone).

Rule under test: nothing is lost and nothing hangs. A failed upload is retried a bounded number of times
(LINGBOT_S3_MAX_ATTEMPTS, first try included), then the MP4 stays in LINGBOT_OUTPUT_DIR and the video result
says where (`path`) and why (`upload_error`); a full disk fails the job with an error that says so, leaves no
partial file, and the worker serves the next job.
"""

from __future__ import annotations

import errno
import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jobs import small_request
from worker import media
from worker.storage import StorageConfig, store_video

SECRET = "fault-test-secret-" + "9" * 22


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


def _req(**kw) -> dict:
    return small_request(**{"seed": 3, "camera_actions": [[], ["w"], ["w", "l"]], **kw})


def _runner(engine, env: dict):
    from worker.service import JobRunner

    return JobRunner.from_env(engine, engine.preset, env)


class Always500:
    """An 'S3' on 127.0.0.1 that reads each request and answers 500 InternalError; counts requests by method."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                outer.requests.append(f"{self.command} {self.path.split('?')[0]}")
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                        b"<Message>We encountered an internal error. Please try again.</Message></Error>")
                self.send_response(500)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_PUT = do_GET = do_POST = do_HEAD = do_DELETE = _answer  # noqa: N815

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class BlackHole:
    """Accepts connections and reads what comes, but never answers (a hung S3 / load balancer)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            self.conns.append(conn)  # held open, never answered

    def close(self) -> None:
        self._stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


def _s3_env(endpoint: str, out: Path, **extra: str) -> dict:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "AKIAFAULTTEST0000000", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": "us-east-1", "LINGBOT_S3_BUCKET": "faults", "LINGBOT_OUTPUT_DIR": str(out), **extra}


def test_s3_500s_bounded_retries_and_the_video_is_kept(engine, tmp_path):
    s3 = Always500()
    try:
        env = _s3_env(s3.url, tmp_path / "out", LINGBOT_S3_MAX_ATTEMPTS="3")
        t0 = time.monotonic()
        items = list(_runner(engine, env).run(_req(), job_id="s3-500"))
        elapsed = time.monotonic() - t0
    finally:
        s3.close()
    video = items[-1]
    assert video["type"] == "video", video
    assert s3.requests == ["PUT /faults/s3-500.mp4"] * 3  # exactly LINGBOT_S3_MAX_ATTEMPTS tries, then give up
    assert elapsed < 20  # standard-mode backoff between the 3 tries is at most 1 + 2 s
    # where: the MP4 is in the output dir, whole; why: the error names the target and S3's answer
    kept = Path(video["path"])
    assert kept.parent == (tmp_path / "out").resolve() and kept.stat().st_size == video["bytes"]
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == video["sha256"]
    assert video["url"] is None and video["s3_uri"] is None
    assert "s3://faults/s3-500.mp4" in video["upload_error"] and "InternalError" in video["upload_error"]
    assert "reached max retries: 2" in video["upload_error"]
    assert SECRET not in str(items)
    with av_open(kept) as frames:
        assert frames == video["num_frames"] == 9


def av_open(path: Path):
    """Context manager yielding the number of decodable frames of an MP4."""
    import contextlib

    import av

    @contextlib.contextmanager
    def cm():
        with av.open(str(path)) as c:
            yield sum(1 for _ in c.decode(video=0))

    return cm()


def test_s3_that_never_answers_is_bounded_by_the_read_timeout(tmp_path):
    hole = BlackHole()
    video = tmp_path / "work" / "hung.mp4"
    video.parent.mkdir()
    video.write_bytes(b"\0" * 50_000)
    try:
        cfg = StorageConfig.from_env(_s3_env(hole.url, tmp_path / "out", LINGBOT_S3_MAX_ATTEMPTS="2",
                                             LINGBOT_S3_READ_TIMEOUT_S="0.5", LINGBOT_S3_CONNECT_TIMEOUT_S="1"))
        t0 = time.monotonic()
        result = store_video(video, s3_uri=None, presign_expires_s=None, config=cfg)
        elapsed = time.monotonic() - t0
    finally:
        hole.close()
    assert hole.accepted == 2  # one connection per attempt: the timed-out connection is not reused
    assert elapsed < 6, elapsed  # 2 x 0.5 s read timeout + at most 1 s backoff, plus slack
    assert "timeout" in result["upload_error"].lower() and "s3://faults/hung.mp4" in result["upload_error"]
    assert Path(result["path"]).read_bytes() == b"\0" * 50_000 and not video.exists()


@pytest.mark.parametrize("where", ["write", "close"])
def test_full_disk_fails_the_job_clearly_and_the_worker_serves_the_next(engine, tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    runner = _runner(engine, {"LINGBOT_OUTPUT_DIR": str(out)})
    real = getattr(media.Mp4Writer, where)

    def full(self, *a, **k):
        if where == "close":  # the encoder wrote its file, then finishing it hits the full disk
            self._hand_over(None)  # as the real close: the encoder thread ends before the container closes (closing
            self._thread.join()  # it under a frame being encoded crashed libav: a segfault in CI, 2026-11-22)
            self._container.close()
        raise OSError(errno.ENOSPC, os_strerror(errno.ENOSPC), str(self._tmp))

    monkeypatch.setattr(media.Mp4Writer, where, full)
    items = list(runner.run(_req(num_chunks=2, stream={"format": "jpeg"}), job_id="full"))
    err = items[-1]
    assert set(err) == {"error", "field"} and err["field"] is None
    assert "disk is full" in err["error"] and "No space left on device" in err["error"]
    assert "LINGBOT_OUTPUT_DIR" in err["error"]
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no partial MP4 left behind (hidden temp included)

    monkeypatch.setattr(media.Mp4Writer, where, real)  # space freed: the same worker takes the next job
    items = list(runner.run(_req(), job_id="after"))
    assert items[-1]["type"] == "video" and Path(items[-1]["path"]).is_file()


def os_strerror(code: int) -> str:
    import os

    return os.strerror(code)
