"""Hostile input end to end: what a caller sees from JobRunner.run, and the callback URL's address rules.

tests/test_inputs.py checks the loaders themselves (URL tricks, redirects re-checked per hop, schemes, bombs,
truncation, huge base64, symlink traversal). Here the same attacks go through the public entry: each must come
back as ONE error item naming the field "image" (and the limit where there is one), before any model work, and
the worker must take the next job. Callback URLs (worker/webhook.py) get the same address policy: the cases
tests/test_modal.py does not cover (names and literal forms reaching loopback, IPv6, redirects) are here.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from worker import schema, webhook
from worker.config import PRESETS
from worker.service import JobRunner

PRESET = PRESETS["tiny"]


class NoModel:
    """A generator that must never be reached: hostile input is refused before the rollout."""

    calls = 0

    def rollout(self, job):
        NoModel.calls += 1
        raise AssertionError("the rollout ran for a refused request")
        yield  # pragma: no cover


def _png(w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((w, h)).save(buf, "PNG")
    return buf.getvalue()


def _bomb(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _req(image) -> dict:
    return {"prompt": "x", "image": image, "size": "64x48", "num_chunks": 1, "seed": 1}


@pytest.fixture
def runner(tmp_path):
    inside = tmp_path / "in"
    inside.mkdir()
    (tmp_path / "secret.png").write_bytes(_png())
    os.symlink(tmp_path / "secret.png", inside / "link.png")
    os.symlink(tmp_path, inside / "up")
    env = {"LINGBOT_OUTPUT_DIR": str(tmp_path / "out"), "LINGBOT_INPUT_DIR": str(inside),
           "LINGBOT_MAX_IMAGE_BYTES": "200000", "LINGBOT_MAX_IMAGE_PIXELS": "1000000"}
    return JobRunner.from_env(NoModel(), PRESET, env)


B64 = base64.b64encode
CASES = {
    "loopback name": ("https://localhost/a.png", "non-public address"),
    "IPv6 loopback": ("https://[::1]/a.png", "non-public address (::1)"),
    "IPv4-mapped IPv6 loopback": ("https://[::ffff:127.0.0.1]/a.png", "non-public address"),
    "decimal IP": ("https://2130706433/a.png", "non-public address (127.0.0.1)"),
    "hex IP": ("https://0x7f000001/a.png", "non-public address (127.0.0.1)"),
    "cloud metadata": ("https://169.254.169.254/latest/meta-data/", "non-public address (169.254.169.254)"),
    "private network": ("https://10.0.0.1/a.png", "non-public address (10.0.0.1)"),
    "plain http": ("http://example.com/a.png", "scheme 'http' is not allowed"),
    "file scheme": ("file:///etc/passwd", "unsupported scheme 'file'"),
    "gopher scheme": ("gopher://127.0.0.1:70/_x", "unsupported scheme 'gopher'"),
    "decompression bomb": ("data:image/png;base64," + B64(_bomb(30_000, 30_000)).decode(), "exceed 1000000 pixels"),
    "truncated image": (B64(_png()[:300]).decode(), "truncated"),
    "huge base64": ("A" * 400_000, "at most 200000 bytes"),
    "huge data URI": ("data:image/png;base64," + "A" * 400_000, "at most 200000 bytes"),
    "symlink out of the input dir": ("link.png", "outside the input directory"),
    "dir symlink traversal": ("up/secret.png", "outside the input directory"),
    "dot-dot traversal": ("../secret.png", "outside the input directory"),
    "absolute path": ("/etc/passwd", "outside the input directory"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_image_is_one_clear_error_naming_the_field(runner, case):
    image, fragment = CASES[case]
    NoModel.calls = 0
    items = list(runner.run(_req(image), job_id="hostile"))
    assert len(items) == 1, items
    err = items[0]
    assert set(err) == {"error", "field"} and err["field"] == "image", err
    assert err["error"].startswith("image: ") and fragment in err["error"], err
    assert NoModel.calls == 0


def test_the_limits_come_from_the_environment(runner):
    assert runner.limits.max_image_bytes == 200_000 and runner.limits.max_image_pixels == 1_000_000
    default = schema.Limits.for_preset(PRESET, {})
    assert default.max_image_bytes > 200_000 and default.max_image_pixels > 1_000_000


# --- callback URLs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://localhost/cb", "https://[::1]/cb", "https://[::ffff:127.0.0.1]/cb", "https://2130706433/cb",
    "https://0x7f.1/cb", "https://[fd00::1]/cb", "https://100.64.0.1/cb", "gopher://example.com/cb",
    "https://user:pass@127.0.0.1/cb",
])
def test_callback_urls_follow_the_address_policy(url):
    with pytest.raises(webhook.BatchError) as e:
        webhook.check_callback_url(url, allow_private=False)
    assert e.value.field == "callback_url" and "pass" not in str(e.value)


def test_callback_name_resolving_to_loopback_is_refused_at_every_attempt():
    # A name that resolves to a public address when the batch is accepted and to loopback later (DNS rebinding):
    # every attempt re-checks, and the policy refusal is final (nothing is sent).
    answers = iter([["93.184.215.14"], ["127.0.0.1"]])
    assert webhook.check_callback_url("https://hooks.example.test/cb", allow_private=False,
                                      resolver=lambda h, p: next(answers))
    d = webhook.post_signed("https://hooks.example.test/cb", {"x": 1}, "secret", resolver=lambda h, p: next(answers),
                            backoff_s=0.001)
    assert not d.ok and d.attempts == 1 and "non-public address (127.0.0.1)" in d.error


def test_callback_redirects_are_not_followed():
    hits = []

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    try:
        d = webhook.post_signed(f"http://127.0.0.1:{srv.server_address[1]}/cb", {"x": 1}, "secret",
                                allow_private=True, backoff_s=0.001)
    finally:
        srv.shutdown()
        srv.server_close()
    assert not d.ok and d.status == 302 and d.attempts == 1 and hits == ["/cb"]  # final, not followed
