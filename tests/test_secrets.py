"""No secret in logs or output: jobs with S3 credentials (good and bad), a presigned URL result, a signed webhook.

Everything is captured: every logger at DEBUG (worker, botocore, boto3, s3transfer, urllib3; caplog) and the
process's stdout/stderr file descriptors (capfd, which also sees subprocess-free C-level writes). None of these may
contain the S3 secret key, the session token, the access key id, the webhook HMAC key, or any part of the
presigned URL's query (X-Amz-Signature / X-Amz-Credential and their values). The presigned URL may appear in one
place only: the `url` field of the video result (and the callback body that carries that result to its owner).
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from jobs import small_request
from worker import webhook
from worker.service import JobRunner

HMAC_KEY = "whsec-" + "k3y" * 12
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLESESSIONTOKEN" + "t0k" * 10
LOGGERS = ("", "worker", "botocore", "boto3", "s3transfer", "urllib3", "handler", "modal_app")


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine


_req = small_request


class _Receiver:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                outer.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(503 if len(outer.bodies) == 1 else 200)  # one retry, then accepted
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_no_secret_in_logs_or_output(engine, s3_server, tmp_path, caplog, capfd):
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    bad_secret = "BAD" + s3_server.secret_key[3:][::-1]

    good = JobRunner.from_env(engine, engine.preset, s3_server.env(LINGBOT_OUTPUT_DIR=str(tmp_path / "a")))
    good_items = list(good.run(_req(), job_id="secrets-good"))
    video = good_items[-1]
    assert video["type"] == "video" and video["s3_uri"], video
    url = video["url"]
    query = parse_qs(urlsplit(url).query)
    presign_sig, presign_cred = query["X-Amz-Signature"][0], query["X-Amz-Credential"][0]

    bad = JobRunner.from_env(engine, engine.preset, s3_server.env(
        LINGBOT_OUTPUT_DIR=str(tmp_path / "b"), AWS_SECRET_ACCESS_KEY=bad_secret, AWS_SESSION_TOKEN=SESSION_TOKEN,
        LINGBOT_S3_MAX_ATTEMPTS="2"))
    bad_items = list(bad.run(_req(seed=6), job_id="secrets-bad"))
    assert bad_items[-1]["upload_error"] and bad_items[-1]["path"], bad_items[-1]

    receiver = _Receiver()
    try:
        delivery = webhook.post_signed(receiver.url, {"index": 0, "result": video}, HMAC_KEY, allow_private=True,
                                       backoff_s=0.01)
    finally:
        receiver.close()
    assert delivery.ok and delivery.attempts == 2
    assert json.loads(receiver.bodies[-1])["result"]["url"] == url  # the owner gets the URL, signed

    out, err = capfd.readouterr()
    records = caplog.records
    assert any(r.name.startswith("botocore") for r in records)  # DEBUG capture really saw the S3 traffic
    logged = "\n".join([caplog.text, *(r.getMessage() for r in records), *(r.exc_text or "" for r in records)])
    outside_url = json.dumps([{k: v for k, v in it.items() if k != "url"} for it in good_items + bad_items])
    places = {"logs": logged, "stdout": out, "stderr": err, "results (url field excluded)": outside_url,
              "delivery": repr(delivery)}
    secrets = {
        "S3 secret key": s3_server.secret_key, "wrong S3 secret key": bad_secret, "session token": SESSION_TOKEN,
        "access key id": s3_server.access_key, "webhook HMAC key": HMAC_KEY, "presigned signature": presign_sig,
        "presigned credential": presign_cred, "X-Amz-Signature": "X-Amz-Signature", "X-Amz-Credential":
        "X-Amz-Credential", "presigned URL": url,
    }
    found = [f"{what} in {where}" for where, text in places.items() for what, s in secrets.items() if s in text]
    assert not found, found
