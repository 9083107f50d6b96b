"""worker.storage against a real S3 server (rclone serve s3 on loopback, SigV4 checked)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

import s3server
from worker import media, storage
from worker.storage import StorageConfig, parse_s3_uri, store_video


def make_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CallRecorder:
    """Wraps make_s3_client to count the S3 operations actually sent (and optionally inject a failure)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_part: int | None = None) -> None:
        self.sent: list[str] = []
        self.results: list[tuple[str, int]] = []
        real = storage.make_s3_client

        def wrapped(config: StorageConfig) -> Any:
            client = real(config)
            events = client.meta.events

            def before_send(request: Any, **kw: Any) -> None:
                op = kw["event_name"].split(".")[-1]
                self.sent.append(op)

            def before_call(params: Any, model: Any, **kw: Any) -> None:
                if fail_part is not None and str(params["query_string"].get("partNumber")) == str(fail_part):
                    raise ConnectionAbortedError(f"injected failure of part {fail_part}")

            def after_call(http_response: Any, model: Any, **kw: Any) -> None:
                self.results.append((model.name, http_response.status_code))

            events.register("before-send.s3.*", before_send)
            events.register("before-call.s3.UploadPart", before_call)
            events.register("after-call.s3.*", after_call)
            return client

        monkeypatch.setattr(storage, "make_s3_client", wrapped)


def test_config_from_env(tmp_path: Path) -> None:
    cfg = StorageConfig.from_env({})
    assert cfg.bucket is None and not cfg.s3_enabled and cfg.output_dir == Path("outputs")
    assert cfg.presign_expires_s == 3600 and cfg.prefix == ""
    cfg = StorageConfig.from_env({
        "LINGBOT_S3_BUCKET": "my-bucket", "LINGBOT_S3_PREFIX": "/videos/run1", "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://a", "AWS_ENDPOINT_URL_S3": "http://b", "AWS_SECRET_ACCESS_KEY": "topsecret",
        "LINGBOT_PRESIGN_EXPIRES_S": "60", "LINGBOT_S3_MULTIPART_THRESHOLD": "1048576",
        "LINGBOT_OUTPUT_DIR": str(tmp_path),
    })
    assert (cfg.bucket, cfg.prefix, cfg.region, cfg.endpoint_url) == ("my-bucket", "videos/run1/", "eu-west-1", "http://b")
    assert cfg.presign_expires_s == 60 and cfg.multipart_threshold == 1 << 20 and cfg.output_dir == tmp_path
    assert "topsecret" not in repr(cfg)
    for bad in ({"LINGBOT_S3_MAX_ATTEMPTS": "x"}, {"LINGBOT_PRESIGN_EXPIRES_S": "999999999"},
                {"LINGBOT_S3_BUCKET": "Bad_Bucket"}, {"LINGBOT_S3_ADDRESSING_STYLE": "sideways"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StorageConfig.from_env(bad)


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b.mp4") == ("bucket", "a/b.mp4")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    assert parse_s3_uri("s3://bucket/dir/") == ("bucket", "dir/")
    for bad in ("https://bucket/a", "s3://", "s3:///key", "s3://b/a", "s3://Bucket/a", "s3://bucket//a",
                "s3://bucket/a/../b", "s3://bucket/a?x=1", 42):
        with pytest.raises(ValueError):
            parse_s3_uri(bad)  # type: ignore[arg-type]


def test_upload_real_mp4_and_presigned_get(s3_server: s3server.S3Server, tmp_path: Path) -> None:
    video = tmp_path / "work" / "job-1.mp4"
    video.parent.mkdir()
    with media.Mp4Writer(video, 64, 48) as w:
        w.write(np.random.default_rng(0).integers(0, 256, (10, 48, 64, 3), dtype=np.uint8))
        info = w.close()
    data = video.read_bytes()
    cfg = StorageConfig.from_env(s3_server.env(LINGBOT_S3_PREFIX="videos", LINGBOT_OUTPUT_DIR=str(tmp_path / "out")))
    result = store_video(video, s3_uri=None, presign_expires_s=None, config=cfg)
    assert result["s3_uri"] == f"s3://{s3_server.bucket}/videos/job-1.mp4"
    assert result["bytes"] == len(data) and result["sha256"] == sha(data) == info.sha256
    assert result["upload_error"] is None and result["path"] is None and not video.exists()  # uploaded -> local copy removed
    assert (s3_server.root / s3_server.bucket / "videos" / "job-1.mp4").read_bytes() == data
    url = result["url"]
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "X-Amz-Expires=3600" in url  # SigV4
    r = requests.get(url, timeout=10)
    assert r.status_code == 200 and r.content == data
    assert r.headers["Content-Type"] == "video/mp4"
    # an explicit s3_uri wins over the configured bucket/prefix; keep_local keeps the file
    video2 = make_file(tmp_path / "work" / "b.mp4", 1000)
    result = store_video(video2, s3_uri=f"s3://{s3_server.bucket}/explicit/name.mp4", presign_expires_s=120,
                         config=cfg, keep_local=True)
    assert result["s3_uri"] == f"s3://{s3_server.bucket}/explicit/name.mp4" and video2.exists()
    assert "X-Amz-Expires=120" in result["url"]
    assert requests.get(result["url"], timeout=10).content == video2.read_bytes()


def test_presigned_url_expires(s3_server: s3server.S3Server, tmp_path: Path) -> None:
    video = make_file(tmp_path / "short.mp4", 5000)
    data = video.read_bytes()
    cfg = StorageConfig.from_env(s3_server.env(LINGBOT_OUTPUT_DIR=str(tmp_path / "out")))
    # SigV4 expiry is X-Amz-Date (whole seconds, truncated) + X-Amz-Expires: a URL signed for 3 s is good for at
    # least 2 (1 s flaked: signed late in a second, it was already expired at the first GET)
    result = store_video(video, s3_uri=None, presign_expires_s=3, config=cfg)
    r = requests.get(result["url"], timeout=10)
    assert r.status_code == 200 and r.content == data
    # a tampered URL is refused while the real one is still good: rclone really checks the signature
    assert requests.get(result["url"].replace("X-Amz-Expires=3", "X-Amz-Expires=9"), timeout=10).status_code in (400, 403)
    time.sleep(4.2)
    r = requests.get(result["url"], timeout=10)
    # rclone answers 400 AccessDenied ("request time ... exceeds the maximum allowed"); AWS answers 403
    assert r.status_code in (400, 403) and "AccessDenied" in r.text


def test_wrong_credentials_keep_file(s3_server: s3server.S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "WRONG-" + "s3cr3t" * 6
    video = make_file(tmp_path / "work" / "creds.mp4", 20_000)
    data = video.read_bytes()
    out = tmp_path / "out"
    cfg = StorageConfig.from_env(s3_server.env(AWS_SECRET_ACCESS_KEY=secret, LINGBOT_OUTPUT_DIR=str(out),
                                               LINGBOT_S3_MAX_ATTEMPTS="2"))
    with caplog.at_level(logging.DEBUG, logger="worker.storage"):
        result = store_video(video, s3_uri=None, presign_expires_s=None, config=cfg)
    assert result["s3_uri"] is None and result["url"] is None
    assert "SignatureDoesNotMatch" in result["upload_error"] or "AccessDenied" in result["upload_error"]
    assert Path(result["path"]) == (out / "creds.mp4").resolve() and Path(result["path"]).read_bytes() == data
    assert result["sha256"] == sha(data) and result["bytes"] == len(data)
    for text in (result["upload_error"], caplog.text, repr(result)):
        assert secret not in text and s3_server.secret_key not in text
    assert not (s3_server.root / s3_server.bucket / "creds.mp4").exists()


def test_unreachable_endpoint_bounded_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = CallRecorder(monkeypatch)
    video = make_file(tmp_path / "work" / "down.mp4", 10_000)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3server.closed_port()}", "AWS_ACCESS_KEY_ID": "ak",
        "AWS_SECRET_ACCESS_KEY": "sk-never-shown", "AWS_REGION": "us-east-1", "LINGBOT_S3_BUCKET": "bucket",
        "LINGBOT_OUTPUT_DIR": str(tmp_path / "out"), "LINGBOT_S3_MAX_ATTEMPTS": "3",
        "LINGBOT_S3_CONNECT_TIMEOUT_S": "1",
    }
    t0 = time.monotonic()
    result = store_video(video, s3_uri=None, presign_expires_s=None, config=StorageConfig.from_env(env))
    elapsed = time.monotonic() - t0
    assert rec.sent.count("PutObject") == 3  # exactly max_attempts tries, then give up
    assert elapsed < 15
    assert "Could not connect" in result["upload_error"] and "sk-never-shown" not in result["upload_error"]
    assert Path(result["path"]).read_bytes() == (tmp_path / "out" / "down.mp4").read_bytes()
    assert not video.exists()  # moved (not copied) into the output dir


def test_multipart_upload(s3_server: s3server.S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = CallRecorder(monkeypatch)
    size = 11 * storage.MIB + 123  # s3transfer's minimum part is 5 MiB (S3's rule): 3 parts
    video = make_file(tmp_path / "big.mp4", size)
    data = video.read_bytes()
    cfg = StorageConfig.from_env(s3_server.env(
        LINGBOT_S3_MULTIPART_THRESHOLD=str(storage.MIB), LINGBOT_S3_MULTIPART_CHUNKSIZE=str(5 * storage.MIB),
        LINGBOT_S3_MAX_CONCURRENCY="2", LINGBOT_OUTPUT_DIR=str(tmp_path / "out"),
    ))
    result = store_video(video, s3_uri=f"s3://{s3_server.bucket}/mp/", presign_expires_s=None, config=cfg)
    assert result["upload_error"] is None, result
    assert rec.sent.count("CreateMultipartUpload") == 1 and rec.sent.count("UploadPart") == 3
    assert rec.sent.count("CompleteMultipartUpload") == 1 and "PutObject" not in rec.sent
    assert result["s3_uri"] == f"s3://{s3_server.bucket}/mp/big.mp4"
    r = requests.get(result["url"], timeout=30)
    assert r.status_code == 200 and sha(r.content) == sha(data) == result["sha256"]


def test_failed_multipart_is_aborted(s3_server: s3server.S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = CallRecorder(monkeypatch, fail_part=2)
    video = make_file(tmp_path / "work" / "broken.mp4", 11 * storage.MIB)
    data = video.read_bytes()
    cfg = StorageConfig.from_env(s3_server.env(
        LINGBOT_S3_MULTIPART_THRESHOLD=str(storage.MIB), LINGBOT_S3_MULTIPART_CHUNKSIZE=str(5 * storage.MIB),
        LINGBOT_S3_MAX_CONCURRENCY="1", LINGBOT_OUTPUT_DIR=str(tmp_path / "out"),
    ))
    result = store_video(video, s3_uri=None, presign_expires_s=None, config=cfg)
    assert "injected failure of part 2" in result["upload_error"]
    assert Path(result["path"]).read_bytes() == data
    assert ("AbortMultipartUpload", 204) in rec.results  # s3transfer aborted it, and the server accepted
    assert "CompleteMultipartUpload" not in rec.sent
    bucket_dir = s3_server.root / s3_server.bucket
    assert not (bucket_dir / "broken.mp4").exists()
    # the server dropped its temporary multipart object (rclone names them .rclone_temp_multipart_*)
    assert not [p for p in bucket_dir.rglob(".rclone_temp_*")]


def test_error_messages_are_scrubbed() -> None:
    cfg = StorageConfig(secret_access_key="SECRETKEY", session_token="TOKEN123")
    msg = storage._scrub(
        'failed: SECRETKEY TOKEN123 "http://h:1/b/k?X-Amz-Signature=abc&X-Amz-Credential=AK%2F1" Signature=zzz', cfg
    )
    assert "SECRETKEY" not in msg and "TOKEN123" not in msg and "abc" not in msg and "zzz" not in msg
    assert "http://h:1/b/k?***" in msg


def test_local_fallback_without_bucket(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = StorageConfig.from_env({"LINGBOT_OUTPUT_DIR": str(out)})
    video = make_file(tmp_path / "tmpdir" / "job.mp4", 3000)
    data = video.read_bytes()
    result = store_video(video, s3_uri=None, presign_expires_s=None, config=cfg)
    assert result == {"path": str((out / "job.mp4").resolve()), "url": None, "s3_uri": None, "upload_error": None,
                      "bytes": 3000, "sha256": sha(data)}
    # a second video with the same name never overwrites the first
    video2 = make_file(tmp_path / "tmpdir" / "job.mp4", 10)
    result2 = store_video(video2, s3_uri=None, presign_expires_s=None, config=cfg)
    assert Path(result2["path"]).name == "job-1.mp4" and (out / "job.mp4").read_bytes() == data
    # already in the output dir: stays where it is
    result3 = store_video(out / "job.mp4", s3_uri=None, presign_expires_s=None, config=cfg)
    assert result3["path"] == result["path"]
    with pytest.raises(ValueError):
        store_video(out / "job.mp4", s3_uri="http://nope", presign_expires_s=None, config=cfg)
    with pytest.raises(ValueError):
        store_video(out / "job.mp4", s3_uri=None, presign_expires_s=0, config=cfg)
    with pytest.raises(FileNotFoundError):
        store_video(out / "missing.mp4", s3_uri=None, presign_expires_s=None, config=cfg)
